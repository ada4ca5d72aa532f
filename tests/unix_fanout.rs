//! 1,000 concurrent registered sessions: broadcasts reach every one of
//! them, none lost.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Raw, TestBus};
use serde_json::json;

const SESSIONS: usize = 1000;
const SENDERS: usize = 50;
const PER_SENDER: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sessions_hear_every_broadcast() {
    hermes_bus::transports::unix::server::raise_fd_limit();
    tokio::time::timeout(Duration::from_secs(180), async {
        let bus = TestBus::start().await;
        let mut conns = Vec::with_capacity(SESSIONS);
        for i in 0..SESSIONS {
            conns.push(Raw::register(&bus.socket, &format!("s{i:04}")).await);
        }
        let mut admin = Raw::connect(&bus.socket).await;
        admin.send(&json!({"type": "list_endpoints"})).await;
        let eps = admin.recv().await.expect("list");
        assert_eq!(
            eps["endpoints"].as_object().map(|m| m.len()),
            Some(SESSIONS)
        );

        // Every session reads on its own task until it has every broadcast.
        let expected = SENDERS * PER_SENDER;
        let mut readers = Vec::new();
        let mut senders = Vec::new();
        for (i, mut c) in conns.into_iter().enumerate() {
            if i < SENDERS {
                senders.push(i);
            }
            readers.push(tokio::spawn(async move {
                let mut seen = BTreeSet::new();
                let mut sent = 0;
                while seen.len() < expected {
                    if i < SENDERS && sent < PER_SENDER {
                        c.send(&json!({"type": "message", "body": {"k": format!("{i}-{sent}")}}))
                            .await;
                        sent += 1;
                    }
                    let m = c
                        .recv_within(Duration::from_secs(60))
                        .await
                        .expect("broadcast arrives");
                    assert_eq!(m["type"], "message", "{m}");
                    assert!(
                        seen.insert(m["body"]["k"].as_str().expect("k").to_owned()),
                        "duplicate {m}"
                    );
                }
                (i, seen)
            }));
        }
        for r in readers {
            let (i, seen) = r.await.expect("reader");
            assert_eq!(seen.len(), expected, "session {i}");
        }
        let t = bus.totals();
        assert_eq!(t.routed as usize, expected);
        assert_eq!(t.delivered as usize, expected * SESSIONS);
        assert_eq!(t.dropped_slow, 0);
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
