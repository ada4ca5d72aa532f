//! Last values on the Unix side: the router keeps the newest topic
//! delivery of each topic it routes (Unix publishes and envelopes bridged
//! from ZeroMQ) in a [`LastValues`], and a session that subscribes with
//! `"snapshot": true` is first sent the kept value of every matching
//! topic, then live traffic.
//!
//! Plain state, like the rest of the router: a snapshot is a cursor the
//! session advances a chunk at a time ([`Router::snapshot_chunk`]), each
//! under one router lock, so a large snapshot never holds the lock long.
//! Publishes update the cache and deliver under that same lock, and a
//! chunk replays only values stored before the subscription (the cache's
//! mark at that moment): a value stored since went to the session live, so
//! nothing arrives twice and no kept value arrives after a newer one.
//! A prefix the session already held replays nothing, and topics another
//! of its prefixes matches are skipped (they reach it live). A full outbox
//! ends the chunk: the session waits until it drained, then goes on; a
//! stuck or closed one gets the rest dropped and counted.

use crate::delivery::Delivery;
use crate::error::{ErrorCode, ProtocolError};
use crate::last_value::{LastValues, Scan, Taken};
use crate::outbox::PushError;
use crate::stats::LastValueStats;

use super::{Router, SessionId, SlowPolicy};
use bytes::Bytes;

/// Most cached topics one snapshot chunk visits under the router lock.
pub const SNAPSHOT_CHUNK: usize = 256;

/// A session's snapshot of one new prefix, in progress.
#[derive(Debug)]
pub struct Snapshot {
    /// The prefix.
    prefix: String,
    /// Where it stands in the cache.
    scan: Scan,
    /// Values queued to the session so far.
    pub sent: u64,
}

impl Snapshot {
    /// The prefix it replays.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// What a snapshot chunk ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStep {
    /// Nothing left (or the session is gone).
    Done,
    /// More to send: let others run, then the next chunk.
    More,
    /// The session's outbox is full: wait until it drained, then the next
    /// chunk.
    Full,
}

/// The weight of a kept topic delivery: its message, and the Unix JSON and
/// MessagePack frames the writers may encode into it once (each about the
/// message's size).
fn weight(d: &Delivery) -> usize {
    d.charge().saturating_mul(3)
}

impl Router {
    /// Keeps `d` as the newest value of its topic (with a cache).
    pub(super) fn remember(&mut self, d: &Delivery) {
        if let (Some(lv), Some(m)) = (self.last_values.as_mut(), d.topic_message()) {
            lv.put(m.topic.as_bytes(), d.without_ack(), weight(d));
        }
    }

    /// Subscribes `sid` to `prefix` and, when the prefix is new for it,
    /// starts its snapshot. `Err(no_last_value)` (nothing changed) when the
    /// bus keeps no last values; Ok(None) when it held the prefix already.
    pub fn subscribe_snapshot(
        &mut self,
        sid: SessionId,
        prefix: &str,
    ) -> Result<Option<Snapshot>, ProtocolError> {
        let Some(lv) = self.last_values.as_ref() else {
            return Err(ProtocolError::new(
                ErrorCode::NoLastValue,
                "this bus keeps no last values (start it with --last-value); subscribe without \"snapshot\"",
            ));
        };
        let mark = lv.mark();
        if !self.sessions.contains_key(&sid) || !self.topics.subscribe(sid, prefix)? {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            prefix: prefix.to_owned(),
            scan: LastValues::<Delivery>::scan(prefix.as_bytes(), mark),
            sent: 0,
        }))
    }

    /// Queues the next chunk of `snap` to session `sid`.
    pub fn snapshot_chunk(&mut self, sid: SessionId, snap: &mut Snapshot) -> SnapshotStep {
        let (Some(lv), Some(s)) = (self.last_values.as_ref(), self.sessions.get_mut(&sid)) else {
            return SnapshotStep::Done;
        };
        let topics = &self.topics;
        let prefix = snap.prefix.as_str();
        // Under conflation a session's topic values are keyed by topic, as
        // live ones are: a newer live value then takes this one's place.
        let conflate = self.cfg.topic_policy == SlowPolicy::Conflate;
        let (mut sent, mut dropped, mut conflated, mut full) = (0u64, 0u64, 0u64, false);
        lv.next_chunk(&mut snap.scan, SNAPSHOT_CHUNK, |topic, d| {
            if topics.covers_other(sid, topic, prefix) {
                return Taken::Yes;
            }
            let pushed = if conflate {
                s.outbox
                    .push_keyed(d.clone(), Bytes::copy_from_slice(topic))
                    .map(|old| conflated += u64::from(old.is_some()))
            } else {
                s.outbox.push(d.clone())
            };
            match pushed {
                Ok(()) => {
                    sent += 1;
                    Taken::Yes
                }
                Err(PushError::Full) => {
                    full = true;
                    Taken::No
                }
                Err(PushError::Stuck) | Err(PushError::Closed) => {
                    dropped += 1;
                    Taken::Yes
                }
            }
        });
        s.counters.delivered += sent;
        s.counters.dropped += dropped;
        self.totals.delivered += sent;
        self.totals.dropped_slow += dropped;
        self.totals.conflated += conflated;
        self.replayed += sent;
        self.replay_dropped += dropped;
        snap.sent += sent;
        if full {
            SnapshotStep::Full
        } else if snap.scan.is_done() {
            SnapshotStep::Done
        } else {
            SnapshotStep::More
        }
    }

    /// The cache's counters for `status` (zeros without a cache).
    pub fn last_value_stats(&self) -> LastValueStats {
        let Some(lv) = &self.last_values else {
            return LastValueStats::default();
        };
        LastValueStats {
            enabled: true,
            cached_topics: lv.len() as u64,
            cached_bytes: lv.bytes() as u64,
            cache_evictions: lv.evictions(),
            replayed: self.replayed,
            replay_dropped: self.replay_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::time::Instant;

    use super::*;
    use crate::delivery::TopicMessage;
    use crate::last_value::LastValueLimits;
    use crate::outbox::{standalone, OutboxReader};
    use crate::router::RouterConfig;

    fn router() -> Router {
        Router::new(RouterConfig {
            last_value: Some(LastValueLimits::default()),
            ..RouterConfig::default()
        })
    }

    fn session(r: &mut Router, items: usize) -> (SessionId, OutboxReader) {
        let (tx, rx) = standalone(items, 1 << 20);
        (r.connect("unix", tx, Instant::now()), rx)
    }

    fn publish(r: &mut Router, from: SessionId, topic: &str, n: u64) {
        let d = Delivery::topic(TopicMessage {
            topic: topic.to_owned(),
            origin: "o".to_owned(),
            data: serde_json::value::to_raw_value(&n).expect("json"),
            ts: 1.0,
            seq: None,
        });
        r.publish_delivery(from, &d, crate::router::Full::Drop);
    }

    /// (topic, n) of what the session's writer would take now (written).
    fn drain(rx: &mut OutboxReader) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        loop {
            let mut b = VecDeque::new();
            if rx.try_recv_batch(&mut b) == 0 {
                return out;
            }
            let bytes = b.iter().map(|d| d.charge()).sum();
            rx.written(b.len(), bytes);
            out.extend(b.iter().filter_map(|d| d.topic_message()).map(|m| {
                let n: u64 = serde_json::from_str(m.data.get()).expect("n");
                (m.topic.clone(), n)
            }));
        }
    }

    fn run(r: &mut Router, sid: SessionId, snap: &mut Snapshot) {
        let mut rounds = 0;
        while r.snapshot_chunk(sid, snap) != SnapshotStep::Done {
            rounds += 1;
            assert!(rounds < 10_000);
        }
    }

    #[test]
    fn a_snapshot_sends_the_newest_value_of_each_matching_topic_then_live() {
        let mut r = router();
        let (p, _rp) = session(&mut r, 100);
        let (l, mut rl) = session(&mut r, 100);
        for (t, n) in [("a/1", 1), ("a/2", 2), ("a/1", 3), ("b/1", 4)] {
            publish(&mut r, p, t, n);
        }
        let mut snap = r.subscribe_snapshot(l, "a/").unwrap().expect("new");
        run(&mut r, l, &mut snap);
        assert_eq!(snap.sent, 2);
        assert_eq!(drain(&mut rl), [("a/1".into(), 3), ("a/2".into(), 2)]);
        publish(&mut r, p, "a/2", 5);
        assert_eq!(drain(&mut rl), [("a/2".into(), 5)]);
        let st = r.last_value_stats();
        assert_eq!(
            (st.cached_topics, st.replayed, st.replay_dropped),
            (3, 2, 0)
        );
        // Held already: nothing again. A narrower prefix: covered by a/.
        assert!(r.subscribe_snapshot(l, "a/").unwrap().is_none());
        let mut snap = r.subscribe_snapshot(l, "a/1").unwrap().expect("new");
        run(&mut r, l, &mut snap);
        assert_eq!(snap.sent, 0);
        // Everything: only what a/ does not cover.
        let mut snap = r.subscribe_snapshot(l, "").unwrap().expect("new");
        run(&mut r, l, &mut snap);
        assert_eq!(drain(&mut rl), [("b/1".into(), 4)]);
    }

    #[test]
    fn without_a_cache_a_snapshot_is_refused_and_nothing_subscribed() {
        let mut r = Router::new(RouterConfig::default());
        let (l, _rl) = session(&mut r, 10);
        let err = r.subscribe_snapshot(l, "a/").unwrap_err();
        assert_eq!(err.code, ErrorCode::NoLastValue);
        assert_eq!(r.topics.count_of(l), 0);
        assert!(!r.last_value_stats().enabled);
    }

    #[test]
    fn a_full_outbox_pauses_the_snapshot_where_it_stopped() {
        let mut r = router();
        let (p, _rp) = session(&mut r, 100);
        for i in 0..10u64 {
            publish(&mut r, p, &format!("t/{i}"), i);
        }
        let (l, mut rl) = session(&mut r, 4);
        let mut snap = r.subscribe_snapshot(l, "t/").unwrap().expect("new");
        let mut got = Vec::new();
        let mut fulls = 0;
        loop {
            match r.snapshot_chunk(l, &mut snap) {
                SnapshotStep::Done => break,
                SnapshotStep::Full => fulls += 1,
                SnapshotStep::More => {}
            }
            got.extend(drain(&mut rl));
        }
        got.extend(drain(&mut rl));
        assert!(fulls >= 2);
        let want: Vec<(String, u64)> = (0..10).map(|i| (format!("t/{i}"), i)).collect();
        assert_eq!(got, want, "every value once, in order, nothing dropped");
        assert_eq!(r.last_value_stats().replay_dropped, 0);
    }

    #[test]
    fn live_values_between_chunks_are_never_followed_by_older_ones() {
        let mut r = router();
        let (p, _rp) = session(&mut r, 100_000);
        let n = 3 * SNAPSHOT_CHUNK as u64;
        for i in 0..n {
            publish(&mut r, p, &format!("t/{i:05}"), i * 10);
        }
        let (l, mut rl) = session(&mut r, 100_000);
        let mut snap = r.subscribe_snapshot(l, "t/").unwrap().expect("new");
        assert_eq!(r.snapshot_chunk(l, &mut snap), SnapshotStep::More);
        let (behind, ahead) = (3, n - 3);
        publish(&mut r, p, &format!("t/{behind:05}"), behind * 10 + 1);
        publish(&mut r, p, &format!("t/{ahead:05}"), ahead * 10 + 1);
        run(&mut r, l, &mut snap);
        let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
        for (t, v) in drain(&mut rl) {
            seen.entry(t).or_default().push(v);
        }
        assert_eq!(seen.len() as u64, n);
        assert_eq!(
            seen[&format!("t/{behind:05}")],
            [behind * 10, behind * 10 + 1]
        );
        assert_eq!(
            seen[&format!("t/{ahead:05}")],
            [ahead * 10 + 1],
            "live only"
        );
        assert!(seen.values().all(|v| v.windows(2).all(|w| w[0] < w[1])));
        assert_eq!(snap.sent, n - 1);
    }
}
