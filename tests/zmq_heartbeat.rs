//! ZMTP 3.1 heartbeats (PING/PONG, libzmq's `ZMQ_HEARTBEAT_*`): libzmq
//! peers with heartbeats stay connected through our proxy; a raw PING gets
//! its context echoed; the proxy drops a peer that goes silent (its own
//! heartbeat, or the TTL the peer asked for); our Receiver and Publisher
//! drop a silent proxy and dial again. The cut-link case across network
//! namespaces is in `zmq_netns.rs`.
#![cfg(feature = "zmq")]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::zmq::{raw_peer, start_proxy, RawPeer};
use common::{eventually, PyPeer, TEST_LIMIT};
use hermes_bus::envelope::Data;
use hermes_bus::transports::zmq::endpoint::{ReadHalf, WriteHalf};
use hermes_bus::transports::zmq::zmtp::{self, FrameReader, Inbound, SocketType};
use hermes_bus::transports::zmq::{HeartbeatConfig, Publisher, PublisherConfig};
use tokio::io::AsyncWriteExt;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// PING every `ivl` ms, give up `timeout` ms after one.
fn beats(ivl: u64, timeout: u64) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: ms(ivl),
        timeout: Some(ms(timeout)),
        ttl: Duration::ZERO,
    }
}

async fn send_ping(peer: &mut RawPeer, ttl_ds: u16, context: &[u8]) {
    let mut b = BytesMut::new();
    zmtp::put_ping(&mut b, ttl_ds, context);
    peer.w.write_all(&b).await.expect("ping");
}

/// Reads until a PONG (skipping anything else, our PINGs included).
async fn next_pong(peer: &mut RawPeer) -> Option<zmtp::Pong> {
    loop {
        match peer.next_item(Duration::from_secs(10)).await? {
            Inbound::Pong(p) => return Some(p),
            _ => continue,
        }
    }
}

/// Reads everything until the proxy closes the connection; how many
/// PINGs came meanwhile. Bounded by `limit` (None: still open then).
async fn pings_until_closed(peer: &mut RawPeer, limit: Duration) -> Option<u64> {
    tokio::time::timeout(limit, async {
        let mut pings = 0;
        loop {
            match peer.reader.next_item() {
                Ok(Some(Inbound::Ping(_))) => pings += 1,
                Ok(Some(_)) => {}
                Ok(None) => match peer.reader.fill(&mut peer.r).await {
                    Ok(true) => {}
                    _ => return pings,
                },
                Err(_) => return pings,
            }
        }
    })
    .await
    .ok()
}

/// pyzmq SUB and PUB with HEARTBEAT_IVL 200 ms / TIMEOUT 1 s stay
/// connected through our proxy across a quiet spell of several timeouts
/// (in which only heartbeats flow) and keep exchanging messages: with our
/// heartbeats off (they live on our PONGs alone) and on (they also answer
/// ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_peers_with_heartbeats_stay_connected_through_our_proxy() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        for ours in [HeartbeatConfig::OFF, beats(200, 1000)] {
            let proxy = start_proxy(|c| c.heartbeat = ours).await;
            let peer = PyPeer::spawn(
                &py,
                "zmq_heartbeat_peer.py",
                &[&proxy.front(), &proxy.back(), "200", "1000", "4"],
                &[],
            );
            let lines = peer.finish(Duration::from_secs(50)).await;
            let v: serde_json::Value = lines
                .iter()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| panic!("python result: {lines:?}"));
            let s = proxy.stats.snapshot();
            println!("proxy heartbeat {ours:?}: python {v}");
            println!(
                "  proxy subscribers: pings received (answered) {}, pings sent {}, pongs received {}, timeouts {}",
                s.subscribers.pings_received,
                s.subscribers.pings_sent,
                s.subscribers.pongs_received,
                s.subscribers.heartbeat_timeouts
            );
            assert!(v["warm"].as_u64().unwrap_or(0) > 0, "{v}");
            for phase in ["before", "after"] {
                let got = v[phase][1].as_u64().unwrap_or(0);
                assert!(got > 0, "{phase}: messages flow ({v})");
            }
            for side in ["sub", "pub"] {
                assert_eq!(v[side]["disconnected"], 0, "{side} stayed connected: {v}");
                assert_eq!(v[side]["connected"], 1, "{side} connected once: {v}");
            }
            // Their PINGs reached us and were answered (4 s of quiet at
            // 200 ms: many).
            for side in [&s.subscribers, &s.publishers] {
                assert!(side.pings_received >= 10, "{side:?}");
                assert_eq!(side.heartbeat_timeouts, 0, "{side:?}");
                assert_eq!(side.pongs_dropped, 0, "{side:?}");
                assert_eq!(side.protocol_errors, 0, "{side:?}");
                if ours.enabled() {
                    assert!(side.pings_sent >= 10, "{side:?}");
                    assert!(side.pongs_received >= 10, "libzmq answers ours: {side:?}");
                } else {
                    assert_eq!(side.pings_sent, 0, "{side:?}");
                }
            }
            proxy.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

/// A raw ZMTP peer's PING gets a PONG echoing its context, on both sides
/// of the proxy, whatever the proxy's own heartbeat settings.
#[tokio::test]
async fn a_ping_gets_a_pong_that_echoes_its_context() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        for (addr, ty) in [
            (proxy.back(), SocketType::Sub),
            (proxy.front(), SocketType::Pub),
        ] {
            let mut peer = raw_peer(&addr, ty).await;
            for ctx in [&b"ctx-0123456789ab"[..], b"x", b""] {
                send_ping(&mut peer, 0, ctx).await;
                let pong = next_pong(&mut peer).await.expect("pong");
                assert_eq!(&pong.context[..], ctx, "{ty:?}");
            }
        }
        let s = proxy.stats.snapshot();
        assert_eq!(s.subscribers.pings_received, 3);
        assert_eq!(s.publishers.pings_received, 3);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// With `heartbeat_ivl` set, a subscriber and a publisher that handshake
/// (and subscribe or publish) and then go silent are dropped, counted as
/// heartbeat timeouts; a peer that answers (our Receiver) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_drops_peers_that_go_silent() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.heartbeat = beats(100, 500)).await;
        let good = common::zmq::receiver(&proxy.back(), |c| {
            c.heartbeat = HeartbeatConfig::OFF;
        });
        good.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let mut sub = raw_peer(&proxy.back(), SocketType::Sub).await;
        sub.subscribe(b"\"T/").await;
        let mut publ = raw_peer(&proxy.front(), SocketType::Pub).await;
        publ.send(&[b"\"T/x\"", b"\"o\"", b"1", b"1.0"]).await;
        // They read (so TCP is alive) but never answer a PING.
        let (a, b) = tokio::join!(
            pings_until_closed(&mut sub, Duration::from_secs(20)),
            pings_until_closed(&mut publ, Duration::from_secs(20))
        );
        let (a, b) = (a.expect("sub dropped"), b.expect("pub dropped"));
        println!("pings seen before the drop: sub {a}, pub {b}");
        assert!(a >= 1 && b >= 1);
        let st = proxy.stats.clone();
        assert!(
            eventually(Duration::from_secs(10), || {
                let s = st.snapshot();
                s.subscribers.heartbeat_timeouts == 1
                    && s.publishers.heartbeat_timeouts == 1
                    && s.publishers.open == 0
                    && s.subscribers.open == 1
            })
            .await,
            "{:?}",
            st.snapshot()
        );
        // The answering receiver was pinged many times and is still there.
        tokio::time::sleep(ms(700)).await;
        let s = st.snapshot();
        assert!(good.is_connected());
        assert_eq!(good.stats().reconnects, 0);
        assert!(good.stats().pings_received >= 5, "{:?}", good.stats());
        assert_eq!(s.subscribers.heartbeat_timeouts, 1, "{s:?}");
        assert_eq!(s.subscribers.protocol_errors, 0);
        assert!(s.subscribers.pongs_received >= 5, "{s:?}");
        // Where the other counters show: the metrics of the status.
        let text = hermes_bus::metrics::render(&serde_json::json!({"transports": {"zmq": s}}));
        for line in [
            "hermes_bus_zmq_subscribers_heartbeat_timeouts_total 1",
            "hermes_bus_zmq_publishers_heartbeat_timeouts_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// With heartbeats off, the proxy still honours the TTL of a peer's PING:
/// a peer that asks for 0.5 s and then says nothing is dropped.
#[tokio::test]
async fn the_proxy_honours_a_peers_ttl() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let mut sub = raw_peer(&proxy.back(), SocketType::Sub).await;
        sub.subscribe(b"\"T/").await;
        // A TTL-less PING asks nothing: the peer stays.
        send_ping(&mut sub, 0, b"").await;
        next_pong(&mut sub).await.expect("pong");
        assert!(
            pings_until_closed(&mut sub, ms(1500)).await.is_none(),
            "kept without a TTL"
        );
        send_ping(&mut sub, 5, b"").await;
        assert_eq!(
            pings_until_closed(&mut sub, Duration::from_secs(20)).await,
            Some(0),
            "dropped after its TTL, never pinged"
        );
        let st = proxy.stats.clone();
        assert!(
            eventually(Duration::from_secs(10), || {
                let s = st.snapshot();
                s.subscribers.heartbeat_timeouts == 1 && s.subscribers.open == 0
            })
            .await,
            "{:?}",
            st.snapshot()
        );
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A fake proxy side that says in its READY it is ours (so clients ping
/// it), handshaking as `ty`.
struct FakeProxySide {
    listener: tokio::net::TcpListener,
    addr: String,
    ty: SocketType,
}

impl FakeProxySide {
    async fn bind(ty: SocketType) -> FakeProxySide {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("tcp://{}", listener.local_addr().expect("addr"));
        FakeProxySide { listener, addr, ty }
    }

    async fn accept(&self) -> RawPeer {
        let (s, _) = tokio::time::timeout(Duration::from_secs(20), self.listener.accept())
            .await
            .expect("a client dialled in time")
            .expect("accept");
        let (r, w) = s.into_split();
        let (mut r, mut w): (ReadHalf, WriteHalf) = (Box::new(r), Box::new(w));
        let mut reader = FrameReader::new(1 << 20);
        zmtp::handshake(
            &mut r,
            &mut w,
            &mut reader,
            self.ty,
            &[(zmtp::CODEC_PROPERTY, b"msgpack")],
            Duration::from_secs(5),
        )
        .await
        .expect("handshake");
        RawPeer { r, w, reader }
    }
}

/// Answers every PING of `peer` for `limit`; returns how many.
async fn answer_pings(peer: &mut RawPeer, limit: Duration) -> u64 {
    let mut n = 0;
    let _ = tokio::time::timeout(limit, async {
        while let Some(item) = peer.next_item(Duration::from_secs(30)).await {
            if let Inbound::Ping(p) = item {
                let mut b = BytesMut::new();
                zmtp::put_pong(&mut b, &p);
                if peer.w.write_all(&b).await.is_err() {
                    return;
                }
                n += 1;
            }
        }
    })
    .await;
    n
}

/// Our Receiver pings a proxy that takes PINGs; when it stops answering
/// (a half-open connection: TCP is fine, nothing comes back), the
/// receiver counts a heartbeat timeout, dials again, re-subscribes and
/// receives.
#[tokio::test]
async fn the_receiver_drops_a_silent_proxy_and_dials_again() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = FakeProxySide::bind(SocketType::XPub).await;
        let r = common::zmq::receiver(&fake.addr, |c| {
            c.heartbeat = beats(100, 500);
            c.topics = vec!["T/".into()];
        });
        let mut first = fake.accept().await;
        // Alive while answered.
        let answered = answer_pings(&mut first, ms(1000)).await;
        assert!(answered >= 3, "{answered}");
        assert_eq!(r.stats().heartbeat_timeouts, 0);
        // Then silent (still reading, never answering): dropped.
        let mut second = fake.accept().await;
        let s = r.stats();
        println!("receiver after the silent proxy: {s:?}");
        assert_eq!(s.heartbeat_timeouts, 1);
        assert!(s.pongs_received >= 3);
        assert!(pings_until_closed(&mut first, ms(100)).await.is_some());
        // The new connection re-subscribed and delivers.
        let sub = loop {
            match second
                .next_item(Duration::from_secs(10))
                .await
                .expect("item")
            {
                Inbound::Message(m) => break m,
                _ => continue,
            }
        };
        assert_eq!(sub.first_frame(), b"\x01\"T/");
        second.send(&[b"\"T/x\"", b"\"o\"", b"7", b"1e10"]).await;
        let env = r
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("envelope");
        assert_eq!(env.topic, "T/x");
        assert!(eventually(Duration::from_secs(10), || r.stats().reconnects == 1).await);
    })
    .await
    .expect("test timed out");
}

/// Our Publisher likewise: a proxy that stops answering is dropped and
/// dialled again, and publishing resumes on the new connection.
#[tokio::test]
async fn the_publisher_drops_a_silent_proxy_and_dials_again() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = FakeProxySide::bind(SocketType::XSub).await;
        let mut cfg = PublisherConfig::new(&fake.addr, "p");
        cfg.heartbeat = beats(100, 500);
        let mut p = Publisher::with_config(cfg).expect("publisher");
        p.start().expect("start");
        let mut first = fake.accept().await;
        let mut sub = BytesMut::new();
        zmtp::put_subscription(&mut sub, true, b"");
        first.w.write_all(&sub).await.expect("subscribe");
        p.wait_for_subscriber("T/x", Duration::from_secs(10))
            .await
            .expect("subscribed");
        assert!(answer_pings(&mut first, ms(800)).await >= 3);
        // Silent from now on.
        let mut second = fake.accept().await;
        let s = p.stats();
        println!("publisher after the silent proxy: {s:?}");
        assert_eq!(s.heartbeat_timeouts, 1);
        second.w.write_all(&sub).await.expect("subscribe");
        p.wait_for_subscriber("T/x", Duration::from_secs(10))
            .await
            .expect("subscribed again");
        assert!(p
            .publish_parts("T/x", "p", &Data::json(&1).expect("json"))
            .expect("publish"));
        let got = loop {
            match second
                .next_item(Duration::from_secs(10))
                .await
                .expect("item")
            {
                Inbound::Message(m) => break m,
                _ => continue,
            }
        };
        assert_eq!(got.first_frame(), b"\"T/x\"");
        assert_eq!(p.stats().reconnects, 1);
        p.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Clients never ping a ZMTP 3.0 peer that is not ours (it may not know
/// PING): a fake proxy without our READY property sees no PING.
#[tokio::test]
async fn clients_do_not_ping_peers_that_do_not_take_pings() {
    tokio::time::timeout(TEST_LIMIT, async {
        let fake = common::zmq::FakeXpub::bind().await;
        let r = common::zmq::receiver(&fake.addr, |c| c.heartbeat = beats(50, 200));
        let mut peer = fake.accept().await;
        assert_eq!(
            pings_until_closed(&mut peer, ms(1000)).await,
            None,
            "still connected"
        );
        let s = r.stats();
        assert_eq!(
            (s.pings_sent, s.heartbeat_timeouts, s.reconnects),
            (0, 0, 0)
        );
    })
    .await
    .expect("test timed out");
}

/// Every TCP socket of the transport, accepted or dialled, has TCP
/// keepalive with our settings (the kernel's own says so).
#[tokio::test]
async fn accepted_and_dialled_sockets_have_tcp_keepalive() {
    use hermes_bus::transports::zmq::endpoint::{
        self as ep, Listener, Stream, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES,
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let l = Listener::bind(&"tcp://127.0.0.1:0".parse().expect("endpoint"))
            .await
            .expect("bind");
        let at = l.local_endpoint().expect("bound");
        let (dialled, accepted) = tokio::join!(ep::connect(&at), l.accept());
        for s in [dialled.expect("connect"), accepted.expect("accept")] {
            let Stream::Tcp(s) = s else {
                panic!("a TCP stream")
            };
            let k = socket2::SockRef::from(&s);
            assert!(k.keepalive().expect("SO_KEEPALIVE"));
            assert_eq!(k.tcp_keepalive_time().expect("idle"), KEEPALIVE_IDLE);
            assert_eq!(
                k.tcp_keepalive_interval().expect("intvl"),
                KEEPALIVE_INTERVAL
            );
            assert_eq!(k.tcp_keepalive_retries().expect("cnt"), KEEPALIVE_PROBES);
        }
    })
    .await
    .expect("test timed out");
}
