//! `hermes-busd start/status/stop/restart` as a user runs them, on a temp
//! root: start over a live bus (refused), over a stale socket (cleaned),
//! and a reference Python client reconnecting after a restart.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

const LIMIT: Duration = Duration::from_secs(120);

struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        Root {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn socket(&self) -> PathBuf {
        self.path().join("hermes-bus.sock")
    }
    fn pid_file(&self) -> PathBuf {
        self.path().join("run/busd.pid")
    }
    fn cmd(&self, bin: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(common::bin_dir().join(bin));
        c.env("HERMES_BUS_ROOT", self.path())
            .env("HERMES_HOME", self.path().join("home"))
            .env_remove("HERMES_BUS_HOOKS")
            .env("PATH", common::path_with_bins())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }
    async fn run(&self, bin: &str, args: &[&str]) -> (i32, String) {
        let out: Output =
            tokio::time::timeout(Duration::from_secs(30), self.cmd(bin).args(args).output())
                .await
                .expect("command finished in time")
                .expect("command runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
    async fn busd(&self, args: &[&str]) -> (i32, String) {
        self.run("hermes-busd", args).await
    }
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
    async fn status_json(&self) -> serde_json::Value {
        let out = self
            .cmd("hermes-busd")
            .args(["status", "--json"])
            .output()
            .await
            .expect("status runs");
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

impl Drop for Root {
    fn drop(&mut self) {
        // Never leave a daemon behind, whatever the test did.
        if let Ok(text) = std::fs::read_to_string(self.pid_file()) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                // SAFETY: plain kill(2) of the daemon this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[tokio::test]
async fn start_status_stop_as_a_user_would() {
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("busd not running"), "{out}");
        assert!(out.contains("No PID file"), "{out}");

        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("busd started (pid="), "{out}");
        assert!(out.contains(&root.socket().display().to_string()), "{out}");
        let mode = std::fs::metadata(root.socket())
            .expect("socket")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let pid: i32 = std::fs::read_to_string(root.pid_file())
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");

        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!("busd already running (pid={pid})")),
            "{out}"
        );

        // An endpoint shows up in status with its session id and counters.
        let mut lst = root.cmd("hermes-bus");
        lst.args(["listen", "watcher"]).stdout(Stdio::piped());
        let mut listener = lst.spawn().expect("listen");
        let found = common::wait_for(Duration::from_secs(10), || {
            std::process::Command::new(common::bin_dir().join("hermes-bus"))
                .env("HERMES_BUS_ROOT", root.path())
                .arg("endpoints")
                .output()
                .ok()
                .filter(|o| String::from_utf8_lossy(&o.stdout).contains("watcher"))
        })
        .await;
        assert!(found.is_some(), "listener never registered");
        let (code, out) = root
            .run("hermes-bus", &["send", "watcher", r#"{"hello": 1}"#])
            .await;
        assert_eq!(code, 0, "{out}");
        let mut lines = BufReader::new(listener.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("in time")
            .expect("read")
            .expect("a line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(v["body"]["hello"], 1);

        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("busd running (pid={pid})")), "{out}");
        assert!(out.contains("Endpoints (1):"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with("watcher ") && l.contains("unix")),
            "{out}"
        );
        assert!(out.contains("Totals: routed=1"), "{out}");
        assert!(out.contains("Recent logs:"), "{out}");
        let _ = listener.kill().await;

        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("Stopping busd (pid={pid})")), "{out}");
        assert!(out.contains("busd stopped"), "{out}");
        assert!(!root.socket().exists(), "socket removed at exit");
        assert!(!root.pid_file().exists(), "pid file removed");

        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("busd not running (no PID file)"), "{out}");

        // The log was written under run/, without colour codes.
        let log = std::fs::read_to_string(root.path().join("run/busd.log")).expect("log");
        assert!(log.contains("bus running"), "{log}");
        assert!(log.contains("SIGTERM"), "{log}");
        assert!(!log.contains('\x1b'), "no ANSI codes in the log: {log}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn refuses_a_live_bus_and_cleans_a_stale_socket() {
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        // A stale socket file: bound once, nobody listening now.
        std::fs::create_dir_all(root.path()).expect("dir");
        drop(std::os::unix::net::UnixListener::bind(root.socket()).expect("bind"));
        assert!(root.socket().exists());
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 3);
        assert!(out.contains("stale"), "{out}");
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("busd started"), "{out}");

        // A second server on the same socket path is refused, clearly, and
        // the live bus keeps serving.
        let other = tempfile::tempdir().expect("tempdir");
        let sock = root.socket().display().to_string();
        let (code, out) = root
            .run(
                "hermes-bus-server",
                &[
                    "--root",
                    &other.path().display().to_string(),
                    "--socket",
                    &sock,
                ],
            )
            .await;
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("already listening"), "{out}");
        // busd with another root but the same socket refuses too.
        let (code, out) = root
            .run(
                "hermes-busd",
                &[
                    "--root",
                    &other.path().display().to_string(),
                    "--socket",
                    &sock,
                    "start",
                ],
            )
            .await;
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("refusing"), "{out}");
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 0, "{out}");

        // A pid file naming a dead process is diagnosed.
        let (code, _) = root.busd(&["stop"]).await;
        assert_eq!(code, 0);
        std::fs::write(root.pid_file(), "999999\n").expect("write");
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 3);
        assert!(out.contains("has exited"), "{out}");
        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(!root.pid_file().exists());
    })
    .await
    .expect("test timed out");
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(40), lines.next_line())
        .await
        .expect("python line in time")
        .expect("read")
        .expect("python still running")
}

#[tokio::test]
async fn python_client_reconnects_after_restart() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        let mut child = tokio::process::Command::new(&py)
            .arg(common::repo_root().join("tests/py/unix_listener.py"))
            .env("HERMES_BUS_ROOT", root.path())
            .env("NAME", "py-svc")
            .env("RUN_SECONDS", "90")
            .env("PATH", common::path_with_bins())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = next_line(&mut lines).await;
        assert!(first.starts_with("session "), "{first}");
        let first_sid = first["session ".len()..].to_owned();

        let (code, out) = root.busd(&["restart"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("busd stopped") && out.contains("busd started"),
            "{out}"
        );

        // The client notices, reconnects and registers again: a new session id.
        loop {
            let l = next_line(&mut lines).await;
            if let Some(sid) = l.strip_prefix("session ") {
                if sid != first_sid && sid != "None" {
                    break;
                }
            }
        }
        // And it is reachable by name on the new bus.
        let mut delivered = false;
        for _ in 0..50 {
            let (code, _) = root
                .run("hermes-bus", &["send", "py-svc", r#"{"after": "restart"}"#])
                .await;
            if code == 0 {
                delivered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(delivered, "py-svc never registered on the restarted bus");
        loop {
            let l = next_line(&mut lines).await;
            if l.starts_with("msg ") {
                assert!(l.contains(r#""after": "restart""#), "{l}");
                break;
            }
        }
        let _ = child.kill().await;
        let (code, _) = root.busd(&["stop"]).await;
        assert_eq!(code, 0);
    })
    .await
    .expect("test timed out");
}

/// The reference client starts `hermes-busd start` from PATH when no bus
/// answers: with our binaries first on PATH, it starts ours and works.
#[tokio::test]
async fn python_client_autostarts_our_daemon() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let script = r#"
from hermes_bus.client import BusClient, send_message
c = BusClient("starter")
print("connected", c.connect())
print("sent", send_message("starter", {"k": 1}))
import time
end = time.time() + 10
got = []
while time.time() < end and not got:
    got = c.poll()
    time.sleep(0.05)
print("got", got[0]["body"]["k"] if got else None)
c.disconnect()
"#;
        let root_s = root.path().display().to_string();
        let home = root.path().join("home").display().to_string();
        let out = common::run_python(
            &py,
            script,
            &[("HERMES_BUS_ROOT", &root_s), ("HERMES_HOME", &home)],
            Duration::from_secs(60),
        )
        .await;
        assert!(out.contains("connected True"), "{out}");
        assert!(out.contains("sent True"), "{out}");
        assert!(out.contains("got 1"), "{out}");
        // It is our daemon, managed by our busd: status and stop work.
        let (code, status) = root.busd(&["status"]).await;
        assert_eq!(code, 0, "{status}");
        assert!(status.contains("busd running"), "{status}");
        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(!root.socket().exists());
    })
    .await
    .expect("test timed out");
}

/// Five concurrent `start`s: exactly one bus; the others say it is
/// already running and exit 0; the pid file names the live bus (the one
/// that owns the socket); `stop` stops it.
#[tokio::test]
async fn concurrent_starts_make_one_bus_and_stop_stops_it() {
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let s = ["start"];
        let (a, b, c, d, e) = tokio::join!(
            root.busd(&s),
            root.busd(&s),
            root.busd(&s),
            root.busd(&s),
            root.busd(&s)
        );
        let results = [a, b, c, d, e];
        let started: Vec<&String> = results
            .iter()
            .filter(|(_, o)| o.contains("busd started (pid="))
            .map(|(_, o)| o)
            .collect();
        for (code, out) in &results {
            assert_eq!(*code, 0, "{out}");
        }
        assert_eq!(started.len(), 1, "exactly one start: {results:?}");
        let pid = root.pid().expect("pid file");
        assert!(alive(pid));
        assert!(started[0].contains(&format!("pid={pid}")), "{results:?}");
        for (_, out) in results.iter().filter(|(_, o)| !o.contains("busd started")) {
            assert!(
                out.contains(&format!("already running (pid={pid})")),
                "{out}"
            );
        }
        let st = root.status_json().await;
        assert_eq!(st["running"], true, "{st}");
        assert_eq!(st["pid"], pid, "the socket's owner is the pid file's: {st}");
        assert_eq!(st["stats"]["pid"], pid, "{st}");

        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("busd stopped"), "{out}");
        let gone = common::wait_for(Duration::from_secs(10), || (!alive(pid)).then_some(())).await;
        assert!(gone.is_some(), "bus {pid} still alive after stop");
        assert!(!root.socket().exists());
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 3, "{out}");
    })
    .await
    .expect("test timed out");
}

/// `stop` with connected clients that autostart: they notice, try to
/// reconnect, and do not start a bus again; `start` brings it back and
/// they reconnect.
#[tokio::test]
async fn stop_with_autostarting_clients_stays_stopped() {
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        let mut listeners = Vec::new();
        for i in 0..3 {
            let mut c = root.cmd("hermes-bus");
            c.args(["listen", &format!("client{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = c.spawn().expect("listen");
            let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
            let l = tokio::time::timeout(Duration::from_secs(20), err.next_line())
                .await
                .expect("in time")
                .expect("read")
                .expect("a line");
            assert!(l.contains("listening as"), "{l}");
            listeners.push((child, err));
        }
        let pid = root.pid().expect("pid");
        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("busd stopped"), "{out}");
        // Each client says it lost the bus, then keeps trying (1 s, 1.5 s,
        // 2.25 s... apart) without starting one.
        for (_, err) in listeners.iter_mut() {
            let l = tokio::time::timeout(Duration::from_secs(20), err.next_line())
                .await
                .expect("in time")
                .expect("read")
                .expect("a line");
            assert!(l.contains("lost the bus"), "{l}");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!alive(pid));
        assert!(
            std::os::unix::net::UnixStream::connect(root.socket()).is_err(),
            "a client started a bus again after an explicit stop"
        );
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("stopped explicitly"), "{out}");
        // A client command says why it does not start one.
        let (code, out) = root.run("hermes-bus", &["send", "client0", "{}"]).await;
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("stopped explicitly"), "{out}");
        assert!(out.contains(&root.socket().display().to_string()), "{out}");

        // An explicit start lifts it; the clients come back by themselves.
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        for (_, err) in listeners.iter_mut() {
            loop {
                let l = tokio::time::timeout(Duration::from_secs(40), err.next_line())
                    .await
                    .expect("in time")
                    .expect("read")
                    .expect("a line");
                if l.contains("reconnected as") {
                    break;
                }
            }
        }
        for (mut c, _) in listeners {
            let _ = c.kill().await;
        }
        let (code, _) = root.busd(&["stop"]).await;
        assert_eq!(code, 0);
    })
    .await
    .expect("test timed out");
}

/// `restart` with a flag the server refuses leaves the running bus alone.
#[tokio::test]
async fn restart_with_a_bad_flag_keeps_the_old_bus() {
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        let pid = root.pid().expect("pid");
        let (code, out) = root.busd(&["restart", "--", "--no-such-flag"]).await;
        assert_eq!(code, 2, "{out}");
        assert!(out.contains("left alone"), "{out}");
        assert!(out.contains("--no-such-flag"), "{out}");
        let (code, out) = root
            .busd(&["restart", "--", "--hold-grace-ms", "soon"])
            .await;
        assert_eq!(code, 2, "{out}");
        assert!(alive(pid));
        assert_eq!(root.pid(), Some(pid));
        let (code, out) = root.busd(&["status"]).await;
        assert_eq!(code, 0, "{out}");
        // Good flags restart it.
        let (code, out) = root
            .busd(&["restart", "--", "--hold-grace-ms", "100"])
            .await;
        assert_eq!(code, 0, "{out}");
        let new = root.pid().expect("pid");
        assert_ne!(new, pid);
        assert!(!alive(pid));
        let (code, _) = root.busd(&["stop"]).await;
        assert_eq!(code, 0);
    })
    .await
    .expect("test timed out");
}

/// `stop` stops the bus that owns the socket even when busd did not start
/// it (a foreground server here), and says so.
#[tokio::test]
async fn stop_stops_a_bus_it_did_not_start() {
    tokio::time::timeout(LIMIT, async {
        let root = Root::new();
        let other = tempfile::tempdir().expect("tempdir");
        let mut server = root
            .cmd("hermes-bus-server")
            .arg("--root")
            .arg(other.path())
            .arg("--socket")
            .arg(root.socket())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("server");
        let up = common::wait_for(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(root.socket()).ok()
        })
        .await;
        assert!(up.is_some());
        let (code, out) = root.busd(&["stop"]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("not started with this root"), "{out}");
        assert!(out.contains("busd stopped"), "{out}");
        let status = tokio::time::timeout(Duration::from_secs(20), server.wait())
            .await
            .expect("server exits")
            .expect("wait");
        assert!(status.success(), "{status}");
    })
    .await
    .expect("test timed out");
}
