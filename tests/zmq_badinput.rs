//! Bad input through the proxy: wrong frame counts, frames that are not
//! JSON, oversized messages, and MessagePack for peers that did not opt
//! in. Each is counted; nothing crashes; valid traffic keeps flowing.
#![cfg(feature = "zmq")]

mod common;

use std::time::Duration;

use common::zmq::*;
use common::{eventually, TEST_LIMIT};
use hermes_bus::codec::{self, Codec, MSGPACK_MARKER};
use hermes_bus::envelope::{Quote, Registry};
use hermes_bus::transports::zmq::zmtp::SocketType;
use hermes_bus::transports::zmq::{Receiver, SlowPolicy};

fn receiver(addr: &str, codec: Codec) -> Receiver {
    common::zmq::receiver(addr, |c| c.codec = codec)
}

const TOPIC: &[u8] = b"\"T/x\"";
const ORIGIN: &[u8] = b"\"raw\"";

#[tokio::test]
async fn malformed_and_oversized_messages_are_counted_not_fatal() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.max_msg_size = 64 * 1024).await;
        let r = receiver(&proxy.back(), Codec::Json);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let mut p = raw_peer(&proxy.front(), SocketType::Pub).await;
        // Wait until the receivers' subscriptions reached the proxy (and
        // give the proxy's replay to the publisher a moment).
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 1)
            .await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;

        p.send(&[TOPIC, ORIGIN, b"1"]).await; // 3 frames
        p.send(&[TOPIC, ORIGIN, b"1", b"2.0", b"extra"]).await; // 5 frames
        p.send(&[b"not json", b"{", b"}", b"x"]).await; // not JSON
        p.send(&[TOPIC, ORIGIN, b"{\"a\":", b"1.5"]).await; // bad data JSON
        p.send(&[TOPIC, ORIGIN, &vec![b'7'; 100 * 1024], b"1.5"])
            .await; // oversized
        p.send(&[TOPIC, ORIGIN, b"[\"ok\"]", b"1.5"]).await; // valid
        let env = r
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("the valid envelope arrives");
        assert_eq!(env.topic, "T/x");
        assert_eq!(
            serde_json::to_value(&env.data).expect("json"),
            serde_json::json!(["ok"])
        );

        let s = proxy.stats.snapshot();
        // Forwarded like a ZeroMQ proxy, but counted: 3 structural ones
        // (the bad data frame is only caught where data is decoded).
        assert_eq!(s.publishers.malformed, 3, "{s:?}");
        assert_eq!(s.publishers.drops, 1, "oversized dropped: {s:?}");
        assert_eq!(s.publishers.messages, 5);
        let rs = r.stats();
        assert_eq!(rs.malformed, 4, "{rs:?}");
        assert_eq!(rs.delivered, 1);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn msgpack_reaches_only_peers_that_opted_in() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let json_r = receiver(&proxy.back(), Codec::Json);
        let mp_r = receiver(&proxy.back(), Codec::MsgPack);
        json_r
            .wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        mp_r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let mut p = raw_peer(&proxy.front(), SocketType::Pub).await;
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 2)
            .await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;

        let q = Quote {
            ts: 1.0,
            symbol: "ABC".into(),
            bid: 1.0,
            bid_size: 2.0,
            ask: 3.0,
            ask_size: 4.0,
        };
        let mp = codec::encode(Codec::MsgPack, &q).expect("msgpack");
        assert_eq!(mp[0], MSGPACK_MARKER);
        p.send(&[TOPIC, ORIGIN, &mp, b"1.5"]).await;
        // Invalid MessagePack after the marker.
        p.send(&[TOPIC, ORIGIN, &[MSGPACK_MARKER, 0xC1, 0xC1], b"1.5"])
            .await;
        p.send(&[TOPIC, ORIGIN, b"[\"end\"]", b"1.5"]).await;

        for r in [&json_r, &mp_r] {
            let e = r
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("quote");
            assert_eq!(e.data.downcast_ref::<Quote>(), Some(&q));
            let e = r.recv_timeout(Duration::from_secs(10)).await.expect("end");
            assert_eq!(
                serde_json::to_value(&e.data).expect("json"),
                serde_json::json!(["end"])
            );
        }
        // The JSON peer got a transcoded copy and never the broken one;
        // the MessagePack peer got the broken one and counted it.
        assert_eq!(json_r.stats().codec_errors, 0);
        assert_eq!(mp_r.stats().codec_errors, 1);
        assert_eq!(proxy.stats.snapshot().transcoded, 1);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn receiver_counts_a_codec_it_did_not_opt_in_to() {
    // Without our proxy in between (a peer that ignores the opt-in), the
    // JSON receiver must count MessagePack data, not decode garbage.
    tokio::time::timeout(TEST_LIMIT, async {
        let xpub = FakeXpub::bind().await;
        let r = receiver(&xpub.addr, Codec::Json);
        let mut peer = xpub.accept().await;
        let mp = codec::encode(Codec::MsgPack, &serde_json::json!([1, 2])).expect("mp");
        peer.send(&[TOPIC, ORIGIN, &mp[..], b"1.5"]).await;
        peer.send(&[TOPIC, ORIGIN, b"3", b"1.5"]).await;
        let e = r
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("json one");
        assert_eq!(
            serde_json::to_value(&e.data).expect("json"),
            serde_json::json!(3)
        );
        assert_eq!(r.stats().codec_errors, 1);
        let _ = Registry::shared();
    })
    .await
    .expect("test timed out");
}

fn fake_receiver(addr: &str, policy: SlowPolicy, exchanges: &[&str]) -> Receiver {
    common::zmq::receiver(addr, |c| {
        c.slow_policy = policy;
        c.exchanges = exchanges.iter().map(|s| s.to_string()).collect();
    })
}

#[tokio::test]
async fn lagging_envelopes_follow_the_slow_policy_and_origins_are_filtered() {
    tokio::time::timeout(TEST_LIMIT, async {
        let now = hermes_bus::envelope::unix_now();
        let fresh = format!("{now}");
        let old = format!("{}", now - 30.0);
        for policy in [SlowPolicy::Warn, SlowPolicy::Drop, SlowPolicy::Stop] {
            let server = FakeXpub::bind().await;
            let r = fake_receiver(&server.addr, policy, &["raw"]);
            let mut peer = server.accept().await;
            let other: &[u8] = b"\"someone-else\"";
            peer.send(&[TOPIC, other, b"0", fresh.as_bytes()]).await;
            peer.send(&[TOPIC, ORIGIN, b"1", old.as_bytes()]).await;
            peer.send(&[TOPIC, ORIGIN, b"2", fresh.as_bytes()]).await;
            let mut got = Vec::new();
            while let Some(e) = r.recv_timeout(Duration::from_secs(5)).await {
                assert_eq!(e.origin, "raw");
                got.push(serde_json::to_value(&e.data).expect("json"));
                if got.len() == 2 || policy != SlowPolicy::Warn {
                    break;
                }
            }
            let s = r.stats();
            assert_eq!(s.filtered, 1, "{policy:?}: origin filter");
            assert_eq!(s.lagging, 1, "{policy:?}: lag counted");
            match policy {
                SlowPolicy::Warn => assert_eq!(got, vec![1, 2]),
                SlowPolicy::Drop => {
                    assert_eq!(got, vec![2]);
                    assert_eq!(s.dropped, 1);
                }
                SlowPolicy::Stop => {
                    // The reference's "suicidal snail": it stops receiving.
                    assert!(got.is_empty(), "{got:?}");
                    assert!(eventually(Duration::from_secs(5), || !r.is_running()).await);
                    assert!(r.recv_timeout(Duration::from_secs(1)).await.is_none());
                }
            }
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_recv_like_the_reference() {
    tokio::time::timeout(TEST_LIMIT, async {
        let server = FakeXpub::bind().await;
        let r = std::sync::Arc::new(fake_receiver(&server.addr, SlowPolicy::Warn, &[]));
        let mut peer = server.accept().await;
        // Non-blocking on an empty queue: None at once.
        assert!(r.recv_blocking(false, None).is_none());
        let r2 = r.clone();
        let waiter = tokio::task::spawn_blocking(move || {
            r2.recv_blocking(true, Some(Duration::from_secs(10)))
        });
        let ts = format!("{}", hermes_bus::envelope::unix_now());
        peer.send(&[TOPIC, ORIGIN, b"\"hi\"", ts.as_bytes()]).await;
        let e = waiter.await.expect("join").expect("blocking recv got it");
        assert_eq!(e.topic, "T/x");
        let r3 = r.clone();
        let none = tokio::task::spawn_blocking(move || {
            r3.recv_blocking(true, Some(Duration::from_millis(50)))
        });
        assert!(none.await.expect("join").is_none(), "timeout gives None");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_receiver_that_does_not_read_stops_reading_at_its_queue_bytes_and_loses_nothing() {
    // A peer sends 200 envelopes of about 16 KiB to a receiver whose
    // application does not call recv yet: the queue stops at its byte
    // bound (64 KiB) and the receiver stops reading (the rest waits in the
    // sockets: pushback on the peer, as from a libzmq SUB); once the
    // application reads, all 200 come, in order, none dropped.
    tokio::time::timeout(TEST_LIMIT, async {
        const BOUND: usize = 64 * 1024;
        let xpub = FakeXpub::bind().await;
        let r = common::zmq::receiver(&xpub.addr, |c| c.queue_bytes = BOUND);
        let mut peer = xpub.accept().await;
        let ts = format!("{}", hermes_bus::envelope::unix_now());
        let sender = tokio::spawn(async move {
            for i in 0..200u32 {
                let data =
                    serde_json::to_vec(&format!("{i:04}{}", "x".repeat(16 * 1024))).expect("json");
                peer.send(&[TOPIC, ORIGIN, &data, ts.as_bytes()]).await;
            }
            peer
        });
        assert!(
            eventually(Duration::from_secs(20), || r.stats().paused > 0).await,
            "{:?}",
            r.stats()
        );
        let s = r.stats();
        assert!(s.queued_bytes as usize <= BOUND, "{s:?}");
        assert!(s.delivered > 0 && s.delivered < 200, "{s:?}");
        assert_eq!(s.dropped, 0, "{s:?}");
        assert_eq!(r.pending() as u64, s.delivered, "{s:?}");
        // The application reads: everything comes, in order.
        for i in 0..200u32 {
            let e = r
                .recv_timeout(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("envelope {i} in time: {:?}", r.stats()));
            let text: String = serde_json::from_value(serde_json::to_value(&e.data).expect("json"))
                .expect("a string");
            assert_eq!(&text[..4], format!("{i:04}"), "in order");
        }
        let _peer = sender.await.expect("sender");
        let s = r.stats();
        assert_eq!((s.delivered, s.dropped), (200, 0), "{s:?}");
        assert_eq!(s.reconnects, 0, "{s:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_receiver_that_drops_when_full_holds_at_most_its_queue_bytes() {
    // The same burst to a receiver told to drop when full
    // (`drop_when_full`): the queue stops at its byte bound (64 KiB), the
    // rest is dropped and counted, and what it holds shows.
    tokio::time::timeout(TEST_LIMIT, async {
        const BOUND: usize = 64 * 1024;
        let xpub = FakeXpub::bind().await;
        let r = common::zmq::receiver(&xpub.addr, |c| {
            c.queue_bytes = BOUND;
            c.drop_when_full = true;
        });
        let mut peer = xpub.accept().await;
        let data = serde_json::to_vec(&"x".repeat(16 * 1024)).expect("json");
        let ts = format!("{}", hermes_bus::envelope::unix_now());
        for _ in 0..200 {
            peer.send(&[TOPIC, ORIGIN, &data, ts.as_bytes()]).await;
        }
        assert!(
            eventually(Duration::from_secs(20), || r.stats().received == 200).await,
            "{:?}",
            r.stats()
        );
        let s = r.stats();
        assert!(s.queued_bytes as usize <= BOUND, "{s:?}");
        assert!(s.queued_bytes > 0, "{s:?}");
        assert!(s.dropped > 0, "{s:?}");
        assert_eq!(s.delivered + s.dropped, 200, "{s:?}");
        assert_eq!(r.pending() as u64, s.delivered, "{s:?}");
        // What it holds is what recv gives, whole.
        let mut got = 0;
        while let Some(e) = r.try_recv() {
            assert_eq!(e.origin, "raw");
            got += 1;
        }
        assert_eq!(got, s.delivered);
        assert_eq!(r.stats().queued_bytes, 0);
    })
    .await
    .expect("test timed out");
}
