//! Faults: a stalled subscriber, a publisher dying mid-frame, a subscriber
//! reset mid-stream, and a proxy restart. Counts, never durations.
#![cfg(feature = "zmq")]

mod common;

use std::time::Duration;

use common::zmq::*;
use common::{eventually, free_tcp_addr, TEST_LIMIT};
use hermes_bus::envelope::Data;
use hermes_bus::transports::zmq::proxy::ProxyConfig;
use hermes_bus::transports::zmq::zmtp::SocketType;
use hermes_bus::transports::zmq::{Publisher, Receiver};
use tokio::io::AsyncWriteExt;

fn receiver(addr: &str, topics: &[&str]) -> Receiver {
    common::zmq::receiver(addr, |c| {
        c.topics = topics.iter().map(|s| s.to_string()).collect();
        c.queue = 1_000_000;
    })
}

async fn started_publisher(front: &str, topic: &str) -> Publisher {
    let mut p = Publisher::new(front, "p").expect("publisher");
    p.start().expect("start");
    p.wait_for_subscriber(topic, Duration::from_secs(15))
        .await
        .expect("subscriber");
    p
}

/// Publishes `n` envelopes of `size` bytes in chunks, waiting for `r` to
/// catch up after each chunk (so only a stalled peer can overflow).
async fn paced_publish(p: &Publisher, r: &Receiver, n: u64, size: usize) {
    let payload = Data::json(&"x".repeat(size)).expect("json");
    let base = r.stats().delivered;
    let mut sent = 0u64;
    while sent < n {
        let chunk = (n - sent).min(500);
        for _ in 0..chunk {
            assert!(
                p.publish_parts("T/x", "p", &payload).expect("publish"),
                "publisher dropped"
            );
        }
        sent += chunk;
        let ok = eventually(Duration::from_secs(20), || {
            r.stats().delivered >= base + sent
        })
        .await;
        assert!(
            ok,
            "healthy receiver stalled at {} of {sent}",
            r.stats().delivered - base
        );
    }
}

#[tokio::test]
async fn stalled_subscriber_does_not_stall_the_others() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| {
            c.sub_queue_bytes = 1 << 20;
        })
        .await;
        // A subscriber that subscribes to everything and never reads.
        let mut stalled = raw_peer(&proxy.back(), SocketType::Sub).await;
        stalled.subscribe(b"").await;
        let r = receiver(&proxy.back(), &["T/"]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let p = started_publisher(&proxy.front(), "T/x").await;
        // 30 MB: far more than the stalled peer's socket buffers + queue.
        const N: u64 = 30_000;
        paced_publish(&p, &r, N, 1000).await;
        let s = r.stats();
        assert_eq!(s.delivered, N);
        assert_eq!(s.dropped, 0);
        let ps = proxy.stats.snapshot();
        assert!(
            ps.subscribers.drops > 0,
            "stalled peer's drops are counted: {ps:?}"
        );
        assert_eq!(ps.publishers.messages, N);
        drop(stalled);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn broken_publishers_and_subscribers_leave_the_proxy_serving() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let r = receiver(&proxy.back(), &["T/"]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let p = started_publisher(&proxy.front(), "T/x").await;

        // A subscriber that reads a little, then resets mid-stream.
        let mut doomed = raw_peer(&proxy.back(), SocketType::Sub).await;
        doomed.subscribe(b"").await;
        paced_publish(&p, &r, 2_000, 200).await;

        // Publishers that die: half a frame then RST; garbage greeting;
        // a clean close mid-message.
        for variant in 0..3 {
            let addr = proxy.ep.frontend.to_string();
            let host = addr.trim_start_matches("tcp://").to_string();
            match variant {
                0 => {
                    let mut peer = raw_peer(&addr, SocketType::Pub).await;
                    // Header announces 100 bytes; send 10 and reset.
                    peer.w
                        .write_all(&[0x01, 100, b'"', b'T', b'/', 0, 0, 0, 0, 0, 0, 0])
                        .await
                        .expect("half");
                    peer.w.flush().await.expect("flush");
                    drop(peer);
                }
                1 => {
                    let mut s = tokio::net::TcpStream::connect(&host)
                        .await
                        .expect("connect");
                    // Not ZMTP at all; a clean close, so the bytes arrive.
                    s.write_all(b"GET / HTTP/1.1\r\n\r\n")
                        .await
                        .expect("garbage");
                    s.shutdown().await.expect("close");
                    drop(s);
                }
                _ => {
                    let s = tokio::net::TcpStream::connect(&host)
                        .await
                        .expect("connect");
                    // Linger 0: close with RST. (Deprecated because a
                    // non-zero linger blocks on drop; zero never does.)
                    #[allow(deprecated)]
                    s.set_linger(Some(Duration::ZERO)).expect("linger");
                    let std = s.into_std().expect("std");
                    let s = tokio::net::TcpStream::from_std(std).expect("tokio");
                    let (mut rd, mut wr) = s.into_split();
                    let mut reader = hermes_bus::transports::zmq::zmtp::FrameReader::new(1 << 20);
                    hermes_bus::transports::zmq::zmtp::handshake(
                        &mut rd,
                        &mut wr,
                        &mut reader,
                        SocketType::Pub,
                        &[],
                        Duration::from_secs(5),
                    )
                    .await
                    .expect("handshake");
                    wr.write_all(&[0x03, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3])
                        .await
                        .expect("long frame, cut");
                    drop(wr);
                    drop(rd);
                }
            }
        }
        // The subscriber resets mid-stream (RST: linger 0 is not reachable
        // on split halves, so close it while data is in flight).
        drop(doomed);
        paced_publish(&p, &r, 2_000, 200).await;
        let ok = eventually(Duration::from_secs(5), || {
            proxy.stats.snapshot().publishers.protocol_errors >= 1
        })
        .await;
        assert!(ok, "garbage greeting counted: {:?}", proxy.stats.snapshot());
        assert_eq!(r.stats().delivered, 4_000);
        // A brand-new pair still works through the same proxy.
        let r2 = receiver(&proxy.back(), &["T/"]);
        r2.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let p2 = started_publisher(&proxy.front(), "T/x").await;
        paced_publish(&p2, &r2, 100, 10).await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn clients_resume_after_a_proxy_restart() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (front, back) = (free_tcp_addr(), free_tcp_addr());
        let cfg = ProxyConfig {
            frontend: front.clone(),
            backend: back.clone(),
            ..ProxyConfig::default()
        };
        let proxy = run_proxy(cfg.clone()).await;
        let r = receiver(&back, &["T/"]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let p = started_publisher(&front, "T/x").await;
        paced_publish(&p, &r, 100, 10).await;

        proxy.stop.cancel();
        proxy.task.await.expect("proxy ended");
        assert!(
            eventually(Duration::from_secs(10), || !p.is_connected()
                && !r.is_connected())
            .await
        );
        // While the proxy is down, publishing drops (counted), never blocks.
        assert!(!p
            .publish_parts("T/x", "p", &Data::json(&0).expect("json"))
            .expect("publish"));
        assert!(p.stats().disconnected >= 1);

        let proxy = run_proxy(cfg).await;
        p.wait_for_subscriber("T/x", Duration::from_secs(15))
            .await
            .expect("publisher and receiver back");
        paced_publish(&p, &r, 100, 10).await;
        assert!(p.stats().reconnects >= 1);
        assert!(r.stats().reconnects >= 1);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn many_publishers_many_subscribers_exact_counts() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        // Subscribers by prefix: "MD/A", "MD/B", and everything under "MD/".
        let prefixes = ["MD/A", "MD/B", "MD/"];
        let subs: Vec<Receiver> = prefixes
            .iter()
            .map(|p| receiver(&proxy.back(), &[p]))
            .collect();
        for s in &subs {
            s.wait_connected(Duration::from_secs(10))
                .await
                .expect("connected");
        }
        let mut pubs = Vec::new();
        for i in 0..4 {
            let mut p = Publisher::new(&proxy.front(), &format!("p{i}")).expect("publisher");
            p.start().expect("start");
            pubs.push(p);
        }
        for p in &pubs {
            for t in ["MD/A1", "MD/B1"] {
                p.wait_for_subscriber(t, Duration::from_secs(15))
                    .await
                    .expect("subscriber");
            }
        }
        const PER: u64 = 1_000;
        let data = Data::json(&[1, 2, 3]).expect("json");
        for round in 0..PER {
            for (i, p) in pubs.iter().enumerate() {
                let topic = if (round + i as u64) % 2 == 0 {
                    "MD/A1"
                } else {
                    "MD/B1"
                };
                assert!(p.publish_parts(topic, p.name(), &data).expect("publish"));
                // Not the subscribed tree: filtered at the source.
                assert!(!p.publish_parts("XX/1", p.name(), &data).expect("publish"));
            }
            if round % 100 == 99 {
                let want = (round + 1) * pubs.len() as u64;
                let ok = eventually(Duration::from_secs(20), || {
                    subs[2].stats().delivered >= want
                })
                .await;
                assert!(ok, "all-MD subscriber stalled");
            }
        }
        let total = PER * pubs.len() as u64;
        let ok = eventually(Duration::from_secs(20), || {
            subs[0].stats().delivered == total / 2
                && subs[1].stats().delivered == total / 2
                && subs[2].stats().delivered == total
        })
        .await;
        let counts: Vec<_> = subs.iter().map(|s| s.stats()).collect();
        assert!(ok, "exact per-prefix counts: {counts:?}");
        for p in &pubs {
            assert_eq!(p.stats().filtered, PER);
        }
        let s = proxy.stats.snapshot();
        assert_eq!(s.publishers.messages, total);
        assert_eq!(s.subscribers.messages, total * 2);
        assert_eq!(s.subscribers.drops, 0);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}
