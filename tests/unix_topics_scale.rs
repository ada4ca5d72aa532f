//! Topic subscriptions at scale: one session holds 1,000,000 prefixes;
//! publishes and a control round trip stay fast (figures printed, no
//! timing assertions: run with `--release -- --nocapture` to read them).
//! Limits answer with typed errors.

mod common;

use std::time::{Duration, Instant};

use common::{Raw, TestBus};
use hermes_bus::transports::unix::frame;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const TOPICS: u32 = 1_000_000;

fn put(buf: &mut Vec<u8>, json: &str) {
    buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
    buf.extend_from_slice(json.as_bytes());
}

/// Reads `n` frames of type `kind` (skipping keepalives) off `s`.
async fn read_n(s: &mut UnixStream, n: u64, kind: &str) {
    let mut buf = bytes::BytesMut::with_capacity(1 << 20);
    let mut got = 0;
    while got < n {
        match frame::decode(&mut buf, frame::MAX_FRAME).expect("sync") {
            Some(p) => {
                let v: Value = serde_json::from_slice(&p).expect("json");
                if v["keepalive"] == true {
                    continue;
                }
                assert_eq!(v["type"], kind, "{v}");
                got += 1;
            }
            None => {
                let r = tokio::time::timeout(Duration::from_secs(60), s.read_buf(&mut buf))
                    .await
                    .expect("replies keep coming")
                    .expect("read");
                assert!(r > 0, "closed after {got}");
            }
        }
    }
}

/// Publishes `n` messages on topics `sym/{i}/t` and waits until `sub`
/// has them all; returns messages per second.
async fn publish_rate(p: &mut UnixStream, sub: &mut UnixStream, n: u32) -> f64 {
    let start = Instant::now();
    let mut buf = Vec::new();
    for i in 0..n {
        put(
            &mut buf,
            &format!(
                r#"{{"type":"publish","topic":"sym/{:07}/t","data":{{"i":{i}}}}}"#,
                (i * 7919) % TOPICS
            ),
        );
    }
    let (_, ()) = tokio::join!(read_n(sub, u64::from(n), "publish"), async {
        p.write_all(&buf).await.expect("publish");
    });
    f64::from(n) / start.elapsed().as_secs_f64()
}

async fn round_trip_median(a: &mut Raw, b: &mut Raw, n: usize) -> Duration {
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        a.send(&json!({"type": "message", "to": "ctl-b", "body": {"i": i}}))
            .await;
        let m = b.recv().await.expect("ctl-b");
        assert_eq!(m["body"]["i"], i);
        b.send(&json!({"type": "message", "to": "ctl-a", "body": {"i": i}}))
            .await;
        let m = a.recv().await.expect("ctl-a");
        assert_eq!(m["body"]["i"], i);
        rtts.push(t.elapsed());
    }
    rtts.sort();
    rtts[n / 2]
}

#[tokio::test]
async fn a_million_subscriptions_in_one_session_keep_everything_fast() {
    tokio::time::timeout(Duration::from_secs(600), async {
        // The control sessions stay silent while the million
        // subscriptions go in, which takes minutes on a loaded machine:
        // no heartbeat eviction in the middle of the measurement.
        let cfg = hermes_bus::RouterConfig {
            heartbeat_timeout: Duration::from_secs(3600),
            ..Default::default()
        };
        let bus = TestBus::start_with(cfg, hermes_bus::hooks::HookEngine::disabled()).await;
        let mut a = Raw::register(&bus.socket, "ctl-a").await;
        let mut b = Raw::register(&bus.socket, "ctl-b").await;
        let mut publisher = UnixStream::connect(&bus.socket).await.expect("connect");
        let mut heavy = UnixStream::connect(&bus.socket).await.expect("connect");
        // Baseline, same run: the subscriber holds one prefix.
        let mut one = Vec::new();
        put(&mut one, r#"{"type":"subscribe","topic":"sym/"}"#);
        heavy.write_all(&one).await.expect("subscribe");
        read_n(&mut heavy, 1, "subscribed").await;
        let rtt_before = round_trip_median(&mut a, &mut b, 200).await;
        let rate_one = publish_rate(&mut publisher, &mut heavy, 20_000).await;
        let mut off = Vec::new();
        put(&mut off, r#"{"type":"unsubscribe","topic":"sym/"}"#);
        heavy.write_all(&off).await.expect("unsubscribe");
        read_n(&mut heavy, 1, "unsubscribed").await;

        // A million prefixes, pipelined, with every reply read.
        let start = Instant::now();
        let mut buf = Vec::with_capacity(64 << 20);
        for i in 0..TOPICS {
            put(&mut buf, &format!(r#"{{"type":"subscribe","topic":"sym/{i:07}/"}}"#));
        }
        let (mut rd, mut wr) = heavy.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&buf).await.expect("subscribe");
            wr
        });
        {
            let mut s = bytes::BytesMut::new();
            let mut got = 0u64;
            while got < u64::from(TOPICS) {
                match frame::decode(&mut s, frame::MAX_FRAME).expect("sync") {
                    Some(p) => {
                        let v: Value = serde_json::from_slice(&p).expect("json");
                        if v["keepalive"] == true {
                            continue;
                        }
                        assert_eq!(v["type"], "subscribed", "{v}");
                        got += 1;
                    }
                    None => {
                        let r = tokio::time::timeout(Duration::from_secs(60), rd.read_buf(&mut s))
                            .await
                            .expect("replies keep coming")
                            .expect("read");
                        assert!(r > 0);
                    }
                }
            }
        }
        let subscribe_time = start.elapsed();
        let wr = writer.await.expect("writer");
        let mut heavy = rd.reunite(wr).expect("reunite");
        let stats = bus.bus.router().stats(Instant::now());
        assert_eq!(stats.subscriptions, TOPICS as usize);

        let rtt_after = round_trip_median(&mut a, &mut b, 200).await;
        let rate_million = publish_rate(&mut publisher, &mut heavy, 20_000).await;
        eprintln!(
            "1,000,000 subscriptions in {:.2} s; publish to the heavy session: {:.0}/s with 1 prefix, {:.0}/s with 1,000,000 ({:.2}x); control round trip p50 {:?} before, {:?} after",
            subscribe_time.as_secs_f64(),
            rate_one,
            rate_million,
            rate_million / rate_one,
            rtt_before,
            rtt_after
        );
        // Going away releases everything.
        drop(heavy);
        let gone = common::eventually(Duration::from_secs(30), || {
            bus.bus.router().stats(Instant::now()).subscriptions == 0
        })
        .await;
        assert!(gone, "a closed session's subscriptions are removed");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn subscription_limits_answer_typed_errors() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let cfg = hermes_bus::RouterConfig {
            topics: hermes_bus::topics::TopicLimits {
                max_per_session: 3,
                max_bytes_per_session: 1 << 20,
                max_prefix: 16,
            },
            ..Default::default()
        };
        let bus = TestBus::start_with(cfg, hermes_bus::hooks::HookEngine::disabled()).await;
        let mut s = Raw::connect(&bus.socket).await;
        s.send(&json!({"type": "subscribe", "topic": "x".repeat(17)}))
            .await;
        assert_eq!(s.recv().await.expect("reply")["code"], "topic_too_long");
        for t in ["a", "b", "c"] {
            s.send(&json!({"type": "subscribe", "topic": t})).await;
            assert_eq!(s.recv().await.expect("reply")["type"], "subscribed");
        }
        s.send(&json!({"type": "subscribe", "topic": "d"})).await;
        assert_eq!(
            s.recv().await.expect("reply")["code"],
            "too_many_subscriptions"
        );
        // A name past 255 bytes is refused too, with its own code.
        let mut n = Raw::connect(&bus.socket).await;
        n.send(&json!({"type": "register", "endpoint": "n".repeat(256)}))
            .await;
        assert_eq!(n.recv().await.expect("reply")["code"], "name_too_long");
        n.send(&json!({"type": "register", "endpoint": "n".repeat(255)}))
            .await;
        assert_eq!(n.recv().await.expect("reply")["type"], "registered");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
