//! Sequence numbers and gap detection through our ZeroMQ proxy: drops at
//! the proxy counted exactly as gaps, reference and libzmq subscribers
//! unaffected next to a numbered receiver, the loss of a proxy restart
//! shown as a gap, and numbers across the bus between ZeroMQ and Unix
//! sessions.
#![cfg(feature = "zmq")]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::zmq::{receiver, run_proxy, serve_zmq, start_proxy};
use common::{eventually, free_tcp_addr, PyPeer, Raw, TestBus, TEST_LIMIT};
use hermes_bus::envelope::{Data, Envelope};
use hermes_bus::seq::Gap;
use hermes_bus::transports::zmq::proxy::ProxyConfig;
use hermes_bus::transports::zmq::{OnGap, Publisher, Receiver};
use serde_json::{json, Value};

/// A numbered receiver of `topics` whose gap reports land in the list.
fn seq_receiver(addr: &str, topics: &[&str]) -> (Receiver, Arc<Mutex<Vec<Gap>>>) {
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let sink = gaps.clone();
    let r = receiver(addr, |c| {
        c.topics = topics.iter().map(|t| t.to_string()).collect();
        c.seq = true;
        c.on_gap = Some(OnGap::new(move |g| sink.lock().unwrap().push(g.clone())));
    });
    (r, gaps)
}

/// A message in the reference's struct form (`[dtype, ts, fields...]`: the
/// reference receiver reads `data[0]` as the dtype).
fn data(i: u64) -> Data {
    Data::json(&json!(["Tick", 1.5, i])).expect("json")
}

/// Moves what `r` holds now into `out`.
fn drain(r: &Receiver, out: &mut Vec<Envelope>) {
    while let Some(e) = r.try_recv() {
        out.push(e);
    }
}

/// What one receiver saw of one topic: envelopes, first and last number.
#[derive(Debug, Default)]
struct Seen {
    count: u64,
    first: u64,
    last: u64,
}

fn per_topic(envs: &[Envelope]) -> BTreeMap<String, Seen> {
    let mut m: BTreeMap<String, Seen> = BTreeMap::new();
    for e in envs {
        let n = e.seq.as_ref().expect("numbered").n;
        let s = m.entry(e.topic.clone()).or_default();
        if s.count == 0 {
            s.first = n;
        }
        s.count += 1;
        s.last = n;
    }
    m
}

/// With a tiny subscriber queue the proxy drops; every drop shows as a
/// gap at the receiver it was dropped for, exactly: the gaps' missing
/// envelopes equal the proxy's drop counter, and what each receiver got
/// plus what it was told is missing equals what was sent. One receiver
/// takes a subset of the topics (numbers are per topic, so it sees no
/// false gap for the topics it did not want), and a third topic nobody
/// wants is numbered and filtered at the source.
#[tokio::test]
async fn tiny_queue_drops_are_reported_as_exact_gaps() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.sub_queue = 4).await;
        let (all, all_gaps) = seq_receiver(&proxy.back(), &["T/"]);
        let (only_a, a_gaps) = seq_receiver(&proxy.back(), &["T/a"]);
        for r in [&all, &only_a] {
            r.wait_connected(Duration::from_secs(10))
                .await
                .expect("connected");
        }
        let mut p = Publisher::new(&proxy.front(), "feed").expect("publisher");
        p.start().expect("start");
        for t in ["T/a", "T/b"] {
            p.wait_for_subscriber(t, Duration::from_secs(15))
                .await
                .expect("subscribed");
        }
        let (mut got_all, mut got_a) = (Vec::new(), Vec::new());
        // Warm-up, paced (nothing dropped): every stream gets its baseline
        // before the blast, so a drop of its first envelopes is a gap too.
        let mut sent = BTreeMap::<&str, u64>::new();
        for _ in 0..200 {
            for t in ["T/a", "T/b"] {
                p.publish_parts(t, "feed", &data(0)).expect("publish");
                *sent.entry(t).or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            drain(&all, &mut got_all);
            drain(&only_a, &mut got_a);
            let topics = per_topic(&got_all);
            if topics.len() == 2 && !got_a.is_empty() {
                break;
            }
        }
        assert!(!got_a.is_empty(), "warm-up reached both receivers");
        // The blast: T/a, T/b, and U/x that nobody wants.
        const N: u64 = 20_000;
        for i in 0..N {
            for t in ["T/a", "T/b", "U/x"] {
                p.publish_parts(t, "feed", &data(i)).expect("publish");
                *sent.entry(t).or_default() += 1;
            }
            if i % 1000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        p.flush(Duration::from_secs(30)).await.expect("flushed");
        // Settled: the proxy read everything the publisher wrote, and the
        // receivers read everything the proxy wrote to them.
        let settled = eventually(Duration::from_secs(30), || {
            let s = proxy.stats.snapshot();
            s.publishers.messages == p.stats().sent
                && all.stats().received + only_a.stats().received == s.subscribers.messages
        })
        .await;
        assert!(settled, "proxy and receivers settled");
        // A fence per topic, paced, so the last drops show too (a gap is
        // seen when the next envelope of its stream arrives).
        for t in ["T/a", "T/b"] {
            let before = (all.stats().received, only_a.stats().received);
            p.publish_parts(t, "feed", &data(N)).expect("publish");
            *sent.entry(t).or_default() += 1;
            let want_a = u64::from(t == "T/a");
            assert!(
                eventually(Duration::from_secs(10), || all.stats().received == before.0 + 1
                    && only_a.stats().received == before.1 + want_a)
                .await
            );
        }
        drain(&all, &mut got_all);
        drain(&only_a, &mut got_a);

        let drops = proxy.stats.snapshot().subscribers.drops;
        let (sa, so) = (all.stats(), only_a.stats());
        println!(
            "sent {sent:?}; proxy drops {drops}; all: got {} gaps {} missing {}; only T/a: got {} gaps {} missing {}",
            got_all.len(),
            sa.gaps,
            sa.missing,
            got_a.len(),
            so.gaps,
            so.missing
        );
        assert!(drops > 0, "the tiny queue dropped");
        assert_eq!(sa.missing + so.missing, drops, "every drop is a gap");
        // Each report: our publisher's origin, a wanted topic.
        let ga = all_gaps.lock().unwrap().clone();
        let gb = a_gaps.lock().unwrap().clone();
        assert_eq!(ga.len() as u64, sa.gaps);
        assert_eq!(gb.len() as u64, so.gaps);
        assert_eq!(ga.iter().map(Gap::missing).sum::<u64>(), sa.missing);
        assert_eq!(gb.iter().map(Gap::missing).sum::<u64>(), so.missing);
        assert!(ga
            .iter()
            .all(|g| g.origin == p.origin_id() && (g.topic == "T/a" || g.topic == "T/b")));
        assert!(gb
            .iter()
            .all(|g| g.origin == p.origin_id() && g.topic == "T/a"));
        // Got + missing = sent, per stream: the last number is what the
        // publisher was asked to send on that topic.
        for (envs, gaps, topics) in [
            (&got_all, &ga, &["T/a", "T/b"][..]),
            (&got_a, &gb, &["T/a"][..]),
        ] {
            let seen = per_topic(envs);
            assert_eq!(seen.len(), topics.len());
            for t in topics {
                let s = &seen[*t];
                let missing: u64 = gaps.iter().filter(|g| g.topic == *t).map(Gap::missing).sum();
                assert_eq!(s.last, sent[t], "{t}: the last number is the count sent");
                assert_eq!(s.count + missing, s.last - s.first + 1, "{t}");
            }
        }
        let by_origin = all.gaps_by_origin();
        assert_eq!(by_origin.len(), 1);
        assert_eq!(by_origin[0].origin, p.origin_id());
        assert_eq!((by_origin[0].gaps, by_origin[0].missing), (sa.gaps, sa.missing));
        assert_eq!((sa.seq_restarts, sa.seq_stale, sa.malformed), (0, 0, 0));
        assert_eq!(p.stats().filtered, N, "U/x was numbered and filtered at the source");
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A reference hermes-zmq 1.3.0 Receiver and a pyzmq SUB on the same proxy
/// as a numbered receiver still get well-formed 4-frame envelopes, and
/// so does our receiver that did not ask; the numbered one gets numbers.
#[tokio::test]
async fn reference_and_libzmq_subscribers_get_four_frames_next_to_a_numbered_receiver() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        const K: usize = 10;
        let proxy = start_proxy(|_| {}).await;
        let k = K.to_string();
        let mut sub = PyPeer::spawn_ready(
            &py,
            "zmq_peer.py",
            &["sub", &proxy.back(), "\"S/", &k, "30"],
        )
        .await;
        let mut reference =
            PyPeer::spawn_ready(&py, "zmq_peer.py", &["recv", &proxy.back(), &k, "30"]).await;
        let (numbered, gaps) = seq_receiver(&proxy.back(), &["S/"]);
        let plain = receiver(&proxy.back(), |c| c.topics = vec!["S/".into()]);
        for r in [&numbered, &plain] {
            r.wait_connected(Duration::from_secs(10))
                .await
                .expect("connected");
        }
        let mut p = Publisher::new(&proxy.front(), "feed").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("S/x", Duration::from_secs(15))
            .await
            .expect("subscribed");
        let (mut sub_lines, mut ref_lines) = (Vec::new(), Vec::new());
        let (mut got_n, mut got_p) = (Vec::new(), Vec::new());
        let mut i = 0u64;
        while sub_lines.len() < K || ref_lines.len() < K || got_n.len() < K || got_p.len() < K {
            assert!(
                i < 1000,
                "peers got too little: {sub_lines:?} {ref_lines:?}"
            );
            p.publish_parts("S/x", "feed", &data(i)).expect("publish");
            i += 1;
            if sub_lines.len() < K {
                if let Some(l) = sub.next_json(Duration::from_millis(20)).await {
                    sub_lines.push(l);
                }
            }
            if ref_lines.len() < K {
                if let Some(l) = reference.next_json(Duration::from_millis(20)).await {
                    ref_lines.push(l);
                }
            }
            drain(&numbered, &mut got_n);
            drain(&plain, &mut got_p);
        }
        println!("published {i}; pyzmq SUB frames: {}", sub_lines[0]);
        for l in &sub_lines {
            let f = l.as_array().expect("frames");
            assert_eq!(f.len(), 4, "libzmq SUB gets 4 frames: {l}");
            assert_eq!(f[0], "\"S/x\"");
            assert_eq!(f[1], "\"feed\"");
            let d: Value = serde_json::from_str(f[2].as_str().unwrap()).expect("data");
            assert!(d[0] == "Tick" && d[2].is_u64(), "{l}");
            let ts: f64 = f[3].as_str().unwrap().parse().expect("ts");
            assert!(ts > 1.0e9);
        }
        for l in &ref_lines {
            assert_eq!(
                (l["topic"].as_str(), l["origin"].as_str()),
                (Some("S/x"), Some("feed"))
            );
            assert!(l["data"][0] == "Tick" && l["data"][2].is_u64(), "{l}");
            assert!(l["ts"].as_f64().unwrap() > 1.0e9);
        }
        // Ours, not asking: 4 frames, nothing malformed, no numbers.
        assert!(got_p.iter().all(|e| e.seq.is_none() && e.topic == "S/x"));
        assert_eq!(plain.stats().malformed, 0);
        // Ours, asking: consecutive numbers of our publisher's origin.
        let first = got_n[0].seq.as_ref().expect("numbered").n;
        for (k, e) in got_n.iter().enumerate() {
            let s = e.seq.as_ref().expect("numbered");
            assert_eq!((&*s.origin, s.n), (p.origin_id(), first + k as u64));
        }
        assert!(gaps.lock().unwrap().is_empty());
        assert_eq!(numbered.stats().malformed, 0);
        let st = proxy.stats.snapshot();
        assert!(
            st.seq_stripped > 0 && st.publishers.malformed == 0,
            "{st:?}"
        );
        assert!(p.stats().numbered > 0);
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A publisher keeps numbering across its reconnect through a proxy
/// restart (same origin): what was lost meanwhile (published while
/// disconnected, filtered until the subscription came back, in flight)
/// shows as a gap, and received + missing covers every number.
#[tokio::test]
async fn a_proxy_restart_mid_stream_shows_the_loss_as_a_gap() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (front, back) = (free_tcp_addr(), free_tcp_addr());
        let cfg = ProxyConfig {
            frontend: front.clone(),
            backend: back.clone(),
            ..ProxyConfig::default()
        };
        let proxy = run_proxy(cfg.clone()).await;
        let (r, gaps) = seq_receiver(&back, &["T/"]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        let mut p = Publisher::new(&front, "feed").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("T/x", Duration::from_secs(15))
            .await
            .expect("subscribed");
        let mut got = Vec::new();
        for i in 0..50 {
            p.publish_parts("T/x", "feed", &data(i)).expect("publish");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(eventually(Duration::from_secs(10), || r.pending() > 0).await);
        proxy.stop.cancel();
        proxy.task.await.expect("proxy ended");
        assert!(
            eventually(Duration::from_secs(10), || !p.is_connected()
                && !r.is_connected())
            .await
        );
        for i in 0..20 {
            assert!(!p.publish_parts("T/x", "feed", &data(i)).expect("publish"));
        }
        let proxy = run_proxy(cfg).await;
        drain(&r, &mut got);
        let before = got.len();
        let mut i = 0;
        while got.len() < before + 20 {
            assert!(i < 5000, "nothing after the restart");
            p.publish_parts("T/x", "feed", &data(i)).expect("publish");
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
            drain(&r, &mut got);
        }
        let seen = &per_topic(&got)["T/x"];
        let st = r.stats();
        let ps = p.stats();
        println!(
            "publisher: {ps:?}; receiver: got {} numbers {}..{} gaps {} missing {}",
            seen.count, seen.first, seen.last, st.gaps, st.missing
        );
        assert!(st.gaps >= 1 && st.missing >= ps.disconnected && ps.disconnected >= 20);
        assert_eq!(seen.count + st.missing, seen.last - seen.first + 1);
        assert_eq!(st.seq_restarts, 0, "same origin, same counter");
        assert!(gaps
            .lock()
            .unwrap()
            .iter()
            .all(|g| g.origin == p.origin_id() && g.topic == "T/x"));
        assert!(got
            .iter()
            .all(|e| e.seq.as_ref().unwrap().origin.as_ref() == p.origin_id()));
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Through the bus: a ZeroMQ publisher's numbers reach a Unix session that
/// asked (and a Unix session that did not gets today's bytes); a Unix
/// publish reaches a numbered ZeroMQ receiver with the bus's numbers (and
/// one that did not ask gets 4 frames).
#[tokio::test]
async fn numbers_cross_the_bus_between_zeromq_and_unix() {
    tokio::time::timeout(TEST_LIMIT, async {
        let bus = TestBus::start().await;
        let proxy = serve_zmq(&bus.bus).await;
        let mut seq_s = Raw::register(&bus.socket, "seq").await;
        seq_s
            .send(&json!({"type": "subscribe", "topic": "md/", "seq": true}))
            .await;
        assert_eq!(seq_s.recv().await.expect("reply")["type"], "subscribed");
        let mut plain_s = Raw::register(&bus.socket, "plain").await;
        plain_s
            .send(&json!({"type": "subscribe", "topic": "md/"}))
            .await;
        assert_eq!(plain_s.recv().await.expect("reply")["type"], "subscribed");

        // ZeroMQ → Unix.
        let mut p = Publisher::new(&proxy.front(), "feed").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("md/z", Duration::from_secs(15))
            .await
            .expect("the bus subscribes to everything");
        const K: u64 = 10;
        for i in 0..K {
            p.publish_parts("md/z", "feed", &data(i)).expect("publish");
        }
        for i in 0..K {
            let v = seq_s.recv().await.expect("numbered delivery");
            assert_eq!((v["topic"].as_str(), v["data"][2].as_u64()), (Some("md/z"), Some(i)));
            assert_eq!(v["seq"].as_u64(), Some(i + 1), "{v}");
            assert_eq!(v["seq_origin"], p.origin_id());
            let raw = plain_s.recv_payload().await.expect("plain delivery");
            let text = std::str::from_utf8(&raw).unwrap();
            let ts = serde_json::from_str::<Value>(text).unwrap()["ts"].clone();
            assert_eq!(
                text,
                format!(
                    r#"{{"type":"publish","topic":"md/z","origin":"feed","data":["Tick",1.5,{i}],"ts":{}}}"#,
                    serde_json::to_string(&ts).unwrap()
                ),
                "today's bytes"
            );
        }

        // Unix → ZeroMQ.
        let (numbered, gaps) = seq_receiver(&proxy.back(), &["alert/"]);
        let plain = receiver(&proxy.back(), |c| c.topics = vec!["alert/".into()]);
        for r in [&numbered, &plain] {
            r.wait_connected(Duration::from_secs(10))
                .await
                .expect("connected");
        }
        let origin = bus.bus.router().stats(Instant::now()).seq.origin;
        let mut unix_pub = Raw::register(&bus.socket, "unix-pub").await;
        let (mut got_n, mut got_p) = (Vec::new(), Vec::new());
        let mut i = 0u64;
        while got_n.len() < K as usize || got_p.len() < K as usize {
            assert!(i < 1000, "the receivers got too little");
            unix_pub
                .send(&json!({"type": "publish", "topic": "alert/x", "data": {"i": i}}))
                .await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            drain(&numbered, &mut got_n);
            drain(&plain, &mut got_p);
        }
        let first = got_n[0].seq.as_ref().unwrap().n;
        for (k, e) in got_n.iter().enumerate() {
            let s = e.seq.as_ref().expect("numbered by the bus");
            assert_eq!((&*s.origin, s.n), (origin.as_str(), first + k as u64));
            assert_eq!(e.origin, "unix-pub");
        }
        assert!(got_p.iter().all(|e| e.seq.is_none()));
        assert_eq!((plain.stats().malformed, numbered.stats().malformed), (0, 0));
        assert!(gaps.lock().unwrap().is_empty());
        p.stop().await;
        proxy.shutdown().await;
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

/// `hermes-bus sub --seq`: every line carries its number and origin, and
/// every gap (a tiny proxy queue drops) is reported on stderr; the lines
/// and the missing counts of the reports cover every number exactly.
#[tokio::test]
async fn the_sub_command_prints_numbers_and_reports_gaps() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.sub_queue = 2).await;
        let root = common::TempRoot::new();
        let back = proxy.back();
        let mut sub = root.cmd("hermes-bus");
        sub.args([
            "sub",
            "--seq",
            "--json",
            "--zmq-out",
            &back,
            "--timeout-s",
            "8",
            "T/",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let sub = sub.spawn().expect("sub");
        let mut p = Publisher::new(&proxy.front(), "feed").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("T/x", Duration::from_secs(15))
            .await
            .expect("the sub command subscribed");
        for i in 0..5_000 {
            p.publish_parts("T/x", "feed", &data(i)).expect("publish");
        }
        p.flush(Duration::from_secs(10)).await.expect("flushed");
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The fence: the last drops show once it arrives.
        p.publish_parts("T/x", "feed", &data(5_000))
            .expect("publish");
        let out = tokio::time::timeout(Duration::from_secs(30), sub.wait_with_output())
            .await
            .expect("sub ended")
            .expect("sub output");
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert!(lines
            .iter()
            .all(|l| l["seq_origin"] == p.origin_id() && l["topic"] == "T/x"));
        let (first, last) = (
            lines[0]["seq"].as_u64().expect("seq"),
            lines[lines.len() - 1]["seq"].as_u64().expect("seq"),
        );
        // "... (N missing)" per gap line.
        let missing: u64 = stderr
            .lines()
            .filter(|l| l.contains("gap from") && l.contains(p.origin_id()))
            .filter_map(|l| l.rsplit('(').next()?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        println!(
            "sub: {} lines, numbers {first}..{last}, {missing} missing; proxy drops {}",
            lines.len(),
            proxy.stats.snapshot().subscribers.drops
        );
        assert_eq!(last, 5_001, "the fence arrived");
        assert_eq!(lines.len() as u64 + missing, last - first + 1, "{stderr}");
        // Every drop is reported, but those before the first line (the
        // stream's baseline), which nothing can tell apart.
        assert_eq!(
            missing + (first - 1),
            proxy.stats.snapshot().subscribers.drops
        );
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}
