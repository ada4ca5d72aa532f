//! The daemon manager: pid file, lock, log, and `start` / `stop` /
//! `status` / `restart`, with the reference's behaviour and wording where
//! users see it (README.md, "The `hermes-bus` command"). The `cmd_*`
//! functions print CLI output and return the process exit code
//! ([`EXIT_OK`], [`EXIT_FAILURE`], [`EXIT_USAGE`], [`EXIT_NOT_RUNNING`]).
//! The log file itself is [`crate::logging`]'s.
//!
//! Starting and stopping hold an exclusive `flock` on `<root>/run/busd.lock`,
//! so concurrent starts (people, scripts, autostarting clients) end with
//! exactly one bus and a pid file that names it. An explicit `stop` leaves
//! a marker beside the socket ([`stop_marker`]) that makes client autostart
//! refrain for [`AUTOSTART_HOLDOFF`]; an explicit `start` clears it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Paths;
use crate::transports::unix::client;
use crate::transports::unix::server::socket_is_live;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: the command failed.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad usage (unknown flag, bad value).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: no bus is running (LSB `status`'s "not running").
pub const EXIT_NOT_RUNNING: i32 = 3;

/// How long after an explicit `stop` client autostart refrains.
pub const AUTOSTART_HOLDOFF: Duration = Duration::from_secs(300);

/// How long `start` / `stop` wait for another one holding the lock.
const LOCK_WAIT: Duration = Duration::from_secs(20);

/// Writes one line of CLI output to stdout. A closed pipe (`| head -1`)
/// ends the process quietly with status 0, as Unix tools do; it never
/// panics.
pub fn out(args: fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    let r = o
        .write_fmt(args)
        .and_then(|_| o.write_all(b"\n"))
        .and_then(|_| o.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_OK);
        }
    }
}

macro_rules! say {
    () => { $crate::daemon::out(format_args!("")) };
    ($($t:tt)*) => { $crate::daemon::out(format_args!($($t)*)) };
}

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
        // EPERM: it exists, owned by someone else.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// Sends a signal; the OS error when it could not be sent.
fn send_signal(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when the process's command line names one of our binaries (a
/// pid file can outlive its process and name a recycled pid).
fn is_our_process(pid: i32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(argv0).contains("hermes-bus")
        }
        // No /proc: trust the pid file, as the reference does.
        Err(_) => true,
    }
}

/// The pid of the process that listens on `socket`, from the kernel's
/// peer credentials of a connection to it (`SO_PEERCRED`): whoever
/// started it, this is the bus that owns the socket.
pub fn socket_owner_pid(socket: &Path) -> Option<i32> {
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    // SAFETY: ucred is plain data; getsockopt writes at most `len` bytes.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// True when a bus answers `list_endpoints` on the socket.
pub fn bus_answers(socket: &Path) -> bool {
    query(async {
        tokio::time::timeout(Duration::from_millis(1500), client::list_endpoints(socket))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    })
    .unwrap_or(false)
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
    say!();
    say!("  Recent logs:");
    let tail = log_tail(&paths.log_file, n);
    if tail.is_empty() {
        say!("    (no logs)");
    }
    for l in tail {
        say!("    {l}");
    }
}

/// The running daemon's pid, if the pid file names a live process whose
/// socket answers.
pub fn running_pid(paths: &Paths) -> Option<i32> {
    let pid = read_pid(&paths.pid_file)?;
    (pid_alive(pid) && bus_answers(&paths.socket)).then_some(pid)
}

/// The explicit-stop marker of a socket: `<socket>.stopped`, beside it,
/// where every client that dials the socket can look.
pub fn stop_marker(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".stopped");
    PathBuf::from(s)
}

/// How long ago the bus on `socket` was stopped explicitly, while that is
/// within [`AUTOSTART_HOLDOFF`] (client autostart then refrains).
pub fn stopped_recently(socket: &Path) -> Option<Duration> {
    let meta = std::fs::metadata(stop_marker(socket)).ok()?;
    let age = SystemTime::now()
        .duration_since(meta.modified().ok()?)
        .unwrap_or_default();
    (age < AUTOSTART_HOLDOFF).then_some(age)
}

fn clear_stop_marker(socket: &Path) {
    let _ = std::fs::remove_file(stop_marker(socket));
}

fn leave_stop_marker(socket: &Path) {
    // Only where the socket's directory exists: a stop never creates one.
    if socket
        .parent()
        .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
    {
        let _ = std::fs::write(
            stop_marker(socket),
            format!(
                "stopped explicitly by pid {}; client autostart refrains for {} s; `hermes-busd start` clears this\n",
                std::process::id(),
                AUTOSTART_HOLDOFF.as_secs()
            ),
        );
    }
}

/// The exclusive lock that serialises `start` and `stop` on one root
/// (`<root>/run/busd.lock`); released when dropped (or at exit).
pub struct DaemonLock {
    /// The locked file; closing it releases the lock.
    _file: File,
}

/// Takes the daemon lock, waiting up to `wait` for whoever holds it.
pub fn lock(paths: &Paths, wait: Duration) -> Result<DaemonLock, String> {
    let path = paths.run_dir().join("busd.lock");
    std::fs::create_dir_all(paths.run_dir())
        .map_err(|e| format!("cannot create {}: {e}", paths.run_dir().display()))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(DaemonLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "another hermes-busd holds {} (still starting or stopping after {} s)",
                path.display(),
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How `start` was asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartMode {
    /// A client's autostart (`start --auto`): refrains after an explicit
    /// `stop` and leaves the stop marker in place.
    pub auto: bool,
}

impl StartMode {
    /// `start --auto`, or a `start` with stdin, stdout and stderr all on
    /// `/dev/null`: how the reference Python client autostarts the daemon.
    pub fn detect(auto_flag: bool) -> StartMode {
        StartMode {
            auto: auto_flag || all_stdio_devnull(),
        }
    }
}

fn all_stdio_devnull() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return false;
    };
    (0..3).all(|fd| {
        // SAFETY: fstat on a descriptor number; st is plain data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
        ok && st.st_rdev as u64 == null.rdev() && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
    })
}

/// `start`: starts `hermes-bus-server` detached under the daemon lock,
/// writes the pid file, waits up to 3 s for the socket to answer.
/// `server_args` are passed on. Concurrent starts: one starts the bus,
/// the others wait for the lock and report it as already running.
pub fn cmd_start(paths: &Paths, server_args: &[String], mode: StartMode) -> i32 {
    if mode.auto {
        if let Some(age) = stopped_recently(&paths.socket) {
            say!(
                "busd not started: the bus on {} was stopped explicitly {} s ago; autostart refrains for {} s (run `hermes-busd start` to start it)",
                paths.socket.display(),
                age.as_secs(),
                AUTOSTART_HOLDOFF.as_secs()
            );
            return EXIT_NOT_RUNNING;
        }
    }
    let _lock = match lock(paths, LOCK_WAIT) {
        Ok(l) => l,
        Err(e) => {
            say!("busd start failed: {e}");
            return EXIT_FAILURE;
        }
    };
    // Under the lock: a stop may have happened while we waited.
    if mode.auto && stopped_recently(&paths.socket).is_some() {
        say!(
            "busd not started: the bus on {} was stopped explicitly (run `hermes-busd start`)",
            paths.socket.display()
        );
        return EXIT_NOT_RUNNING;
    }
    if !mode.auto {
        clear_stop_marker(&paths.socket);
    }
    if let Some(pid) = running_pid(paths) {
        say!("busd already running (pid={pid})");
        return EXIT_OK;
    }
    if bus_answers(&paths.socket) {
        let owner = socket_owner_pid(&paths.socket)
            .map(|p| format!("pid {p}"))
            .unwrap_or_else(|| "unknown pid".into());
        say!(
            "a bus is already answering on {} ({owner}, not started with this root: {} names no live bus)",
            paths.socket.display(),
            paths.pid_file.display()
        );
        say!("  refusing to start a second bus over it; stop that one first (`hermes-busd --socket {} stop`)", paths.socket.display());
        return EXIT_FAILURE;
    }
    if let Some(pid) = read_pid(&paths.pid_file) {
        if pid_alive(pid) && is_our_process(pid) {
            // A live bus whose socket does not answer: hung.
            say!("pid={pid} is alive but its socket does not answer; stopping it first");
            let _ = stop_pid(pid);
        }
        let _ = std::fs::remove_file(&paths.pid_file);
    }
    let log = match OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log_file)
    {
        Ok(f) => f,
        Err(e) => {
            say!(
                "busd start failed: cannot open log {}: {e}",
                paths.log_file.display()
            );
            return EXIT_FAILURE;
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
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
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
            say!("busd start failed: cannot run {}: {e}", server.display());
            return EXIT_FAILURE;
        }
    };
    let pid = child.id() as i32;
    if let Err(e) = write_pid_file(&paths.pid_file, pid) {
        say!(
            "busd start failed: cannot write pid file {}: {e}",
            paths.pid_file.display()
        );
        let _ = child.kill();
        let _ = child.wait();
        return EXIT_FAILURE;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            say!("busd start failed — server exited ({status})");
            print_log_tail(paths, 20);
            let _ = std::fs::remove_file(&paths.pid_file);
            return EXIT_FAILURE;
        }
        if bus_answers(&paths.socket) {
            say!("busd started (pid={pid})");
            say!("  socket: {}", paths.socket.display());
            say!("  log:    {}", paths.log_file.display());
            return EXIT_OK;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    say!("busd start timed out — server not ready after 3 s");
    print_log_tail(paths, 20);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&paths.pid_file);
    EXIT_FAILURE
}

/// Writes the pid file atomically (a reader sees the old or the new one).
fn write_pid_file(path: &Path, pid: i32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("pid.{}", std::process::id()));
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Sends SIGTERM, waits up to ~4.5 s, then SIGKILL. Ok when it is gone.
fn stop_pid(pid: i32) -> Result<(), String> {
    if let Err(e) = send_signal(pid, libc::SIGTERM) {
        if !pid_alive(pid) {
            return Ok(());
        }
        return Err(format!("cannot signal pid {pid}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    say!("  process not responding to SIGTERM, sending SIGKILL...");
    let _ = send_signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("pid {pid} is still alive after SIGKILL"))
}

/// `stop`: stops the bus that owns the socket (found by its peer
/// credentials, whoever started it) and the one the pid file names;
/// SIGTERM, wait, SIGKILL. Leaves the stop marker so clients do not
/// autostart a new bus for a while. Exit 1 when a bus still answers.
pub fn cmd_stop(paths: &Paths) -> i32 {
    // Without a run directory nothing was started here; do not create one.
    let _lock = if paths.run_dir().is_dir() {
        match lock(paths, LOCK_WAIT) {
            Ok(l) => Some(l),
            Err(e) => {
                say!("busd stop failed: {e}");
                return EXIT_FAILURE;
            }
        }
    } else {
        None
    };
    leave_stop_marker(&paths.socket);
    let owner = socket_owner_pid(&paths.socket);
    let file_pid = read_pid(&paths.pid_file);
    let file_live = file_pid.filter(|p| pid_alive(*p) && is_our_process(*p));
    let mut targets: Vec<i32> = owner.into_iter().collect();
    if let Some(p) = file_live {
        if !targets.contains(&p) {
            targets.push(p);
        }
    }
    if targets.is_empty() {
        match file_pid {
            None => say!("busd not running (no PID file)"),
            Some(p) => say!("busd not running (pid={p} has exited); cleaning up"),
        }
        let _ = std::fs::remove_file(&paths.pid_file);
        if std::fs::symlink_metadata(&paths.socket).is_ok() && !socket_is_live(&paths.socket) {
            let _ = std::fs::remove_file(&paths.socket);
            say!("  removed stale socket {}", paths.socket.display());
        }
        return EXIT_OK;
    }
    if let (Some(o), Some(f)) = (owner, file_pid) {
        if o != f {
            say!(
                "the bus on {} is pid {o} (the pid file named {f})",
                paths.socket.display()
            );
        }
    } else if owner.is_some() && file_pid.is_none() {
        say!(
            "the bus on {} was not started with this root's pid file; stopping it anyway",
            paths.socket.display()
        );
    }
    let mut failed = Vec::new();
    for pid in targets {
        say!("Stopping busd (pid={pid})...");
        if let Err(e) = stop_pid(pid) {
            failed.push(e);
        }
    }
    if read_pid(&paths.pid_file).is_some_and(|p| !pid_alive(p)) {
        let _ = std::fs::remove_file(&paths.pid_file);
    }
    if !failed.is_empty() {
        for e in failed {
            say!("busd stop failed: {e}");
        }
        return EXIT_FAILURE;
    }
    if socket_is_live(&paths.socket) {
        let owner = socket_owner_pid(&paths.socket)
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        say!(
            "busd stop failed: a bus still answers on {}{owner}",
            paths.socket.display()
        );
        return EXIT_FAILURE;
    }
    if std::fs::symlink_metadata(&paths.socket).is_ok() {
        let _ = std::fs::remove_file(&paths.socket);
    }
    say!("busd stopped");
    EXIT_OK
}

/// `restart`: checks the new flags with the server's own parser first
/// (a typo keeps the old bus running), then stops and starts.
pub fn cmd_restart(paths: &Paths, server_args: &[String]) -> i32 {
    if let Err(e) = check_server_args(server_args) {
        say!("busd restart refused: the new server flags are invalid; the running bus was left alone");
        for l in e.lines() {
            say!("  {l}");
        }
        return EXIT_USAGE;
    }
    let code = cmd_stop(paths);
    if code != EXIT_OK {
        return code;
    }
    cmd_start(paths, server_args, StartMode::default())
}

/// Runs `hermes-bus-server --check-args ARGS`: Ok when the server would
/// accept them, else its error message.
pub fn check_server_args(server_args: &[String]) -> Result<(), String> {
    let server = sibling_exe("hermes-bus-server");
    let out = std::process::Command::new(&server)
        .arg("--check-args")
        .args(server_args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", server.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if msg.is_empty() {
        msg = format!("{} --check-args failed ({})", server.display(), out.status);
    }
    Err(msg)
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
        Err(_) => d.push(format!("socket file {} not found", paths.socket.display())),
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
    if let Some(age) = stopped_recently(&paths.socket) {
        d.push(format!(
            "stopped explicitly {} s ago (client autostart refrains for {} s; `hermes-busd start` starts it)",
            age.as_secs(),
            AUTOSTART_HOLDOFF.as_secs()
        ));
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

/// `status`: running (pid, socket, log, a table of endpoints, totals,
/// transports, hooks) or not running with a diagnosis; then the log tail.
/// With `json`, one JSON object instead (`running`, `pid`, `socket`,
/// `log`, `pid_file`, `stats`, `diagnosis`). Exit 0 when a bus answers, 3
/// when not (LSB).
pub fn cmd_status(paths: &Paths, json: bool) -> i32 {
    let file_pid = read_pid(&paths.pid_file);
    let stats = query(async {
        tokio::time::timeout(Duration::from_millis(3000), client::stats(&paths.socket)).await
    })
    .and_then(|r| r.ok())
    .and_then(|r| r.ok());
    let live = stats.is_some() || bus_answers(&paths.socket);
    let owner = if live {
        socket_owner_pid(&paths.socket)
    } else {
        None
    };
    let code = if live { EXIT_OK } else { EXIT_NOT_RUNNING };
    if json {
        let v = serde_json::json!({
            "running": live,
            "pid": owner.or(file_pid.filter(|p| live && pid_alive(*p))),
            "pid_file_pid": file_pid,
            "socket": paths.socket,
            "log": paths.log_file,
            "pid_file": paths.pid_file,
            "stats": stats,
            "diagnosis": if live { Vec::new() } else { diagnose(paths) },
        });
        say!("{v}");
        return code;
    }
    match (file_pid, live) {
        (Some(pid), true) if pid_alive(pid) => {
            say!("busd running (pid={pid})");
            say!("  socket: {} ✓", paths.socket.display());
            say!("  log:    {}", paths.log_file.display());
        }
        (_, true) => {
            say!(
                "busd not running (no live PID file), but a bus{} answers on {}",
                owner.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                paths.socket.display()
            );
        }
        (Some(pid), false) if pid_alive(pid) => {
            say!("pid={pid} exists but socket is unresponsive");
            say!("  socket: {}", paths.socket.display());
        }
        (Some(pid), false) => {
            say!("busd not running (pid={pid} — process has exited)");
        }
        (None, false) => {
            say!("busd not running (no PID file)");
        }
    }
    if live {
        match &stats {
            Some(s) => print_stats_tables(s),
            None => say!("  (the bus answers but not to `stats`: an older or foreign bus)"),
        }
    } else {
        say!();
        say!("  Disconnect diagnosis:");
        for line in diagnose(paths) {
            say!("    {line}");
        }
    }
    print_log_tail(paths, 10);
    code
}

/// Prints rows as aligned columns (the first row is the header).
pub fn print_table(indent: &str, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from(indent);
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        say!("{}", line.trim_end());
    }
}

fn num(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `key=value` for the scalar fields of an object (nested objects one
/// level down as `outer.key=value`).
fn scalars(v: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if let Some(o) = v.as_object() {
        for (k, x) in o {
            match x {
                serde_json::Value::Object(inner) => {
                    for (k2, y) in inner {
                        if !y.is_object() && !y.is_array() {
                            parts.push(format!("{k}.{k2}={}", num(y)));
                        }
                    }
                }
                serde_json::Value::Array(a) => parts.push(format!("{k}=[{}]", a.len())),
                x => parts.push(format!("{k}={}", num(x))),
            }
        }
    } else if !v.is_null() {
        parts.push(num(v));
    }
    parts.join(" ")
}

/// The human form of the bus's `stats` reply: endpoints, held names,
/// totals and flow, transports, hooks.
pub fn print_stats_tables(stats: &serde_json::Value) {
    let router = &stats["router"];
    say!(
        "  uptime: {:.0}s   sessions: {}   subscriptions: {} ({} bytes)",
        stats["uptime_s"].as_f64().unwrap_or(0.0),
        num(&router["sessions"]),
        num(&router["subscriptions"]),
        num(&router["subscription_bytes"]),
    );
    say!();
    let eps = router["endpoints"].as_array().cloned().unwrap_or_default();
    if eps.is_empty() {
        say!("  Endpoints: none connected");
    } else {
        say!("  Endpoints ({}):", eps.len());
        let mut rows = vec![[
            "NAME",
            "TRANSPORT",
            "QUEUED",
            "QUEUED_BYTES",
            "RECEIVED",
            "DELIVERED",
            "DROPPED",
            "ERRORS",
            "SUBS",
            "STATE",
            "SESSION",
        ]
        .map(String::from)
        .to_vec()];
        for e in &eps {
            let c = &e["counters"];
            rows.push(vec![
                num(&e["name"]),
                num(&e["transport"]),
                num(&e["queued"]),
                num(&e["queued_bytes"]),
                num(&c["received"]),
                num(&c["delivered"]),
                num(&c["dropped"]),
                num(&c["errors"]),
                num(&e["subscriptions"]),
                if e["stuck"] == true {
                    "STUCK".into()
                } else {
                    "ok".into()
                },
                num(&e["session_id"]),
            ]);
        }
        print_table("    ", &rows);
    }
    if let Some(held) = router["held"].as_array().filter(|h| !h.is_empty()) {
        say!();
        say!("  Held for reconnect ({}):", held.len());
        let mut rows = vec![["NAME", "QUEUED", "BYTES", "GONE_MS"]
            .map(String::from)
            .to_vec()];
        for h in held {
            rows.push(vec![
                num(&h["name"]),
                num(&h["queued"]),
                num(&h["bytes"]),
                num(&h["gone_ms"]),
            ]);
        }
        print_table("    ", &rows);
    }
    let t = &router["totals"];
    let f = &router["flow"];
    say!();
    say!(
        "  Totals: routed={} delivered={} dropped_slow={} dropped_held={} errors={} evicted={} replaced={} slow_disconnects={} connections={}",
        num(&t["routed"]), num(&t["delivered"]), num(&t["dropped_slow"]), num(&t["dropped_held"]), num(&t["errors"]), num(&t["evicted"]), num(&t["replaced"]), num(&t["slow_disconnects"]), num(&t["connections"])
    );
    say!(
        "  Flow: blocked_now={} blocked_total={} blocked_ms={} budget_used={} of {} bytes (outbox {} bytes / {} messages, slow-consumer timeout {} ms)",
        num(&f["blocked_now"]), num(&t["blocked"]), num(&t["blocked_ms"]), num(&f["budget_used"]), num(&f["budget_limit"]), num(&f["outbox_bytes"]), num(&f["outbox_capacity"]), num(&f["slow_consumer_timeout_ms"])
    );
    if let Some(tr) = stats["transports"].as_object().filter(|t| !t.is_empty()) {
        say!();
        say!("  Transports:");
        let mut rows = vec![vec!["NAME".to_owned(), "COUNTERS".to_owned()]];
        for (name, v) in tr {
            rows.push(vec![name.clone(), scalars(v)]);
        }
        print_table("    ", &rows);
    }
    let h = &stats["hooks"];
    if !h.is_null() {
        say!();
        say!("  Hooks: {}", scalars(h));
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
