//! MessagePack for Unix sessions (ours, opt-in at `register`): a session
//! that asks for it gets every frame after its request as MessagePack
//! (marker byte 0xC1 first); everyone else, and every reference client,
//! keeps getting JSON. The bus accepts MessagePack frames from anyone.

mod common;

use std::time::Duration;

use common::{Raw, TestBus};
use hermes_bus::codec::{self, Codec, MSGPACK_MARKER};
use hermes_bus::transports::unix::{BusClient, ClientConfig};
use serde_json::{json, Value};

fn decode_mp(p: &[u8]) -> Value {
    assert_eq!(
        p.first(),
        Some(&MSGPACK_MARKER),
        "expected MessagePack, got {p:?}"
    );
    codec::decode::<Value>(p).expect("valid MessagePack")
}

#[tokio::test]
async fn msgpack_sessions_get_msgpack_and_json_sessions_json() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let bus = TestBus::start().await;
        let mut js = Raw::register(&bus.socket, "js").await;
        let mut mp = Raw::connect(&bus.socket).await;
        mp.send(&json!({"type": "register", "endpoint": "mp", "codec": "msgpack"}))
            .await;
        let reg = decode_mp(&mp.recv_payload().await.expect("registered"));
        assert_eq!(reg["type"], "registered");

        // JSON in, MessagePack out.
        js.send(&json!({"type": "message", "to": "mp", "body": {"n": 1, "s": "é"}}))
            .await;
        let m = decode_mp(&mp.recv_payload().await.expect("message"));
        assert_eq!(m["from"], "js");
        assert_eq!(m["body"], json!({"n": 1, "s": "é"}));

        // MessagePack in (marker first), JSON out to the JSON session.
        let frame = codec::encode(
            Codec::MsgPack,
            &json!({"type": "message", "to": "js", "body": {"k": [1, 2.5, null]}}),
        )
        .expect("encode");
        mp.send_payload(&frame).await;
        let p = js.recv_payload().await.expect("message");
        assert_eq!(p[0], b'{', "a JSON session never sees MessagePack");
        let m: Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(m["from"], "mp");
        assert_eq!(m["body"], json!({"k": [1, 2.5, null]}));

        // Broadcasts too: each session in its own form.
        js.send(&json!({"type": "message", "body": {"all": true}}))
            .await;
        assert_eq!(
            decode_mp(&mp.recv_payload().await.expect("bcast"))["body"]["all"],
            true
        );
        assert_eq!(js.recv().await.expect("bcast")["body"]["all"], true);

        // Bad MessagePack and an unknown codec are typed errors; the
        // connections stay.
        js.send_payload(&[MSGPACK_MARKER, 0xc1, 0xff]).await;
        assert_eq!(js.recv().await.expect("error")["code"], "bad_msgpack");
        let mut other = Raw::connect(&bus.socket).await;
        other
            .send(&json!({"type": "register", "endpoint": "x", "codec": "xml"}))
            .await;
        assert_eq!(other.recv().await.expect("error")["code"], "bad_field");
        js.send(&json!({"type": "ping"})).await;
        assert_eq!(js.recv().await.expect("pong")["type"], "pong");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn rust_client_can_ask_for_msgpack() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let bus = TestBus::start().await;
        let mut cfg = ClientConfig::new(&bus.socket);
        cfg.autostart = false;
        cfg.codec = Codec::MsgPack;
        let mut a = BusClient::connect_with("a", cfg).await.expect("a");
        let b = BusClient::connect("b", &bus.socket).await.expect("b");
        b.send("a", json!({"hello": "msgpack"}))
            .await
            .expect("send");
        let m = common::client_recv(&mut a, Duration::from_secs(5)).await;
        assert_eq!(m["body"]["hello"], "msgpack");
        assert_eq!(m["from"], "b");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
