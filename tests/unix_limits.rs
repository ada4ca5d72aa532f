//! Limits: the connection limit, and heartbeat eviction of silent
//! sessions (any inbound traffic counts as liveness).

mod common;

use std::time::Duration;

use common::{Raw, TestBus};
use hermes_bus::hooks::HookEngine;
use hermes_bus::RouterConfig;
use serde_json::json;

#[tokio::test]
async fn connections_past_the_limit_are_told_and_closed() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let tb = TestBus::start_unix(RouterConfig::default(), HookEngine::disabled(), |u| {
            u.max_connections = 3
        })
        .await;
        let (socket, bus) = (tb.socket.clone(), tb.bus.clone());
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(Raw::register(&socket, &format!("c{i}")).await);
        }
        let mut extra = Raw::connect(&socket).await;
        let v = extra.recv().await.expect("a reason");
        assert_eq!(v["code"], "too_many_connections", "{v}");
        assert!(extra.closed_within(Duration::from_secs(5)).await);
        // A slot frees when a connection ends.
        drop(held.pop());
        let again =
            common::eventually(Duration::from_secs(5), || bus.router().session_count() == 2).await;
        assert!(again);
        let _c = Raw::register(&socket, "late").await;
        tb.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn silent_sessions_are_evicted_and_active_ones_kept() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let cfg = RouterConfig {
            heartbeat_timeout: Duration::from_millis(600),
            ..RouterConfig::default()
        };
        let bus = TestBus::start_with(cfg, HookEngine::disabled()).await;
        let mut silent = Raw::register(&bus.socket, "silent").await;
        let mut pinger = Raw::register(&bus.socket, "pinger").await;
        let mut evicted = None;
        for _ in 0..40 {
            pinger.send(&json!({"type": "ping"})).await;
            assert_eq!(pinger.recv().await.expect("pong")["type"], "pong");
            if let Some(v) = silent.recv_within(Duration::from_millis(100)).await {
                evicted = Some(v);
                break;
            }
        }
        let v = evicted.expect("the silent session was told");
        assert_eq!(v["code"], "heartbeat_timeout", "{v}");
        assert!(silent.closed_within(Duration::from_secs(5)).await);
        assert_eq!(bus.totals().evicted, 1);
        // The pinger is still registered.
        pinger.send(&json!({"type": "list_endpoints"})).await;
        let eps = pinger.recv().await.expect("list");
        assert!(eps["endpoints"]["pinger"].is_string(), "{eps}");
        assert!(eps["endpoints"]["silent"].is_null(), "{eps}");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn shutdown_drains_what_is_queued_then_closes() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let bus = TestBus::start().await;
        let mut rx = Raw::register(&bus.socket, "rx").await;
        let mut tx = Raw::register(&bus.socket, "tx").await;
        for i in 0..2000u64 {
            tx.send(&json!({"type": "message", "to": "rx", "body": {"n": i}}))
                .await;
        }
        // Wait until the bus has routed them all, then shut it down before
        // rx has read anything.
        let routed =
            common::eventually(Duration::from_secs(10), || bus.totals().routed == 2000).await;
        assert!(routed);
        let socket = bus.socket.clone();
        let stop = bus.shutdown.clone();
        stop.cancel();
        for i in 0..2000u64 {
            let m = rx.recv().await.expect("drained before close");
            assert_eq!(m["body"]["n"], i);
        }
        assert!(rx.closed_within(Duration::from_secs(5)).await);
        let _ = tokio::time::timeout(Duration::from_secs(10), bus.task).await;
        assert!(!socket.exists(), "socket removed");
    })
    .await
    .expect("test timed out");
}
