//! Topic subscriptions of the router's sessions: plain state whose cost
//! per change and per published message does not grow with the number of
//! subscriptions.
//!
//! Prefixes are kept in one hash map (prefix → sessions) plus the set of
//! prefix lengths in use. A published topic is matched by looking up each
//! of its prefixes whose length is in use: the work is bounded by the
//! topic's length and the number of matching sessions, whatever the total.
//! Every session's subscriptions are bounded in count and in bytes, and a
//! prefix in length.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{ErrorCode, ProtocolError};
use crate::router::SessionId;

/// Bounds on one session's subscriptions.
#[derive(Debug, Clone, Copy)]
pub struct TopicLimits {
    /// Most prefixes one session may hold.
    pub max_per_session: usize,
    /// Most bytes of prefixes one session may hold (each prefix counts its
    /// length plus [`TopicIndex::OVERHEAD`]).
    pub max_bytes_per_session: usize,
    /// Longest prefix accepted, in bytes.
    pub max_prefix: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits {
            max_per_session: 1_000_000,
            max_bytes_per_session: 128 << 20,
            // Topics are short routing keys ("md/BTC-USD/binance"); 1 KiB
            // is generous for them and keeps one subscription from being
            // a memory lever (the reference had no limit at all).
            max_prefix: 1024,
        }
    }
}

/// One session's subscriptions.
#[derive(Debug, Default)]
struct Owned {
    /// Its prefixes.
    prefixes: HashSet<Box<str>>,
    /// Their charge in bytes.
    bytes: usize,
}

/// Every session's topic subscriptions. See the module docs.
#[derive(Debug, Default)]
pub struct TopicIndex {
    /// The limits in force.
    limits: TopicLimits,
    /// Prefix → the sessions subscribed to exactly it.
    by_prefix: HashMap<Box<str>, Vec<SessionId>>,
    /// Prefix length → how many distinct prefixes have it (so a publish
    /// probes only lengths in use).
    lengths: BTreeMap<usize, usize>,
    /// Session → its prefixes (for unsubscribe-all and the limits).
    by_session: HashMap<SessionId, Owned>,
    /// Subscriptions held, all sessions together.
    count: usize,
    /// Their bytes.
    bytes: usize,
}

impl TopicIndex {
    /// Bytes a subscription is charged beyond its prefix: the map entries
    /// and the session's set slot.
    pub const OVERHEAD: usize = 96;

    /// An empty index with these limits.
    pub fn new(limits: TopicLimits) -> Self {
        TopicIndex {
            limits,
            ..TopicIndex::default()
        }
    }

    /// Subscribes `sid` to `prefix`; true when it is new for the session.
    /// Refused (typed error, nothing changed) past a limit.
    pub fn subscribe(&mut self, sid: SessionId, prefix: &str) -> Result<bool, ProtocolError> {
        if prefix.len() > self.limits.max_prefix {
            return Err(ProtocolError::new(
                ErrorCode::TopicTooLong,
                format!(
                    "topic prefix of {} bytes exceeds the limit of {} bytes",
                    prefix.len(),
                    self.limits.max_prefix
                ),
            ));
        }
        let owned = self.by_session.entry(sid).or_default();
        if owned.prefixes.contains(prefix) {
            return Ok(false);
        }
        let charge = prefix.len() + Self::OVERHEAD;
        if owned.prefixes.len() >= self.limits.max_per_session
            || owned.bytes + charge > self.limits.max_bytes_per_session
        {
            return Err(ProtocolError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "this session holds {} subscriptions ({} bytes); the limit is {} ({} bytes)",
                    owned.prefixes.len(),
                    owned.bytes,
                    self.limits.max_per_session,
                    self.limits.max_bytes_per_session
                ),
            ));
        }
        owned.prefixes.insert(prefix.into());
        owned.bytes += charge;
        let subs = self.by_prefix.entry(prefix.into()).or_default();
        if subs.is_empty() {
            *self.lengths.entry(prefix.len()).or_insert(0) += 1;
        }
        subs.push(sid);
        self.count += 1;
        self.bytes += charge;
        Ok(true)
    }

    /// Removes one prefix of a session; true when it had it.
    pub fn unsubscribe(&mut self, sid: SessionId, prefix: &str) -> bool {
        let Some(owned) = self.by_session.get_mut(&sid) else {
            return false;
        };
        if !owned.prefixes.remove(prefix) {
            return false;
        }
        let charge = prefix.len() + Self::OVERHEAD;
        owned.bytes -= charge;
        if owned.prefixes.is_empty() {
            self.by_session.remove(&sid);
        }
        self.unlink(sid, prefix, charge);
        true
    }

    /// Removes every prefix of a session (it went away).
    pub fn remove_session(&mut self, sid: SessionId) {
        let Some(owned) = self.by_session.remove(&sid) else {
            return;
        };
        for p in owned.prefixes {
            self.unlink(sid, &p, p.len() + Self::OVERHEAD);
        }
    }

    fn unlink(&mut self, sid: SessionId, prefix: &str, charge: usize) {
        if let Some(subs) = self.by_prefix.get_mut(prefix) {
            subs.retain(|s| *s != sid);
            if subs.is_empty() {
                self.by_prefix.remove(prefix);
                if let Some(n) = self.lengths.get_mut(&prefix.len()) {
                    *n -= 1;
                    if *n == 0 {
                        self.lengths.remove(&prefix.len());
                    }
                }
            }
        }
        self.count -= 1;
        self.bytes -= charge;
    }

    /// The sessions subscribed to a prefix of `topic`, each once, in no
    /// particular order, into `out` (cleared first).
    pub fn matches(&self, topic: &str, out: &mut Vec<SessionId>) {
        out.clear();
        let mut hits = 0;
        for &len in self.lengths.keys() {
            if len > topic.len() {
                break;
            }
            if !topic.is_char_boundary(len) {
                continue;
            }
            if let Some(subs) = self.by_prefix.get(&topic[..len]) {
                out.extend_from_slice(subs);
                hits += 1;
            }
        }
        if hits > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }

    /// True when nobody subscribed to anything.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Subscriptions held, all sessions together.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Their bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many prefixes one session holds.
    pub fn count_of(&self, sid: SessionId) -> usize {
        self.by_session.get(&sid).map_or(0, |o| o.prefixes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(ix: &TopicIndex, topic: &str) -> Vec<SessionId> {
        let mut out = Vec::new();
        ix.matches(topic, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn prefixes_match_once_per_session_and_go_away_cleanly() {
        let mut ix = TopicIndex::new(TopicLimits::default());
        assert!(ix.subscribe(1, "md/").unwrap());
        assert!(ix.subscribe(1, "md/BTC").unwrap());
        assert!(!ix.subscribe(1, "md/BTC").unwrap(), "a repeat is no-op");
        assert!(ix.subscribe(2, "").unwrap());
        assert!(ix.subscribe(3, "news/").unwrap());
        assert!(ix.subscribe(4, "md/ÉTH").unwrap());
        assert_eq!(matched(&ix, "md/BTC/x"), vec![1, 2]);
        assert_eq!(matched(&ix, "news/a"), vec![2, 3]);
        assert_eq!(matched(&ix, "md/ÉTH"), vec![1, 2, 4]);
        assert_eq!(matched(&ix, "m"), vec![2]);
        assert!(ix.unsubscribe(1, "md/"));
        assert!(!ix.unsubscribe(1, "md/"));
        assert_eq!(matched(&ix, "md/ETH"), vec![2]);
        ix.remove_session(1);
        ix.remove_session(2);
        ix.remove_session(3);
        ix.remove_session(4);
        assert!(ix.is_empty());
        assert_eq!(ix.bytes(), 0);
        assert!(ix.by_prefix.is_empty() && ix.lengths.is_empty());
    }

    #[test]
    fn limits_refuse_with_a_typed_error_and_change_nothing() {
        let mut ix = TopicIndex::new(TopicLimits {
            max_per_session: 2,
            max_bytes_per_session: 1 << 20,
            max_prefix: 8,
        });
        assert_eq!(
            ix.subscribe(1, "123456789").unwrap_err().code,
            ErrorCode::TopicTooLong
        );
        ix.subscribe(1, "a").unwrap();
        ix.subscribe(1, "b").unwrap();
        assert_eq!(
            ix.subscribe(1, "c").unwrap_err().code,
            ErrorCode::TooManySubscriptions
        );
        assert_eq!(ix.count_of(1), 2);
        ix.subscribe(2, "c").unwrap();
        assert_eq!(matched(&ix, "c"), vec![2]);
    }

    #[test]
    fn many_prefixes_cost_nothing_per_publish() {
        let mut ix = TopicIndex::new(TopicLimits::default());
        for i in 0..200_000u32 {
            ix.subscribe(7, &format!("sym/{i:07}/")).unwrap();
        }
        assert_eq!(ix.count_of(7), 200_000);
        // One length in use: a publish probes one prefix.
        assert_eq!(ix.lengths.len(), 1);
        assert_eq!(matched(&ix, "sym/0123456/trade"), vec![7]);
        assert!(matched(&ix, "sym/x").is_empty());
    }
}
