//! [`PrefixSet`]: the subscription prefixes a publisher holds for source
//! filtering, as a multiset, with costs independent of their number.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

/// A multiset of subscription prefixes (one entry per subscribe, removed
/// one per cancel, as ZeroMQ counts them) matched against topic frames.
///
/// A subscribe or cancel costs one map update; a match probes only the
/// prefix lengths in use that fit the topic frame, so neither depends on
/// how many subscriptions there are (a storm of subscribe/cancel from a
/// hostile or buggy peer cannot make each change or each message slower).
#[derive(Debug, Default)]
pub struct PrefixSet {
    /// Prefix → how many subscriptions hold it.
    counts: HashMap<Bytes, u64>,
    /// Prefix length → how many distinct prefixes have it.
    lengths: BTreeMap<usize, usize>,
}

impl PrefixSet {
    /// Adds one subscription to `prefix`.
    pub fn subscribe(&mut self, prefix: Bytes) {
        self.insert(prefix);
    }

    /// Removes one subscription to `prefix` (none held: nothing happens).
    pub fn cancel(&mut self, prefix: &[u8]) {
        self.remove(prefix);
    }

    /// Adds one subscription to `prefix`; true when it was not held
    /// before (a new distinct prefix).
    pub fn insert(&mut self, prefix: Bytes) -> bool {
        let len = prefix.len();
        let n = self.counts.entry(prefix).or_insert(0);
        *n += 1;
        if *n == 1 {
            *self.lengths.entry(len).or_insert(0) += 1;
            return true;
        }
        false
    }

    /// Removes one subscription to `prefix`; true when that was its last
    /// (none held: nothing happens, false).
    pub fn remove(&mut self, prefix: &[u8]) -> bool {
        let Some(n) = self.counts.get_mut(prefix) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.counts.remove(prefix);
        if let Some(k) = self.lengths.get_mut(&prefix.len()) {
            *k -= 1;
            if *k == 0 {
                self.lengths.remove(&prefix.len());
            }
        }
        true
    }

    /// The distinct prefixes held, in no particular order.
    pub fn prefixes(&self) -> impl Iterator<Item = &Bytes> {
        self.counts.keys()
    }

    /// Whether some subscription's prefix starts `topic_frame`.
    pub fn matches(&self, topic_frame: &[u8]) -> bool {
        self.lengths
            .range(..=topic_frame.len())
            .any(|(&len, _)| self.counts.contains_key(&topic_frame[..len]))
    }

    /// Removes every subscription.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.lengths.clear();
    }
}

#[cfg(test)]
impl PrefixSet {
    /// How many distinct prefixes are held.
    fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// Whether no subscription is held.
    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn matches_by_prefix_and_the_empty_prefix_matches_all() {
        let mut s = PrefixSet::default();
        assert!(!s.matches(b"\"md/x\""));
        s.subscribe(b("\"md/"));
        assert!(s.matches(b"\"md/x\""));
        assert!(!s.matches(b"\"mx\""));
        assert!(!s.matches(b"\"m"));
        s.subscribe(b(""));
        assert!(s.matches(b"anything"));
        assert!(s.matches(b""));
    }

    #[test]
    fn counts_like_a_multiset() {
        let mut s = PrefixSet::default();
        s.subscribe(b("a"));
        s.subscribe(b("a"));
        s.subscribe(b("ab"));
        s.cancel(b"a");
        assert!(s.matches(b"ax"));
        s.cancel(b"a");
        assert!(!s.matches(b"ax"));
        assert!(s.matches(b"abc"));
        // A cancel of what is not held changes nothing.
        s.cancel(b"a");
        s.cancel(b"zz");
        assert!(s.matches(b"abc"));
        s.cancel(b"ab");
        assert!(s.is_empty());
        assert!(s.lengths.is_empty());
    }

    #[test]
    fn a_subscription_storm_leaves_only_what_is_held() {
        // 100k distinct prefixes subscribed and cancelled in turn, then
        // again in reverse: each change is one map update, and what is
        // left is exactly the multiset held.
        let mut s = PrefixSet::default();
        let n = 100_000;
        let prefixes: Vec<Bytes> = (0..n).map(|i| b(&format!("\"t{i}/"))).collect();
        for p in &prefixes {
            s.subscribe(p.clone());
            s.subscribe(p.clone());
        }
        assert_eq!(s.distinct(), n);
        for p in prefixes.iter().rev() {
            s.cancel(p);
        }
        assert_eq!(s.distinct(), n);
        assert!(s.matches(b"\"t99999/x\""));
        for p in &prefixes[1..] {
            s.cancel(p);
        }
        assert_eq!(s.distinct(), 1);
        assert!(s.matches(b"\"t0/x\""));
        assert!(!s.matches(b"\"t1/x\""));
        // Only the one length left is in use.
        assert_eq!(s.lengths.len(), 1);
        s.clear();
        assert!(s.is_empty() && !s.matches(b"\"t0/x\""));
    }
}
