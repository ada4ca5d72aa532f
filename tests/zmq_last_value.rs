//! The last-value cache (`--last-value`): a subscriber that joins late
//! first gets the newest envelope of every matching topic, then live
//! traffic; a libzmq SUB (pyzmq) unmodified, our `Receiver` (which may
//! decline, or ask in opt-in mode), and a Unix session subscribing with
//! `"snapshot": true` on `server --zmq --last-value`. The cache's bounds
//! evict and count; a large replay does not hold up other subscribers.
#![cfg(feature = "zmq")]

mod common;

use std::time::{Duration, Instant};

use common::zmq::{receiver, start_proxy, TestProxy};
use common::{eventually, free_tcp_addr, PyPeer, Raw, ServerProcess, TEST_LIMIT};
use hermes_bus::envelope::Data;
use hermes_bus::last_value::LastValueLimits;
use hermes_bus::transports::zmq::{LastValueReplay, Publisher, Receiver};
use serde_json::json;

/// Topics of the big replay.
const TOPICS: u64 = 1000;

fn topic(i: u64) -> String {
    format!("LV/{i:04}")
}

/// A publisher to `proxy` once the proxy's everything-subscription (kept
/// for its cache) reached it.
async fn publisher(proxy: &TestProxy) -> Publisher {
    let mut p = Publisher::new(&proxy.front(), "lv-pub").expect("publisher");
    p.start().expect("start");
    p.wait_for_subscriber("anything", Duration::from_secs(15))
        .await
        .expect("the cache's upstream subscription");
    p
}

fn publish(p: &Publisher, topic: &str, n: i64) {
    assert!(p
        .publish_parts(topic, "lv-pub", &Data::json(&n).expect("json"))
        .expect("publish"));
}

/// Publishes `TOPICS` topics twice (the cache must keep the second value)
/// and one topic outside `LV/`; waits until the proxy read them all.
async fn fill(proxy: &TestProxy, p: &Publisher) {
    let before = proxy.stats.snapshot().publishers.messages;
    for round in 0..2 {
        for i in 0..TOPICS {
            publish(p, &topic(i), (round * 10_000 + i) as i64);
        }
    }
    publish(p, "OTHER/x", -1);
    p.flush(Duration::from_secs(10)).await.expect("flushed");
    let want = before + 2 * TOPICS + 1;
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .stats
            .snapshot()
            .publishers
            .messages
            == want)
        .await,
        "{:?}",
        proxy.stats.snapshot()
    );
}

/// Waits until the proxy replayed `n` envelopes in all.
async fn replayed(proxy: &TestProxy, n: u64) {
    assert!(
        eventually(Duration::from_secs(30), || proxy.stats.snapshot().replayed
            >= n)
        .await,
        "replayed {n}: {:?}",
        proxy.stats.snapshot()
    );
}

/// The next `n` envelopes of `r` as (topic, data).
async fn take(r: &Receiver, n: u64) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let e = r
            .recv_timeout(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("envelope {} of {n}", out.len()));
        let v: i64 = serde_json::to_value(&e.data)
            .expect("json")
            .as_i64()
            .expect("a number");
        out.push((e.topic, v));
    }
    out
}

fn want_replay() -> Vec<(String, i64)> {
    (0..TOPICS)
        .map(|i| (topic(i), (10_000 + i) as i64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_pyzmq_sub_and_late_receiver_get_every_last_value_before_live() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.last_value = Some(LastValueLimits::default())).await;
        let mut p = publisher(&proxy).await;
        fill(&proxy, &p).await;
        assert_eq!(proxy.stats.snapshot().cached_topics, TOPICS + 1);

        // A plain libzmq SUB, unmodified, subscribing to the topic frames'
        // prefix (a libzmq SUB filters what it receives by its own
        // subscriptions, so it must name the JSON form).
        let started = Instant::now();
        let mut sub = PyPeer::spawn_ready(
            &py,
            "zmq_peer.py",
            &["sub", &proxy.back(), "\"LV/", &(TOPICS + 1).to_string(), "60"],
        )
        .await;
        replayed(&proxy, TOPICS).await;
        let sub_replayed_in = started.elapsed();
        // Our Receiver (the proxy's default: replay), and one that declines.
        let ours = receiver(&proxy.back(), |c| c.topics = vec!["LV/".into()]);
        replayed(&proxy, 2 * TOPICS).await;
        let declines = receiver(&proxy.back(), |c| {
            c.topics = vec!["LV/".into()];
            c.last_value = Some(false);
        });
        assert!(
            eventually(Duration::from_secs(15), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 3)
            .await
        );
        // Live traffic, after every replay was queued.
        publish(&p, &topic(500), 99_999);

        let mut lines = Vec::new();
        for _ in 0..=TOPICS {
            let l = sub
                .next_json(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("pyzmq line {}", lines.len()));
            lines.push(l);
        }
        let got: Vec<(String, i64)> = lines
            .iter()
            .map(|f| {
                let t: String = serde_json::from_str(f[0].as_str().expect("topic")).expect("json");
                let d: i64 = f[2].as_str().expect("data").parse().expect("number");
                (t, d)
            })
            .collect();
        let mut want = want_replay();
        want.push((topic(500), 99_999));
        assert_eq!(got, want, "pyzmq: the last values in key order, then live");

        assert_eq!(take(&ours, TOPICS + 1).await, want, "our Receiver");
        assert_eq!(take(&declines, 1).await, [(topic(500), 99_999)]);
        assert_eq!(declines.stats().received, 1, "no replay when declined");
        let st = proxy.stats.snapshot();
        assert_eq!(st.replayed, 2 * TOPICS);
        assert_eq!(st.replay_dropped, 0);
        println!(
            "1,000 last values replayed to a late pyzmq SUB within {sub_replayed_in:?} of its start; proxy: replayed {}, cached {} topics / {} bytes",
            st.replayed, st.cached_topics, st.cached_bytes
        );
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn opt_in_mode_replays_only_to_receivers_that_ask() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| {
            c.last_value = Some(LastValueLimits::default());
            c.last_value_replay = LastValueReplay::OptIn;
        })
        .await;
        let mut p = publisher(&proxy).await;
        fill(&proxy, &p).await;
        let plain = receiver(&proxy.back(), |c| c.topics = vec!["LV/".into()]);
        assert!(
            eventually(Duration::from_secs(15), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 1)
            .await
        );
        let asks = receiver(&proxy.back(), |c| {
            c.topics = vec!["LV/".into()];
            c.last_value = Some(true);
        });
        replayed(&proxy, TOPICS).await;
        publish(&p, &topic(7), 77);
        let mut want = want_replay();
        want.push((topic(7), 77));
        assert_eq!(take(&asks, TOPICS + 1).await, want);
        assert_eq!(take(&plain, 1).await, [(topic(7), 77)]);
        assert_eq!(plain.stats().received, 1);
        assert_eq!(proxy.stats.snapshot().replayed, TOPICS);
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_small_byte_bound_evicts_counts_and_stays_within_it() {
    tokio::time::timeout(TEST_LIMIT, async {
        let max_bytes = 32 * 1024;
        let proxy = start_proxy(|c| {
            c.last_value = Some(LastValueLimits {
                max_topics: 1_000_000,
                max_bytes,
            })
        })
        .await;
        let mut p = publisher(&proxy).await;
        let pad = "x".repeat(100);
        for i in 0..TOPICS {
            assert!(p
                .publish_parts(
                    &topic(i),
                    "lv-pub",
                    &Data::json(&format!("{i:04}{pad}")).expect("json")
                )
                .expect("publish"));
        }
        p.flush(Duration::from_secs(10)).await.expect("flushed");
        assert!(
            eventually(Duration::from_secs(20), || proxy
                .stats
                .snapshot()
                .publishers
                .messages
                == TOPICS)
            .await
        );
        let st = proxy.stats.snapshot();
        println!(
            "byte bound {max_bytes}: cached {} topics / {} bytes, {} evictions",
            st.cached_topics, st.cached_bytes, st.cache_evictions
        );
        assert!(st.cached_bytes <= max_bytes as u64, "{st:?}");
        assert!(st.cached_topics > 0 && st.cache_evictions > 0, "{st:?}");
        assert_eq!(st.cached_topics + st.cache_evictions, TOPICS);
        // A late subscriber gets exactly what is kept: the newest topics.
        let late = receiver(&proxy.back(), |_| {});
        let mut got = Vec::new();
        for _ in 0..st.cached_topics {
            let e = late
                .recv_timeout(Duration::from_secs(15))
                .await
                .expect("replayed");
            got.push(e.topic);
        }
        let first_kept = TOPICS - st.cached_topics;
        let want: Vec<String> = (first_kept..TOPICS).map(topic).collect();
        assert_eq!(got, want);
        assert!(late
            .recv_timeout(Duration::from_millis(300))
            .await
            .is_none());
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// `hermes-bus server --zmq --last-value`: the router keeps the newest
/// value of every topic it routes (ZeroMQ envelopes bridged in, Unix
/// publishes), and a Unix session that subscribes with `"snapshot": true`
/// gets the matching ones, then the answer with their count, then live
/// traffic; the proxy's cache (on with the same flag) serves a late
/// ZeroMQ Receiver the same topics.
#[cfg(feature = "unix")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_snapshot_on_server_zmq_last_value_gets_the_last_values_then_live() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (front, back) = (free_tcp_addr(), free_tcp_addr());
        let server = ServerProcess::start(&[
            "--zmq",
            "--last-value",
            "--zmq-in",
            &front,
            "--zmq-out",
            &back,
        ])
        .await;
        let socket = server.socket.clone();
        let mut p = Publisher::new(&front, "lv-pub").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("LV/0", Duration::from_secs(15))
            .await
            .expect("the bus subscribes to everything");
        for round in 0..2 {
            for i in 0..TOPICS {
                publish(&p, &topic(i), (round * 10_000 + i) as i64);
            }
        }
        publish(&p, "OTHER/x", -1);
        p.flush(Duration::from_secs(10)).await.expect("flushed");
        // A Unix publish is kept too.
        let mut unix_pub = Raw::register(&socket, "unix-pub").await;
        unix_pub
            .send(&json!({"type": "publish", "topic": "LV/unix", "data": 7}))
            .await;
        let cached = |v: &serde_json::Value| v["stats"]["router"]["last_value"]["cached_topics"].as_u64();
        let mut stats = serde_json::Value::Null;
        for _ in 0..200 {
            stats = Raw::stats(&socket).await;
            if cached(&stats) == Some(TOPICS + 2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(cached(&stats), Some(TOPICS + 2), "{stats}");

        let mut late = Raw::register(&socket, "late").await;
        let started = Instant::now();
        late.send(&json!({"type": "subscribe", "topic": "LV/", "snapshot": true}))
            .await;
        let mut got = Vec::new();
        let answer = loop {
            let v = late
                .recv_within(Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("frame after {} values", got.len()));
            if v["type"] == "publish" {
                got.push((
                    v["topic"].as_str().expect("topic").to_owned(),
                    v["data"].as_i64().expect("data"),
                ));
            } else {
                break v;
            }
        };
        let took = started.elapsed();
        assert_eq!(answer["type"], "subscribed", "{answer}");
        assert_eq!(answer["snapshot"], json!(TOPICS + 1));
        let mut want = want_replay();
        want.push(("LV/unix".to_owned(), 7));
        assert_eq!(got, want, "the last values in topic order, OTHER/ not among them");
        // Live traffic after the snapshot.
        publish(&p, &topic(500), 99_999);
        let v = late.recv_within(Duration::from_secs(10)).await.expect("live");
        assert_eq!((v["topic"].as_str(), v["data"].as_i64()), (Some("LV/0500"), Some(99_999)));
        // A session without a snapshot just subscribes.
        let mut plain = Raw::register(&socket, "plain").await;
        plain
            .send(&json!({"type": "subscribe", "topic": "LV/"}))
            .await;
        let v = plain.recv().await.expect("answer");
        assert_eq!(v["type"], "subscribed");
        assert!(v.get("snapshot").is_none(), "{v}");

        // The proxy's own cache (turned on by the same flag).
        let r = receiver(&back, |c| c.topics = vec!["LV/".into()]);
        let mut z = take(&r, TOPICS + 1).await;
        let unix = z.pop().expect("LV/unix");
        assert_eq!(unix, ("LV/unix".to_owned(), 7));
        assert_eq!(z.len() as u64, TOPICS);
        assert_eq!(z[500], (topic(500), 99_999));

        let stats = Raw::stats(&socket).await;
        let lv = &stats["stats"]["router"]["last_value"];
        assert_eq!(lv["replayed"], json!(TOPICS + 1), "{lv}");
        let zmq = &stats["stats"]["transports"]["zmq"];
        assert!(zmq["replayed"].as_u64() >= Some(TOPICS + 1), "{zmq}");
        println!(
            "Unix snapshot of {} values took {took:?}; router cache: {lv}; proxy: cached {} topics / {} bytes",
            TOPICS + 1,
            zmq["cached_topics"],
            zmq["cached_bytes"]
        );
        p.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A replay of 20,000 topics goes a chunk per cache lock: another
/// subscriber's live traffic flows meanwhile (figures printed; every
/// control message and every replayed value is checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_replay_does_not_stall_other_subscribers() {
    tokio::time::timeout(TEST_LIMIT, async {
        const BIG: u64 = 20_000;
        const CONTROL: u64 = 200;
        let proxy = start_proxy(|c| c.last_value = Some(LastValueLimits::default())).await;
        let mut p = publisher(&proxy).await;
        for i in 0..BIG {
            publish(&p, &format!("BIG/{i:05}"), i as i64);
        }
        p.flush(Duration::from_secs(20)).await.expect("flushed");
        assert!(
            eventually(Duration::from_secs(30), || proxy.stats.snapshot().cached_topics == BIG)
                .await
        );
        let control = receiver(&proxy.back(), |c| c.topics = vec!["CTL/".into()]);
        assert!(
            eventually(Duration::from_secs(10), || proxy.stats.snapshot().subscriptions == 1).await
        );
        let started = Instant::now();
        let late = receiver(&proxy.back(), |c| c.topics = vec!["BIG/".into()]);
        // Control traffic while the replay runs.
        let mut max_lag = 0.0f64;
        for i in 0..CONTROL {
            publish(&p, "CTL/x", i as i64);
            let e = control
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("control message during the replay");
            assert_eq!(serde_json::to_value(&e.data).expect("json"), i);
            max_lag = max_lag.max(hermes_bus::clock::unix_now() - e.ts);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let replayed_during = proxy.stats.snapshot().replayed;
        for i in 0..BIG {
            let e = late
                .recv_timeout(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("replayed value {i}"));
            assert_eq!(e.topic, format!("BIG/{i:05}"));
        }
        println!(
            "replay of {BIG} topics: {:?} to the late receiver; {CONTROL} control messages meanwhile (replayed by then: {replayed_during}), worst control lag {:.1} ms",
            started.elapsed(),
            max_lag * 1e3
        );
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}
