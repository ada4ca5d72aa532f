//! The Rust client library: daemon autostart, events, reconnect with
//! re-register, sends queued while away, poll, and the blocking wrapper.

mod common;

use std::path::Path;
use std::time::Duration;

use common::client_recv;
use hermes_bus::hooks::HookEngine;
use hermes_bus::transports::unix::blocking::{self, BlockingClient};
use hermes_bus::transports::unix::{BusClient, ClientConfig, ClientEvent};
use hermes_bus::RouterConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A bus with defaults serving `socket`; the token stops it.
fn serve_at(socket: &Path) -> CancellationToken {
    common::serve_unix(
        socket,
        RouterConfig::default(),
        HookEngine::disabled(),
        |_| {},
    )
    .shutdown
}

async fn next_event(ev: &mut tokio::sync::broadcast::Receiver<ClientEvent>) -> ClientEvent {
    tokio::time::timeout(Duration::from_secs(20), ev.recv())
        .await
        .expect("event in time")
        .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_registers_again_after_the_bus_restarts() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bus.sock");
        let stop = serve_at(&socket);
        let mut cfg = ClientConfig::new(&socket);
        cfg.autostart = false;
        let mut a = BusClient::connect_with("a", cfg.clone()).await.expect("a");
        let mut b = BusClient::connect_with("b", cfg).await.expect("b");
        let first_sid = a.session_id().expect("registered");
        let mut ev = a.events();

        a.send("b", json!({"n": 1})).await.expect("send");
        let m = client_recv(&mut b, Duration::from_secs(5)).await;
        assert_eq!(m["body"]["n"], 1);
        assert_eq!(m["from"], "a");

        // The bus goes away: the client reports it and retries.
        stop.cancel();
        assert!(matches!(
            next_event(&mut ev).await,
            ClientEvent::Disconnected { .. }
        ));
        assert!(matches!(
            next_event(&mut ev).await,
            ClientEvent::Reconnecting { .. }
        ));
        // Sent while away: queued, delivered after the reconnect.
        a.send("b", json!({"n": 2})).await.expect("queued");

        // A new bus on the same path: both clients come back by themselves.
        let _stop2 = {
            let ok = common::eventually(Duration::from_secs(10), || !socket.exists()).await;
            assert!(ok, "old socket removed at shutdown");
            serve_at(&socket)
        };
        loop {
            if let ClientEvent::Connected { session_id } = next_event(&mut ev).await {
                assert_ne!(session_id, first_sid);
                break;
            }
        }
        assert!(a.wait_connected(Duration::from_secs(20)).await);
        assert!(b.wait_connected(Duration::from_secs(20)).await);
        // b may have registered after a's queued message was routed; send
        // until b has it (bounded), then check poll() drains without waiting.
        let mut got = None;
        for _ in 0..100 {
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), b.recv()).await {
                got = Some(m);
                break;
            }
            a.send("b", json!({"n": 3})).await.expect("send");
        }
        let got = got.expect("b receives after the restart");
        assert!(got["body"]["n"] == 2 || got["body"]["n"] == 3, "{got}");
        assert!(b.poll().len() <= 100);
        assert!(b.poll().is_empty());
        a.close().await;
        b.close().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_the_daemon_when_no_bus_answers() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let root = tempfile::tempdir().expect("tempdir");
        let socket = root.path().join("hermes-bus.sock");
        let busd = common::bin("hermes-busd");
        let mut cfg = ClientConfig::new(&socket);
        cfg.busd = busd.clone();
        let mut c = BusClient::connect_with("auto", cfg)
            .await
            .expect("autostarted");
        assert!(c.session_id().is_some());
        hermes_bus::transports::unix::send_message(&socket, "auto", json!({"k": 1}), None)
            .await
            .expect("sent");
        let m = client_recv(&mut c, Duration::from_secs(5)).await;
        assert_eq!(m["body"]["k"], 1);
        c.close().await;
        // The daemon keeps its pid file beside its socket.
        assert!(root.path().join("run/busd.pid").exists());
        let home_root = root.path();
        let out = std::process::Command::new(&busd)
            .arg("--socket")
            .arg(&socket)
            .arg("--root")
            .arg(home_root)
            .arg("stop")
            .output()
            .expect("stop");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("busd stopped"),
            "{out:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[test]
fn blocking_wrapper_sends_and_receives() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("bus.sock");
    let stop = rt.block_on(async { serve_at(&socket) });
    let mut x = BlockingClient::connect("x", &socket).expect("x");
    let mut y = BlockingClient::connect("y", &socket).expect("y");
    x.send("y", json!({"hello": "world"})).expect("send");
    let m = y.recv_timeout(Duration::from_secs(5)).expect("message");
    assert_eq!(m["body"]["hello"], "world");
    blocking::send_message(&socket, "x", json!({"n": 1}), Some("tool")).expect("send_message");
    let m = x.recv_timeout(Duration::from_secs(5)).expect("message");
    assert_eq!(m["from"], "tool");
    assert!(x.poll().is_empty());
    let err =
        blocking::send_message(&socket, "nobody", json!({}), None).expect_err("unknown target");
    assert!(err.to_string().contains("not connected"), "{err}");
    stop.cancel();
}

/// `send` waits while the bus pushes back (a receiver whose outbox is
/// full), holding at most `out_bytes` of unsent frames on its side:
/// nothing is queued without bound and nothing is dropped; once the
/// receiver reads, every message arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_while_the_bus_pushes_back_and_holds_at_most_its_byte_budget() {
    const N: u64 = 5_000;
    const OUT_BYTES: usize = 64 * 1024;
    tokio::time::timeout(common::TEST_LIMIT, async {
        let cfg = RouterConfig {
            outbox_bytes: 256 * 1024,
            // The reader is slow, not stuck: no policy applies to it.
            slow_consumer_timeout: Duration::from_secs(600),
            ..RouterConfig::default()
        };
        let bus = common::bus::TestBus::start_with(cfg, HookEngine::disabled()).await;
        let mut sink = common::bus::Raw::register(&bus.socket, "sink").await;
        let mut ccfg = ClientConfig::new(&bus.socket);
        ccfg.autostart = false;
        ccfg.out_bytes = OUT_BYTES;
        let client =
            std::sync::Arc::new(BusClient::connect_with("src", ccfg).await.expect("client"));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (c2, s2) = (client.clone(), sent.clone());
        let sender = tokio::spawn(async move {
            let pad = "x".repeat(1000);
            for n in 0..N {
                c2.send("sink", json!({"n": n, "pad": pad}))
                    .await
                    .expect("send");
                s2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // The sink reads nothing yet: the bus holds the client back ...
        let held = common::eventually(Duration::from_secs(30), || bus.totals().blocked > 0).await;
        assert!(held, "the bus held the client back: {:?}", bus.totals());
        // ... so `send` waits, with at most its budget unsent.
        assert!(
            client.unsent_bytes() <= OUT_BYTES,
            "{}",
            client.unsent_bytes()
        );
        let so_far = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(so_far < N, "send waits: {so_far} of {N} returned");
        // The sink reads: everything arrives, in order.
        for n in 0..N {
            let m = sink
                .recv_within(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("message {n} in time: {:?}", bus.totals()));
            assert_eq!(m["body"]["n"], n, "in order: {m}");
        }
        sender.await.expect("sender");
        assert_eq!(sent.load(std::sync::atomic::Ordering::Relaxed), N);
        let t = bus.totals();
        assert_eq!(t.dropped_slow, 0, "{t:?}");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
