//! A receiver that never reads does not slow a pair of other sessions;
//! its drops are counted and shown by `status`.

mod common;

use std::time::Duration;

use common::{Raw, TestBus};
use hermes_bus::hooks::HookEngine;
use hermes_bus::router::SlowConsumerPolicy;
use hermes_bus::RouterConfig;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

fn small_outbox(policy: SlowConsumerPolicy) -> RouterConfig {
    RouterConfig {
        outbox_capacity: 256,
        // A receiver that makes no progress for this long gets the policy
        // (its senders wait until then).
        slow_consumer_timeout: Duration::from_secs(1),
        slow_consumer: policy,
        ..RouterConfig::default()
    }
}

#[tokio::test]
async fn stalled_receiver_does_not_slow_others_and_its_drops_are_counted() {
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start_with(
            small_outbox(SlowConsumerPolicy::Drop),
            HookEngine::disabled(),
        )
        .await;
        // `stuck` registers and then never reads again.
        let stuck = Raw::register(&bus.socket, "stuck").await;
        let mut alice = Raw::register(&bus.socket, "alice").await;
        let mut bob = Raw::register(&bus.socket, "bob").await;
        let pad = "p".repeat(1024);

        // Flood `stuck` until its socket buffers and its outbox are full
        // and drops are being counted (bounded count).
        let mut sent = 0u64;
        while bus.totals().dropped_slow < 1000 && sent < 200_000 {
            for _ in 0..100 {
                alice
                    .send(&json!({"type": "message", "to": "stuck", "body": {"pad": pad}}))
                    .await;
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            bus.totals().dropped_slow >= 1000,
            "no drops after {sent} messages: {:?}",
            bus.totals()
        );

        // Meanwhile alice and bob exchange a numbered stream, complete
        // and in order, while the flood to `stuck` goes on.
        for i in 0..2000u64 {
            alice
                .send(&json!({"type": "message", "to": "stuck", "body": {"pad": pad}}))
                .await;
            alice
                .send(&json!({"type": "message", "to": "bob", "body": {"n": i}}))
                .await;
            if i % 100 == 99 {
                for j in i - 99..=i {
                    let m = bob.recv().await.expect("bob keeps receiving");
                    assert_eq!(m["body"]["n"], j);
                }
            }
        }
        // Bob answers alice too: the other direction is unaffected.
        bob.send(&json!({"type": "message", "to": "alice", "body": {"done": true}}))
            .await;
        let m = alice.recv().await.expect("alice receives");
        assert_eq!(m["body"]["done"], true);

        // The drops are attributed to `stuck`, visible in the stats reply
        // that `hermes-busd status` prints.
        let stats = Raw::stats(&bus.socket).await;
        let eps = stats["stats"]["router"]["endpoints"]
            .as_array()
            .expect("endpoints")
            .clone();
        let stuck_stats = eps
            .iter()
            .find(|e| e["name"] == "stuck")
            .expect("stuck listed");
        let bob_stats = eps.iter().find(|e| e["name"] == "bob").expect("bob listed");
        assert!(
            stuck_stats["counters"]["dropped"].as_u64().unwrap_or(0) >= 1000,
            "{stuck_stats}"
        );
        assert_eq!(bob_stats["counters"]["dropped"], 0, "{bob_stats}");
        assert!(
            stats["stats"]["router"]["totals"]["dropped_slow"]
                .as_u64()
                .unwrap_or(0)
                >= 1000
        );
        // And `hermes-busd status` shows them, as a user would look.
        let out = tokio::process::Command::new(common::bin("hermes-busd"))
            .arg("--socket")
            .arg(&bus.socket)
            .arg("--root")
            .arg(bus.dir.path())
            .arg("status")
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .expect("in time")
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        // The endpoints table: a header row naming the columns, then one
        // row per endpoint.
        let header: Vec<&str> = text
            .lines()
            .find(|l| l.trim_start().starts_with("NAME ") && l.contains("DROPPED"))
            .unwrap_or_else(|| panic!("{text}"))
            .split_whitespace()
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name);
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some("stuck"))
            .unwrap_or_else(|| panic!("{text}"));
        let dropped: u64 = column("DROPPED")
            .and_then(|i| line.split_whitespace().nth(i))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(dropped >= 1000, "{line}");
        assert!(text.contains("dropped_slow="), "{text}");
        // Flow control is visible too: who was held back, for how long,
        // how much of the byte budget is used, and who is stuck.
        assert!(text.contains("Flow: blocked_now="), "{text}");
        assert!(text.contains("budget_used="), "{text}");
        assert!(line.contains("STUCK"), "{line}");
        drop(stuck);
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn disconnect_policy_closes_the_slow_session_with_a_reason() {
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start_with(
            small_outbox(SlowConsumerPolicy::Disconnect),
            HookEngine::disabled(),
        )
        .await;
        let mut stuck = Raw::register(&bus.socket, "stuck").await;
        let mut alice = Raw::register(&bus.socket, "alice").await;
        let mut bob = Raw::register(&bus.socket, "bob").await;
        let pad = "p".repeat(1024);
        let mut sent = 0;
        while bus.totals().slow_disconnects == 0 && sent < 200_000 {
            for _ in 0..100 {
                alice
                    .send(&json!({"type": "message", "to": "stuck", "body": {"pad": pad}}))
                    .await;
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(bus.totals().slow_disconnects, 1, "{:?}", bus.totals());
        alice
            .send(&json!({"type": "message", "to": "bob", "body": {"n": 1}}))
            .await;
        assert_eq!(bob.recv().await.expect("bob")["body"]["n"], 1);
        // `stuck` now reads: it finds what was written before the
        // overflow, then the reason, then the end of the stream.
        let mut reason = None;
        while let Some(v) = stuck.recv_within(Duration::from_secs(10)).await {
            if v["type"] == "error" {
                reason = Some(v);
            }
        }
        let reason = reason.expect("a slow_consumer error before close");
        assert_eq!(reason["code"], "slow_consumer");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
