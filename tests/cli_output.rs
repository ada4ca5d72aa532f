//! The command line as people and scripts use it, with the real binaries
//! on a temp root: `--json` outputs parse, a closed pipe is not a panic,
//! `request` gets its reply or times out cleanly, `pub` / `sub` against
//! nothing fail clearly, autostart is announced and can be turned off,
//! completions and the man page generate.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{client_recv, free_tcp_addr, lines_of, next_line, TempRoot};
use hermes_bus::transports::unix::{BusClient, ClientConfig};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

fn parse(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

/// A client of the bus in this process (no autostart).
async fn client(root: &TempRoot, name: &str) -> BusClient {
    let mut cfg = ClientConfig::new(root.socket());
    cfg.autostart = false;
    BusClient::connect_with(name, cfg).await.expect("connect")
}

#[tokio::test]
async fn json_outputs_parse() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        root.start().await;
        let mut svc = client(&root, "svc").await;

        let (code, out, err) = root.run("hermes-busd", &["status", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        let st = parse(&out);
        assert_eq!(st["running"], true);
        assert!(st["stats"]["router"]["endpoints"].is_array(), "{st}");

        let (code, out, err) = root.bus(&["daemon", "status", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(parse(&out)["running"], true);

        let (code, out, err) = root.bus(&["endpoints", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(parse(&out)["svc"].is_string(), "{out}");

        let (code, out, err) = root.bus(&["stats", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(parse(&out)["router"]["totals"].is_object(), "{out}");

        let (code, out, err) = root.bus(&["send", "--json", "svc", r#"{"n": 1}"#]).await;
        assert_eq!(code, 0, "{err}");
        let sent = parse(&out);
        let id = sent["id"].as_str().expect("id").to_owned();
        assert_eq!(sent["to"], "svc");
        let m = client_recv(&mut svc, Duration::from_secs(10)).await;
        assert_eq!(m["id"], id.as_str(), "the printed id is the message's");

        // Human forms: a sentence with the id, tables with headers.
        let (code, out, _) = root.bus(&["send", "svc", r#"{"n": 2}"#]).await;
        assert_eq!(code, 0);
        assert!(out.starts_with("sent ") && out.contains("to svc"), "{out}");
        let (code, out, _) = root.bus(&["endpoints"]).await;
        assert_eq!(code, 0);
        assert!(out.starts_with("NAME") && out.contains("svc"), "{out}");
        let (code, out, _) = root.bus(&["stats"]).await;
        assert_eq!(code, 0);
        assert!(
            out.contains("Endpoints (1):") && out.contains("Totals:"),
            "{out}"
        );

        // listen --json: one JSON message per line.
        let mut l = root.cmd("hermes-bus");
        l.args(["listen", "--json", "--count", "1", "lst"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = l.spawn().expect("listen");
        let mut err = lines_of(child.stderr.take().expect("stderr"));
        let first = next_line(&mut err, Duration::from_secs(20)).await;
        assert!(first.contains("listening as lst"), "{first}");
        svc.send("lst", json!({"k": "v"})).await.expect("send");
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .expect("in time")
            .expect("listen output");
        assert!(out.status.success());
        let m = parse(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(m["body"]["k"], "v");
        assert_eq!(m["from"], "svc");
        svc.close().await;
    })
    .await
    .expect("test timed out");
}

/// A reader that goes away (`| head -1`) ends the command quietly with 0.
#[tokio::test]
async fn a_closed_pipe_is_not_a_panic() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        root.start().await;
        let _a = client(&root, "a").await;
        let _b = client(&root, "b").await;
        for (bin, args) in [
            ("hermes-busd", vec!["status"]),
            ("hermes-bus", vec!["daemon", "status"]),
            ("hermes-bus", vec!["endpoints"]),
            ("hermes-bus", vec!["stats"]),
            ("hermes-bus", vec!["stats", "--json"]),
            ("hermes-bus", vec!["completions", "bash"]),
        ] {
            // The read end is closed before the command writes.
            let mut c = root.cmd(bin);
            c.args(&args).stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = c.spawn().expect("spawn");
            drop(child.stdout.take());
            let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
                .await
                .expect("in time")
                .expect("wait");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{bin} {args:?}: {err}");
            assert!(!err.contains("panicked"), "{bin} {args:?}: {err}");
        }
        // As a shell runs it.
        let busd = common::bin("hermes-busd");
        let out = tokio::process::Command::new("bash")
            .env("HERMES_BUS_ROOT", root.path())
            .args([
                "-o",
                "pipefail",
                "-c",
                &format!("'{}' status | head -1", busd.display()),
            ])
            .output()
            .await
            .expect("bash");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("busd running"));
    })
    .await
    .expect("test timed out");
}

/// A service that answers each request to its sender.
async fn echo_service(root: &TempRoot, name: &str) -> tokio::task::JoinHandle<()> {
    let mut c = client(root, name).await;
    tokio::spawn(async move {
        while let Some(m) = c.recv().await {
            if let Some(from) = m["from"].as_str() {
                let _ = c.send(from, json!({"echo": m["body"]})).await;
            }
        }
    })
}

#[tokio::test]
async fn request_gets_its_reply_and_times_out_cleanly() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        root.start().await;
        let echo = echo_service(&root, "echo").await;
        let (code, out, err) = root
            .bus(&["request", "echo", r#"{"q": 1}"#, "--timeout", "10"])
            .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(parse(&out), json!({"echo": {"q": 1}}));
        let (code, out, err) = root
            .bus(&[
                "request",
                "--json",
                "echo",
                r#"{"q": 2}"#,
                "--timeout",
                "10",
            ])
            .await;
        assert_eq!(code, 0, "{err}");
        let m = parse(&out);
        assert_eq!(m["from"], "echo");
        assert_eq!(m["body"]["echo"]["q"], 2);

        // A registered name that never answers: a clean timeout.
        let _mute = client(&root, "mute").await;
        let (code, out, err) = root
            .bus(&["request", "mute", "{}", "--timeout", "0.5"])
            .await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("no reply from mute within 0.5 s"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        // Nobody by that name: the bus says so.
        let (code, _, err) = root
            .bus(&["request", "nobody", "{}", "--timeout", "5"])
            .await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("nobody"), "{err}");
        // Bad JSON is a usage error.
        let (code, _, err) = root
            .bus(&["request", "echo", "{bad", "--timeout", "1"])
            .await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("not valid JSON"), "{err}");
        echo.abort();
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn not_running_errors_name_the_socket_once_and_exit_3() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        let sock = root.socket().display().to_string();
        for args in [vec!["endpoints"], vec!["stats", "--json"]] {
            let (code, out, err) = root.bus(&args).await;
            assert_eq!(code, 3, "{args:?}: {out}{err}");
            assert!(err.contains(&sock), "{err}");
            assert!(err.contains("hermes-busd start"), "{err}");
            assert_eq!(err.matches("os error").count(), 1, "each cause once: {err}");
        }
        // Autostart off: by flag and by environment.
        let (code, _, err) = root.bus(&["--no-autostart", "send", "x", "{}"]).await;
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("autostart is off") && err.contains(&sock),
            "{err}"
        );
        let out = root
            .cmd("hermes-bus")
            .env("HERMES_BUS_AUTOSTART", "0")
            .args(["send", "x", "{}"])
            .output()
            .await
            .expect("runs");
        assert_eq!(out.status.code(), Some(3));
        assert!(!root.socket().exists(), "nothing started");

        // A socket named in a directory that does not exist: no autostart,
        // and the directory is not created.
        let missing = root.path().join("no/such/dir/bus.sock");
        let (code, _, err) = root
            .bus(&[
                "--socket",
                &missing.display().to_string(),
                "send",
                "x",
                "{}",
            ])
            .await;
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(!root.path().join("no").exists(), "directory created");

        // Autostart is announced on stderr.
        let (code, out, err) = root.bus(&["send", "", r#"{"hello": 1}"#]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(err.contains("starting one"), "{err}");
        assert!(out.starts_with("broadcast "), "{out}");
        let (code, _, err) = root.bus(&["endpoints"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("no endpoints registered"), "{err}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn listen_exits_when_replaced() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        root.start().await;
        let mut l = root.cmd("hermes-bus");
        l.args(["listen", "dup"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = l.spawn().expect("listen");
        let mut err = lines_of(child.stderr.take().expect("stderr"));
        let first = next_line(&mut err, Duration::from_secs(20)).await;
        assert!(first.contains("listening as dup"), "{first}");
        let _taker = client(&root, "dup").await;
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("listen exits")
            .expect("wait");
        assert_eq!(status.code(), Some(1));
        let mut rest = String::new();
        while let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_secs(5), err.next_line()).await
        {
            rest.push_str(&l);
            rest.push('\n');
        }
        assert!(rest.contains("replaced"), "{rest}");
        let mut out = String::new();
        use tokio::io::AsyncReadExt;
        let _ = child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .await;
        assert!(
            out.is_empty(),
            "the error is not printed as a message: {out}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn pub_and_sub_against_nothing_fail_clearly() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        let dead = free_tcp_addr();
        let (code, out, err) = root
            .bus(&["pub", "--zmq-in", &dead, "--wait-ms", "500", "T/x", "{}"])
            .await;
        assert_eq!(code, 3, "{out}{err}");
        assert!(
            err.contains(&dead) && err.contains("nothing was published"),
            "{err}"
        );
        // The old spelling is an alias.
        let (code, _, err) = root
            .bus(&["pub", "--addr", &dead, "--wait-ms", "200", "T/x", "1"])
            .await;
        assert_eq!(code, 3, "{err}");
        let (code, _, err) = root.bus(&["pub", "--zmq-in", &dead, "T/x", "{bad"]).await;
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("not valid JSON") && err.contains("--raw"),
            "{err}"
        );
        let (code, _, err) = root
            .bus(&["sub", "--zmq-out", &dead, "--timeout-s", "3"])
            .await;
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("no ZeroMQ proxy") && err.contains(&dead),
            "{err}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn pub_and_sub_json_through_a_proxy() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        let mut proxy = root.cmd("hermes-bus");
        proxy
            .args([
                "proxy",
                "--zmq-in",
                "tcp://127.0.0.1:0",
                "--zmq-out",
                "tcp://127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proxy = proxy.spawn().expect("proxy");
        let mut lines = lines_of(proxy.stdout.take().expect("stdout"));
        let ep = parse(&next_line(&mut lines, Duration::from_secs(20)).await);
        let front = ep["frontend"].as_str().expect("frontend").to_owned();
        let back = ep["backend"].as_str().expect("backend").to_owned();

        // Nobody subscribed: published, with a warning.
        let (code, out, err) = root
            .bus(&[
                "pub",
                "--json",
                "--zmq-in",
                &front,
                "--wait-ms",
                "300",
                "T/a",
                "1",
            ])
            .await;
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("no subscriber"), "{err}");
        assert_eq!(parse(&out)["filtered"], 1, "{out}");

        let mut sub = root.cmd("hermes-bus");
        sub.args(["sub", "--json", "--zmq-out", &back, "--count", "1", "T/"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let sub = sub.spawn().expect("sub");
        let mut got = None;
        for _ in 0..20 {
            let (code, out, err) = root
                .bus(&["pub", "--zmq-in", &front, "--raw", "T/b", "plain text"])
                .await;
            assert_eq!(code, 0, "{err}");
            if out.starts_with("published 1 of 1") {
                got = Some(out);
                break;
            }
        }
        assert!(got.is_some(), "the subscriber never showed up");
        let out = tokio::time::timeout(Duration::from_secs(20), sub.wait_with_output())
            .await
            .expect("in time")
            .expect("sub output");
        assert!(out.status.success());
        let env = parse(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(env["topic"], "T/b");
        assert_eq!(env["data"], "plain text");
        let _ = proxy.kill().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn completions_and_man_page_generate() {
    tokio::time::timeout(LIMIT, async {
        let root = TempRoot::new();
        for shell in ["bash", "zsh", "fish"] {
            let (code, out, err) = root.bus(&["completions", shell]).await;
            assert_eq!(code, 0, "{err}");
            assert!(out.contains("hermes-bus"), "{shell}");
            assert!(out.contains("request"), "{shell}: subcommands completed");
        }
        let (code, _, err) = root.bus(&["completions", "tcsh"]).await;
        assert_eq!(code, 2, "usage error: {err}");
        let (code, out, err) = root.bus(&["man"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(".TH"), "roff: {out}");
    })
    .await
    .expect("test timed out");
}
