//! The proxy's opt-in lossless mode, over real loopback sockets:
//! - lossless: a pyzmq SUB that reads slowly gets every message of a
//!   200,000-message burst, in order, and the publisher was pushed back;
//! - default: the same burst to the same slow reader is dropped in part,
//!   and the proxy's counters account for every missing message;
//! - lossless with a subscriber that never reads: after the slow-consumer
//!   timeout it is dropped for (counted), and a healthy slow subscriber
//!   still gets the whole burst;
//! - lossless end to end with our clients: a `Receiver` with a small
//!   queue whose application stalls, then reads, gets the whole burst in
//!   order (its full queue paused its reading, which pushed back on the
//!   proxy and so on the publisher).
//!
//! Counts, never durations: every wait is bounded, nothing asserts on time.
#![cfg(feature = "zmq")]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::zmq::{raw_peer, start_proxy};
use common::{eventually, lines_of, next_line, PyPeer, TEST_LIMIT};
use hermes_bus::envelope::Data;
use hermes_bus::transports::zmq::zmtp::SocketType;
use hermes_bus::transports::zmq::{HeartbeatConfig, Publisher, PublisherConfig, SlowPolicy};

/// Messages in the burst.
const N: u64 = 200_000;
/// Topic of the burst.
const TOPIC: &str = "B/burst";
/// Per-subscriber queue in the proxy: small, so a slow reader fills it.
const SUB_QUEUE: usize = 1_000;
/// The slow reader sleeps this long after every `EVERY` messages.
const PAUSE_MS: &str = "10";
/// See `PAUSE_MS`.
const EVERY: &str = "2000";

/// The burst tests run one at a time: each keeps a Python reader and the
/// proxy busy, and on a 2-core machine three at once would mostly measure
/// the scheduler.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes [`SERIAL`], waiting at most for the other burst tests.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    tokio::time::timeout(3 * TEST_LIMIT, SERIAL.lock())
        .await
        .expect("the other burst tests finished in time")
}

/// Starts the slow pyzmq subscriber; `idle_ms` ends it after that long
/// without a message once one arrived; `hold_ms` stalls it once, after
/// its first message.
async fn slow_sub(py: &std::path::Path, back: &str, idle_ms: u64, hold_ms: u64) -> PyPeer {
    PyPeer::spawn_ready(
        py,
        "zmq_lossless_peer.py",
        &[
            "slow-sub",
            back,
            &N.to_string(),
            "50",
            EVERY,
            PAUSE_MS,
            &idle_ms.to_string(),
            &hold_ms.to_string(),
        ],
    )
    .await
}

/// A proxy in lossless mode with small subscriber queues.
async fn lossless_proxy() -> common::zmq::TestProxy {
    start_proxy(|c| {
        c.lossless = true;
        c.sub_queue = SUB_QUEUE;
    })
    .await
}

/// A publisher whose own queue holds the whole burst, so every message
/// reaches the proxy (its socket, not its queue, meets the pushback).
async fn burst_publisher(front: &str) -> Publisher {
    let mut cfg = PublisherConfig::new(front, "burst");
    cfg.queue = N as usize + 1_000;
    cfg.queue_bytes = 1 << 30;
    cfg.linger = Duration::from_secs(5);
    let mut p = Publisher::with_config(cfg).expect("publisher");
    p.start().expect("start");
    p.wait_for_subscriber(TOPIC, Duration::from_secs(20))
        .await
        .expect("subscriber reached the publisher");
    p
}

/// Publishes `[seq, padding]` for seq in 0..N as fast as it can, then
/// waits until the publisher wrote everything to its socket.
async fn publish_burst(p: &Publisher) {
    let pad = "x".repeat(100);
    for seq in 0..N {
        let data = Data::json(&(seq, &pad)).expect("json");
        assert!(
            p.publish_parts(TOPIC, "burst", &data).expect("publish"),
            "publisher dropped message {seq}: {:?}",
            p.stats()
        );
    }
    // `flush` means "queue empty"; the last batch may still be in the
    // writer's hands, so wait for the sent count.
    let sent = eventually(Duration::from_secs(40), || p.stats().sent >= N).await;
    let s = p.stats();
    assert!(sent, "publisher wrote the burst: {s:?}");
    assert_eq!((s.sent, s.dropped), (N, 0), "{s:?}");
}

/// The slow subscriber's summary line.
async fn summary(peer: &mut PyPeer) -> serde_json::Value {
    peer.next_json(Duration::from_secs(50))
        .await
        .expect("subscriber summary in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_slow_subscriber_gets_the_whole_burst_in_order() {
    let Some(py) = common::python("py07") else {
        return;
    };
    let _serial = one_at_a_time().await;
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = lossless_proxy().await;
        // It also stalls for 3 s after its first message (well under the
        // proxy's no-progress timeout): whatever the machine's load, its
        // queue fills and pushes back on the publisher.
        let mut sub = slow_sub(&py, &proxy.back(), 10_000, 3_000).await;
        let p = burst_publisher(&proxy.front()).await;
        publish_burst(&p).await;
        let s = summary(&mut sub).await;
        assert_eq!(
            s["got"],
            N,
            "every message arrived: {s} {:?}",
            proxy.stats.snapshot()
        );
        assert_eq!(s["first"], 0, "{s}");
        assert_eq!(s["last"], N - 1, "{s}");
        assert_eq!(s["gaps"], 0, "none missing, none reordered: {s}");
        assert_eq!(s["bad"], 0, "{s}");
        let ps = proxy.stats.snapshot();
        assert_eq!(ps.publishers.messages, N);
        assert_eq!(ps.subscribers.drops, 0, "{ps:?}");
        assert_eq!(ps.stuck_subscribers, 0, "{ps:?}");
        assert!(
            ps.publisher_blocks > 0,
            "the full queue pushed back on the publisher: {ps:?}"
        );
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_with_a_full_queue_pushes_back_through_a_lossless_proxy() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = lossless_proxy().await;
        let r = common::zmq::receiver(&proxy.back(), |c| {
            c.topics = vec!["B/".into()];
            c.queue = 1_000;
            // Ages are not the point here (the stall makes them grow).
            c.slow_policy = SlowPolicy::Warn;
            // Heartbeats far shorter than the stall: the proxy's silence
            // while the receiver does not read is not held against it.
            c.heartbeat = HeartbeatConfig {
                interval: Duration::from_millis(100),
                timeout: Some(Duration::from_millis(300)),
                ttl: Duration::ZERO,
            };
        });
        let p = burst_publisher(&proxy.front()).await;
        let reader = tokio::spawn(async move {
            let mut next = 0u64;
            while next < N {
                let Some(e) = r.recv_timeout(Duration::from_secs(20)).await else {
                    break;
                };
                let (seq, _): (u64, String) =
                    serde_json::from_value(serde_json::to_value(&e.data).expect("json"))
                        .expect("[seq, padding]");
                assert_eq!(seq, next, "in order, none missing");
                next += 1;
                if next == 1 {
                    // The application stalls: the receiver's queue fills
                    // and it stops reading; the proxy's fills and pauses
                    // the publisher.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
            (next, r)
        });
        publish_burst(&p).await;
        let (got, r) = reader.await.expect("reader");
        let rs = r.stats();
        let ps = proxy.stats.snapshot();
        assert_eq!(got, N, "every envelope arrived: {rs:?} {ps:?}");
        assert_eq!((rs.delivered, rs.dropped), (N, 0), "{rs:?}");
        assert!(rs.paused > 0, "the full queue paused the receiver: {rs:?}");
        assert!(rs.pings_sent > 0, "{rs:?}");
        assert_eq!((rs.heartbeat_timeouts, rs.reconnects), (0, 0), "{rs:?}");
        assert_eq!(ps.subscribers.drops, 0, "{ps:?}");
        assert!(
            ps.publisher_blocks > 0,
            "the pushback reached the publisher: {ps:?}"
        );
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_mode_drops_for_a_slow_subscriber_and_counts_every_drop() {
    let Some(py) = common::python("py07") else {
        return;
    };
    let _serial = one_at_a_time().await;
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| {
            c.sub_queue = SUB_QUEUE;
        })
        .await;
        // It also stalls for 3 s after its first message: whatever the
        // machine's load, the burst then overflows its queue.
        let mut sub = slow_sub(&py, &proxy.back(), 3_000, 3_000).await;
        let p = burst_publisher(&proxy.front()).await;
        publish_burst(&p).await;
        // The proxy has handled the whole burst once every message was
        // either written to the subscriber or dropped for it.
        let handled = eventually(Duration::from_secs(40), || {
            let s = proxy.stats.snapshot().subscribers;
            s.messages + s.drops == N
        })
        .await;
        let ps = proxy.stats.snapshot();
        assert!(handled, "proxy handled the burst: {ps:?}");
        let s = summary(&mut sub).await;
        assert_eq!(ps.publishers.messages, N);
        assert!(ps.subscribers.drops > 0, "a slow reader loses: {ps:?}");
        assert_eq!(
            s["got"], ps.subscribers.messages,
            "it got what was written: {s} {ps:?}"
        );
        assert_eq!(s["disorder"], 0, "what arrives is in order: {s}");
        assert_eq!(s["bad"], 0, "{s}");
        assert_eq!(ps.publisher_blocks, 0, "no pushback by default: {ps:?}");
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_drops_only_for_a_stuck_subscriber() {
    let Some(py) = common::python("py07") else {
        return;
    };
    let _serial = one_at_a_time().await;
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| {
            c.lossless = true;
            c.sub_queue = SUB_QUEUE;
            // Short, so the test is quick; still well above how long the
            // healthy reader may go without freeing socket buffer space,
            // even on a loaded 2-core machine (2 s was not, once).
            c.slow_timeout = Duration::from_secs(5);
        })
        .await;
        // Completes the handshake, subscribes to everything, never reads.
        let mut stuck = raw_peer(&proxy.back(), SocketType::Sub).await;
        stuck.subscribe(b"").await;
        let mut sub = slow_sub(&py, &proxy.back(), 10_000, 0).await;
        let both = eventually(Duration::from_secs(20), || {
            proxy.stats.snapshot().subscriptions >= 2
        })
        .await;
        assert!(both, "both subscribed: {:?}", proxy.stats.snapshot());
        let p = burst_publisher(&proxy.front()).await;
        publish_burst(&p).await;
        let s = summary(&mut sub).await;
        assert_eq!(
            s["got"],
            N,
            "the healthy one got everything: {s} {:?}",
            proxy.stats.snapshot()
        );
        assert_eq!(s["first"], 0, "{s}");
        assert_eq!(s["last"], N - 1, "{s}");
        assert_eq!(s["gaps"], 0, "{s}");
        let ps = proxy.stats.snapshot();
        assert_eq!(ps.publishers.messages, N);
        assert!(
            ps.stuck_subscribers >= 1,
            "the stuck one was given up on: {ps:?}"
        );
        assert!(
            ps.subscribers.drops > 0,
            "the stuck one's drops are counted: {ps:?}"
        );
        assert!(
            ps.subscribers.drops < N,
            "what it took before it stuck was not dropped: {ps:?}"
        );
        drop(stuck);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_proxy_command_takes_the_lossless_flags() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let bin = common::bin("hermes-bus");
        let mut child = tokio::process::Command::new(&bin)
            .args([
                "proxy",
                "--frontend",
                "tcp://127.0.0.1:0",
                "--backend",
                "tcp://127.0.0.1:0",
                "--lossless",
                "--slow-consumer-timeout",
                "2.5",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn proxy");
        let out = child.stdout.take().expect("stdout");
        let line = next_line(&mut lines_of(out), Duration::from_secs(20)).await;
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert!(
            v["frontend"]
                .as_str()
                .is_some_and(|s| s.starts_with("tcp://127.0.0.1:")),
            "{v}"
        );
        let _ = child.kill().await;
        let bad = tokio::process::Command::new(&bin)
            .args(["proxy", "--lossless", "--slow-consumer-timeout=-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("run");
        assert!(!bad.success(), "a negative timeout is refused");
    })
    .await
    .expect("test timed out");
}
