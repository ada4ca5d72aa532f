//! Sequence numbers and gap detection, as plain state (no I/O, no clock).
//!
//! # The design
//! Every numbered topic message carries a [`Seq`]: the *origin* that
//! numbered it and its number. An origin is one numbering instance, its
//! name plus a random epoch chosen when it starts (`feed#9f3a06c1d2e4b5a7`,
//! see [`new_origin`]), so a restarted publisher is a new origin, not a
//! giant gap or a step backwards. Numbers count per **(origin, topic)**,
//! from 1, with no hole: a subscriber of any subset of topics (ZeroMQ
//! subscriptions are prefixes, and publishers filter at the source)
//! expects every number of each topic it gets, and never sees a false gap
//! for topics it did not want.
//!
//! - [`SeqCounters`] numbers: one counter per topic of one origin. A
//!   ZeroMQ `Publisher` numbers every envelope it is asked to publish,
//!   including those it then drops (not connected, no subscriber, queue
//!   full): each of those is a loss for whoever wanted the topic. The
//!   counters outlive reconnects, so what a reconnect loses shows as a gap.
//!   The bus numbers the topic messages that arrive without a number (Unix
//!   `publish`, unnumbered ZeroMQ publishers) as its own origin.
//! - [`GapTracker`] checks: for each (origin, topic) it remembers the last
//!   number seen. The first number of a stream is its baseline (joining
//!   mid-stream is no gap); a jump forward is a [`Gap`] (`expected`, `got`:
//!   `got - expected` messages are missing); number 1 after a higher one is
//!   a restart (the numbering side forgot that topic's counter, see below);
//!   any other step back is stale (a duplicate), counted and skipped.
//!
//! Both maps are bounded in bytes (each entry is charged its key bytes plus
//! a fixed overhead). Past the bound the least recently used quarter of the
//! entries is forgotten at once (so the cost is amortized: one pass per
//! quarter of the entries) and counted. A forgotten counter starts again at
//! 1 (a restart at the receivers); a forgotten stream at a tracker takes
//! its next number as a new baseline.
//!
//! A loss at the very end of a stream shows only when the next message of
//! that topic arrives: nothing tells a receiver about a message that was
//! never followed by another.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Bytes charged per entry of a counter or tracker map beyond its key (the
/// map slot, the state, the allocation's header).
pub const ENTRY_OVERHEAD: usize = 64;

/// Default bound of a [`SeqCounters`] or [`GapTracker`], in bytes.
pub const DEFAULT_SEQ_BYTES: usize = 4 << 20;

/// A message's number: who numbered it and the number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seq {
    /// The numbering origin, `name#epoch` ([`new_origin`]).
    pub origin: Arc<str>,
    /// The number within (origin, topic), from 1.
    pub n: u64,
}

/// A fresh origin id for `name`: `name#` and a random 64-bit epoch in 16
/// hex digits. Opaque to receivers: they compare it whole.
pub fn new_origin(name: &str) -> String {
    let epoch = uuid::Uuid::new_v4().as_u64_pair().0;
    format!("{name}#{epoch:016x}")
}

/// Least recently used entries to forget so that `bytes` falls to three
/// quarters of `max`: the tick below which an entry goes. `ticks` are the
/// entries' last-use ticks.
fn lru_cutoff(mut ticks: Vec<u64>) -> u64 {
    if ticks.is_empty() {
        return 0;
    }
    // Forget the oldest quarter (at least one entry).
    let k = (ticks.len() / 4).max(1).min(ticks.len()) - 1;
    let (_, nth, _) = ticks.select_nth_unstable(k);
    *nth + 1
}

/// One origin's counters, one per topic, bounded in bytes. See the module
/// docs. Looking up a known topic does not allocate.
#[derive(Debug)]
pub struct SeqCounters {
    /// Topic (as the caller spells it: the topic frame, or the topic) →
    /// its counter.
    map: HashMap<Box<[u8]>, Counter>,
    /// Bytes charged for the entries.
    bytes: usize,
    /// The bound on `bytes`.
    max_bytes: usize,
    /// Advances per call: the entries' recency.
    tick: u64,
    /// Counters forgotten for the bound since start.
    forgotten: u64,
}

/// One topic's counter.
#[derive(Debug, Clone, Copy)]
struct Counter {
    /// The last number given.
    last: u64,
    /// Tick of its last use (for forgetting the least recently used).
    used: u64,
}

impl SeqCounters {
    /// Empty counters bounded to `max_bytes`.
    pub fn new(max_bytes: usize) -> SeqCounters {
        SeqCounters {
            map: HashMap::new(),
            bytes: 0,
            max_bytes,
            tick: 0,
            forgotten: 0,
        }
    }

    /// The next number of `topic` (1 for a topic not seen, or forgotten).
    pub fn next(&mut self, topic: &[u8]) -> u64 {
        self.tick += 1;
        let tick = self.tick;
        if let Some(c) = self.map.get_mut(topic) {
            c.last += 1;
            c.used = tick;
            return c.last;
        }
        let charge = topic.len() + ENTRY_OVERHEAD;
        if self.bytes + charge > self.max_bytes {
            self.shrink();
        }
        if self.bytes + charge > self.max_bytes {
            // One key alone is past the bound: numbered, never remembered.
            self.forgotten += 1;
            return 1;
        }
        self.map.insert(
            topic.into(),
            Counter {
                last: 1,
                used: tick,
            },
        );
        self.bytes += charge;
        1
    }

    /// Forgets the least recently used quarter of the counters.
    fn shrink(&mut self) {
        let cutoff = lru_cutoff(self.map.values().map(|c| c.used).collect());
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|k, c| {
            let keep = c.used >= cutoff;
            if !keep {
                freed += k.len() + ENTRY_OVERHEAD;
            }
            keep
        });
        self.bytes -= freed;
        self.forgotten += (before - self.map.len()) as u64;
    }

    /// Topics counted now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no topic is counted.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes charged now (at most the bound).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counters forgotten for the bound since start.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }
}

/// A gap: `got` arrived where `expected` was due, so `got - expected`
/// messages of `topic` from `origin` are missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The numbering origin (`name#epoch`).
    pub origin: String,
    /// The topic.
    pub topic: String,
    /// The number that was due.
    pub expected: u64,
    /// The number that arrived.
    pub got: u64,
}

impl Gap {
    /// How many messages are missing.
    pub fn missing(&self) -> u64 {
        self.got - self.expected
    }
}

/// What [`GapTracker::observe`] made of one number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The first number of its stream (or of a forgotten one): the baseline.
    First,
    /// The number due.
    InOrder,
    /// Numbers were skipped.
    Gap(Gap),
    /// Number 1 after a higher one: the numbering side started that topic
    /// again (it forgot its counter for its bound).
    Restart,
    /// Any other number not past the last one (a duplicate): skipped.
    Stale,
}

/// Gap counts of one origin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OriginGaps {
    /// The origin.
    pub origin: String,
    /// Gaps seen.
    pub gaps: u64,
    /// Messages missing in them.
    pub missing: u64,
    /// Topics tracked now.
    pub topics: usize,
}

/// Totals of a [`GapTracker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GapTotals {
    /// Numbered messages observed.
    pub numbered: u64,
    /// Gaps seen.
    pub gaps: u64,
    /// Messages missing in them.
    pub missing: u64,
    /// Restarts (number 1 after a higher one).
    pub restarts: u64,
    /// Stale numbers (duplicates), skipped.
    pub stale: u64,
    /// Streams (origin, topic) forgotten for the byte bound.
    pub forgotten: u64,
    /// Origins forgotten for the byte bound (with their per-origin counts).
    pub origins_forgotten: u64,
    /// Bytes charged now.
    pub bytes: u64,
}

/// One origin as the tracker knows it.
#[derive(Debug, Default)]
struct OriginState {
    /// Topic → its stream.
    topics: HashMap<Box<str>, Stream>,
    /// Gaps seen from this origin.
    gaps: u64,
    /// Messages missing in them.
    missing: u64,
    /// Tick of its last use.
    used: u64,
}

/// One (origin, topic) stream.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The last number seen.
    last: u64,
    /// Tick of its last use.
    used: u64,
}

/// The receiving side: the last number of every (origin, topic) seen,
/// gap counts per origin, bounded in bytes. See the module docs.
#[derive(Debug)]
pub struct GapTracker {
    /// Origin → its streams and counts.
    origins: HashMap<Box<str>, OriginState>,
    /// Bytes charged (origins and streams).
    bytes: usize,
    /// The bound on `bytes`.
    max_bytes: usize,
    /// Advances per observation: recency.
    tick: u64,
    /// Totals since start.
    totals: GapTotals,
}

impl GapTracker {
    /// An empty tracker bounded to `max_bytes`.
    pub fn new(max_bytes: usize) -> GapTracker {
        GapTracker {
            origins: HashMap::new(),
            bytes: 0,
            max_bytes,
            tick: 0,
            totals: GapTotals::default(),
        }
    }

    /// Checks number `n` of (`origin`, `topic`). Allocates only for a new
    /// origin or topic, and for a gap's report.
    pub fn observe(&mut self, origin: &str, topic: &str, n: u64) -> Observed {
        self.tick += 1;
        let tick = self.tick;
        self.totals.numbered += 1;
        if let Some(o) = self.origins.get_mut(origin) {
            if let Some(s) = o.topics.get_mut(topic) {
                o.used = tick;
                s.used = tick;
                let expected = s.last.saturating_add(1);
                if n == expected {
                    s.last = n;
                    return Observed::InOrder;
                }
                if n > expected {
                    s.last = n;
                    o.gaps += 1;
                    o.missing += n - expected;
                    self.totals.gaps += 1;
                    self.totals.missing += n - expected;
                    return Observed::Gap(Gap {
                        origin: origin.to_owned(),
                        topic: topic.to_owned(),
                        expected,
                        got: n,
                    });
                }
                if n == 1 {
                    s.last = 1;
                    self.totals.restarts += 1;
                    return Observed::Restart;
                }
                self.totals.stale += 1;
                return Observed::Stale;
            }
        }
        self.insert(origin, topic, n, tick);
        Observed::First
    }

    /// Starts tracking (`origin`, `topic`) at `n`, within the bound.
    fn insert(&mut self, origin: &str, topic: &str, n: u64, tick: u64) {
        let topic_charge = topic.len() + ENTRY_OVERHEAD;
        let origin_charge = if self.origins.contains_key(origin) {
            0
        } else {
            origin.len() + ENTRY_OVERHEAD
        };
        let charge = topic_charge + origin_charge;
        if self.bytes + charge > self.max_bytes {
            self.shrink();
        }
        let origin_charge = if self.origins.contains_key(origin) {
            0
        } else {
            origin.len() + ENTRY_OVERHEAD
        };
        let charge = topic_charge + origin_charge;
        if self.bytes + charge > self.max_bytes {
            // Past the bound on its own: never remembered.
            self.totals.forgotten += 1;
            return;
        }
        if origin_charge > 0 {
            self.origins.insert(origin.into(), OriginState::default());
        }
        if let Some(o) = self.origins.get_mut(origin) {
            o.used = tick;
            o.topics.insert(
                topic.into(),
                Stream {
                    last: n,
                    used: tick,
                },
            );
        }
        self.bytes += charge;
    }

    /// Forgets the least recently used quarter of the streams, and the
    /// origins left without streams that were not used since.
    fn shrink(&mut self) {
        let ticks: Vec<u64> = self
            .origins
            .values()
            .flat_map(|o| o.topics.values().map(|s| s.used))
            .collect();
        let cutoff = lru_cutoff(ticks);
        let mut freed = 0;
        let (mut streams, mut origins) = (0u64, 0u64);
        self.origins.retain(|name, o| {
            o.topics.retain(|t, s| {
                let keep = s.used >= cutoff;
                if !keep {
                    freed += t.len() + ENTRY_OVERHEAD;
                    streams += 1;
                }
                keep
            });
            let keep = !o.topics.is_empty() || o.used >= cutoff;
            if !keep {
                freed += name.len() + ENTRY_OVERHEAD;
                origins += 1;
            }
            keep
        });
        self.bytes -= freed;
        self.totals.forgotten += streams;
        self.totals.origins_forgotten += origins;
    }

    /// Totals since start (and the bytes charged now).
    pub fn totals(&self) -> GapTotals {
        GapTotals {
            bytes: self.bytes as u64,
            ..self.totals
        }
    }

    /// Gap counts of every origin tracked now, by origin.
    pub fn origins(&self) -> Vec<OriginGaps> {
        let mut v: Vec<OriginGaps> = self
            .origins
            .iter()
            .map(|(name, o)| OriginGaps {
                origin: name.to_string(),
                gaps: o.gaps,
                missing: o.missing,
                topics: o.topics.len(),
            })
            .collect();
        v.sort_by(|a, b| a.origin.cmp(&b.origin));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_number_each_topic_apart_and_forget_within_their_bytes() {
        let mut c = SeqCounters::new(1 << 20);
        assert_eq!(c.next(b"a"), 1);
        assert_eq!(c.next(b"a"), 2);
        assert_eq!(c.next(b"b"), 1);
        assert_eq!(c.next(b"a"), 3);
        assert_eq!((c.len(), c.bytes()), (2, 2 + 2 * ENTRY_OVERHEAD));
        // Room for 8 one-byte topics: the 9th forgets the two least
        // recently used (a quarter), never more than the bound.
        let mut c = SeqCounters::new(8 * (1 + ENTRY_OVERHEAD));
        for t in b'a'..=b'h' {
            c.next(&[t]);
        }
        c.next(b"a");
        c.next(b"a");
        assert_eq!(c.next(b"i"), 1);
        assert_eq!(c.forgotten(), 2, "b and c went (a was used since)");
        assert!(c.bytes() <= 8 * (1 + ENTRY_OVERHEAD));
        assert_eq!(c.next(b"a"), 4, "a kept its count");
        assert_eq!(c.next(b"b"), 1, "b starts again");
        // A key past the bound alone is numbered 1 and counted.
        let mut tiny = SeqCounters::new(10);
        assert_eq!(tiny.next(b"x"), 1);
        assert_eq!(tiny.next(b"x"), 1);
        assert_eq!((tiny.forgotten(), tiny.bytes()), (2, 0));
    }

    #[test]
    fn tracker_sees_baselines_gaps_restarts_and_duplicates_per_stream() {
        let mut t = GapTracker::new(1 << 20);
        assert_eq!(t.observe("p#1", "md/a", 5), Observed::First);
        assert_eq!(t.observe("p#1", "md/a", 6), Observed::InOrder);
        // Another topic of the same origin is its own stream: no gap.
        assert_eq!(t.observe("p#1", "md/b", 1), Observed::First);
        assert_eq!(
            t.observe("p#1", "md/a", 9),
            Observed::Gap(Gap {
                origin: "p#1".into(),
                topic: "md/a".into(),
                expected: 7,
                got: 9
            })
        );
        assert_eq!(t.observe("p#1", "md/a", 9), Observed::Stale);
        assert_eq!(t.observe("p#1", "md/a", 1), Observed::Restart);
        assert_eq!(t.observe("p#1", "md/a", 2), Observed::InOrder);
        // Another origin (a restarted publisher) is a new stream.
        assert_eq!(t.observe("p#2", "md/a", 1), Observed::First);
        assert_eq!(
            t.observe("p#2", "md/a", 4),
            Observed::Gap(Gap {
                origin: "p#2".into(),
                topic: "md/a".into(),
                expected: 2,
                got: 4
            })
        );
        let tot = t.totals();
        assert_eq!(
            (tot.numbered, tot.gaps, tot.missing, tot.restarts, tot.stale),
            (9, 2, 4, 1, 1)
        );
        let o = t.origins();
        assert_eq!(o.len(), 2);
        assert_eq!((o[0].gaps, o[0].missing, o[0].topics), (1, 2, 2));
        assert_eq!((o[1].gaps, o[1].missing, o[1].topics), (1, 2, 1));
    }

    #[test]
    fn tracker_forgets_least_recent_streams_within_its_bytes() {
        // Room for one origin and 4 one-byte topics.
        let per = 1 + ENTRY_OVERHEAD;
        let origin_cost = 3 + ENTRY_OVERHEAD;
        let mut t = GapTracker::new(origin_cost + 4 * per);
        for (i, topic) in ["a", "b", "c", "d"].iter().enumerate() {
            t.observe("o#1", topic, 10 + i as u64);
        }
        t.observe("o#1", "a", 11);
        assert_eq!(t.totals().forgotten, 0);
        // A fifth topic: the least recently used one (b) is forgotten.
        assert_eq!(t.observe("o#1", "e", 1), Observed::First);
        assert_eq!(t.totals().forgotten, 1);
        assert!(t.totals().bytes as usize <= origin_cost + 4 * per);
        // b's next number is a new baseline, not a gap; a kept its place.
        assert_eq!(t.observe("o#1", "b", 50), Observed::First);
        assert_eq!(t.observe("o#1", "a", 12), Observed::InOrder);
    }
}
