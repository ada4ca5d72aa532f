//! Interop with the reference Python `hermes-bus` clients (0.7.0 and
//! 0.3.0), unmodified, against our bus.

mod common;

use std::path::Path;
use std::time::Duration;

use common::python::NoLine;
use common::{client_recv, PyPeer, TestBus};
use hermes_bus::transports::unix::BusClient;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

/// Reads the Python peer's next line that starts with `tag`.
async fn line_with(peer: &mut PyPeer, tag: &str) -> String {
    loop {
        let line = match peer.read(Duration::from_secs(30)).await {
            Ok(l) => l,
            Err(NoLine::TimedOut) => panic!("no '{tag}' line from the python peer"),
            Err(NoLine::Ended) => panic!("python peer ended before '{tag}'"),
        };
        if let Some(rest) = line.strip_prefix(tag) {
            return rest.trim().to_owned();
        }
        assert!(
            !line.starts_with("timeout") && !line.starts_with("connect-failed"),
            "python peer: {line}"
        );
    }
}

async fn exchange_with(python: &Path, version: &str) {
    let bus = TestBus::start().await;
    let mut rusty = BusClient::connect("rusty", &bus.socket)
        .await
        .expect("rust client");
    let sock = bus.socket.to_string_lossy().into_owned();
    let env = [("SOCK", sock.as_str()), ("NAME", "py"), ("PEER", "rusty")];
    let mut peer = PyPeer::spawn(python, "unix_peer.py", &[], &env);
    line_with(&mut peer, "ready").await;

    // Rust → Python.
    rusty
        .send("py", json!({"n": 7, "text": "from rust"}))
        .await
        .expect("send");
    let got: Value = serde_json::from_str(&line_with(&mut peer, "got").await).expect("json");
    assert_eq!(got["type"], "message");
    assert_eq!(got["to"], "py");
    assert_eq!(got["from"], "rusty");
    assert_eq!(got["body"], json!({"n": 7, "text": "from rust"}));
    assert!(got["id"].is_string() && got["ts"].is_number(), "{got}");

    // Python → Rust (skipping nothing: the first message must be it).
    let reply = client_recv(&mut rusty, Duration::from_secs(20)).await;
    assert_eq!(reply["from"], "py", "{version}: {reply}");
    assert_eq!(reply["body"]["reply_to"], 7);
    assert_eq!(reply["body"]["text"], "héllo ✓");

    // list_endpoints from Python shows both names (with session ids).
    let eps: Value = serde_json::from_str(&line_with(&mut peer, "endpoints").await).expect("json");
    assert_eq!(eps["type"], "endpoints_list", "{eps}");
    assert!(eps["endpoints"]["rusty"].is_string(), "{eps}");
    assert!(eps["endpoints"]["py"].is_string(), "{eps}");

    // send_message to a missing endpoint returns False.
    assert_eq!(
        line_with(&mut peer, "send_missing").await,
        "false",
        "{version}"
    );

    let status = tokio::time::timeout(Duration::from_secs(20), peer.child.wait())
        .await
        .expect("python exits")
        .expect("wait");
    assert!(status.success(), "{version}: python peer failed: {status}");
    rusty.close().await;
    bus.stop().await;
}

#[tokio::test]
async fn python_070_client_exchanges_with_rust_client() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(LIMIT, exchange_with(&py, "0.7.0"))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn python_030_client_exchanges_with_rust_client() {
    let Some(py) = common::python("py03") else {
        return;
    };
    tokio::time::timeout(LIMIT, exchange_with(&py, "0.3.0"))
        .await
        .expect("test timed out");
}

/// `send_message` of 0.7.0 returns True for a delivered message, and the
/// message arrives with the `from` the anonymous sender chose.
#[tokio::test]
async fn python_send_message_delivers_with_its_from() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start().await;
        let mut rusty = BusClient::connect("rusty", &bus.socket).await.expect("rust client");
        let script = r#"
import os
from hermes_bus.client import send_message
print(send_message("rusty", {"k": [1, 2.5, None, "ü"]}, socket_path=os.environ["SOCK"], from_ep="cli-tool"))
"#;
        let sock = bus.socket.to_string_lossy().into_owned();
        let out = common::run_python(&py, script, &[("SOCK", &sock)], Duration::from_secs(30)).await;
        assert_eq!(out.trim(), "True");
        let m = client_recv(&mut rusty, Duration::from_secs(10)).await;
        assert_eq!(m["from"], "cli-tool");
        assert_eq!(m["body"], json!({"k": [1, 2.5, null, "ü"]}));
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
