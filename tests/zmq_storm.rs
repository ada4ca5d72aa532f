//! Hostile subscribers: subscription storms, oversized and excess
//! subscriptions, and idle connections must not stall or lock out anyone.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::eventually;
use common::zmq::{raw_peer, serve_zmq, start_proxy, try_raw_peer, RawPeer};
use hermes_bus::transports::unix::frame;
use hermes_bus::transports::zmq::proxy::ProxyStats;
use hermes_bus::transports::zmq::zmtp::{self, Inbound, SocketType, SubChange};
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(120);

/// Keeps reading a raw publisher's socket (the proxy's upstream
/// subscriptions) so its writer never blocks on it.
fn drain(mut p: RawPeer) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while p.next_item(Duration::from_secs(60)).await.is_some() {} })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_storm_does_not_stall_other_traffic() {
    tokio::time::timeout(LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        storm_with_control_pair(&proxy.back(), &proxy.front(), &proxy.stats, None).await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// The same two storms against the bus with both transports in one
/// process (as `hermes-bus server --zmq` runs them): a Unix ping keeps
/// being answered throughout. Prints the round trips' p99 and max (no
/// timing assertion; every ping must be answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_storm_leaves_unix_pings_answered_in_the_bus() {
    tokio::time::timeout(LIMIT, async {
        let tb = common::TestBus::start().await;
        let zmq = serve_zmq(&tb.bus).await;
        let rtts =
            storm_with_control_pair(&zmq.back(), &zmq.front(), &zmq.stats, Some(tb.socket.clone()))
                .await;
        let mut sorted = rtts.clone();
        sorted.sort_unstable();
        let p99 = sorted[(sorted.len() * 99).div_ceil(100).saturating_sub(1)];
        let max = sorted[sorted.len() - 1];
        println!(
            "storm in the bus: {} Unix pings during the storm, all answered; p50 {:?} p99 {p99:?} max {max:?}",
            sorted.len(),
            sorted[sorted.len() / 2]
        );
        zmq.shutdown().await;
        tb.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Pings the bus on its Unix socket every 10 ms from an OS thread of its
/// own (the test's load does not count as bus latency) until `stop`;
/// returns every round trip. Panics when a ping is not answered within
/// 10 s (the bound of this test, not a timing assertion).
fn unix_pinger(socket: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("unix connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let req = frame::encode(br#"{"type": "ping"}"#);
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        let mut rtts = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            s.write_all(&req).expect("ping sent");
            'wait: loop {
                while let Some(p) = frame::decode(&mut buf, frame::MAX_FRAME).expect("a frame") {
                    let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
                    if v["type"] == "pong" && v["keepalive"] != true {
                        break 'wait;
                    }
                }
                let n = s.read(&mut chunk).expect("pong within 10 s");
                assert!(n > 0, "the bus closed the ping connection");
                buf.extend_from_slice(&chunk[..n]);
            }
            rtts.push(t0.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        rtts
    })
}

/// Two raw subscribers × 50,000 subscriptions against the XPUB side at
/// `back` while a raw control pair exchanges messages through it (and,
/// with `ping`, a Unix session pings the bus); asserts ≥ 95 % control
/// delivery and that the storm's subscriptions leave with it. Returns
/// the ping round trips taken during the storm.
async fn storm_with_control_pair(
    back: &str,
    front: &str,
    stats: &Arc<ProxyStats>,
    ping: Option<PathBuf>,
) -> Vec<Duration> {
    {
        let base = stats.snapshot().subscriptions;
        let mut ctl_sub = raw_peer(back, SocketType::Sub).await;
        // A JSON topic (a bare prefix means its quoted form by default).
        ctl_sub.subscribe(b"\"CTRL").await;
        assert!(
            eventually(Duration::from_secs(10), || stats.snapshot().subscriptions
                == base + 1)
            .await
        );
        let ping_stop = Arc::new(AtomicBool::new(false));
        let pinger = ping.map(|socket| unix_pinger(socket, ping_stop.clone()));
        // The control publisher: its reading side (the proxy's upstream
        // subscriptions, storm included) is drained by a task.
        let RawPeer { r, mut w, reader } = raw_peer(front, SocketType::Pub).await;
        let drainer = drain(RawPeer {
            r,
            w: Box::new(tokio::io::sink()),
            reader,
        });

        // The storm: two subscribers, 50,000 subscriptions each, in one
        // write each as fast as the socket takes, then they leave.
        let storm_start = Instant::now();
        let mut storm = Vec::new();
        for s in 0..2 {
            let addr = back.to_owned();
            storm.push(tokio::spawn(async move {
                let mut p = raw_peer(&addr, SocketType::Sub).await;
                let mut b = BytesMut::new();
                for i in 0..50_000u32 {
                    let prefix = format!("\"storm/{s}/{i:06}/xxxxxx");
                    zmtp::put_subscription(&mut b, true, prefix.as_bytes());
                }
                let n = b.len();
                p.w.write_all(&b).await.expect("storm sent");
                p.w.flush().await.expect("flush");
                n
            }));
        }

        // Meanwhile the control pair exchanges numbered messages, one per
        // 10 ms, until the storm was absorbed (and at least 200).
        let stats_s = stats.clone();
        let sender = tokio::spawn(async move {
            let mut sent = 0u32;
            let mut absorbed: Option<Duration> = None;
            while sent < 3_000 && (sent < 200 || absorbed.is_none()) {
                let n = sent.to_string();
                let at = storm_start.elapsed().as_micros().to_string();
                let mut b = BytesMut::new();
                zmtp::put_message(&mut b, &[b"\"CTRL\"", n.as_bytes(), b"0", at.as_bytes()]);
                w.write_all(&b).await.expect("control publish");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                let s = stats_s.snapshot();
                if absorbed.is_none()
                    && storm_start.elapsed() > Duration::from_millis(100)
                    && s.subscriptions == base + 1
                    && s.subscribers.open == 1
                    && s.subscribers.accepted >= 3
                {
                    absorbed = Some(storm_start.elapsed());
                }
            }
            (sent, absorbed)
        });
        // The control subscriber reads as messages come, noting each one's
        // delay, until 5 s of silence (the sender sends every 10 ms).
        let receiver = tokio::spawn(async move {
            let mut got = HashSet::new();
            let mut max_delay = Duration::ZERO;
            while let Some(item) = ctl_sub.next_item(Duration::from_secs(5)).await {
                if let Inbound::Message(m) = item {
                    let f: Vec<&[u8]> = m.frames().collect();
                    assert_eq!(f[0], b"\"CTRL\"");
                    got.insert(String::from_utf8_lossy(f[1]).into_owned());
                    let at: u64 = std::str::from_utf8(f[3])
                        .expect("utf8")
                        .parse()
                        .expect("time");
                    let delay = storm_start
                        .elapsed()
                        .saturating_sub(Duration::from_micros(at));
                    max_delay = max_delay.max(delay);
                }
            }
            // Still subscribed: the count below includes it.
            (got, max_delay, ctl_sub)
        });
        let mut storm_bytes = 0;
        for t in storm {
            storm_bytes += t.await.expect("storm task");
        }
        let (sent, absorbed) = sender.await.expect("sender");
        let (got, max_delay, ctl_sub) = receiver.await.expect("receiver");
        let pct = got.len() as f64 * 100.0 / f64::from(sent);
        println!(
            "storm: {storm_bytes} bytes of subscriptions from 2 peers; absorbed after {absorbed:?}; \
             control delivery {}/{sent} = {pct:.1} %, slowest control message {max_delay:?}",
            got.len()
        );
        assert!(pct >= 95.0, "control delivery {pct:.1} %");
        assert!(
            eventually(Duration::from_secs(30), || {
                let s = stats.snapshot();
                s.subscriptions == base + 1 && s.subscribers.open == 1
            })
            .await,
            "the storm's subscriptions left with it: {:?}",
            stats.snapshot()
        );
        drop(ctl_sub);
        drainer.abort();
        ping_stop.store(true, Ordering::Relaxed);
        match pinger {
            Some(t) => t.join().expect("every ping answered"),
            None => Vec::new(),
        }
    }
}

/// The subscriptions a raw publisher reads until it sees `marker`.
async fn upstream_until(p: &mut RawPeer, marker: &[u8]) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    loop {
        let item = p
            .next_item(Duration::from_secs(20))
            .await
            .expect("the marker subscription arrives upstream");
        if let Some(SubChange::Subscribe(x)) = SubChange::from_inbound(&item) {
            if x.as_ref() == marker {
                return seen;
            }
            seen.push(x.to_vec());
        }
    }
}

#[tokio::test]
async fn subscriptions_beyond_the_limits_are_counted_not_forwarded() {
    tokio::time::timeout(LIMIT, async {
        let proxy = start_proxy(|c| {
            c.max_subs_per_peer = 10;
            c.max_sub_bytes_per_peer = 100;
            // Byte semantics: the sizes below are the bytes as sent.
            c.strict_subscriptions = true;
        })
        .await;
        let mut publisher = raw_peer(&proxy.front(), SocketType::Pub).await;
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .stats
                .snapshot()
                .publishers
                .open
                == 1)
            .await
        );
        // Peer A: one 2 KiB prefix (too long), then 15 prefixes of 4 bytes
        // (10 accepted, 5 over the count).
        let mut a = raw_peer(&proxy.back(), SocketType::Sub).await;
        a.subscribe(&[b'x'; 2048]).await;
        for i in 0..15 {
            a.subscribe(format!("L/{i:02}").as_bytes()).await;
        }
        assert!(
            eventually(Duration::from_secs(10), || {
                let s = proxy.stats.snapshot();
                s.subs_too_long == 1 && s.subs_over_count == 5 && s.subscriptions == 10
            })
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        // Peer B: three prefixes of 40 bytes (the third passes 100 bytes).
        let mut b = raw_peer(&proxy.back(), SocketType::Sub).await;
        for i in 0..3 {
            b.subscribe(format!("B/{i}/{}", "y".repeat(36)).as_bytes())
                .await;
        }
        assert!(
            eventually(Duration::from_secs(10), || {
                let s = proxy.stats.snapshot();
                s.subs_over_bytes == 1 && s.subscriptions == 12
            })
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        // A marker from a third peer: everything forwarded before it is
        // what reached the publisher.
        let mut c = raw_peer(&proxy.back(), SocketType::Sub).await;
        c.subscribe(b"MARKER").await;
        let seen = upstream_until(&mut publisher, b"MARKER").await;
        let mut want: Vec<Vec<u8>> = (0..10).map(|i| format!("L/{i:02}").into_bytes()).collect();
        want.extend((0..2).map(|i| format!("B/{i}/{}", "y".repeat(36)).into_bytes()));
        assert_eq!(seen, want, "only the accepted subscriptions went upstream");
        println!("limits: {:?}", proxy.stats.snapshot());
        drop((a, b, c));
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Raises this process's open-file limit to at least `want` (up to the
/// hard limit); returns the soft limit in force.
// `rlim_t` is u64 here but not on every platform.
#[allow(clippy::unnecessary_cast)]
fn raise_nofile(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid rlimit living across both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < want as libc::rlim_t {
            rl.rlim_cur = (want as libc::rlim_t).min(rl.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        }
    }
    rl.rlim_cur as u64
}

/// `n` connections handshake and do nothing while the limit is `n`: a new
/// subscriber is served once the idle ones were closed.
async fn idle_peers_free_the_limit(n: usize, idle_timeout: Duration) {
    let proxy = start_proxy(|c| {
        c.max_connections = n;
        c.idle_timeout = idle_timeout;
    })
    .await;
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(raw_peer(&proxy.back(), SocketType::Sub).await);
    }
    let opened = Instant::now();
    // Retry (bounded) until the proxy takes a new subscriber again.
    let mut sub = None;
    let mut refused = 0;
    for _ in 0..600 {
        if let Ok(mut p) = try_raw_peer(&proxy.back(), SocketType::Sub).await {
            p.subscribe(b"\"IDLE").await;
            if eventually(Duration::from_secs(2), || {
                proxy.stats.snapshot().subscriptions == 1
            })
            .await
            {
                sub = Some(p);
                break;
            }
        }
        refused += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sub = sub.expect("a new subscriber is served");
    let mut publisher = raw_peer(&proxy.front(), SocketType::Pub).await;
    let frames: [&[u8]; 4] = [b"\"IDLE/x\"", b"o", b"1", b"2.0"];
    publisher.send(&frames).await;
    let got = loop {
        match sub.next_item(Duration::from_secs(10)).await {
            Some(Inbound::Message(m)) => break m,
            Some(_) => {}
            None => panic!("the new subscriber got the message"),
        }
    };
    assert_eq!(got.frames().collect::<Vec<_>>(), frames.to_vec());
    let served = opened.elapsed();
    assert!(
        eventually(Duration::from_secs(30), || proxy
            .stats
            .snapshot()
            .idle_closed
            >= n as u64)
        .await,
        "idle_closed {:?}",
        proxy.stats.snapshot()
    );
    let s = proxy.stats.snapshot();
    println!(
        "idle {n}: a new subscriber was served {served:?} after the idle ones were open \
         ({refused} attempts refused before); rejected {}, idle_closed {}",
        s.subscribers.rejected, s.idle_closed
    );
    drop(idle);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed_and_free_the_limit() {
    tokio::time::timeout(LIMIT, idle_peers_free_the_limit(64, Duration::from_secs(1)))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn idle_connections_at_the_default_limit() {
    // 4,096 connections: both ends live in this process.
    let have = raise_nofile(3 * 4096 + 256);
    if have < 2 * 4096 + 256 {
        let msg = format!("RLIMIT_NOFILE is {have}: 4,096 connections cannot be opened");
        assert!(!common::in_ci(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    tokio::time::timeout(
        LIMIT,
        idle_peers_free_the_limit(4096, Duration::from_secs(10)),
    )
    .await
    .expect("test timed out");
}
