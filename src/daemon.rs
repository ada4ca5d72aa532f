//! The daemon manager: pid file, log, and `start` / `stop` / `status` /
//! `restart`, with the reference's behaviour and wording where users see
//! it (README.md, "The `hermes-bus` command"). The `cmd_*` functions
//! print CLI output and return the process exit code. The log file itself
//! is [`crate::logging`]'s.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Paths;
use crate::transports::unix::client;
use crate::transports::unix::server::socket_is_live;

/// Reads the pid file.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// True when the process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => true,
    }
}

fn send_signal(pid: i32, sig: i32) -> bool {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, sig) == 0 }
}

/// True when a bus answers `list_endpoints` on the socket.
pub fn bus_answers(socket: &Path) -> bool {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return false,
    };
    rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(1500), client::list_endpoints(socket))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    })
}

fn query<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    Some(rt.block_on(f))
}

/// The last `n` lines of the log.
pub fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn print_log_tail(paths: &Paths, n: usize) {
    println!();
    println!("  Recent logs:");
    let tail = log_tail(&paths.log_file, n);
    if tail.is_empty() {
        println!("    (no logs)");
    }
    for l in tail {
        println!("    {l}");
    }
}

/// The running daemon's pid, if the pid file names a live process whose
/// socket answers.
pub fn running_pid(paths: &Paths) -> Option<i32> {
    let pid = read_pid(&paths.pid_file)?;
    (pid_alive(pid) && bus_answers(&paths.socket)).then_some(pid)
}

/// `start`: starts `hermes-bus-server` detached, writes the pid file,
/// waits up to 3 s for the socket to answer. `server_args` are passed on.
pub fn cmd_start(paths: &Paths, server_args: &[String]) -> i32 {
    if let Some(pid) = running_pid(paths) {
        println!("busd already running (pid={pid})");
        return 0;
    }
    if bus_answers(&paths.socket) {
        println!(
            "a bus is already answering on {} (not started by busd: no live pid file)",
            paths.socket.display()
        );
        println!("  refusing to start a second bus over it; stop that one first");
        return 1;
    }
    if let Some(pid) = read_pid(&paths.pid_file) {
        if pid_alive(pid) {
            // A live process whose socket does not answer: a hung bus.
            println!("pid={pid} is alive but its socket does not answer; stopping it first");
            stop_pid(pid);
        }
        let _ = std::fs::remove_file(&paths.pid_file);
    }
    if let Err(e) = std::fs::create_dir_all(paths.run_dir()) {
        println!("cannot create {}: {e}", paths.run_dir().display());
        return 1;
    }
    let log = match OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log_file)
    {
        Ok(f) => f,
        Err(e) => {
            println!("cannot open log {}: {e}", paths.log_file.display());
            return 1;
        }
    };
    let server = sibling_exe("hermes-bus-server");
    let mut cmd = std::process::Command::new(&server);
    cmd.arg("--root")
        .arg(&paths.root)
        .arg("--socket")
        .arg(&paths.socket)
        .arg("--log-file")
        .arg(&paths.log_file)
        .arg("--pid-file")
        .arg(&paths.pid_file)
        .args(server_args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    match log.try_clone() {
        Ok(l) => cmd.stderr(l),
        Err(_) => cmd.stderr(std::process::Stdio::null()),
    };
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe; it detaches the server from
        // our session so it outlives the terminal.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            println!("cannot start {}: {e}", server.display());
            return 1;
        }
    };
    let pid = child.id() as i32;
    if let Err(e) = std::fs::write(&paths.pid_file, format!("{pid}\n")) {
        println!("cannot write pid file {}: {e}", paths.pid_file.display());
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            println!("busd start failed — server exited ({status})");
            print_log_tail(paths, 20);
            let _ = std::fs::remove_file(&paths.pid_file);
            return 1;
        }
        if bus_answers(&paths.socket) {
            println!("busd started (pid={pid})");
            println!("  socket: {}", paths.socket.display());
            println!("  log:    {}", paths.log_file.display());
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("busd start timed out — server not ready");
    print_log_tail(paths, 20);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&paths.pid_file);
    1
}

/// Sends SIGTERM, waits up to ~4.5 s, then SIGKILL. True when it is gone.
fn stop_pid(pid: i32) -> bool {
    if !send_signal(pid, libc::SIGTERM) {
        return !pid_alive(pid);
    }
    let deadline = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("  process not responding to SIGTERM, sending SIGKILL...");
    send_signal(pid, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(100));
    !pid_alive(pid)
}

/// `stop`: SIGTERM, wait, SIGKILL; removes socket and pid file.
pub fn cmd_stop(paths: &Paths) -> i32 {
    let Some(pid) = read_pid(&paths.pid_file) else {
        println!("busd not running (no PID file)");
        if paths.socket.exists() {
            if socket_is_live(&paths.socket) {
                println!("  but socket is alive — a bus not started by busd is running there; left alone");
            } else {
                let _ = std::fs::remove_file(&paths.socket);
                println!("  removed stale socket {}", paths.socket.display());
            }
        }
        return 0;
    };
    if !pid_alive(pid) {
        println!("busd not running (pid={pid} has exited); cleaning up");
    } else {
        println!("Stopping busd (pid={pid})...");
        if !stop_pid(pid) {
            println!("  could not stop pid={pid}");
            return 1;
        }
    }
    let _ = std::fs::remove_file(&paths.pid_file);
    if paths.socket.exists() && !socket_is_live(&paths.socket) {
        let _ = std::fs::remove_file(&paths.socket);
    }
    println!("busd stopped");
    0
}

/// `restart`: stop, then start.
pub fn cmd_restart(paths: &Paths, server_args: &[String]) -> i32 {
    let _ = cmd_stop(paths);
    cmd_start(paths, server_args)
}

/// What `status` found wrong when the bus is not answering.
pub fn diagnose(paths: &Paths) -> Vec<String> {
    let mut d = Vec::new();
    match std::fs::symlink_metadata(&paths.socket) {
        Ok(_) if socket_is_live(&paths.socket) => {}
        Ok(_) => d.push(format!(
            "socket file {} exists but nobody answers (stale; `start` cleans it)",
            paths.socket.display()
        )),
        Err(_) => d.push("socket file not found".into()),
    }
    match std::fs::read_to_string(&paths.pid_file) {
        Ok(text) => match text.trim().parse::<i32>() {
            Ok(pid) if !pid_alive(pid) => d.push(format!(
                "PID file exists but process {pid} has exited — abnormal termination (crash/kill)"
            )),
            Ok(_) => {}
            Err(_) => d.push("PID file content invalid".into()),
        },
        Err(_) => d.push("No PID file — busd was not started via start command".into()),
    }
    let patterns = [
        ("panic", "the server panicked"),
        ("error", "errors were logged"),
        ("address already in use", "socket bind failed"),
        ("already listening", "another bus held the socket"),
        ("permission", "permission error"),
        ("too many open files", "file descriptor limit reached"),
        ("sigterm", "received SIGTERM"),
        ("killed", "process was killed"),
    ];
    let tail = log_tail(&paths.log_file, 50);
    for (kw, what) in patterns {
        let n = tail
            .iter()
            .filter(|l| l.to_lowercase().contains(kw))
            .count();
        if n > 0 {
            d.push(format!("Log contains '{kw}': {what} ({n} occurrences)"));
        }
    }
    d
}

/// `status`: running (pid, socket, log, endpoints, counters) or not
/// running with a diagnosis; then the log tail. Exit code 0 when running,
/// 3 when not (LSB).
pub fn cmd_status(paths: &Paths) -> i32 {
    let pid = read_pid(&paths.pid_file);
    let live = bus_answers(&paths.socket);
    let code = match (pid, live) {
        (Some(pid), true) if pid_alive(pid) => {
            println!("busd running (pid={pid})");
            println!("  socket: {} ✓", paths.socket.display());
            println!("  log:    {}", paths.log_file.display());
            print_live_details(paths);
            0
        }
        (_, true) => {
            println!("busd not running (no live PID file)");
            println!(
                "  but socket is alive — a bus started by another process answers on {}",
                paths.socket.display()
            );
            print_live_details(paths);
            0
        }
        (Some(pid), false) if pid_alive(pid) => {
            println!("pid={pid} exists but socket is unresponsive");
            println!("  socket: {}", paths.socket.display());
            print_diagnosis(paths);
            3
        }
        (Some(pid), false) => {
            println!("busd not running (pid={pid} — process has exited)");
            print_diagnosis(paths);
            3
        }
        (None, false) => {
            println!("busd not running (no PID file)");
            print_diagnosis(paths);
            3
        }
    };
    print_log_tail(paths, 10);
    code
}

fn print_diagnosis(paths: &Paths) {
    println!();
    println!("  Disconnect diagnosis:");
    for line in diagnose(paths) {
        println!("    {line}");
    }
}

fn print_live_details(paths: &Paths) {
    let Some(Ok(stats)) = query(client::stats(&paths.socket)) else {
        if let Some(Ok(eps)) = query(client::list_endpoints(&paths.socket)) {
            println!("  Connected endpoints ({}):", eps.len());
            for (name, sid) in eps {
                println!("    {name}  (sid={})", sid.as_str().unwrap_or(""));
            }
        }
        return;
    };
    let router = &stats["router"];
    let eps = router["endpoints"].as_array().cloned().unwrap_or_default();
    if eps.is_empty() {
        println!("  No connected endpoints");
    } else {
        println!("  Connected endpoints ({}):", eps.len());
        for e in &eps {
            let c = &e["counters"];
            println!(
                "    {}  (sid={})  received={} delivered={} dropped={} errors={} queued={} queued_bytes={}{}",
                e["name"].as_str().unwrap_or(""),
                e["session_id"].as_str().unwrap_or(""),
                c["received"],
                c["delivered"],
                c["dropped"],
                c["errors"],
                e["queued"],
                e["queued_bytes"],
                if e["stuck"] == true { "  STUCK (slow consumer)" } else { "" }
            );
        }
    }
    if let Some(held) = router["held"].as_array().filter(|h| !h.is_empty()) {
        println!("  Held for reconnect ({}):", held.len());
        for h in held {
            println!(
                "    {}  queued={} bytes={} gone_ms={}",
                h["name"].as_str().unwrap_or(""),
                h["queued"],
                h["bytes"],
                h["gone_ms"]
            );
        }
    }
    let t = &router["totals"];
    println!(
        "  Sessions: {}  uptime: {:.0}s",
        router["sessions"],
        stats["uptime_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  Totals: routed={} delivered={} dropped_slow={} dropped_held={} errors={} evicted={} replaced={} slow_disconnects={} connections={}",
        t["routed"], t["delivered"], t["dropped_slow"], t["dropped_held"], t["errors"], t["evicted"], t["replaced"], t["slow_disconnects"], t["connections"]
    );
    let f = &router["flow"];
    println!(
        "  Flow: blocked_now={} blocked_total={} blocked_ms={} budget_used={} of {} bytes (outbox {} bytes / {} messages, slow-consumer timeout {} ms)",
        f["blocked_now"], t["blocked"], t["blocked_ms"], f["budget_used"], f["budget_limit"], f["outbox_bytes"], f["outbox_capacity"], f["slow_consumer_timeout_ms"]
    );
    let h = &stats["hooks"];
    if h.is_object() {
        println!("  Hooks: {}", h);
    }
    if let Some(tr) = stats["transports"].as_object() {
        for (name, v) in tr {
            println!("  Transport {name}: {v}");
        }
    }
}

/// A binary next to the current executable (falls back to PATH).
pub fn sibling_exe(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}
