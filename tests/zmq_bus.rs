//! The proxy inside the bus: a topic hook fires for ZeroMQ traffic, a
//! router session receives ZeroMQ topics, and a topic published into the
//! router reaches ZeroMQ subscribers (without coming back).
#![cfg(feature = "zmq")]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::zmq::{receiver, serve_zmq};
use common::{eventually, TEST_LIMIT};
use hermes_bus::delivery::TopicMessage;
use hermes_bus::envelope::Data;
use hermes_bus::hooks::error::HookError;
use hermes_bus::hooks::event::{HookEvent, HookEventKind};
use hermes_bus::hooks::filter::HookFilter;
use hermes_bus::hooks::hook::Hook;
use hermes_bus::hooks::{HookConfig, HookEngine};
use hermes_bus::transports::zmq::Publisher;
use hermes_bus::{Bus, RouterConfig};

/// An in-process hook that records the topics it sees.
struct Recorder {
    /// Its filter.
    filter: HookFilter,
    /// What it saw: (transport, topic, json).
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[async_trait::async_trait]
impl Hook for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn filter(&self) -> &HookFilter {
        &self.filter
    }
    async fn call(&self, e: &HookEvent) -> Result<(), HookError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.push((
            e.transport.to_owned(),
            e.topic.clone().unwrap_or_default(),
            String::from_utf8_lossy(&e.json).into_owned(),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn zmq_traffic_enters_the_router_and_hooks() {
    tokio::time::timeout(TEST_LIMIT, async {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let filter = HookFilter {
            kind: Some(HookEventKind::Topic),
            topic_prefix: Some("MD/".into()),
            transport: Some("zmq".into()),
            ..HookFilter::any()
        };
        let hook: Arc<dyn Hook> = Arc::new(Recorder {
            filter,
            seen: seen.clone(),
        });
        let hooks = HookEngine::start(HookConfig::default(), vec![hook]);
        let bus = Bus::new(RouterConfig::default(), hooks);

        let zmq = serve_zmq(&bus).await;
        let (ep, stats) = (zmq.ep.clone(), zmq.stats.clone());

        // A router session (as a Unix client would have) subscribed to MD/.
        let (sid, mut outbox) = bus.connect("test");
        bus.subscribe(sid, "MD/").expect("subscribed");

        let mut p = Publisher::new(&ep.frontend.to_string(), "feed").expect("publisher");
        p.start().expect("start");
        // The proxy subscribes upstream to what the session and the hook
        // want (MD/), and nothing else: NEWS/ is dropped at the source.
        p.wait_for_subscriber("MD/AAPL", Duration::from_secs(15))
            .await
            .expect("upstream subscription");
        for i in 0..10 {
            assert!(p
                .publish_parts("MD/AAPL", "feed", &Data::json(&i).expect("json"))
                .expect("publish"));
            assert!(!p
                .publish_parts("NEWS/x", "feed", &Data::json(&i).expect("json"))
                .expect("publish"));
        }
        assert_eq!(p.stats().filtered, 10);
        let mut got = VecDeque::new();
        let mut topics = Vec::new();
        while topics.len() < 10 {
            let more = tokio::time::timeout(Duration::from_secs(10), outbox.recv_batch(&mut got))
                .await
                .expect("router delivers zmq topics");
            assert!(more);
            for d in got.drain(..) {
                let m = d.topic_message().expect("topic message");
                assert_eq!(m.origin, "feed");
                topics.push(m.topic.clone());
            }
        }
        assert!(topics.iter().all(|t| t == "MD/AAPL"), "{topics:?}");

        let ok = eventually(Duration::from_secs(10), || {
            seen.lock().map(|s| s.len() >= 10).unwrap_or(false)
        })
        .await;
        assert!(ok, "hook fired for the 10 MD/ envelopes");
        tokio::time::sleep(Duration::from_millis(100)).await;
        {
            let seen = seen.lock().expect("lock");
            assert_eq!(seen.len(), 10, "NEWS/ does not match the filter");
            for (transport, topic, json) in seen.iter() {
                assert_eq!(transport, "zmq");
                assert_eq!(topic, "MD/AAPL");
                assert!(json.contains("\"topic\":\"MD/AAPL\""), "{json}");
            }
        }

        // Router → ZeroMQ: a topic published by the router session reaches
        // a ZeroMQ receiver, and is not fed back into the router.
        let mut r = receiver(&zmq.back(), |c| c.topics = vec!["ALERT/".into()]);
        r.wait_connected(Duration::from_secs(10))
            .await
            .expect("connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = stats.snapshot().to_bus;
        let msg = TopicMessage {
            topic: "ALERT/é".into(),
            origin: "unix-client".into(),
            data: serde_json::value::to_raw_value(&serde_json::json!({"level": 3})).expect("raw"),
            ts: hermes_bus::envelope::unix_now(),
            seq: None,
        };
        bus.publish("test", sid, msg);
        let env = r
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("from the router");
        assert_eq!(env.topic, "ALERT/é");
        assert_eq!(env.origin, "unix-client");
        assert_eq!(
            serde_json::to_value(&env.data).expect("json"),
            serde_json::json!({"level": 3})
        );
        let s = stats.snapshot();
        assert_eq!(s.from_bus, 1);
        assert_eq!(s.to_bus, before, "no loop back into the router");

        p.stop().await;
        r.stop().await;
        zmq.shutdown().await;
    })
    .await
    .expect("test timed out");
}
