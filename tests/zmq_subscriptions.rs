//! Bare subscriptions (`RAW/`, as the reference `Receiver` sends them):
//! by default the proxy also reads them as the prefix of the topic's text
//! (`"RAW/`), matching, replaying last values and subscribing upstream
//! with that form, next to the bytes as sent; `--strict-subscriptions`
//! keeps only libzmq's byte prefixes. And what a libzmq SUB does with
//! them on its own side.
#![cfg(feature = "zmq")]

mod common;

use std::time::Duration;

use common::zmq::{raw_peer, receiver, start_proxy, RawPeer};
use common::{eventually, PyPeer, TEST_LIMIT};
use hermes_bus::envelope::Data;
use hermes_bus::last_value::LastValueLimits;
use hermes_bus::transports::zmq::zmtp::{Inbound, SocketType};
use hermes_bus::transports::zmq::Publisher;

/// The topic frames `peer` receives within `limit` of silence.
async fn topics_of(peer: &mut RawPeer, limit: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(item) = peer.next_item(limit).await {
        if let Inbound::Message(m) = item {
            out.push(String::from_utf8_lossy(m.first_frame()).into_owned());
        }
    }
    out
}

fn envelope(topic: &str, n: u64) -> Vec<Vec<u8>> {
    vec![
        format!("\"{topic}\"").into_bytes(),
        b"\"raw-pub\"".to_vec(),
        n.to_string().into_bytes(),
        b"1.0".to_vec(),
    ]
}

async fn send(p: &mut RawPeer, frames: &[Vec<u8>]) {
    let f: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
    p.send(&f).await;
}

#[tokio::test]
async fn a_bare_subscription_gets_its_topics_live_replayed_and_upstream() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.last_value = Some(LastValueLimits::default())).await;
        let mut p = Publisher::new(&proxy.front(), "p").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("RAW/0", Duration::from_secs(15))
            .await
            .expect("the cache's upstream subscription");
        for i in 0..3u64 {
            p.publish_parts(&format!("RAW/{i}"), "p", &Data::json(&i).expect("json"))
                .expect("publish");
        }
        p.publish_parts("OTHER/x", "p", &Data::json(&9).expect("json"))
            .expect("publish");
        p.flush(Duration::from_secs(10)).await.expect("flushed");
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .stats
                .snapshot()
                .cached_topics
                == 4)
            .await
        );
        // A subscriber that does not filter on its side (a raw ZMTP peer,
        // as an XSUB is), subscribing with the bare text.
        let mut sub = raw_peer(&proxy.back(), SocketType::Sub).await;
        sub.subscribe(b"RAW/").await;
        assert!(
            eventually(Duration::from_secs(10), || proxy.stats.snapshot().replayed
                == 3)
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        p.publish_parts("RAW/1", "p", &Data::json(&11).expect("json"))
            .expect("publish");
        p.publish_parts("OTHER/y", "p", &Data::json(&12).expect("json"))
            .expect("publish");
        let got = topics_of(&mut sub, Duration::from_millis(1500)).await;
        assert_eq!(got, ["\"RAW/0\"", "\"RAW/1\"", "\"RAW/2\"", "\"RAW/1\""]);
        let st = proxy.stats.snapshot();
        assert_eq!(st.bare_subscriptions, 1);
        // Both forms are held: the quoted one and the bytes as sent.
        assert_eq!(st.subscriptions, 2);
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_quoted_form_goes_upstream_so_publishers_filter_at_the_source() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let mut sub = raw_peer(&proxy.back(), SocketType::Sub).await;
        sub.subscribe(b"RAW/").await;
        let mut p = Publisher::new(&proxy.front(), "p").expect("publisher");
        p.start().expect("start");
        p.wait_for_subscriber("RAW/x", Duration::from_secs(15))
            .await
            .expect("the quoted form reached the publisher");
        assert!(
            p.wait_for_subscriber("OTHER/x", Duration::from_millis(300))
                .await
                .is_err(),
            "nothing else is wanted"
        );
        for i in 0..5u64 {
            assert!(p
                .publish_parts("RAW/x", "p", &Data::json(&i).expect("json"))
                .expect("publish"));
            p.publish_parts("OTHER/x", "p", &Data::json(&i).expect("json"))
                .expect("publish");
        }
        let got = topics_of(&mut sub, Duration::from_millis(1500)).await;
        assert_eq!(got, vec!["\"RAW/x\""; 5]);
        assert_eq!(p.stats().filtered, 5, "OTHER/ filtered at the source");
        p.stop().await;
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn strict_subscriptions_keep_byte_prefixes() {
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|c| c.strict_subscriptions = true).await;
        let mut bare = raw_peer(&proxy.back(), SocketType::Sub).await;
        bare.subscribe(b"RAW/").await;
        // A control subscriber with the quoted prefix (our Receiver).
        let control = receiver(&proxy.back(), |c| c.topics = vec!["RAW/".into()]);
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 2)
            .await
        );
        // A publisher that does not filter at the source (a raw PUB).
        let mut publ = raw_peer(&proxy.front(), SocketType::Pub).await;
        const N: u64 = 20;
        for i in 0..N {
            send(&mut publ, &envelope("RAW/x", i)).await;
        }
        publ.send(&[b"RAW/raw-topic", b"x"]).await;
        for _ in 0..N {
            control
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("the control subscriber gets the envelopes");
        }
        // Counted, not guessed: every message was read and each went where
        // its subscriptions say (N envelopes to the control, the raw topic
        // to the bare subscriber), so the bare one got no envelope.
        assert!(
            eventually(Duration::from_secs(10), || {
                let s = proxy.stats.snapshot();
                s.publishers.messages == N + 1 && s.subscribers.messages == N + 1
            })
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        assert_eq!(proxy.stats.snapshot().bare_subscriptions, 0);
        let got = topics_of(&mut bare, Duration::from_millis(500)).await;
        assert_eq!(got, ["RAW/raw-topic"]);
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// The reference `Receiver(topics="RAW/")` is a libzmq SUB subscribed to
/// `RAW/`, and a libzmq SUB drops on its own side every message whose
/// first frame does not start with its subscription: the JSON topic frame
/// `"RAW/x"` never does. The proxy sends it the envelopes (counted), the
/// Receiver discards them; with no topics (the empty subscription) it
/// gets them. A pyzmq SUB with a bare prefix still gets raw (non-JSON)
/// topics through our proxy, as libzmq matches them.
#[tokio::test]
async fn a_libzmq_sub_filters_its_bare_prefix_on_its_own_side() {
    let Some(py) = common::python("py07") else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let proxy = start_proxy(|_| {}).await;
        let mut bare = PyPeer::spawn_ready(
            &py,
            "zmq_peer.py",
            &["recv", &proxy.back(), "1000", "30", "RAW/"],
        )
        .await;
        let all =
            PyPeer::spawn_ready(&py, "zmq_peer.py", &["recv", &proxy.back(), "5", "30"]).await;
        // Two bare prefixes held for the Receiver of RAW/, one empty.
        assert!(
            eventually(Duration::from_secs(15), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 3)
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        let mut publ = raw_peer(&proxy.front(), SocketType::Pub).await;
        for i in 0..5u64 {
            let mut e = envelope("RAW/x", i);
            // A list (the reference reads `data[0]` as the dtype), and
            // fresh, so its 1 s lag check passes.
            e[2] = format!("[\"Tick\", 1.0, {i}]").into_bytes();
            e[3] = format!("{}", hermes_bus::clock::unix_now()).into_bytes();
            send(&mut publ, &e).await;
        }
        let lines = all.finish(Duration::from_secs(20)).await;
        let got: Vec<serde_json::Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(got.len(), 5, "the Receiver without topics: {lines:?}");
        assert!(got.iter().all(|l| l["topic"] == "RAW/x"));
        // Both Receivers were sent all 5 (counted by the proxy) ...
        assert!(
            eventually(Duration::from_secs(10), || proxy
                .stats
                .snapshot()
                .subscribers
                .messages
                == 10)
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        // ... and the one subscribed to RAW/ kept none: its own socket
        // dropped the JSON topic frames.
        assert!(bare.next_json(Duration::from_millis(500)).await.is_none());

        // A pyzmq SUB with a bare prefix, on raw topics: as with libzmq.
        let mut raw_sub = PyPeer::spawn_ready(
            &py,
            "zmq_peer.py",
            &["sub", &proxy.back(), "ZRAW/", "5", "30"],
        )
        .await;
        assert!(
            eventually(Duration::from_secs(15), || proxy
                .stats
                .snapshot()
                .subscriptions
                == 4)
            .await,
            "{:?}",
            proxy.stats.snapshot()
        );
        for _ in 0..5 {
            publ.send(&[b"ZRAW/1", b"x"]).await;
        }
        for _ in 0..5 {
            let f = raw_sub
                .next_json(Duration::from_secs(10))
                .await
                .expect("the raw topic, as libzmq matches it");
            assert_eq!(f[0], "ZRAW/1");
        }
        proxy.shutdown().await;
    })
    .await
    .expect("test timed out");
}
