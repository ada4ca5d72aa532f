//! Interop with the reference `hermes-zmq` 1.3.0 peers and libzmq (pyzmq):
//! Python publisher → our proxy → our receiver; our publisher → our proxy →
//! Python receiver; ours through libzmq's proxy; a pyzmq SUB with a prefix
//! on our proxy.
#![cfg(feature = "zmq")]

mod common;

use std::time::Duration;

use common::zmq::start_proxy;
use common::{free_tcp_addr, PyPeer, TEST_LIMIT};
use hermes_bus::codec::Codec;
use hermes_bus::envelope::{Data, Message, Quote};
use hermes_bus::transports::zmq::{Node, Publisher, PublisherConfig, Receiver};

fn receiver(addr: &str, topics: &[&str]) -> Receiver {
    common::zmq::receiver(addr, |c| {
        c.name = "rust-recv".into();
        c.topics = topics.iter().map(|s| s.to_string()).collect();
    })
}

#[tokio::test]
async fn python_node_publishes_to_rust_receiver_through_our_proxy() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        // Exact-topic subscription with a non-ASCII name: our quoting and
        // escaping must produce the bytes Python's topic frame starts with.
        let r = receiver(&proxy.back(), &["RAW/pynodé"]);
        let other = receiver(&proxy.back(), &["OTHER/"]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let _py = PyPeer::spawn_ready(
            &py,
            "zmq_peer.py",
            &["node-pub", &proxy.front(), "pynodé", "RAW", "20"],
        )
        .await;
        let (mut typed, mut raw) = (0, 0);
        while typed == 0 || raw == 0 {
            let env = r
                .recv_timeout(Duration::from_secs(15))
                .await
                .expect("envelope from python");
            assert_eq!(env.topic, "RAW/pynodé");
            assert_eq!(env.origin, "pynodé");
            assert!(env.ts > 1.0e9);
            if let Some(m) = env.data.downcast_ref::<Message>() {
                assert!(m.ts > 1.0e9);
                typed += 1;
            } else {
                let v: serde_json::Value = serde_json::to_value(&env.data).expect("json");
                assert_eq!(v[0], "Tick");
                assert_eq!(v[3], "café");
                raw += 1;
            }
        }
        assert_eq!(other.stats().received, 0, "prefix OTHER/ must not match");
        let s = proxy.stats.snapshot();
        assert!(s.publishers.messages >= 2);
        assert_eq!(s.publishers.malformed, 0);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn rust_node_publishes_to_python_receiver_through_our_proxy() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let mut py_recv =
            PyPeer::spawn_ready(&py, "zmq_peer.py", &["recv", &proxy.back(), "4", "30"]).await;
        let publisher = Publisher::new(&proxy.front(), "rnode-pub").expect("publisher");
        let mut node = Node::new("rnode", None, Some(publisher));
        node.start().expect("start");
        let p = node.publisher().expect("publisher");
        // The Python receiver subscribes to everything; once that reaches
        // our publisher, nothing is filtered at the source.
        p.wait_for_subscriber("MD/rnode", Duration::from_secs(15))
            .await
            .expect("subscriber");
        let mut got = Vec::new();
        let mut seq = 0u64;
        while got.len() < 4 {
            let quote = Quote {
                ts: 1.0 + seq as f64,
                symbol: "AAPL".into(),
                bid: 1.5,
                bid_size: 10.0,
                ask: 1.75,
                ask_size: 20.0,
            };
            node.publish("MD", quote).expect("publish");
            node.publish("MD", Data::json("plain").expect("json"))
                .expect("publish");
            seq += 1;
            if let Some(line) = py_recv.next_json(Duration::from_millis(100)).await {
                got.push(line);
            }
            assert!(seq < 300, "python receiver got too little: {got:?}");
        }
        for line in &got {
            assert_eq!(line["topic"], "MD/rnode");
            assert_eq!(line["origin"], "rnode");
            let d = &line["data"];
            assert!(
                d == "plain" || (d[0] == "Quote" && d[2] == "AAPL" && d[3] == 1.5),
                "{line}"
            );
        }
        node.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn rust_clients_through_libzmq_proxy() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let (front, back) = (free_tcp_addr(), free_tcp_addr());
        let _proxy =
            PyPeer::spawn_ready(&py, "zmq_peer.py", &["libzmq-proxy", &front, &back]).await;
        let r = receiver(&back, &["T/"]);
        let mut cfg = PublisherConfig::new(&front, "p");
        // libzmq does not announce MessagePack: the publisher must fall
        // back to JSON, and the JSON receiver sees no codec error.
        cfg.codec = Codec::MsgPack;
        let mut p = Publisher::with_config(cfg).expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("T/x", Duration::from_secs(15))
            .await
            .expect("subscription via libzmq");
        assert!(
            p.wait_for_subscriber("U/x", Duration::from_millis(200))
                .await
                .is_err(),
            "U/ has no subscriber"
        );
        const N: u64 = 500;
        for i in 0..N {
            let q = Quote {
                ts: i as f64,
                symbol: format!("S{i}"),
                bid: 1.0,
                bid_size: 1.0,
                ask: 2.0,
                ask_size: 1.0,
            };
            assert!(p.publish_parts("T/q", "p", &q.into()).expect("publish"));
            p.publish_parts("U/q", "p", &Data::json(&i).expect("json"))
                .expect("publish");
        }
        let mut n = 0;
        while n < N {
            let env = r
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("all through libzmq");
            let q = env.data.downcast_ref::<Quote>().expect("typed quote");
            assert_eq!(q.symbol, format!("S{n}"));
            n += 1;
        }
        let s = r.stats();
        assert_eq!((s.codec_errors, s.malformed), (0, 0));
        assert_eq!(p.stats().filtered, N, "U/ filtered at the source");
        p.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn pyzmq_sub_prefix_is_forwarded_upstream_by_our_proxy() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let mut sub = PyPeer::spawn_ready(
            &py,
            "zmq_peer.py",
            &["sub", &proxy.back(), "\"A/", "20", "30"],
        )
        .await;
        let mut p = Publisher::new(&proxy.front(), "p").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("A/1", Duration::from_secs(15))
            .await
            .expect("subscription forwarded upstream");
        assert!(p
            .wait_for_subscriber("B/1", Duration::from_millis(200))
            .await
            .is_err());
        let mut got = Vec::new();
        let mut i = 0u64;
        while got.len() < 20 {
            p.publish_parts("A/1", "p", &Data::json(&i).expect("json"))
                .expect("publish");
            p.publish_parts("B/1", "p", &Data::json(&i).expect("json"))
                .expect("publish");
            i += 1;
            while let Some(frames) = sub.next_json(Duration::from_millis(5)).await {
                got.push(frames);
            }
            assert!(i < 5000, "pyzmq SUB got too little");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for frames in &got {
            let f = frames.as_array().expect("frames");
            assert_eq!(f.len(), 4);
            assert_eq!(f[0], "\"A/1\"");
            assert_eq!(f[1], "\"p\"");
        }
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn ipc_endpoints_and_capture_socket() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipc = |n: &str| format!("ipc://{}", dir.path().join(n).display());
        let proxy = start_proxy(|c| {
            c.frontend = ipc("in.sock");
            c.backend = ipc("out.sock");
            c.capture = Some(ipc("capture.sock"));
        })
        .await;
        let capture_addr = proxy.ep.capture.as_ref().expect("capture").to_string();
        // The capture side is a PUB: its subscribers see what passes
        // through, and their subscriptions do not reach the publishers.
        let cap = receiver(&capture_addr, &[]);
        cap.wait_connected(Duration::from_secs(10))
            .await
            .expect("capture connected");
        let mut p = Publisher::new(&proxy.front(), "p").expect("publisher");
        p.start().expect("start");
        p.wait_connected(Duration::from_secs(10))
            .await
            .expect("publisher connected");
        assert!(
            p.wait_for_subscriber("T/1", Duration::from_millis(300))
                .await
                .is_err(),
            "capture subscriptions stay local"
        );
        let r = receiver(&proxy.back(), &["T/"]);
        p.wait_for_subscriber("T/1", Duration::from_secs(10))
            .await
            .expect("subscriber over ipc");
        for i in 0..50 {
            assert!(p
                .publish_parts("T/1", "p", &Data::json(&i).expect("json"))
                .expect("publish"));
        }
        for i in 0..50 {
            let e = r
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("over ipc");
            assert_eq!(serde_json::to_value(&e.data).expect("json"), i);
            let c = cap
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("capture copy");
            assert_eq!(c.topic, "T/1");
        }
        assert_eq!(proxy.stats.snapshot().capture.drops, 0);
        p.stop().await;
        proxy.shutdown().await;
        assert!(
            !dir.path().join("in.sock").exists(),
            "ipc socket files removed"
        );
    })
    .await
    .expect("test timed out");
}
