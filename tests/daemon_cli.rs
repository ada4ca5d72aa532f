//! `hermes-busd start/status/stop/restart` as a user runs them, on a temp
//! root: start over a live bus (refused), over a stale socket (cleaned),
//! and a reference Python client reconnecting after a restart.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::{alive, lines_of, next_line, PyPeer, TempRoot};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn start_status_stop_as_a_user_would() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
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
        let found = common::eventually(Duration::from_secs(10), || {
            std::process::Command::new(common::bin("hermes-bus"))
                .env("HERMES_BUS_ROOT", root.path())
                .arg("endpoints")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("watcher"))
        })
        .await;
        assert!(found, "listener never registered");
        let (code, out) = root
            .run_text("hermes-bus", &["send", "watcher", r#"{"hello": 1}"#])
            .await;
        assert_eq!(code, 0, "{out}");
        let mut lines = lines_of(listener.stdout.take().expect("stdout"));
        let line = next_line(&mut lines, Duration::from_secs(10)).await;
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
        let root = TempRoot::new();
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
            .run_text(
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
            .run_text(
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

/// The Python client's next line (it prints while it runs).
async fn py_line(peer: &mut PyPeer) -> String {
    peer.line(Duration::from_secs(40)).await
}

#[tokio::test]
async fn python_client_reconnects_after_restart() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        let root_s = root.path().display().to_string();
        let env = [
            ("HERMES_BUS_ROOT", root_s.as_str()),
            ("NAME", "py-svc"),
            ("RUN_SECONDS", "90"),
        ];
        let mut peer = PyPeer::spawn(&py, "unix_listener.py", &[], &env);
        let first = py_line(&mut peer).await;
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
            let l = py_line(&mut peer).await;
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
                .run_text("hermes-bus", &["send", "py-svc", r#"{"after": "restart"}"#])
                .await;
            if code == 0 {
                delivered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(delivered, "py-svc never registered on the restarted bus");
        loop {
            let l = py_line(&mut peer).await;
            if l.starts_with("msg ") {
                assert!(l.contains(r#""after": "restart""#), "{l}");
                break;
            }
        }
        let _ = peer.child.kill().await;
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
        let root = TempRoot::new();
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
        let root = TempRoot::new();
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
        let gone = common::eventually(Duration::from_secs(10), || !alive(pid)).await;
        assert!(gone, "bus {pid} still alive after stop");
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
        let root = TempRoot::new();
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        let mut listeners = Vec::new();
        for i in 0..3 {
            let mut c = root.cmd("hermes-bus");
            c.args(["listen", &format!("client{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = c.spawn().expect("listen");
            let mut err = lines_of(child.stderr.take().expect("stderr"));
            let l = next_line(&mut err, Duration::from_secs(20)).await;
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
            let l = next_line(err, Duration::from_secs(20)).await;
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
        let (code, out) = root
            .run_text("hermes-bus", &["send", "client0", "{}"])
            .await;
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("stopped explicitly"), "{out}");
        assert!(out.contains(&root.socket().display().to_string()), "{out}");

        // An explicit start lifts it; the clients come back by themselves.
        let (code, out) = root.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
        for (_, err) in listeners.iter_mut() {
            loop {
                let l = next_line(err, Duration::from_secs(40)).await;
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
        let root = TempRoot::new();
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
        let root = TempRoot::new();
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
        assert!(common::listening(&root.socket(), Duration::from_secs(20)).await);
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
