//! The whole bus as a user runs it: `hermes-bus server --zmq` serves the
//! Unix socket and the ZeroMQ proxy in one process on one router. A Unix
//! session subscribed to a topic receives what a ZeroMQ publisher sends,
//! a Unix `publish` reaches ZeroMQ subscribers, and the `pub` / `sub`
//! commands work. The ZeroMQ peers here are the `zeromq` crate's sockets
//! (an independent ZMTP implementation) and our own CLI.
#![cfg(all(feature = "zmq", feature = "unix"))]

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::{free_tcp_addr, lines_of, Raw, ServerProcess};
use serde_json::json;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

fn envelope(topic: &str, origin: &str, data: &str) -> ZmqMessage {
    let mut m = ZmqMessage::from(Bytes::from(format!("\"{topic}\"")));
    m.push_back(Bytes::from(format!("\"{origin}\"")));
    m.push_back(Bytes::from(data.to_owned()));
    m.push_back(Bytes::from_static(b"1795300000.25"));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sessions_and_zeromq_peers_share_one_router() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let (front, back) = (free_tcp_addr(), free_tcp_addr());
        let mut server =
            ServerProcess::start(&["--zmq", "--zmq-in", &front, "--zmq-out", &back]).await;
        let socket = server.socket.clone();

        // A Unix session subscribes to market data.
        let mut unix = Raw::register(&socket, "desk").await;
        unix.send(&json!({"type": "subscribe", "topic": "MD/"}))
            .await;
        assert_eq!(unix.recv().await.expect("subscribed")["type"], "subscribed");

        // zeromq-crate peers on both sides of the proxy.
        let mut sub = zeromq::SubSocket::new();
        sub.connect(&back).await.expect("sub connects");
        sub.subscribe("").await.expect("subscribe");
        let mut publ = zeromq::PubSocket::new();
        publ.connect(&front).await.expect("pub connects");

        // ZeroMQ → Unix: publish until the subscription has propagated
        // (a PUB filters at the source), bounded.
        let data = r#"["Quote", 1795300000.0, "BTC", 64000.5, 64001.0]"#;
        let mut got = None;
        for _ in 0..100 {
            publ.send(envelope("MD/BTC/feed", "feed", data))
                .await
                .expect("send");
            if let Some(v) = unix.recv_within(Duration::from_millis(100)).await {
                got = Some(v);
                break;
            }
        }
        let got = got.expect("the Unix session receives the ZeroMQ envelope");
        assert_eq!(got["type"], "publish", "{got}");
        assert_eq!(got["topic"], "MD/BTC/feed");
        assert_eq!(got["origin"], "feed");
        assert_eq!(
            got["data"],
            json!(["Quote", 1795300000.0, "BTC", 64000.5, 64001.0])
        );
        assert_eq!(got["ts"], json!(1795300000.25));
        // The zeromq SUB got it too (through the proxy, unchanged).
        let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(m.len(), 4);
        assert_eq!(m.get(0).map(|b| &b[..]), Some(&b"\"MD/BTC/feed\""[..]));

        // Unix → ZeroMQ: our `sub` command and the zeromq SUB both get a
        // topic a Unix session publishes; origin is its registered name.
        let mut cli_sub = tokio::process::Command::new(common::bin("hermes-bus"))
            .args(["sub", "--addr", &back, "--count", "1", "NEWS/"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("sub");
        let mut lines = lines_of(cli_sub.stdout.take().expect("stdout"));
        let mut publisher = Raw::register(&socket, "newsroom").await;
        let line = loop {
            publisher
                .send(&json!({"type": "publish", "topic": "NEWS/fed", "data": {"rate": 4.25}}))
                .await;
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
            {
                break r.expect("read").expect("a line");
            }
        };
        let env: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(env["topic"], "NEWS/fed", "{env}");
        assert_eq!(env["origin"], "newsroom");
        assert_eq!(env["data"], json!({"rate": 4.25}));
        let m = loop {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
                .await
                .expect("in time")
                .expect("recv");
            if m.get(0).is_some_and(|t| t.starts_with(b"\"NEWS/")) {
                break m;
            }
        };
        assert_eq!(m.get(1).map(|b| &b[..]), Some(&b"\"newsroom\""[..]));
        // ... and the publishing session does not get its own topic back.
        assert!(publisher
            .recv_within(Duration::from_millis(300))
            .await
            .is_none());

        // Our `pub` command reaches the Unix subscriber.
        let out = tokio::process::Command::new(common::bin("hermes-bus"))
            .args([
                "pub",
                "--addr",
                &front,
                "--name",
                "cli",
                "MD/ETH",
                r#"{"p": 2}"#,
            ])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .expect("in time")
            .expect("pub runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = loop {
            let v = unix.recv().await.expect("the pub command's envelope");
            if v["topic"] == "MD/ETH" {
                break v;
            }
        };
        assert_eq!(v["origin"], "cli");
        assert_eq!(v["data"], json!({"p": 2}));

        // The bus counts both sides in its stats.
        let stats = Raw::stats(&socket).await;
        assert!(stats["stats"]["transports"]["zmq"].is_object(), "{stats}");
        let _ = server.child.kill().await;
    })
    .await
    .expect("test timed out");
}
