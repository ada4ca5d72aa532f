//! Traffic counters by transport and by topic: what `top` turns into
//! rates (from two `stats` snapshots) and the metrics endpoint exports.
//!
//! Per transport: messages and publishes that entered through it, and
//! their bytes. Per topic: publishes, their data bytes and the copies
//! queued, for at most [`MAX_TOPICS`] distinct topics (the first seen);
//! the rest are added up under [`OTHER_TOPICS`], so the table is bounded
//! whatever the topics.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::hash::FastHash;

/// Most topics counted one by one.
pub const MAX_TOPICS: usize = 1024;
/// The name the rest are counted under.
pub const OTHER_TOPICS: &str = "(other)";

/// Counters of one transport.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportTraffic {
    /// `message`s routed that came in through it.
    pub messages: u64,
    /// Topic publishes that came in through it.
    pub publishes: u64,
    /// Their bytes (a message's JSON, a publish's data).
    pub bytes: u64,
    /// Copies of them queued to sessions.
    pub delivered: u64,
}

/// Counters of one topic.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicTraffic {
    /// Publishes.
    pub publishes: u64,
    /// Their data bytes.
    pub bytes: u64,
    /// Copies queued to subscribers.
    pub delivered: u64,
}

/// A snapshot for `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrafficStats {
    /// By transport name.
    pub transports: BTreeMap<String, TransportTraffic>,
    /// By topic, the rest under [`OTHER_TOPICS`].
    pub topics: BTreeMap<String, TopicTraffic>,
}

/// The live counters.
#[derive(Default)]
pub struct Traffic {
    transports: Vec<(&'static str, TransportTraffic)>,
    topics: HashMap<String, TopicTraffic, FastHash>,
    other: Option<TopicTraffic>,
}

impl Traffic {
    fn transport(&mut self, name: &'static str) -> &mut TransportTraffic {
        match self.transports.iter().position(|(n, _)| *n == name) {
            Some(i) => &mut self.transports[i].1,
            None => {
                self.transports.push((name, TransportTraffic::default()));
                let last = self.transports.len() - 1;
                &mut self.transports[last].1
            }
        }
    }

    /// Counts a routed `message`.
    pub fn message(&mut self, transport: &'static str, bytes: usize, delivered: usize) {
        let t = self.transport(transport);
        t.messages += 1;
        t.bytes += bytes as u64;
        t.delivered += delivered as u64;
    }

    /// Counts a topic publish.
    pub fn publish(
        &mut self,
        transport: &'static str,
        topic: &str,
        bytes: usize,
        delivered: usize,
    ) {
        let t = self.transport(transport);
        t.publishes += 1;
        t.bytes += bytes as u64;
        t.delivered += delivered as u64;
        let room = self.topics.len() < MAX_TOPICS;
        let c = if let Some(c) = self.topics.get_mut(topic) {
            c
        } else if room {
            self.topics.entry(topic.to_owned()).or_default()
        } else {
            self.other.get_or_insert_with(TopicTraffic::default)
        };
        c.publishes += 1;
        c.bytes += bytes as u64;
        c.delivered += delivered as u64;
    }

    /// A snapshot.
    pub fn stats(&self) -> TrafficStats {
        let mut topics: BTreeMap<String, TopicTraffic> =
            self.topics.iter().map(|(k, v)| (k.clone(), *v)).collect();
        topics.extend(self.other.map(|o| (OTHER_TOPICS.to_owned(), o)));
        TrafficStats {
            transports: self
                .transports
                .iter()
                .map(|(n, t)| ((*n).to_owned(), *t))
                .collect(),
            topics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_transport_and_topic_within_a_bound() {
        let mut t = Traffic::default();
        t.message("unix", 100, 1);
        t.publish("zmq", "md/a", 10, 2);
        for i in 0..MAX_TOPICS + 5 {
            t.publish("zmq", &format!("t/{i}"), 1, 0);
        }
        let s = t.stats();
        assert_eq!(s.transports["unix"].messages, 1);
        assert_eq!(s.transports["zmq"].publishes, MAX_TOPICS as u64 + 6);
        assert_eq!(s.topics.len(), MAX_TOPICS + 1);
        assert_eq!(s.topics[OTHER_TOPICS].publishes, 6);
    }
}
