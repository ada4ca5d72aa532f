//! Hostile Unix-socket peers: what one peer makes the bus keep is
//! bounded in bytes and time, and no input of one peer reaches others
//! in a form that hurts them.

mod common;

use std::time::Duration;

use common::{PyPeer, Raw, TestBus};
use hermes_bus::hooks::HookEngine;
use hermes_bus::RouterConfig;
use serde_json::json;

#[tokio::test]
async fn a_held_name_re_registered_without_reading_still_expires_on_time() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let cfg = RouterConfig {
            hold_grace: Duration::from_secs(3),
            ..RouterConfig::default()
        };
        let bus = TestBus::start_with(cfg, HookEngine::disabled()).await;
        let ghost = Raw::register(&bus.socket, "ghost").await;
        drop(ghost);
        let held = common::eventually(Duration::from_secs(5), || {
            let s = bus.bus.router().stats(std::time::Instant::now());
            s.held.iter().any(|h| h.name == "ghost")
        })
        .await;
        assert!(held);
        // Three messages far larger than a socket buffer: a session that
        // does not read cannot take them off the bus.
        let mut sender = Raw::connect(&bus.socket).await;
        let pad = "g".repeat(1 << 20);
        for n in 0..3 {
            sender
                .send(&json!({"type": "message", "to": "ghost", "body": {"n": n, "pad": pad}}))
                .await;
        }
        let queued = common::eventually(Duration::from_secs(5), || bus.totals().held == 3).await;
        assert!(queued, "{:?}", bus.totals());
        // Re-register every 300 ms without reading, for up to 15 s: the
        // hold's grace (3 s) is not extended by that.
        let mut expired = false;
        for _ in 0..50 {
            let again = Raw::register(&bus.socket, "ghost").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(again);
            if bus.totals().dropped_held >= 3 {
                expired = true;
                break;
            }
        }
        assert!(
            expired,
            "held copies outlived their grace: {:?}",
            bus.totals()
        );
        let budget_freed = common::eventually(Duration::from_secs(10), || {
            bus.bus.router().budget().used() == 0
        })
        .await;
        assert!(budget_freed, "their bytes are given back");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_replaced_session_that_never_reads_is_closed_after_its_farewell() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let bus = TestBus::start().await;
        let old = Raw::register(&bus.socket, "svc").await;
        // Its writer blocks: more than a socket buffer waits for it.
        let mut sender = Raw::connect(&bus.socket).await;
        let pad = "r".repeat(1 << 20);
        for n in 0..3 {
            sender
                .send(&json!({"type": "message", "to": "svc", "body": {"n": n, "pad": pad}}))
                .await;
        }
        let stuck = common::eventually(Duration::from_secs(10), || {
            let s = bus.bus.router().stats(std::time::Instant::now());
            s.endpoints.iter().any(|e| e.name == "svc" && e.queued > 0)
        })
        .await;
        assert!(stuck);
        assert_eq!(bus.bus.router().session_count(), 2);
        let _new = Raw::register(&bus.socket, "svc").await;
        // The old connection never reads, yet it is closed and forgotten.
        let closed = common::eventually(Duration::from_secs(20), || {
            bus.bus.router().session_count() == 2
        })
        .await;
        assert!(closed, "the replaced session still holds its slot");
        assert_eq!(bus.totals().replaced, 1);
        drop(old);
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn partial_frames_are_bounded_in_total_and_in_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::timeout(Duration::from_secs(120), async {
        let server = common::ServerProcess::start(&[
            "--max-partial-bytes",
            "64M",
            "--frame-timeout",
            "3",
        ])
        .await;
        let base = server.peak_rss_kib();
        let mut a = Raw::register(&server.socket, "a").await;
        let mut b = Raw::register(&server.socket, "b").await;
        // 150 connections each announce a frame of 10 MiB - 1 and send
        // 2 MiB of it, then nothing more.
        let mut attackers = Vec::new();
        for _ in 0..150 {
            let mut s = tokio::net::UnixStream::connect(&server.socket)
                .await
                .expect("connect");
            let mut head = ((10u32 << 20) - 1).to_be_bytes().to_vec();
            head.extend_from_slice(br#"{"type":"message","to":"b","body":{"pad":""#);
            head.resize(2 << 20, b'x');
            // The bus may close a connection before it took it all.
            let _ = s.write_all(&head).await;
            attackers.push(s);
        }
        // Others are served meanwhile.
        a.send(&json!({"type": "message", "to": "b", "body": {"n": 1}})).await;
        assert_eq!(b.recv().await.expect("b served")["body"]["n"], 1);
        // Every attacker is closed: over the bound at once (overloaded),
        // the others at their frame deadline (frame_timeout).
        let (mut overloaded, mut timed_out) = (0, 0);
        for s in &mut attackers {
            let mut buf = bytes::BytesMut::new();
            loop {
                let n = tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf))
                    .await
                    .expect("closed within the frame deadline")
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
            }
            if let Ok(Some(p)) = hermes_bus::transports::unix::frame::decode(&mut buf, 1 << 20) {
                let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
                match v["code"].as_str() {
                    Some("overloaded") => overloaded += 1,
                    Some("frame_timeout") => timed_out += 1,
                    other => panic!("unexpected {other:?}: {v}"),
                }
            }
        }
        assert!(overloaded > 0, "the bound was reached");
        // The bound and its use are shown by the stats reply.
        let stats = Raw::stats(&server.socket).await;
        assert_eq!(
            stats["stats"]["transports"]["unix"]["partial_frame_limit"],
            64 << 20,
            "{stats}"
        );
        assert_eq!(stats["stats"]["transports"]["unix"]["partial_frame_bytes"], 0);
        assert!(timed_out > 0, "the rest timed out");
        let grown = server.peak_rss_kib().saturating_sub(base) / 1024;
        eprintln!("150 partial 10 MiB frames: peak RSS grew by {grown} MiB; {overloaded} refused, {timed_out} timed out");
        assert!(grown < 64 + 96, "peak RSS grew by {grown} MiB");
        a.send(&json!({"type": "message", "to": "b", "body": {"n": 2}})).await;
        assert_eq!(b.recv().await.expect("b served")["body"]["n"], 2);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn unread_list_replies_cannot_amplify_memory() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let server = common::ServerProcess::start(&[]).await;
        let base = server.peak_rss_kib();
        // A 1 MiB name is refused; 1,000 names of 255 bytes make each
        // list reply about 300 KB.
        let mut big = Raw::connect(&server.socket).await;
        big.send(&json!({"type": "register", "endpoint": "n".repeat(1 << 20)}))
            .await;
        assert_eq!(big.recv().await.expect("reply")["code"], "name_too_long");
        let mut names = Vec::new();
        for i in 0..1000 {
            names.push(Raw::register(&server.socket, &format!("{i:04}{}", "n".repeat(251))).await);
        }
        // 1,500 list requests, their replies never read (about 450 MB if
        // they were all answered at once).
        let mut deaf = Raw::connect(&server.socket).await;
        let mut req = Vec::new();
        for _ in 0..1500 {
            req.extend_from_slice(&hermes_bus::transports::unix::frame::encode(
                br#"{"type":"list_endpoints"}"#,
            ));
        }
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // The bus stops reading this peer once its replies fill its
            // outbox: this write does not finish, and that is the point.
            let _ = tokio::time::timeout(Duration::from_secs(5), deaf.s.write_all(&req)).await;
            deaf
        });
        let mut a = Raw::register(&server.socket, "ctl-a").await;
        let mut b = Raw::register(&server.socket, "ctl-b").await;
        a.send(&json!({"type": "message", "to": "ctl-b", "body": {"n": 1}}))
            .await;
        assert_eq!(b.recv().await.expect("served")["body"]["n"], 1);
        let _deaf = writer.await.expect("writer");
        // Measure once the bus answered all it will and stopped reading
        // the deaf peer (it shows as blocked).
        let mut admin = Raw::connect(&server.socket).await;
        let mut blocked = false;
        for _ in 0..600 {
            admin.send(&json!({"type": "stats"})).await;
            let st = admin.recv().await.expect("stats");
            if st["stats"]["router"]["flow"]["blocked_now"].as_u64() >= Some(1) {
                blocked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            blocked,
            "the bus stopped reading the peer that does not read its replies"
        );
        a.send(&json!({"type": "message", "to": "ctl-b", "body": {"n": 2}}))
            .await;
        assert_eq!(b.recv().await.expect("served")["body"]["n"], 2);
        let grown = server.peak_rss_kib().saturating_sub(base) / 1024;
        eprintln!("1,500 unread list replies: peak RSS grew by {grown} MiB");
        assert!(grown < 256, "peak RSS grew by {grown} MiB");
        drop(names);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_body_1500_deep_never_reaches_a_reference_070_client() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        let bus = TestBus::start().await;
        let sock = bus.socket.to_string_lossy().into_owned();
        let env = [
            ("SOCK", sock.as_str()),
            ("NAME", "py07"),
            ("RUN_SECONDS", "40"),
        ];
        let mut peer = PyPeer::spawn(&py, "unix_listener.py", &[], &env);
        let first = peer.line(Duration::from_secs(60)).await;
        assert!(first.starts_with("session "), "{first}");
        let mut raw = Raw::register(&bus.socket, "attacker").await;
        let depth = 1500;
        let deep = format!(
            r#"{{"type":"message","to":"py07","body":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        raw.send_payload(deep.as_bytes()).await;
        let v = raw.recv().await.expect("an error reply");
        assert_eq!(v["code"], "too_deep", "{v}");
        raw.send(&json!({"type": "message", "to": "py07", "body": {"next": 1}}))
            .await;
        // The client's receive thread is alive: it gets the next message,
        // and it never saw the deep one.
        let line = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let l = peer.line(Duration::from_secs(20)).await;
                if l.starts_with("msg ") {
                    return l;
                }
            }
        })
        .await
        .expect("the next message arrives");
        let v: serde_json::Value = serde_json::from_str(&line[4..]).expect("json");
        assert_eq!(v["body"]["next"], 1, "{v}");
        assert_eq!(bus.totals().routed, 1);
        let _ = peer.child.kill().await;
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
