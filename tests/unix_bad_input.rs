//! Every kind of bad input, sent as raw bytes, gets its stated answer
//! (README.md, the protocol's error codes), while another pair of
//! sessions keeps exchanging messages untouched.

mod common;

use std::time::Duration;

use common::{Raw, TestBus};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

/// Alice sends bob a numbered message; bob must get exactly it.
async fn pair_still_works(alice: &mut Raw, bob: &mut Raw, n: u64) {
    alice
        .send(&json!({"type": "message", "to": "bob", "body": {"n": n}}))
        .await;
    let got = bob.recv().await.expect("bob receives");
    assert_eq!(got["body"]["n"], n, "{got}");
    assert_eq!(got["from"], "alice");
}

async fn expect_error(c: &mut Raw, code: &str) -> serde_json::Value {
    let v = c.recv().await.expect("an error reply");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    v
}

/// The connection is still usable: ping answers pong.
async fn still_alive(c: &mut Raw) {
    c.send(&json!({"type": "ping"})).await;
    let v = c.recv().await.expect("pong");
    assert_eq!(v["type"], "pong", "{v}");
}

#[tokio::test]
async fn bad_input_answered_and_others_unaffected() {
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start().await;
        let mut alice = Raw::register(&bus.socket, "alice").await;
        let mut bob = Raw::register(&bus.socket, "bob").await;
        let mut bad = Raw::connect(&bus.socket).await;
        let mut n = 0;

        // Not JSON.
        bad.send_payload(b"{this is not json").await;
        expect_error(&mut bad, "bad_json").await;
        still_alive(&mut bad).await;
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;

        // Not UTF-8.
        bad.send_payload(b"{\"type\": \"ping\xff\xfe\"}").await;
        expect_error(&mut bad, "bad_utf8").await;
        still_alive(&mut bad).await;
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;

        // JSON but not an object.
        for payload in [&b"[1, 2, 3]"[..], b"\"register\"", b"42", b"null"] {
            bad.send_payload(payload).await;
            expect_error(&mut bad, "not_object").await;
        }
        still_alive(&mut bad).await;
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;

        // Missing fields.
        bad.send(&json!({"no_type": true})).await;
        expect_error(&mut bad, "missing_field").await;
        bad.send(&json!({"type": "register"})).await;
        expect_error(&mut bad, "missing_field").await;
        bad.send(&json!({"type": "register", "endpoint": 17})).await;
        expect_error(&mut bad, "bad_field").await;
        bad.send(&json!({"type": "message", "to": 5, "id": "x1"}))
            .await;
        let v = expect_error(&mut bad, "bad_field").await;
        assert_eq!(v["id"], "x1");
        still_alive(&mut bad).await;
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;

        // Unknown type.
        bad.send(&json!({"type": "teleport"})).await;
        expect_error(&mut bad, "unknown_type").await;
        still_alive(&mut bad).await;

        // Unknown target: anonymous and registered senders both hear it,
        // with the message id.
        bad.send(&json!({"type": "message", "to": "nobody", "id": "m-1", "body": {}}))
            .await;
        let v = expect_error(&mut bad, "endpoint_not_found").await;
        assert_eq!(v["id"], "m-1");
        assert_eq!(v["detail"], "Endpoint 'nobody' is not connected");
        alice
            .send(&json!({"type": "message", "to": "nobody", "id": "m-2", "body": {}}))
            .await;
        let v = expect_error(&mut alice, "endpoint_not_found").await;
        assert_eq!(v["id"], "m-2");
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;

        // Duplicate register on one connection.
        let mut twice = Raw::register(&bus.socket, "carol").await;
        twice
            .send(&json!({"type": "register", "endpoint": "carol2"}))
            .await;
        expect_error(&mut twice, "already_registered").await;
        still_alive(&mut twice).await;

        // A frame split across writes is fine (not an error).
        let frame = hermes_bus::transports::unix::frame::encode(br#"{"type": "ping"}"#);
        bad.send_bytes(&frame[..3]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        bad.send_bytes(&frame[3..]).await;
        assert_eq!(bad.recv().await.expect("pong")["type"], "pong");

        // Oversized length header: answered, then closed (cannot resync).
        let too_big = (10 * 1024 * 1024 + 1) as u32;
        bad.send_bytes(&too_big.to_be_bytes()).await;
        expect_error(&mut bad, "frame_too_large").await;
        assert!(bad.closed_within(Duration::from_secs(5)).await);
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;

        // A frame of exactly the maximum is accepted (and answered).
        let mut big = Raw::connect(&bus.socket).await;
        let pad = "x".repeat(10 * 1024 * 1024 - 64);
        let payload = format!(r#"{{"type": "ping", "pad": "{pad}"}}"#);
        assert!(payload.len() <= 10 * 1024 * 1024);
        big.send_payload(payload.as_bytes()).await;
        assert_eq!(big.recv().await.expect("pong")["type"], "pong");

        // Counters saw the errors.
        assert!(bus.totals().errors >= 14, "{:?}", bus.totals());
        n += 1;
        pair_still_works(&mut alice, &mut bob, n).await;
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn replaced_session_is_told_why() {
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start().await;
        let mut first = Raw::register(&bus.socket, "svc").await;
        let _second = Raw::register(&bus.socket, "svc").await;
        let v = first.recv().await.expect("a reason before close");
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "replaced");
        assert!(first.closed_within(Duration::from_secs(5)).await);
        assert_eq!(bus.totals().replaced, 1);
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn abrupt_disconnects_mid_frame_leave_the_bus_serving() {
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start().await;
        let mut alice = Raw::register(&bus.socket, "alice").await;
        let mut bob = Raw::register(&bus.socket, "bob").await;
        for i in 0..50u64 {
            let mut c = Raw::connect(&bus.socket).await;
            // Header announcing 1000 bytes, then only part of them.
            let mut bytes = 1000u32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[b'{'; 10]);
            c.send_bytes(&bytes).await;
            drop(c);
            if i % 10 == 0 {
                pair_still_works(&mut alice, &mut bob, i).await;
            }
        }
        pair_still_works(&mut alice, &mut bob, 1000).await;
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

/// Deep nesting (far past serde_json's recursion limit) exhausts no
/// stack and is refused with `too_deep` (never forwarded, so no client has
/// to parse it); the sender and the receiver go on.
#[tokio::test]
async fn deeply_nested_payloads_crash_nothing() {
    tokio::time::timeout(LIMIT, async {
        let bus = TestBus::start().await;
        let mut client = hermes_bus::transports::unix::BusClient::connect("deep", &bus.socket)
            .await
            .expect("client");
        let mut raw = Raw::register(&bus.socket, "raw").await;
        let depth = 1_000_000;
        let payload = format!(
            r#"{{"type": "message", "to": "deep", "body": {}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        raw.send_payload(payload.as_bytes()).await;
        let v = raw.recv().await.expect("an error reply");
        assert_eq!(v["code"], "too_deep", "{v}");
        // Unbalanced and shallow: invalid, answered as such.
        let bad = r#"{"type": "message", "to": "deep", "body": [[[}"#;
        raw.send_payload(bad.as_bytes()).await;
        let v = raw.recv().await.expect("an error reply");
        assert_eq!(v["code"], "bad_json", "{v}");
        raw.send(&json!({"type": "message", "to": "deep", "body": {"after": 1}}))
            .await;
        let m = common::client_recv(&mut client, Duration::from_secs(10)).await;
        assert_eq!(m["body"]["after"], 1);
        assert!(client.is_connected());
        assert_eq!(bus.totals().routed, 1, "the deep one was not routed");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
