//! [`LastValues`]: the newest value of each topic, for late joiners.
//!
//! One plain structure for both transports: the ZeroMQ proxy keeps the
//! newest envelope of each topic frame (its wire bytes), the router keeps
//! the newest topic delivery of each topic (Unix publishes and envelopes
//! bridged from ZeroMQ). No I/O, no locks, no clock.
//!
//! - **Bounded in entries and in bytes.** Each entry costs its key, its
//!   value's weight (given by the caller, who knows what the value holds)
//!   and [`ENTRY_OVERHEAD`]. Past either bound the least recently updated
//!   topics are evicted, and counted; a value larger than the whole byte
//!   bound is not kept (the topic's older value goes too, so a late joiner
//!   never gets a value older than one it could not be given), counted as
//!   an eviction as well.
//! - **Replay in chunks.** A subscriber's replay is a [`Scan`]: a cursor
//!   over the keys starting with its prefix, in key order, that the caller
//!   advances a bounded number of entries at a time
//!   ([`LastValues::next_chunk`]) so a replay of many topics never holds the
//!   caller's lock for long. Between chunks the structure may change; the
//!   cursor stays valid (it is a key, not a position).
//! - **Never older after newer.** Every stored value gets a sequence number
//!   from one counter. A scan started at [`LastValues::mark`] skips the
//!   values stored after it: the caller made its subscriber visible to live
//!   traffic before taking the mark, so those values reach it live, and
//!   replaying them later could put an older copy behind a newer one.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;

use bytes::Bytes;

/// Default most topics kept.
pub const DEFAULT_MAX_TOPICS: usize = 100_000;
/// Default most bytes kept (keys, values and [`ENTRY_OVERHEAD`] each).
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// What an entry costs beyond its key and value: its slot in the key map,
/// its node in the key order and its places in the age log (which hold
/// the key again, shared: at most two per entry, see
/// [`LastValues`]'s `by_age`), the sequence number and the cost itself.
pub const ENTRY_OVERHEAD: usize = 256;

/// The bounds of a [`LastValues`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastValueLimits {
    /// Most topics kept; past it the least recently updated go.
    pub max_topics: usize,
    /// Most bytes kept; past it the least recently updated go.
    pub max_bytes: usize,
}

impl Default for LastValueLimits {
    fn default() -> Self {
        LastValueLimits {
            max_topics: DEFAULT_MAX_TOPICS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// One topic's newest value.
#[derive(Debug)]
struct Entry<V> {
    /// The value.
    value: V,
    /// The topic key again (shared with the map's): what an update
    /// appends to the age log without a second lookup.
    key: Bytes,
    /// Its sequence number (its place in the age map, and what a scan
    /// compares with its mark).
    seq: u64,
    /// What it is charged against the byte bound.
    cost: usize,
}

/// The newest value of each topic, bounded. See the module docs.
#[derive(Debug)]
pub struct LastValues<V> {
    /// The bounds.
    limits: LastValueLimits,
    /// Topic key → its newest value (an update costs one hash lookup).
    entries: HashMap<Bytes, Entry<V>>,
    /// The same keys in key order (prefix scans); touched only when a
    /// topic comes or goes.
    order: BTreeSet<Bytes>,
    /// Every update as (sequence number, key), oldest first: the eviction
    /// order. An update only appends (the topic's earlier place goes
    /// stale: its number is no longer the entry's), so updating a known
    /// topic costs one hash lookup and one append; eviction skips stale
    /// places, and the log is compacted whenever it holds more than twice
    /// the entries (amortized O(1) per update, at most two places per
    /// entry).
    by_age: VecDeque<(u64, Bytes)>,
    /// The last sequence number given (0: none yet).
    seq: u64,
    /// Bytes charged, all entries together.
    bytes: usize,
    /// Values evicted or refused for the bounds since start.
    evictions: u64,
}

/// A replay's cursor: the keys starting with `prefix`, stored no later than
/// `upto`, from where the last chunk stopped. Made by [`LastValues::scan`].
#[derive(Debug, Clone)]
pub struct Scan {
    /// Keys that start with this are replayed.
    prefix: Bytes,
    /// Values stored after this sequence number are skipped.
    upto: u64,
    /// The last key handled (None: start at `prefix`).
    after: Option<Bytes>,
    /// Nothing is left.
    done: bool,
}

impl Scan {
    /// The prefix this scan replays.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Whether every matching key was handled.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Ends the scan early (e.g. its receiver went away).
    pub fn finish(&mut self) {
        self.done = true;
    }
}

/// What the caller did with one value of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Handled (sent, or skipped on purpose): the cursor moves past it.
    Yes,
    /// Not taken (the receiver is full): the chunk ends and the next one
    /// starts with this key again.
    No,
}

impl<V> LastValues<V> {
    /// An empty cache with these bounds.
    pub fn new(limits: LastValueLimits) -> LastValues<V> {
        LastValues {
            limits,
            entries: HashMap::new(),
            order: BTreeSet::new(),
            by_age: VecDeque::new(),
            seq: 0,
            bytes: 0,
            evictions: 0,
        }
    }

    /// The bounds in force.
    pub fn limits(&self) -> LastValueLimits {
        self.limits
    }

    /// Topics kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes charged, all entries together (at most `max_bytes`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Values evicted or refused for the bounds since start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The sequence number of the newest value stored so far: a scan from
    /// this mark replays what is stored now and skips what comes later.
    pub fn mark(&self) -> u64 {
        self.seq
    }

    /// Stores `value` as the newest of topic `key`; `weight` is what the
    /// value holds in memory, in bytes. Evicts the least recently updated
    /// topics while a bound is passed.
    pub fn put(&mut self, key: &[u8], value: V, weight: usize) {
        let cost = key
            .len()
            .saturating_add(weight)
            .saturating_add(ENTRY_OVERHEAD);
        if cost > self.limits.max_bytes || self.limits.max_topics == 0 {
            // Never kept; the older value of the topic goes too.
            self.remove(key);
            self.evictions += 1;
            return;
        }
        self.seq += 1;
        let seq = self.seq;
        match self.entries.get_mut(key) {
            Some(e) => {
                self.bytes = self.bytes - e.cost + cost;
                e.value = value;
                e.seq = seq;
                e.cost = cost;
                self.by_age.push_back((seq, e.key.clone()));
            }
            None => {
                let k = Bytes::copy_from_slice(key);
                self.by_age.push_back((seq, k.clone()));
                self.order.insert(k.clone());
                self.entries.insert(
                    k.clone(),
                    Entry {
                        value,
                        key: k,
                        seq,
                        cost,
                    },
                );
                self.bytes += cost;
            }
        }
        while self.entries.len() > self.limits.max_topics || self.bytes > self.limits.max_bytes {
            let Some((at, k)) = self.by_age.pop_front() else {
                break;
            };
            if !matches!(self.entries.get(&k), Some(e) if e.seq == at) {
                continue; // stale: the topic was updated since, or removed
            }
            if let Some(e) = self.entries.remove(&k) {
                self.bytes -= e.cost;
            }
            self.order.remove(&k);
            self.evictions += 1;
        }
        if self.by_age.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.by_age
                .retain(|(at, k)| entries.get(k).is_some_and(|e| e.seq == *at));
        }
    }

    /// Forgets topic `key`.
    pub fn remove(&mut self, key: &[u8]) {
        if let Some(e) = self.entries.remove(key) {
            self.bytes -= e.cost;
            // Its place in the age log goes stale (skipped, compacted).
            self.order.remove(key);
        }
    }

    /// A cursor over the topics starting with `prefix` stored no later
    /// than `upto` (usually [`LastValues::mark`], taken once the receiver
    /// gets live traffic).
    pub fn scan(prefix: &[u8], upto: u64) -> Scan {
        Scan {
            prefix: Bytes::copy_from_slice(prefix),
            upto,
            after: None,
            done: false,
        }
    }

    /// Hands `take` the next values of `scan`, in key order, visiting at
    /// most `max_visits` entries (skipped ones count: the time spent is
    /// bounded whatever they hold). Values stored after the scan's mark
    /// are skipped. Stops early when `take` answers [`Taken::No`]; that key
    /// comes first in the next chunk.
    pub fn next_chunk(
        &self,
        scan: &mut Scan,
        max_visits: usize,
        mut take: impl FnMut(&[u8], &V) -> Taken,
    ) {
        if scan.done {
            return;
        }
        let lower = match &scan.after {
            Some(k) => Bound::Excluded(&k[..]),
            None => Bound::Included(&scan.prefix[..]),
        };
        let range = self
            .order
            .range::<[u8], (Bound<&[u8]>, Bound<&[u8]>)>((lower, Bound::Unbounded))
            .filter_map(|k| Some((k, self.entries.get(k)?)));
        let mut last: Option<&Bytes> = None;
        // True unless the chunk stopped before the end of the prefix's keys.
        let mut ended = true;
        for (visits, (k, e)) in range.enumerate() {
            if !k.starts_with(&scan.prefix) {
                break;
            }
            if visits == max_visits.max(1) {
                ended = false;
                break;
            }
            if e.seq <= scan.upto && take(k, &e.value) == Taken::No {
                ended = false;
                break;
            }
            last = Some(k);
        }
        if let Some(k) = last {
            scan.after = Some(k.clone());
        }
        scan.done = ended;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_topics: usize, max_bytes: usize) -> LastValues<u32> {
        LastValues::new(LastValueLimits {
            max_topics,
            max_bytes,
        })
    }

    /// Every value `scan` yields, in chunks of `chunk`.
    fn replay(c: &LastValues<u32>, prefix: &str, upto: u64, chunk: usize) -> Vec<(String, u32)> {
        let mut s = LastValues::<u32>::scan(prefix.as_bytes(), upto);
        let mut out = Vec::new();
        let mut rounds = 0;
        while !s.is_done() {
            c.next_chunk(&mut s, chunk, |k, v| {
                out.push((String::from_utf8_lossy(k).into_owned(), *v));
                Taken::Yes
            });
            rounds += 1;
            assert!(rounds < 10_000, "a scan ends");
        }
        out
    }

    #[test]
    fn keeps_the_newest_value_per_topic_and_replays_a_prefix_in_key_order() {
        let mut c = cache(100, 1 << 20);
        c.put(b"md/b", 1, 4);
        c.put(b"md/a", 2, 4);
        c.put(b"news/x", 3, 4);
        c.put(b"md/b", 4, 4);
        assert_eq!(c.len(), 3);
        let want = vec![("md/a".to_owned(), 2), ("md/b".to_owned(), 4)];
        assert_eq!(replay(&c, "md/", c.mark(), 100), want);
        // Chunks of one entry give the same, a key at a time.
        assert_eq!(replay(&c, "md/", c.mark(), 1), want);
        assert_eq!(replay(&c, "", c.mark(), 2).len(), 3);
        assert!(replay(&c, "zz", c.mark(), 10).is_empty());
        assert!(replay(&c, "md/c", c.mark(), 10).is_empty());
        c.remove(b"md/a");
        assert_eq!(
            replay(&c, "md/", c.mark(), 10),
            vec![("md/b".to_owned(), 4)]
        );
        assert_eq!(c.bytes(), 2 * (4 + 4 + ENTRY_OVERHEAD) + 2);
    }

    #[test]
    fn a_scan_skips_values_stored_after_its_mark_and_survives_changes() {
        let mut c = cache(100, 1 << 20);
        for i in 0..10u32 {
            c.put(format!("t/{i}").as_bytes(), i, 1);
        }
        let mut s = LastValues::<u32>::scan(b"t/", c.mark());
        let mut got = Vec::new();
        c.next_chunk(&mut s, 3, |k, v| {
            got.push((k.to_vec(), *v));
            Taken::Yes
        });
        assert_eq!(got.len(), 3);
        // Between chunks: t/5 gets a newer value (it went out live), t/7
        // is removed, a new t/55 arrives (live too).
        c.put(b"t/5", 50, 1);
        c.remove(b"t/7");
        c.put(b"t/55", 55, 1);
        while !s.is_done() {
            c.next_chunk(&mut s, 3, |k, v| {
                got.push((k.to_vec(), *v));
                Taken::Yes
            });
        }
        let keys: Vec<String> = got
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert_eq!(
            keys,
            ["t/0", "t/1", "t/2", "t/3", "t/4", "t/6", "t/8", "t/9"]
        );
    }

    #[test]
    fn a_refused_value_comes_first_in_the_next_chunk() {
        let mut c = cache(100, 1 << 20);
        for i in 0..5u32 {
            c.put(format!("k{i}").as_bytes(), i, 1);
        }
        let mut s = LastValues::<u32>::scan(b"", c.mark());
        let mut got = Vec::new();
        let mut room = 2;
        c.next_chunk(&mut s, 100, |_, v| {
            if room == 0 {
                return Taken::No;
            }
            room -= 1;
            got.push(*v);
            Taken::Yes
        });
        assert_eq!(got, [0, 1]);
        assert!(!s.is_done());
        // Still full: nothing moves, the scan is not done.
        c.next_chunk(&mut s, 100, |_, _| Taken::No);
        assert!(!s.is_done());
        c.next_chunk(&mut s, 100, |_, v| {
            got.push(*v);
            Taken::Yes
        });
        assert_eq!(got, [0, 1, 2, 3, 4]);
        c.next_chunk(&mut s, 100, |_, _| Taken::Yes);
        assert!(s.is_done());
    }

    #[test]
    fn bounds_evict_the_least_recently_updated_and_count() {
        let per = 10 + 6 + ENTRY_OVERHEAD; // key "topic/NNNN" + weight 6
        let mut c = cache(1000, 3 * per);
        for i in 0..3u32 {
            c.put(format!("topic/{i:04}").as_bytes(), i, 6);
        }
        assert_eq!((c.len(), c.bytes(), c.evictions()), (3, 3 * per, 0));
        // Touch 0: 1 is now the oldest.
        c.put(b"topic/0000", 10, 6);
        c.put(b"topic/0003", 3, 6);
        assert_eq!((c.len(), c.evictions()), (3, 1));
        let keys: Vec<String> = replay(&c, "", c.mark(), 10)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["topic/0000", "topic/0002", "topic/0003"]);
        assert!(c.bytes() <= 3 * per);
        // A value larger than the whole bound is not kept, and the topic's
        // older value goes with it.
        c.put(b"topic/0002", 99, 4 * per);
        assert_eq!((c.len(), c.evictions()), (2, 2));
        assert!(replay(&c, "topic/0002", c.mark(), 10).is_empty());
        // The count bound.
        let mut small = cache(2, 1 << 20);
        for i in 0..5u32 {
            small.put(&[b'a' + i as u8], i, 0);
        }
        assert_eq!((small.len(), small.evictions()), (2, 3));
        assert_eq!(
            replay(&small, "", small.mark(), 10),
            vec![("d".to_owned(), 3), ("e".to_owned(), 4)]
        );
    }

    #[test]
    fn a_hot_topic_keeps_the_age_log_small_and_the_order_right() {
        let mut c = cache(3, 1 << 20);
        c.put(b"a", 0, 1);
        c.put(b"b", 0, 1);
        // Ten thousand updates of one topic: the log is compacted as it
        // goes, never holding more than twice the entries (plus slack).
        for i in 0..10_000u32 {
            c.put(b"hot", i, 1);
            assert!(c.by_age.len() <= 2 * c.entries.len() + 64);
        }
        // A topic removed and stored again is as new as its last store.
        c.remove(b"a");
        c.put(b"a", 1, 1);
        // Oldest now: b, then hot, then a.
        c.put(b"c", 0, 1);
        c.put(b"d", 0, 1);
        let keys: Vec<String> = replay(&c, "", c.mark(), 10)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a", "c", "d"]);
        assert_eq!(c.evictions(), 2);
    }

    #[test]
    fn many_topics_stay_within_the_byte_bound() {
        let max = 64 * 1024;
        let mut c = cache(usize::MAX, max);
        for i in 0..20_000u32 {
            c.put(
                format!("sym/{i:06}").as_bytes(),
                i,
                100 + (i as usize % 300),
            );
            assert!(c.bytes() <= max);
        }
        assert!(c.evictions() > 19_000);
        assert!(c.by_age.len() <= 2 * c.entries.len() + 64);
        assert_eq!(c.entries.len(), c.order.len());
        let sum: usize = c.entries.values().map(|e| e.cost).sum();
        assert_eq!(sum, c.bytes());
    }
}
