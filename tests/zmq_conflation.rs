//! Conflation as a slow-subscriber policy, over real sockets: a
//! subscriber that pauses while 1,000 topics tick 100 times each gets, on
//! resuming, the newest value of every topic and then live traffic, and
//! the counters account for every envelope (received + conflated = sent):
//! - a pyzmq SUB behind our proxy with `--slow-policy conflate`;
//! - our `Receiver` with its own queue conflating (`conflate`);
//! - a Unix topic subscriber of a bus with `--slow-policy conflate`.
//!
//! Counts, never durations: every wait is bounded, nothing asserts on time.
#![cfg(feature = "zmq")]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::zmq::{receiver, start_proxy};
use common::{eventually, PyPeer, Raw, TestBus, TEST_LIMIT};
use hermes_bus::envelope::Data;
use hermes_bus::hooks::HookEngine;
use hermes_bus::router::SlowPolicy;
use hermes_bus::transports::zmq::{Publisher, PublisherConfig};
use hermes_bus::RouterConfig;
use serde_json::{json, Value};

/// Topics that tick.
const TOPICS: u64 = 1_000;
/// Ticks per topic.
const TICKS: u64 = 100;
/// Envelopes in the burst.
const N: u64 = TOPICS * TICKS;
/// Live envelopes after the burst.
const LIVE: u64 = 10;

fn topic(i: u64) -> String {
    format!("C/{i:04}")
}

/// A started publisher whose own queue holds the whole burst.
async fn publisher(front: &str) -> Publisher {
    let mut cfg = PublisherConfig::new(front, "ticker");
    cfg.queue = N as usize + 1_000;
    cfg.queue_bytes = 1 << 30;
    cfg.linger = Duration::from_secs(5);
    let mut p = Publisher::with_config(cfg).expect("publisher");
    p.start().expect("start");
    p.wait_for_subscriber("C/", Duration::from_secs(20))
        .await
        .expect("subscriber reached the publisher");
    p
}

/// Tick t of every topic, t = 0..TICKS (the data is the tick).
fn publish_burst(p: &Publisher) {
    for t in 0..TICKS {
        for i in 0..TOPICS {
            let data = Data::json(&t).expect("json");
            assert!(p
                .publish_parts(&topic(i), "ticker", &data)
                .expect("publish"));
        }
    }
}

/// Live envelopes, each on a topic of its own (values of one topic would
/// conflate into one while the subscriber still lags).
fn publish_live(p: &Publisher) {
    for n in 0..LIVE {
        let data = Data::json(&n).expect("json");
        assert!(p
            .publish_parts(&format!("L/{n}"), "ticker", &data)
            .expect("publish"));
    }
}

/// The summary without the per-topic map (for assertion messages).
fn brief(v: &Value) -> String {
    let mut v = v.clone();
    v["last"] = json!(v["last"].as_object().map_or(0, |m| m.len()));
    v.to_string()
}

/// Every topic's newest value is the last tick.
fn assert_newest(last: &HashMap<String, u64>) {
    assert_eq!(last.len() as u64, TOPICS, "every topic arrived");
    for i in 0..TOPICS {
        assert_eq!(
            last.get(&topic(i)),
            Some(&(TICKS - 1)),
            "newest of {}",
            topic(i)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_pyzmq_subscriber_gets_the_newest_of_every_topic_then_live() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.slow_policy = SlowPolicy::Conflate).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let go = dir.path().join("go");
        let go_arg = go.to_string_lossy().into_owned();
        let mut sub = PyPeer::spawn_ready(
            &py,
            "zmq_paused_sub.py",
            &[&proxy.back(), &go_arg, "L/", &LIVE.to_string(), "50"],
        )
        .await;
        let p = publisher(&proxy.front()).await;
        publish_burst(&p);
        // The whole burst is in the proxy before the subscriber resumes.
        let s = &proxy.stats;
        let arrived = eventually(Duration::from_secs(40), || {
            s.publishers.snapshot().messages >= N
        })
        .await;
        assert!(arrived, "burst reached the proxy: {:?}", s.snapshot());
        std::fs::write(&go, b"go").expect("go");
        publish_live(&p);
        let out = sub
            .next_json(Duration::from_secs(50))
            .await
            .expect("summary");
        let snap = s.snapshot();
        println!(
            "pyzmq: conflated {} of {N}, drops {}",
            snap.conflated, snap.subscribers.drops
        );
        let b = brief(&out);
        assert_eq!(out["bad"], 0, "{b}");
        assert_eq!(out["live"], LIVE, "{b}");
        assert_eq!(
            out["burst_after_live"], 0,
            "the burst comes before live: {b}"
        );
        let last: HashMap<String, u64> =
            serde_json::from_value(out["last"].clone()).expect("last values");
        assert_newest(&last);
        assert_eq!(snap.subscribers.drops, 0, "{snap:?}");
        assert!(snap.conflated > 0, "the paused subscriber lagged: {snap:?}");
        assert_eq!(
            out["got"].as_u64().expect("got") + snap.conflated,
            N,
            "received + conflated = sent: {b} {snap:?}"
        );
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflating_receiver_catches_up_with_the_newest_of_every_topic() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let r = receiver(&proxy.back(), |c| {
            c.topics = vec!["C/".into(), "L/".into()];
            c.conflate = true;
        });
        let p = publisher(&proxy.front()).await;
        publish_burst(&p);
        // The application reads nothing until the receiver has read all.
        let all = eventually(Duration::from_secs(40), || r.stats().received >= N).await;
        assert!(all, "receiver read the burst: {:?}", r.stats());
        // The queue's bookkeeping is counted and shown (against its bound).
        let held = r.stats();
        assert!(held.index_bytes > 0, "{held:?}");
        publish_live(&p);
        let mut last = HashMap::new();
        let (mut got, mut live) = (0u64, 0u64);
        while live < LIVE {
            let env = r
                .recv_timeout(Duration::from_secs(20))
                .await
                .expect("envelope in time");
            let v: u64 = serde_json::from_str(env.data.to_raw_json().expect("json").get())
                .expect("a number");
            if env.topic.starts_with("L/") {
                live += 1;
            } else {
                assert_eq!(live, 0, "the burst comes before live");
                got += 1;
                last.insert(env.topic, v);
            }
        }
        let st = r.stats();
        println!("receiver: got {got}, conflated {} of {N}", st.conflated);
        assert_newest(&last);
        assert_eq!(st.dropped, 0, "{st:?}");
        assert_eq!(got, TOPICS, "the queue held one per topic: {st:?}");
        assert_eq!(got + st.conflated, N, "received + conflated = sent: {st:?}");
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Subscribes a raw Unix session to `prefix`, waiting for the reply.
async fn subscribe(s: &mut Raw, prefix: &str) {
    s.send(&json!({"type": "subscribe", "topic": prefix})).await;
    let reply = s.recv_within(Duration::from_secs(10)).await.expect("reply");
    assert_eq!(reply["type"], "subscribed", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_unix_subscriber_gets_the_newest_of_every_topic_then_live() {
    tokio::time::timeout(TEST_LIMIT, async {
        let cfg = RouterConfig {
            topic_policy: SlowPolicy::Conflate,
            ..RouterConfig::default()
        };
        let bus = TestBus::start_with(cfg, HookEngine::disabled()).await;
        let mut sub = Raw::register(&bus.socket, "sub").await;
        subscribe(&mut sub, "C/").await;
        subscribe(&mut sub, "L/").await;
        let mut publ = Raw::register(&bus.socket, "pub").await;
        let mut buf = Vec::new();
        for t in 0..TICKS {
            for i in 0..TOPICS {
                let v = json!({"type": "publish", "topic": topic(i), "data": t});
                let payload = serde_json::to_vec(&v).expect("json");
                buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                buf.extend_from_slice(&payload);
            }
        }
        publ.send_bytes(&buf).await;
        // Routed: the registrations, subscriptions... and the burst.
        let routed = eventually(Duration::from_secs(40), || bus.totals().routed >= N).await;
        assert!(routed, "burst routed: {:?}", bus.totals());
        // The outbox's bookkeeping shows per endpoint (the subscriber has
        // not read: its outbox holds a conflated burst).
        let st = Raw::stats(&bus.socket).await;
        let sub_st = st["stats"]["router"]["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == "sub"))
            .cloned()
            .unwrap_or_default();
        assert!(sub_st["index_bytes"].as_u64() > Some(0), "{sub_st}");
        for n in 0..LIVE {
            publ.send(&json!({"type": "publish", "topic": format!("L/{n}"), "data": n}))
                .await;
        }
        let mut last = HashMap::new();
        let (mut got, mut live) = (0u64, 0u64);
        while live < LIVE {
            let m: Value = sub
                .recv_within(Duration::from_secs(20))
                .await
                .expect("delivery in time");
            let Some(t) = m["topic"].as_str() else {
                continue;
            };
            if t.starts_with("L/") {
                live += 1;
            } else {
                assert_eq!(live, 0, "the burst comes before live");
                got += 1;
                last.insert(t.to_owned(), m["data"].as_u64().expect("tick"));
            }
        }
        let totals = bus.totals();
        println!("unix: got {got}, conflated {} of {N}", totals.conflated);
        assert_newest(&last);
        assert_eq!(totals.dropped_slow, 0, "{totals:?}");
        assert!(
            totals.conflated > 0,
            "the paused subscriber lagged: {totals:?}"
        );
        assert_eq!(
            got + totals.conflated,
            N,
            "received + conflated = sent: {totals:?}"
        );
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
