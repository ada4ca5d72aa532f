//! Lossless flow control: a receiver that keeps reading gets everything
//! its senders were told was accepted, however fast they send; a receiver
//! that stops reading slows only its own senders, and only up to the
//! slow-consumer timeout; memory stays within the byte budget; receipts
//! and error replies tell the truth.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{PyPeer, Raw, TestBus};
use hermes_bus::hooks::HookEngine;
use hermes_bus::transports::unix::frame;
use hermes_bus::RouterConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// These tests run one at a time: each loads the 2-core CI machine on its
/// own (a million-message blast, a gigabyte burst, ten Python senders),
/// and the reference 0.7.0 client loses a message it was told was sent
/// when the bus holds it back for more than its 1 s socket timeout, which
/// a starved Python reader next to another blast can cause.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes [`SERIAL`], waiting (bounded) for the other tests of this file.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    tokio::time::timeout(Duration::from_secs(900), SERIAL.lock())
        .await
        .expect("the other flow-control tests finished in time")
}

/// Bound of one step of a Python peer (the tests bound the whole).
const PEER_LIMIT: Duration = Duration::from_secs(200);

/// The default configuration, except that a session silent for less than
/// an hour is not evicted: these tests' readers only read, and a loaded
/// machine can stretch a run past the 90 s heartbeat timeout (an evicted
/// reader would lose what is routed to it after).
fn patient() -> RouterConfig {
    RouterConfig {
        heartbeat_timeout: Duration::from_secs(3600),
        ..RouterConfig::default()
    }
}

/// Ten reference clients blast one polling reference client.
async fn python_fan_in(which: &str, senders: usize, per_sender: usize) {
    let Some(py) = common::python(which) else {
        return;
    };
    let bus = TestBus::start().await;
    let sock = bus.socket.to_string_lossy().into_owned();
    let env = [("SOCK", sock.as_str())];
    let total = senders * per_sender;
    let sink_args = ["sink", "sink", &total.to_string(), "150"];
    let mut sink = PyPeer::spawn(&py, "flow_peer.py", &sink_args, &env);
    let ready = sink.line(PEER_LIMIT).await;
    assert_eq!(ready, "ready");
    let mut sources = Vec::new();
    for i in 0..senders {
        let args = [
            "source",
            &format!("src{i}"),
            "sink",
            &per_sender.to_string(),
        ];
        sources.push(PyPeer::spawn(&py, "flow_peer.py", &args, &env));
    }
    for (i, source) in sources.into_iter().enumerate() {
        let line = source.finish(PEER_LIMIT).await.join("\n");
        let v: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("{line}"));
        assert_eq!(
            v["true"].as_u64(),
            Some(per_sender as u64),
            "every send() of src{i} returned True: {v}"
        );
    }
    let last = sink.line(PEER_LIMIT).await;
    let v: Value = serde_json::from_str(&last).unwrap_or_else(|_| panic!("{last}"));
    let totals = bus.totals();
    assert_eq!(
        v["total"].as_u64(),
        Some(total as u64),
        "all arrived: {v} {totals:?}"
    );
    assert_eq!(v["out_of_order"], 0, "each sender's order kept: {v}");
    for i in 0..senders {
        assert_eq!(v["per_src"][format!("src{i}")], per_sender, "{v}");
    }
    assert_eq!(totals.dropped_slow, 0, "{totals:?}");
    assert_eq!(totals.dropped_held, 0, "{totals:?}");
    sink.finish(PEER_LIMIT).await;
    bus.stop().await;
}

#[tokio::test]
async fn ten_070_clients_blast_one_polling_070_client_and_lose_nothing() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(200), async {
        python_fan_in("py07", 10, 5_000).await;
        python_fan_in("py07", 10, 20_000).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn ten_030_clients_blast_one_polling_030_client_and_lose_nothing() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(200), async {
        python_fan_in("py03", 10, 5_000).await;
    })
    .await
    .expect("test timed out");
}

/// Ten reference 0.7.0 clients blast 30,000 messages at a receiver that
/// starts reading only once the bus holds them back (its outbox is full),
/// then reads far slower than they write (2 KiB at most a millisecond),
/// so the bus holds them back all along. The 0.7.0 client drops, silently
/// and with `send()` still true, a message whose write the bus held back
/// for its 1 s socket timeout: every wait must stay short and every
/// waiting sender must get its turn. The reader paces itself (a load
/// shape, not a timing check): nothing is lost, each sender's order is
/// kept.
#[tokio::test]
async fn ten_070_clients_held_back_by_a_slow_reader_lose_nothing() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(200), async {
        let Some(py) = common::python("py07") else {
            return;
        };
        const SENDERS: usize = 10;
        const EACH: usize = 3_000;
        let bus = TestBus::start_with(patient(), HookEngine::disabled()).await;
        let mut reader = Raw::register(&bus.socket, "sink").await;
        let sock = bus.socket.to_string_lossy().into_owned();
        let env = [("SOCK", sock.as_str())];
        let mut sources = Vec::new();
        for i in 0..SENDERS {
            let args = ["source", &format!("src{i}"), "sink", &EACH.to_string()];
            sources.push(PyPeer::spawn(&py, "flow_peer.py", &args, &env));
        }
        let held = common::eventually(Duration::from_secs(60), || bus.totals().blocked > 0).await;
        assert!(held, "the senders were held back: {:?}", bus.totals());
        let total = SENDERS * EACH;
        let mut next: HashMap<String, u64> = HashMap::new();
        let mut got = 0;
        let mut buf = bytes::BytesMut::with_capacity(1 << 16);
        let mut chunk = vec![0u8; 2048];
        let mut quiet_since = tokio::time::Instant::now();
        while got < total {
            match frame::decode(&mut buf, frame::MAX_FRAME).expect("in sync") {
                Some(p) => {
                    let v: Value = serde_json::from_slice(&p).expect("json");
                    if v["type"] != "message" {
                        continue;
                    }
                    let src = v["body"]["src"].as_str().expect("src").to_owned();
                    let n = v["body"]["n"].as_u64().expect("n");
                    let want = next.entry(src.clone()).or_insert(0);
                    assert_eq!(
                        n,
                        *want,
                        "{src} lost or reordered after {got} of {total}: {:?}",
                        bus.totals()
                    );
                    *want += 1;
                    got += 1;
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let r =
                        tokio::time::timeout(Duration::from_millis(100), reader.s.read(&mut chunk))
                            .await;
                    match r {
                        Ok(Ok(n)) if n > 0 => {
                            buf.extend_from_slice(&chunk[..n]);
                            quiet_since = tokio::time::Instant::now();
                        }
                        Ok(other) => panic!("stream ended after {got} of {total}: {other:?}"),
                        Err(_) => assert!(
                            quiet_since.elapsed() < Duration::from_secs(30),
                            "nothing for 30 s after {got} of {total}: {:?}",
                            bus.totals()
                        ),
                    }
                }
            }
        }
        for (i, source) in sources.into_iter().enumerate() {
            let line = source.finish(PEER_LIMIT).await.join("\n");
            let v: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("{line}"));
            assert_eq!(v["true"].as_u64(), Some(EACH as u64), "src{i}: {v}");
        }
        let totals = bus.totals();
        assert_eq!(totals.dropped_slow, 0, "{totals:?}");
        assert_eq!(totals.delivered, total as u64, "{totals:?}");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A sender writes until the bus holds it back (its receiver is not
/// reading yet), then closes at once. The bus finds it gone (the
/// keepalive it writes to it fails), yet every frame it wrote whole
/// before closing is still routed, in order, once the receiver reads.
#[tokio::test]
async fn a_sender_that_closes_while_held_back_has_everything_routed() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let cfg = RouterConfig {
            outbox_capacity: 1_000,
            ..RouterConfig::default()
        };
        let bus = TestBus::start_with(cfg, HookEngine::disabled()).await;
        let mut reader = Raw::register(&bus.socket, "reader").await;
        let sender = Raw::register(&bus.socket, "burst").await;
        let s = sender.s;
        // Frame by frame, until the socket takes nothing for a second (or
        // a bound): counts the frames written whole.
        let mut sent = 0u64;
        let mut frame = Vec::new();
        let mut off = 0;
        while sent < 1_000_000 {
            if off == frame.len() {
                frame.clear();
                msg_frame(&mut frame, "reader", 0, sent, "");
                off = 0;
            }
            match tokio::time::timeout(Duration::from_secs(1), s.writable()).await {
                Err(_) => break,
                Ok(r) => r.expect("writable"),
            }
            match s.try_write(&frame[off..]) {
                Ok(n) => {
                    off += n;
                    if off == frame.len() {
                        sent += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        drop(s);
        let totals = bus.totals();
        assert!(totals.blocked > 0, "the sender was held back: {totals:?}");
        // The bus writes a keepalive to the closed sender after 500 ms of
        // quiet, and finds it gone.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let counts = count_in_order(&mut reader.s, 1, sent).await;
        assert_eq!(counts, vec![sent]);
        let totals = bus.totals();
        assert_eq!(totals.dropped_slow, 0, "{totals:?}");
        assert_eq!(totals.delivered, sent, "{totals:?}");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

/// One frame of a message to `to` carrying `{"s": src, "n": n}`.
fn msg_frame(out: &mut Vec<u8>, to: &str, src: usize, n: u64, extra: &str) {
    let json = format!(r#"{{"type":"message","to":"{to}","body":{{"s":{src},"n":{n}}}{extra}}}"#);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json.as_bytes());
}

/// Writes `count` numbered messages to `to` as fast as the socket takes
/// them: big writes of ready frames, no window, no pacing.
async fn blast(mut s: UnixStream, to: String, src: usize, count: u64) -> UnixStream {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut n = 0;
    while n < count {
        buf.clear();
        while n < count && buf.len() < (1 << 20) - 256 {
            msg_frame(&mut buf, &to, src, n, "");
            n += 1;
        }
        s.write_all(&buf).await.expect("the bus reads on");
    }
    s
}

/// Reads frames off `s` and checks per-sender order, until `total`
/// messages arrived (or nothing came for 30 s). Returns the count per
/// sender.
async fn count_in_order(s: &mut UnixStream, senders: usize, total: u64) -> Vec<u64> {
    let mut next = vec![0u64; senders];
    let mut got = 0u64;
    let mut buf = bytes::BytesMut::with_capacity(1 << 20);
    while got < total {
        match frame::decode(&mut buf, frame::MAX_FRAME).expect("in sync") {
            Some(p) => {
                let v: Value = serde_json::from_slice(&p).expect("json");
                if v["type"] != "message" {
                    continue;
                }
                let src = v["body"]["s"].as_u64().expect("s") as usize;
                let n = v["body"]["n"].as_u64().expect("n");
                assert_eq!(n, next[src], "sender {src} out of order");
                next[src] += 1;
                got += 1;
            }
            None => {
                let r = tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf)).await;
                match r {
                    Ok(Ok(n)) if n > 0 => {}
                    other => panic!("stream ended after {got} of {total}: {other:?}"),
                }
            }
        }
    }
    next
}

#[tokio::test]
async fn ten_raw_blasters_to_one_reader_lose_nothing() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(300), async {
        const SENDERS: usize = 10;
        const EACH: u64 = 100_000;
        let bus = TestBus::start_with(patient(), HookEngine::disabled()).await;
        let mut reader = Raw::register(&bus.socket, "reader").await;
        let mut tasks = Vec::new();
        for i in 0..SENDERS {
            let s = UnixStream::connect(&bus.socket).await.expect("connect");
            tasks.push(tokio::spawn(blast(s, "reader".into(), i, EACH)));
        }
        let counts = count_in_order(&mut reader.s, SENDERS, SENDERS as u64 * EACH).await;
        assert!(counts.iter().all(|c| *c == EACH), "{counts:?}");
        for t in tasks {
            t.await.expect("sender");
        }
        let stats = Raw::stats(&bus.socket).await;
        let totals = &stats["stats"]["router"]["totals"];
        assert_eq!(totals["dropped_slow"], 0, "{totals}");
        assert_eq!(totals["delivered"], SENDERS as u64 * EACH, "{totals}");
        assert!(
            totals["blocked"].as_u64().unwrap_or(0) > 0,
            "ten blasters had to wait for one reader: {totals}"
        );
        assert!(stats["stats"]["router"]["flow"]["budget_limit"].as_u64() > Some(0));
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Reads one frame's JSON, skipping nothing; None on timeout.
async fn next_message(r: &mut Raw) -> Value {
    r.recv_within(Duration::from_secs(30))
        .await
        .expect("a message within 30 s")
}

#[tokio::test]
async fn a_stalled_receiver_holds_back_only_its_own_senders_and_only_until_the_timeout() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(200), async {
        let cfg = RouterConfig {
            outbox_capacity: 64,
            slow_consumer_timeout: Duration::from_secs(15),
            ..RouterConfig::default()
        };
        let bus = TestBus::start_with(cfg, HookEngine::disabled()).await;
        // A registers and never reads again.
        let _a = Raw::register(&bus.socket, "a").await;
        let mut b = Raw::register(&bus.socket, "b").await;
        let mut c = Raw::register(&bus.socket, "c").await;
        let s1 = UnixStream::connect(&bus.socket).await.expect("s1");
        let mut s2 = Raw::register(&bus.socket, "s2").await;

        // S1: a burst to A big enough to fill A's socket and outbox, then
        // numbered messages to B. It writes from its own task.
        let s1_task = tokio::spawn(async move {
            let mut s1 = s1;
            let mut buf = Vec::new();
            let pad = "x".repeat(4096);
            for n in 0..2_000u64 {
                let json =
                    format!(r#"{{"type":"message","to":"a","body":{{"pad":"{pad}","n":{n}}}}}"#);
                buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
                buf.extend_from_slice(json.as_bytes());
            }
            for n in 0..500u64 {
                msg_frame(&mut buf, "b", 1, n, "");
            }
            s1.write_all(&buf).await.expect("s1 writes");
            s1
        });
        // S1 is held back: wait until the bus says so.
        let blocked = common::eventually(Duration::from_secs(30), || {
            bus.bus
                .router()
                .stats(std::time::Instant::now())
                .flow
                .blocked_now
                >= 1
        })
        .await;
        assert!(blocked, "S1 is waiting for A: {:?}", bus.totals());

        // Meanwhile S2 sends to B and C; both get everything, in order,
        // while S1 still waits and A is not yet declared stuck.
        for n in 0..1_000u64 {
            for to in ["b", "c"] {
                s2.send(&json!({"type": "message", "to": to, "body": {"s": 2, "n": n}}))
                    .await;
            }
        }
        for n in 0..1_000u64 {
            let m = next_message(&mut b).await;
            assert_eq!(
                (m["body"]["s"].as_u64(), m["body"]["n"].as_u64()),
                (Some(2), Some(n))
            );
            let m = next_message(&mut c).await;
            assert_eq!(
                (m["body"]["s"].as_u64(), m["body"]["n"].as_u64()),
                (Some(2), Some(n))
            );
        }
        let st = bus.bus.router().stats(std::time::Instant::now());
        let a_stats = st.endpoints.iter().find(|e| e.name == "a").expect("a");
        assert_eq!(st.flow.blocked_now, 1, "S1 still waits, S2 never did");
        assert!(!a_stats.stuck, "A's verdict is not in yet");
        assert_eq!(st.totals.dropped_slow, 0);

        // Then A's timeout passes: the policy drops for A (counted), S1
        // goes on, and every message S1 sent to B arrives, in order.
        for n in 0..500u64 {
            let m = next_message(&mut b).await;
            assert_eq!(
                (m["body"]["s"].as_u64(), m["body"]["n"].as_u64()),
                (Some(1), Some(n))
            );
        }
        s1_task.await.expect("s1 done");
        let st = bus.bus.router().stats(std::time::Instant::now());
        let a_stats = st.endpoints.iter().find(|e| e.name == "a").expect("a");
        assert!(a_stats.stuck, "A was declared stuck");
        assert!(a_stats.counters.dropped > 0, "{a_stats:?}");
        assert_eq!(
            a_stats.counters.dropped + a_stats.counters.delivered,
            2_000,
            "every message to A is either delivered into its socket or counted dropped"
        );
        assert_eq!(st.totals.dropped_slow, a_stats.counters.dropped);
        assert_eq!(st.flow.blocked_now, 0);
        assert!(
            st.totals.blocked >= 1 && st.totals.blocked_ms > 0,
            "{:?}",
            st.totals
        );
        let b_stats = st.endpoints.iter().find(|e| e.name == "b").expect("b");
        assert_eq!(b_stats.counters.dropped, 0);
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn acks_follow_deliveries_and_every_unknown_name_is_answered() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(200), async {
        const N: u64 = 100_000;
        let bus = TestBus::start_with(patient(), HookEngine::disabled()).await;
        let mut reader = Raw::register(&bus.socket, "reader").await;
        let sender = UnixStream::connect(&bus.socket).await.expect("connect");
        let (mut rd, mut wr) = sender.into_split();
        // 100,000 pipelined messages with "ack": true, written in one go
        // while the sender reads its acks concurrently.
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            for n in 0..N {
                msg_frame(
                    &mut buf,
                    "reader",
                    0,
                    n,
                    &format!(r#","id":"m{n}","ack":true"#),
                );
            }
            wr.write_all(&buf).await.expect("write");
            wr
        });
        let acks = tokio::spawn(async move {
            let mut buf = bytes::BytesMut::new();
            let mut seen = HashMap::new();
            while (seen.len() as u64) < N {
                match frame::decode(&mut buf, frame::MAX_FRAME).expect("sync") {
                    Some(p) => {
                        let v: Value = serde_json::from_slice(&p).expect("json");
                        assert_eq!(v["type"], "ack", "{v}");
                        let id = v["id"].as_str().expect("id").to_owned();
                        assert!(seen.insert(id, ()).is_none(), "one ack per message");
                    }
                    None => {
                        let n =
                            tokio::time::timeout(Duration::from_secs(30), rd.read_buf(&mut buf))
                                .await
                                .expect("acks keep coming")
                                .expect("read");
                        assert!(n > 0, "closed after {} acks", seen.len());
                    }
                }
            }
            (rd, seen.len() as u64)
        });
        let counts = count_in_order(&mut reader.s, 1, N).await;
        assert_eq!(counts, vec![N]);
        let (mut rd, acked) = acks.await.expect("acks");
        assert_eq!(acked, N, "exactly one ack per delivered message");
        let mut wr = writer.await.expect("writer");
        // No extra ack: nothing more is pending for this sender.
        let mut extra = [0u8; 64];
        let more = tokio::time::timeout(Duration::from_millis(300), rd.read(&mut extra)).await;
        assert!(more.is_err(), "nothing more than the acks: {more:?}");

        // 100,000 messages to names nobody has: 100,000 error replies,
        // none dropped, even though they come faster than one reads.
        let writer = tokio::spawn(async move {
            let mut buf = Vec::new();
            for n in 0..N {
                msg_frame(
                    &mut buf,
                    &format!("nobody{}", n % 7),
                    0,
                    n,
                    &format!(r#","id":"u{n}""#),
                );
            }
            wr.write_all(&buf).await.expect("write");
            wr
        });
        let mut buf = bytes::BytesMut::new();
        let mut errors = 0u64;
        while errors < N {
            match frame::decode(&mut buf, frame::MAX_FRAME).expect("sync") {
                Some(p) => {
                    let v: Value = serde_json::from_slice(&p).expect("json");
                    assert_eq!(v["code"], "endpoint_not_found", "{v}");
                    assert_eq!(v["id"], format!("u{errors}"), "in order, by id");
                    errors += 1;
                }
                None => {
                    let n = tokio::time::timeout(Duration::from_secs(30), rd.read_buf(&mut buf))
                        .await
                        .expect("errors keep coming")
                        .expect("read");
                    assert!(n > 0, "closed after {errors} errors");
                }
            }
        }
        writer.await.expect("writer");
        let t = bus.totals();
        assert_eq!(t.errors, N, "{t:?}");
        assert_eq!(t.dropped_slow, 0, "{t:?}");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_gigabyte_at_a_reader_that_never_reads_stays_within_the_budget() {
    let _serial = one_at_a_time().await;
    tokio::time::timeout(Duration::from_secs(300), async {
        let server = common::ServerProcess::start(&[
            "--memory-budget",
            "64M",
            "--outbox-bytes",
            "32M",
            "--slow-consumer-timeout",
            "2",
            "--heartbeat-check",
            "1",
        ])
        .await;
        let socket = server.socket.clone();
        let base = server.peak_rss_kib();

        let deaf = Raw::register(&socket, "deaf").await;
        let mut ping = Raw::register(&socket, "ping").await;
        let pong = Raw::register(&socket, "pong").await;
        // 1 GiB in 1 MiB messages to a reader that never reads.
        let flood = tokio::spawn({
            let socket = socket.clone();
            async move {
                let mut s = UnixStream::connect(&socket).await.expect("connect");
                let pad = "z".repeat(1 << 20);
                let json = format!(r#"{{"type":"message","to":"deaf","body":{{"pad":"{pad}"}}}}"#);
                let mut one = Vec::new();
                one.extend_from_slice(&(json.len() as u32).to_be_bytes());
                one.extend_from_slice(json.as_bytes());
                for _ in 0..1024 {
                    s.write_all(&one).await.expect("the bus reads on");
                }
                s
            }
        });
        // The bus keeps serving others meanwhile.
        let mut pong = pong;
        let mut n = 0u64;
        while !flood.is_finished() && n < 100_000 {
            ping.send(&json!({"type": "message", "to": "pong", "body": {"n": n}}))
                .await;
            let m = pong
                .recv_within(Duration::from_secs(30))
                .await
                .expect("pong served during the flood");
            assert_eq!(m["body"]["n"], n);
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _s = flood.await.expect("flood done");
        let peak = server.peak_rss_kib();
        let stats = Raw::stats(&socket).await;
        let dropped = stats["stats"]["router"]["totals"]["dropped_slow"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            dropped > 900,
            "the deaf reader's copies were dropped and counted: {stats}"
        );
        // Budget 64 MiB plus a constant (read buffers of a few frames,
        // the writer's batch, allocator slack): 96 MiB over the start.
        let grown_mib = peak.saturating_sub(base) / 1024;
        eprintln!(
            "peak RSS grew by {grown_mib} MiB (base {} MiB) during a 1 GiB flood",
            base / 1024
        );
        assert!(grown_mib < 64 + 96, "peak RSS grew by {grown_mib} MiB");
        // Once the deaf reader goes away its queue is freed, and the
        // memory is given back to the system.
        drop(deaf);
        let given_back = common::eventually(Duration::from_secs(20), || {
            server.rss_kib() < base + 24 * 1024
        })
        .await;
        eprintln!("RSS after the flood: {} MiB", server.rss_kib() / 1024);
        assert!(given_back, "RSS stayed at {} MiB", server.rss_kib() / 1024);
        drop(server);
    })
    .await
    .expect("test timed out");
}
