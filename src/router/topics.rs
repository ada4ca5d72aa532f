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
//!
//! The index also counts, per prefix, the sessions that *want* it (every
//! session but a transport's relay, see [`TopicIndex::subscribe_relay`]),
//! and records the 0→1 and 1→0 transitions as interest changes (see
//! [`super::interest`]) while someone watches.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::interest::{InterestChange, InterestLog};
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
    /// Whether the session relays topics onward (a transport's sink): its
    /// prefixes are matched like any, but are no demand.
    relay: bool,
}

/// The sessions subscribed to exactly one prefix.
#[derive(Debug, Default)]
struct Holders {
    /// Every one of them (what a publish is delivered to).
    sessions: Vec<SessionId>,
    /// How many of them are relays (the rest want the prefix).
    relays: usize,
}

impl Holders {
    /// Sessions that want the prefix.
    fn demand(&self) -> usize {
        self.sessions.len() - self.relays
    }
}

/// Every session's topic subscriptions. See the module docs.
#[derive(Debug, Default)]
pub struct TopicIndex {
    /// The limits in force.
    limits: TopicLimits,
    /// Prefix → the sessions subscribed to exactly it.
    by_prefix: HashMap<Box<str>, Holders>,
    /// Prefix length → how many distinct prefixes have it (so a publish
    /// probes only lengths in use).
    lengths: BTreeMap<usize, usize>,
    /// Session → its prefixes (for unsubscribe-all and the limits).
    by_session: HashMap<SessionId, Owned>,
    /// Subscriptions held, all sessions together.
    count: usize,
    /// Their bytes.
    bytes: usize,
    /// Distinct prefixes some session wants.
    wanted: usize,
    /// The changes of what is wanted, while watched (the router takes
    /// them; [`TopicIndex::watch_interest`] starts the watch).
    pub(super) interest: InterestLog,
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
        self.insert(sid, prefix, false)
    }

    /// Subscribes a relay `sid` (a transport's sink, which passes topics
    /// on to its own peers) to `prefix`: matched like any subscription,
    /// but no demand (no interest change). A session is a relay or not
    /// from its first subscription on; later calls keep that.
    pub fn subscribe_relay(&mut self, sid: SessionId, prefix: &str) -> Result<bool, ProtocolError> {
        self.insert(sid, prefix, true)
    }

    fn insert(&mut self, sid: SessionId, prefix: &str, relay: bool) -> Result<bool, ProtocolError> {
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
        let owned = self.by_session.entry(sid).or_insert_with(|| Owned {
            relay,
            ..Owned::default()
        });
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
        let relay = owned.relay;
        let subs = self.by_prefix.entry(prefix.into()).or_default();
        if subs.sessions.is_empty() {
            *self.lengths.entry(prefix.len()).or_insert(0) += 1;
        }
        subs.sessions.push(sid);
        if relay {
            subs.relays += 1;
        } else if subs.demand() == 1 {
            self.wanted += 1;
            self.interest.push(InterestChange::Added(prefix.into()));
        }
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
        let relay = owned.relay;
        if owned.prefixes.is_empty() {
            self.by_session.remove(&sid);
        }
        self.unlink(sid, prefix, charge, relay);
        true
    }

    /// Removes every prefix of a session (it went away).
    pub fn remove_session(&mut self, sid: SessionId) {
        let Some(owned) = self.by_session.remove(&sid) else {
            return;
        };
        for p in owned.prefixes {
            self.unlink(sid, &p, p.len() + Self::OVERHEAD, owned.relay);
        }
    }

    fn unlink(&mut self, sid: SessionId, prefix: &str, charge: usize, relay: bool) {
        if let Some(subs) = self.by_prefix.get_mut(prefix) {
            subs.sessions.retain(|s| *s != sid);
            if relay {
                subs.relays -= 1;
            } else if subs.demand() == 0 {
                self.wanted -= 1;
                self.interest.push(InterestChange::Removed(prefix.into()));
            }
            if subs.sessions.is_empty() {
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
                out.extend_from_slice(&subs.sessions);
                hits += 1;
            }
        }
        if hits > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }

    /// Whether session `sid` holds a prefix of `topic` other than
    /// `except` (it then gets that topic live already). Costs one lookup
    /// per prefix length in use.
    pub fn covers_other(&self, sid: SessionId, topic: &[u8], except: &str) -> bool {
        let (Some(owned), Ok(topic)) = (self.by_session.get(&sid), std::str::from_utf8(topic))
        else {
            return false;
        };
        self.lengths
            .keys()
            .take_while(|&&len| len <= topic.len())
            .any(|&len| {
                topic.is_char_boundary(len)
                    && &topic[..len] != except
                    && owned.prefixes.contains(&topic[..len])
            })
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

    /// Distinct prefixes some (non-relay) session wants.
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    /// Starts recording interest changes; returns every prefix wanted now
    /// (the watcher's starting point: changes follow from there).
    pub fn watch_interest(&mut self) -> Vec<Box<str>> {
        self.interest.watch();
        self.by_prefix
            .iter()
            .filter(|(_, h)| h.demand() > 0)
            .map(|(p, _)| p.clone())
            .collect()
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

    fn changes(ix: &mut TopicIndex) -> Vec<String> {
        let mut out = Vec::new();
        ix.interest.take(&mut out);
        out.iter()
            .map(|c| match c {
                InterestChange::Added(p) => format!("+{p}"),
                InterestChange::Removed(p) => format!("-{p}"),
            })
            .collect()
    }

    /// Interest is counted per prefix across sessions: only the first
    /// session to want a prefix and the last to let it go are changes;
    /// a relay (a transport's sink) is matched but never demand.
    #[test]
    fn interest_changes_are_the_first_and_last_holder_of_a_prefix() {
        let mut ix = TopicIndex::new(TopicLimits::default());
        // Nothing is recorded before someone watches.
        ix.subscribe(1, "md/").unwrap();
        assert!(!ix.interest.has_pending());
        let mut start = ix.watch_interest();
        start.sort();
        assert_eq!(start, vec![Box::<str>::from("md/")]);
        ix.subscribe(2, "md/").unwrap();
        ix.subscribe(2, "news/").unwrap();
        ix.subscribe(2, "news/").unwrap();
        assert_eq!(changes(&mut ix), vec!["+news/"]);
        // The relay subscribes to everything: matched, not demand.
        ix.subscribe_relay(9, "").unwrap();
        ix.subscribe(9, "x/").unwrap();
        assert!(!ix.interest.has_pending());
        assert_eq!(matched(&ix, "x/1"), vec![9]);
        assert_eq!(ix.wanted(), 2);
        assert!(ix.unsubscribe(1, "md/"));
        assert!(changes(&mut ix).is_empty(), "session 2 still wants md/");
        ix.subscribe(3, "").unwrap();
        assert_eq!(changes(&mut ix), vec!["+"]);
        ix.remove_session(2);
        let mut c = changes(&mut ix);
        c.sort();
        assert_eq!(c, vec!["-md/", "-news/"]);
        ix.remove_session(9);
        assert!(!ix.interest.has_pending());
        ix.unsubscribe(3, "");
        assert_eq!(changes(&mut ix), vec!["-"]);
        assert_eq!(ix.wanted(), 0);
        // Unwatched: nothing recorded.
        ix.interest.unwatch();
        ix.subscribe(4, "y/").unwrap();
        assert!(!ix.interest.has_pending());
        assert_eq!(ix.wanted(), 1);
    }

    #[test]
    fn covers_other_names_the_sessions_other_prefixes_only() {
        let mut ix = TopicIndex::new(TopicLimits::default());
        ix.subscribe(1, "md/").unwrap();
        ix.subscribe(1, "md/BTC").unwrap();
        ix.subscribe(2, "news/").unwrap();
        assert!(ix.covers_other(1, b"md/BTC/x", "md/BTC"));
        assert!(!ix.covers_other(1, b"md/ETH", "md/"));
        assert!(!ix.covers_other(1, b"news/a", "md/"), "another session's");
        assert!(!ix.covers_other(3, b"md/x", ""));
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
