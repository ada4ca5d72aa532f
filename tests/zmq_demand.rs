//! Upstream interest follows demand inside the bus (`hermes-bus server
//! --zmq`): the proxy subscribes its publishers to the topic prefixes Unix
//! sessions and topic hooks want, beside its own subscribers', so a
//! publisher drops everything else at the source. Shown with our
//! `Publisher` (its `filtered` counter) and with a libzmq PUB (pyzmq),
//! whose source filtering shows on the proxy's counters read over the
//! Unix socket.
#![cfg(all(feature = "zmq", feature = "unix"))]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::files::{stdin_copy_script, write_file};
use common::zmq::receiver;
use common::{free_tcp_addr, python, PyPeer, Raw, ServerProcess};
use hermes_bus::envelope::Data;
use hermes_bus::transports::zmq::Publisher;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);
/// How long a subscription change may take to reach a publisher (it is
/// sent at once; this only bounds the wait on a loaded machine).
const PROPAGATION: Duration = Duration::from_secs(15);

/// A bus with the ZeroMQ transport on free ports: (server, XSUB, XPUB).
async fn server(
    tune: impl FnOnce(&mut tokio::process::Command),
) -> (ServerProcess, String, String) {
    let (front, back) = (free_tcp_addr(), free_tcp_addr());
    let s = ServerProcess::start_bin(
        "hermes-bus",
        &["server", "--zmq", "--zmq-in", &front, "--zmq-out", &back],
        tune,
    )
    .await;
    (s, front, back)
}

/// The proxy's counters as the bus's `stats` shows them.
async fn zmq_stats(socket: &Path) -> Value {
    let v = Raw::stats(socket).await;
    v["stats"]["transports"]["zmq"].clone()
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut v = v;
    for k in path {
        v = &v[*k];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

/// Polls the proxy's counters until `cond` holds (bounded by
/// `PROPAGATION`); returns the last ones seen and whether it held.
async fn stats_until(socket: &Path, mut cond: impl FnMut(&Value) -> bool) -> (Value, bool) {
    let end = tokio::time::Instant::now() + PROPAGATION;
    loop {
        let s = zmq_stats(socket).await;
        if cond(&s) {
            return (s, true);
        }
        if tokio::time::Instant::now() >= end {
            return (s, false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Registers `name` and subscribes it to `topic`; returns after the ack.
async fn unix_subscriber(socket: &Path, name: &str, topic: &str) -> Raw {
    let mut c = Raw::register(socket, name).await;
    c.send(&json!({"type": "subscribe", "topic": topic})).await;
    let ack = c.recv().await.expect("subscribe answered");
    assert_eq!(ack["type"], "subscribed", "{ack}");
    c
}

/// Our publisher, connected to `front`.
async fn publisher(front: &str) -> Publisher {
    let mut p = Publisher::new(front, "feed").expect("publisher");
    p.start().expect("start");
    p.wait_connected(Duration::from_secs(10))
        .await
        .expect("connected");
    p
}

fn send(p: &Publisher, topic: &str, i: u64) -> bool {
    p.publish_parts(topic, "feed", &Data::json(&json!({"i": i})).expect("json"))
        .expect("publish")
}

/// Publishes `topic` until the publisher drops it at the source (the
/// cancel reached it), bounded; true when it did.
async fn until_filtered(p: &Publisher, topic: &str) -> bool {
    let end = tokio::time::Instant::now() + PROPAGATION;
    let mut i = 0;
    while tokio::time::Instant::now() < end {
        if !send(p, topic, i) {
            return true;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Waits (bounded) until `name` is no longer a live endpoint of the bus.
async fn gone_from_the_bus(socket: &Path, name: &str) -> bool {
    let end = tokio::time::Instant::now() + PROPAGATION;
    while tokio::time::Instant::now() < end {
        let mut c = Raw::connect(socket).await;
        c.send(&json!({"type": "list_endpoints"})).await;
        let v = c.recv().await.expect("endpoints");
        if v["endpoints"].get(name).is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The next `publish` a Unix session receives within 10 s.
async fn next_publish(c: &mut Raw) -> Value {
    loop {
        let v = c
            .recv_within(Duration::from_secs(10))
            .await
            .expect("a publish in time");
        if v["type"] == "publish" {
            return v;
        }
    }
}

/// Nothing crosses the wire while no Unix session wants it; a
/// `subscribe` makes exactly its prefix flow (and only to the bus:
/// other topics stay filtered); `unsubscribe` and a session's close
/// make the publisher filter again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_sends_only_what_unix_sessions_want() {
    tokio::time::timeout(LIMIT, async {
        let (srv, front, _back) = server(|_| {}).await;
        let socket = srv.socket.clone();
        let p = publisher(&front).await;

        // No Unix subscriber: every envelope is dropped at the source.
        for i in 0..50 {
            assert!(!send(&p, "MD/BTC", i), "filtered at the source");
        }
        let st = p.stats();
        println!("no subscriber: publisher {st:?}");
        assert_eq!((st.filtered, st.sent, st.queued), (50, 0, 0));
        let z = zmq_stats(&socket).await;
        assert_eq!(num(&z, &["publishers", "messages"]), 0, "{z}");
        assert_eq!(num(&z, &["bus_prefixes"]), 0, "{z}");
        assert_eq!(num(&z, &["upstream_prefixes"]), 0, "{z}");

        // A Unix session subscribes: once acknowledged, its prefix is
        // upstream and goes to the publisher at once.
        let mut desk = unix_subscriber(&socket, "desk", "MD/").await;
        let z = zmq_stats(&socket).await;
        assert_eq!(num(&z, &["bus_prefixes"]), 1, "held before the ack: {z}");
        assert_eq!(num(&z, &["upstream_prefixes"]), 1, "{z}");
        p.wait_for_subscriber("MD/BTC", PROPAGATION)
            .await
            .expect("the subscription reached the publisher");
        let filtered_before = p.stats().filtered;
        for i in 0..20 {
            assert!(send(&p, "MD/BTC", i), "MD/ flows");
            assert!(!send(&p, "NEWS/x", i), "NEWS/ still filtered");
        }
        for i in 0..20 {
            let v = next_publish(&mut desk).await;
            assert_eq!(v["topic"], "MD/BTC", "{v}");
            assert_eq!(v["origin"], "feed");
            assert_eq!(v["data"]["i"], i, "in order, none lost");
        }
        let st = p.stats();
        assert_eq!(st.filtered - filtered_before, 20, "only NEWS/ filtered");
        let (z, _) = stats_until(&socket, |z| num(z, &["to_bus"]) >= 20).await;
        println!("subscribed: proxy {z}");
        assert_eq!(num(&z, &["publishers", "messages"]), 20, "{z}");
        assert_eq!(num(&z, &["to_bus"]), 20, "{z}");
        assert_eq!(num(&z, &["to_bus_unwanted"]), 0, "{z}");

        // Unsubscribe: the cancel goes upstream; the publisher filters again.
        desk.send(&json!({"type": "unsubscribe", "topic": "MD/"}))
            .await;
        let ack = desk.recv().await.expect("unsubscribe answered");
        assert_eq!(ack["type"], "unsubscribed", "{ack}");
        assert!(
            until_filtered(&p, "MD/BTC").await,
            "filtered after unsubscribe"
        );
        let z = zmq_stats(&socket).await;
        assert_eq!(num(&z, &["bus_prefixes"]), 0, "{z}");
        assert_eq!(num(&z, &["upstream_prefixes"]), 0, "{z}");

        // Two sessions on one prefix: one upstream prefix, held until the
        // last session goes; a closed connection lets go of it.
        let a = unix_subscriber(&socket, "a", "MD/").await;
        let b = unix_subscriber(&socket, "b", "MD/").await;
        let z = zmq_stats(&socket).await;
        assert_eq!(num(&z, &["bus_prefixes"]), 1, "{z}");
        p.wait_for_subscriber("MD/BTC", PROPAGATION)
            .await
            .expect("subscribed again");
        drop(a);
        assert!(gone_from_the_bus(&socket, "a").await, "a's session closed");
        let z = zmq_stats(&socket).await;
        assert_eq!(num(&z, &["bus_prefixes"]), 1, "b still wants MD/: {z}");
        assert!(send(&p, "MD/BTC", 0), "b still wants MD/");
        drop(b);
        assert!(
            until_filtered(&p, "MD/BTC").await,
            "filtered after the last session closed"
        );
        let (z, gone) = stats_until(&socket, |z| num(z, &["bus_prefixes"]) == 0).await;
        assert!(gone, "{z}");
        println!("after close: publisher {:?}", p.stats());
    })
    .await
    .expect("test timed out");
}

/// A ZeroMQ receiver and a Unix session on the same prefix share one
/// upstream prefix; once the Unix session leaves, envelopes still flow to
/// the receiver but are not decoded for the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeromq_subscriber_and_a_unix_session_share_one_upstream_prefix() {
    tokio::time::timeout(LIMIT, async {
        let (srv, front, back) = server(|_| {}).await;
        let socket = srv.socket.clone();
        let mut r = receiver(&back, |c| c.topics = vec!["MD/".into()]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("receiver connected");
        let mut desk = unix_subscriber(&socket, "desk", "MD/").await;
        let p = publisher(&front).await;
        p.wait_for_subscriber("MD/x", PROPAGATION)
            .await
            .expect("subscribed");
        let (z, one) = stats_until(&socket, |z| {
            num(z, &["subscriptions"]) == 1 && num(z, &["bus_prefixes"]) == 1
        })
        .await;
        assert!(one, "{z}");
        assert_eq!(num(&z, &["upstream_prefixes"]), 1, "coalesced: {z}");

        assert!(send(&p, "MD/x", 1));
        assert_eq!(next_publish(&mut desk).await["topic"], "MD/x");
        let env = r.recv_timeout(Duration::from_secs(10)).await.expect("env");
        assert_eq!(env.topic, "MD/x");

        // The Unix session leaves: the receiver still holds MD/ upstream.
        drop(desk);
        let (z, left) = stats_until(&socket, |z| num(z, &["bus_prefixes"]) == 0).await;
        assert!(left, "{z}");
        assert_eq!(num(&z, &["upstream_prefixes"]), 1, "{z}");
        for i in 0..10 {
            assert!(send(&p, "MD/x", i), "the receiver still wants it");
        }
        for _ in 0..10 {
            r.recv_timeout(Duration::from_secs(10))
                .await
                .expect("the receiver gets it");
        }
        let (z, skipped) = stats_until(&socket, |z| num(z, &["to_bus_unwanted"]) >= 10).await;
        println!("receiver only: proxy {z}");
        assert!(skipped, "not handed to the router: {z}");
        assert_eq!(num(&z, &["to_bus"]), 1, "{z}");
        r.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A libzmq PUB (pyzmq) filters at the source as well: while no Unix
/// session wants anything, none of its envelopes reach the proxy; a Unix
/// `subscribe` makes exactly that prefix cross (the other topic, sent
/// just as often, never does), and `unsubscribe` stops it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libzmq_publisher_filters_at_the_source_too() {
    let Some(py) = python("py07") else { return };
    tokio::time::timeout(LIMIT, async {
        let (srv, front, _back) = server(|_| {}).await;
        let socket = srv.socket.clone();
        let mut pubr =
            PyPeer::spawn_ready(&py, "zmq_pub.py", &[&front, "60", "MD/x", "NEWS/y"]).await;
        let (z, open) = stats_until(&socket, |z| num(z, &["publishers", "open"]) == 1).await;
        assert!(open, "{z}");
        // It sends (100 rounds of both topics) and nothing arrives.
        loop {
            let l = pubr
                .next_json(Duration::from_secs(20))
                .await
                .expect("rounds");
            if l["rounds"].as_u64().is_some_and(|n| n >= 100) {
                break;
            }
        }
        let z = zmq_stats(&socket).await;
        println!("pyzmq PUB, no subscriber: proxy {z}");
        assert_eq!(num(&z, &["publishers", "messages"]), 0, "{z}");

        let mut desk = unix_subscriber(&socket, "desk", "MD/").await;
        for _ in 0..20 {
            let v = next_publish(&mut desk).await;
            assert_eq!(v["topic"], "MD/x", "{v}");
            assert_eq!(v["origin"], "pyzmq");
        }
        desk.send(&json!({"type": "unsubscribe", "topic": "MD/"}))
            .await;
        // Once the cancel reached it, nothing more crosses: the count
        // stays put over 50 more rounds of sending.
        let mut last = u64::MAX;
        let end = tokio::time::Instant::now() + PROPAGATION;
        let settled = loop {
            let z = zmq_stats(&socket).await;
            let n = num(&z, &["publishers", "messages"]);
            if n == last {
                break Some(z);
            }
            last = n;
            if tokio::time::Instant::now() >= end {
                break None;
            }
            let mut rounds = 0;
            while rounds < 50 {
                let l = pubr
                    .next_json(Duration::from_secs(20))
                    .await
                    .expect("rounds");
                if l["rounds"].is_u64() {
                    rounds += 50;
                }
            }
        };
        let z = settled.expect("the PUB stopped sending MD/ after unsubscribe");
        println!("pyzmq PUB after unsubscribe: proxy {z}");
        // Every envelope that crossed is accounted for: wanted (to the
        // bus) or, for MD/ still in flight when the unsubscribe went out,
        // unwanted. NEWS/ never left the PUB: nothing crossed before the
        // subscribe, and the count settled above while NEWS/ kept being
        // sent.
        let crossed = num(&z, &["publishers", "messages"]);
        assert!(crossed >= 20, "{z}");
        assert_eq!(
            crossed,
            num(&z, &["to_bus"]) + num(&z, &["to_bus_unwanted"]),
            "{z}"
        );
        let _ = pubr.child.kill().await;
    })
    .await
    .expect("test timed out");
}

/// A hooks.yaml in a fresh HERMES_HOME with one entry `entry` (its path
/// a script that copies its input to `out`); returns that home.
fn hooks_home(dir: &Path, entry: &str) -> (PathBuf, PathBuf) {
    let home = dir.join("home");
    std::fs::create_dir_all(home.join("hermes-bus")).expect("home");
    let out = dir.join("hook.out");
    let script = stdin_copy_script(dir, "hook.sh", &out);
    let yaml = format!("- path: {}\n  {entry}\n", script.display());
    write_file(&home.join("hermes-bus"), "hooks.yaml", &yaml, 0o644);
    (home, out)
}

/// With `filter: {kind: topic, topic_prefix: HOOK/}` and no Unix session,
/// HOOK/ flows (and the hook runs) while every other topic is filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_filtered_hook_makes_its_prefix_flow() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (home, out) = hooks_home(dir.path(), "filter: {kind: topic, topic_prefix: HOOK/}");
        let (srv, front, _back) = server(|c| {
            c.env("HERMES_HOME", &home);
        })
        .await;
        let p = publisher(&front).await;
        p.wait_for_subscriber("HOOK/a", PROPAGATION)
            .await
            .expect("the hook's prefix is upstream");
        for i in 0..10 {
            assert!(!send(&p, "OTHER/b", i), "no hook or session wants OTHER/");
        }
        assert_eq!(p.stats().filtered, 10);
        assert!(send(&p, "HOOK/a", 1));
        let ran = common::eventually(Duration::from_secs(20), || out.exists()).await;
        assert!(ran, "the hook ran");
        let event: Value =
            serde_json::from_str(&std::fs::read_to_string(&out).expect("hook output"))
                .expect("json");
        assert_eq!(event["topic"], "HOOK/a", "{event}");
        let z = zmq_stats(&srv.socket).await;
        println!("topic hook: proxy {z}");
        assert_eq!(num(&z, &["bus_prefixes"]), 1, "{z}");
        assert_eq!(num(&z, &["publishers", "messages"]), 1, "{z}");
    })
    .await
    .expect("test timed out");
}

/// A topic hook without `topic_prefix` runs for every topic, so the bus
/// needs everything: every topic flows with no Unix session at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_without_topic_filter_makes_everything_flow() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (home, out) = hooks_home(dir.path(), "filter: {kind: topic}");
        let (srv, front, _back) = server(|c| {
            c.env("HERMES_HOME", &home);
        })
        .await;
        let p = publisher(&front).await;
        p.wait_for_subscriber("any/thing", PROPAGATION)
            .await
            .expect("everything is upstream");
        for (i, t) in ["any/thing", "x", "caf\u{e9}"].iter().enumerate() {
            assert!(send(&p, t, i as u64), "{t} flows");
        }
        assert_eq!(p.stats().filtered, 0);
        let ran = common::eventually(Duration::from_secs(20), || out.exists()).await;
        assert!(ran, "the hook ran");
        let (z, all) = stats_until(&srv.socket, |z| num(z, &["to_bus"]) == 3).await;
        println!("hook without topic filter: proxy {z}");
        assert!(all, "{z}");
        assert_eq!(num(&z, &["bus_prefixes"]), 1, "the empty prefix: {z}");
    })
    .await
    .expect("test timed out");
}
