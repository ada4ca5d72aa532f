//! Sequence numbers on the Unix socket: a session that subscribes with
//! `"seq": true` gets `seq` and `seq_origin` on its topic deliveries (the
//! bus numbers Unix publishes per topic as its own origin), in JSON or
//! MessagePack; a session that did not ask gets exactly today's bytes.

mod common;

use std::time::Instant;

use common::{Raw, TestBus, TEST_LIMIT};
use serde_json::{json, Value};

/// Today's frame of a publish: what a session that did not ask must get,
/// byte for byte.
fn plain(topic: &str, i: u64) -> String {
    format!(r#"{{"type":"publish","topic":"{topic}","origin":"pub","data":{{"i":{i}}},"ts":1.5}}"#)
}

/// The same with the number, for a session that asked.
fn numbered(topic: &str, i: u64, n: u64, origin: &str) -> String {
    let p = plain(topic, i);
    format!(
        r#"{},"seq":{n},"seq_origin":"{origin}"}}"#,
        &p[..p.len() - 1]
    )
}

async fn subscribe(r: &mut Raw, v: Value) {
    r.send(&v).await;
    let reply = r.recv().await.expect("reply");
    assert_eq!(reply["type"], "subscribed", "{reply}");
}

#[tokio::test]
async fn a_session_that_asks_gets_numbers_and_the_others_todays_bytes() {
    tokio::time::timeout(TEST_LIMIT, async {
        let bus = TestBus::start().await;
        let origin = bus.bus.router().stats(Instant::now()).seq.origin;
        assert!(origin.starts_with("hermes-bus#"), "{origin}");
        let mut plain_s = Raw::register(&bus.socket, "plain").await;
        subscribe(&mut plain_s, json!({"type": "subscribe", "topic": "md/"})).await;
        let mut seq_s = Raw::register(&bus.socket, "seq").await;
        subscribe(
            &mut seq_s,
            json!({"type": "subscribe", "topic": "md/", "seq": true}),
        )
        .await;
        // A subset of the topics: numbers per topic, so no false gap.
        let mut subset = Raw::register(&bus.socket, "subset").await;
        subscribe(
            &mut subset,
            json!({"type": "subscribe", "topic": "md/b", "seq": true}),
        )
        .await;
        // MessagePack and numbers together.
        let mut mp = Raw::connect(&bus.socket).await;
        mp.send(&json!({"type": "register", "endpoint": "mp", "codec": "msgpack"}))
            .await;
        let reply = mp.recv_payload().await.expect("registered");
        let reply: Value = hermes_bus::codec::decode(&reply).expect("msgpack");
        assert_eq!(reply["type"], "registered");
        mp.send(&json!({"type": "subscribe", "topic": "md/", "seq": true}))
            .await;
        let reply: Value =
            hermes_bus::codec::decode(&mp.recv_payload().await.expect("reply")).expect("msgpack");
        assert_eq!(reply["type"], "subscribed");

        let mut publisher = Raw::register(&bus.socket, "pub").await;
        const N: u64 = 20;
        for i in 0..N {
            let topic = if i % 2 == 0 { "md/a" } else { "md/b" };
            publisher
                .send(&json!({"type": "publish", "topic": topic, "data": {"i": i}, "ts": 1.5}))
                .await;
        }
        for i in 0..N {
            let topic = if i % 2 == 0 { "md/a" } else { "md/b" };
            let n = i / 2 + 1;
            let p = plain_s.recv_payload().await.expect("plain delivery");
            assert_eq!(std::str::from_utf8(&p).unwrap(), plain(topic, i));
            let s = seq_s.recv_payload().await.expect("numbered delivery");
            assert_eq!(
                std::str::from_utf8(&s).unwrap(),
                numbered(topic, i, n, &origin)
            );
            let m: Value =
                hermes_bus::codec::decode(&mp.recv_payload().await.expect("mp")).expect("msgpack");
            assert_eq!(
                (m["topic"].as_str(), m["seq"].as_u64()),
                (Some(topic), Some(n))
            );
            assert_eq!(m["seq_origin"], origin.as_str());
            assert_eq!(m["data"]["i"], i);
            if topic == "md/b" {
                let b = subset.recv_payload().await.expect("subset");
                assert_eq!(
                    std::str::from_utf8(&b).unwrap(),
                    numbered(topic, i, n, &origin)
                );
            }
        }
        // `"seq": false` switches it off again: today's bytes.
        subscribe(
            &mut seq_s,
            json!({"type": "subscribe", "topic": "md/", "seq": false}),
        )
        .await;
        publisher
            .send(&json!({"type": "publish", "topic": "md/a", "data": {"i": 99}, "ts": 1.5}))
            .await;
        let s = seq_s.recv_payload().await.expect("delivery");
        assert_eq!(std::str::from_utf8(&s).unwrap(), plain("md/a", 99));
        let p = plain_s.recv_payload().await.expect("delivery");
        assert_eq!(std::str::from_utf8(&p).unwrap(), plain("md/a", 99));
        // A bad flag is a typed error.
        seq_s
            .send(&json!({"type": "subscribe", "topic": "x", "seq": 1, "id": "q"}))
            .await;
        let e = seq_s.recv().await.expect("error");
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad_field"))
        );
        assert_eq!(e["id"], "q");
        let st = bus.bus.router().stats(Instant::now()).seq;
        println!("bus numbering: {st:?}");
        assert_eq!((st.topics, st.forgotten), (2, 0));
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
