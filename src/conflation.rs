//! The conflation index of a queue: which queued item holds each key's
//! newest value, so a newer value of the same key replaces it in place
//! (`--slow-policy conflate`). Used by [`crate::bounded::Bounded`] beside
//! its `VecDeque`, so by every queue built on it: the proxy's subscriber
//! queues, the `Receiver`'s queue and the Unix sessions'
//! [`crate::outbox`].
//!
//! Positions are absolute (counted from the queue's first push), so taking
//! items from the front moves no entry. A key is hashed once per push
//! (with a randomly keyed hasher, so nobody can choose colliding topics;
//! [`crate::bounded::Bounded`] hashes with its own, before taking its lock);
//! the table maps that hash to a position, and each queued item keeps its
//! hash (and its key, unless the queue reads keys from its items) beside
//! it, so a lookup compares the key with the one item the hash points at.
//! Two live keys with the same 64-bit hash only lose conflation for the
//! older one (it is delivered, never replaced by the other key's value).
//!
//! Items leaving from the front do not touch the table: an entry whose
//! position is before the queue's head is stale, and a lookup that finds
//! one treats the key as not queued. With many distinct keys queued (a
//! lagging subscriber of a wide market) the table outgrows the caches,
//! and the removal was a cache miss per delivered item; now stale entries
//! are swept in one sequential pass once they outnumber the queued items
//! (plus [`SWEEP_SLACK`]), so the sweep costs O(1) per item, amortized.
//! The table thus holds at most twice the queued items plus that slack.
//!
//! What the index holds in memory counts against its queue's byte bound
//! ([`ConflationIndex::heap_bytes`], an estimate from the capacities of
//! its table and deques, and [`ConflationIndex::push_growth`], what the
//! next push would add), so a conflating queue of small items is bounded
//! in bytes by what it really holds, not only by its item count. A
//! drained burst gives that memory back: the table is shrunk when it
//! sweeps, the deques when they are mostly empty. The keys themselves are
//! slices of, or as long as, the items' topics, which the items' own
//! weight already counts.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;

/// The hash of a key, made by the queue that owns the index (with its
/// randomly keyed hasher, before it takes its lock).
pub(crate) type KeyHash = u64;

/// Stale entries the table may hold beyond the queued items before a
/// sweep (so a short queue sweeps rarely: a sweep walks the whole table).
const SWEEP_SLACK: usize = 256;

/// Deque slots kept beyond four times the queued items before a deque
/// is shrunk (so a short queue does not shrink and regrow all the time).
const DEQUE_SLACK: usize = 64;

/// Buckets of a table with room for `cap` entries (a power of two; 1/8
/// kept empty from 8 buckets on, one below that).
fn buckets(cap: usize) -> usize {
    match cap {
        0 => 0,
        1..=7 => cap + 1,
        _ => cap / 7 * 8,
    }
}

/// Heap bytes of `n` buckets: a `(hash, position)` pair and a control
/// byte each.
fn bucket_bytes(n: usize) -> usize {
    n * (std::mem::size_of::<(KeyHash, u64)>() + 1)
}

/// Key → position of the one queued item holding that key's newest value.
#[derive(Debug, Default)]
pub(crate) struct ConflationIndex {
    /// Key hash → absolute position of its queued item (or of an item
    /// that has left: stale when before `head`).
    slot: HashMap<KeyHash, u64, BuildHasherDefault<Prehashed>>,
    /// The key's hash of each queued item in queue order, 0 for an item
    /// pushed without a key (a key hashing to 0 is recorded as 1, see
    /// [`record`]). 8 bytes an item, so
    /// a long queue's bookkeeping stays small and sequential.
    of_item: VecDeque<KeyHash>,
    /// The keys themselves, beside `of_item`, for a queue that is given
    /// its keys (see [`ConflationIndex::keeping_keys`]; made at the first
    /// given key otherwise: a queue that reads keys from its items never
    /// keeps one).
    given: Option<VecDeque<Option<Bytes>>>,
    /// Absolute position of the first queued item.
    head: u64,
}

/// The hash recorded for a key: never 0, which marks an unkeyed item.
fn record(h: KeyHash) -> KeyHash {
    h.max(1)
}

impl ConflationIndex {
    /// The index of a queue that is given its keys (it keeps them, beside
    /// each item's hash). [`ConflationIndex::default`] is that of a queue
    /// that reads each item's key from the item.
    pub(crate) fn keeping_keys() -> ConflationIndex {
        ConflationIndex {
            given: Some(VecDeque::new()),
            ..ConflationIndex::default()
        }
    }

    /// The queued item whose key has hash `h`, if any: its place, and its
    /// key when recorded (otherwise the caller compares the item's own
    /// key: another key may share the hash).
    pub(crate) fn candidate(&self, h: KeyHash) -> Option<(usize, Option<&Bytes>)> {
        let at = *self.slot.get(&h)?;
        let i = usize::try_from(at.checked_sub(self.head)?).ok()?;
        if *self.of_item.get(i)? != record(h) {
            return None;
        }
        let key = self.given.as_ref().and_then(|g| g.get(i)?.as_ref());
        Some((i, key))
    }

    /// Records an item pushed at the back: its key's hash and the key
    /// itself (None when the queue reads it from the item), or None for
    /// an item pushed without a key.
    pub(crate) fn pushed_hashed(&mut self, key: Option<(KeyHash, Option<Bytes>)>) {
        let (h, k) = match key {
            Some((h, k)) => {
                let at = self.head + self.of_item.len() as u64;
                self.slot.insert(h, at);
                (record(h), k)
            }
            None => (0, None),
        };
        if k.is_some() && self.given.is_none() {
            self.given = Some(std::iter::repeat(None).take(self.of_item.len()).collect());
        }
        if let Some(g) = &mut self.given {
            g.push_back(k);
        }
        self.of_item.push_back(h);
    }

    /// Forgets the first `n` queued items (they left the queue). Their
    /// entries go stale; they are swept once they outnumber the queued
    /// items by [`SWEEP_SLACK`].
    pub(crate) fn front_gone(&mut self, n: usize) {
        let n = n.min(self.of_item.len());
        self.of_item.drain(..n);
        if let Some(g) = &mut self.given {
            g.drain(..n);
        }
        self.head += n as u64;
        let len = self.of_item.len();
        if self.slot.len() > 2 * len + SWEEP_SLACK {
            let head = self.head;
            self.slot.retain(|_, at| *at >= head);
            // A table left mostly empty by a drained burst gives its
            // memory back (keeping room for as many again).
            if self.slot.capacity() > 4 * (self.slot.len() + SWEEP_SLACK) {
                self.slot.shrink_to(2 * (self.slot.len() + SWEEP_SLACK));
            }
        }
        // So do the deques (each shrink halves one at least, after at
        // least as many items left: O(1) per item, amortized).
        if self.of_item.capacity() > 4 * len + DEQUE_SLACK {
            self.of_item.shrink_to(2 * len + DEQUE_SLACK);
            if let Some(g) = &mut self.given {
                g.shrink_to(2 * len + DEQUE_SLACK);
            }
        }
    }

    /// The index's heap bytes, estimated from the capacities of its table
    /// and deques: what it costs against its queue's byte bound.
    pub(crate) fn heap_bytes(&self) -> usize {
        bucket_bytes(buckets(self.slot.capacity()))
            + self.of_item.capacity() * std::mem::size_of::<KeyHash>()
            + self
                .given
                .as_ref()
                .map_or(0, |g| g.capacity() * std::mem::size_of::<Option<Bytes>>())
    }

    /// What pushing one more keyed item would add to
    /// [`ConflationIndex::heap_bytes`]: the growth of whatever is full (a
    /// table or deque at its capacity doubles), else 0. Lets a queue
    /// refuse a push whose bookkeeping would take it past its bound.
    pub(crate) fn push_growth(&self) -> usize {
        let mut grow = 0;
        let cap = self.slot.capacity();
        if self.slot.len() >= cap {
            // A full table doubles its buckets (4 at first).
            grow += bucket_bytes(match buckets(cap) {
                0 => 4,
                b => b,
            });
        }
        if self.of_item.len() >= self.of_item.capacity() {
            grow += self.of_item.capacity().max(4) * std::mem::size_of::<KeyHash>();
        }
        if let Some(g) = self.given.as_ref().filter(|g| g.len() >= g.capacity()) {
            grow += g.capacity().max(4) * std::mem::size_of::<Option<Bytes>>();
        }
        grow
    }

    /// Rebuilds the index after items were taken from anywhere in the
    /// queue; `kept` tells, per former item in order, whether it stayed.
    pub(crate) fn retain(&mut self, mut kept: impl FnMut(usize) -> bool) {
        let old = std::mem::take(&mut self.of_item);
        let mut old_keys = self.given.take();
        self.slot.clear();
        for (i, h) in old.into_iter().enumerate() {
            let k = old_keys.as_mut().and_then(|g| g.get_mut(i)?.take());
            if kept(i) {
                // The recorded hash stands in for the key's own (they
                // differ only for a key hashing to 0, which then just is
                // not found again: its item is delivered, not replaced).
                self.pushed_hashed((h != 0).then_some((h, k)));
            }
        }
    }

    /// Entries in the table (live and stale), for tests.
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.slot.len()
    }
}

/// The table's hasher: its keys are already hashes, used as they are.
#[derive(Debug, Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::BuildHasher;

    /// What the owning queue does, with a fixed hasher.
    impl ConflationIndex {
        fn hash(&self, key: &[u8]) -> KeyHash {
            BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
        }

        fn find(&self, key: &[u8]) -> Option<usize> {
            self.find_hashed(self.hash(key), key)
        }

        fn find_hashed(&self, h: KeyHash, key: &[u8]) -> Option<usize> {
            match self.candidate(h)? {
                (i, Some(k)) if k[..] == *key => Some(i),
                _ => None,
            }
        }

        fn pushed(&mut self, key: Option<Bytes>) {
            let key = key.map(|k| (self.hash(&k), Some(k)));
            self.pushed_hashed(key);
        }
    }

    fn k(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn positions_follow_pushes_takes_from_the_front_and_retains() {
        let mut ix = ConflationIndex::default();
        ix.pushed(k("a"));
        ix.pushed(None);
        ix.pushed(k("b"));
        assert_eq!((ix.find(b"a"), ix.find(b"b")), (Some(0), Some(2)));
        ix.front_gone(1);
        assert_eq!((ix.find(b"a"), ix.find(b"b")), (None, Some(1)));
        ix.pushed(k("a"));
        // Drop the unkeyed item (position 0): b moves to 0, a to 1.
        ix.retain(|i| i != 0);
        assert_eq!((ix.find(b"b"), ix.find(b"a")), (Some(0), Some(1)));
        ix.front_gone(5);
        assert_eq!((ix.find(b"b"), ix.find(b"a")), (None, None));
    }

    #[test]
    fn a_hash_shared_by_two_keys_never_replaces_the_wrong_one() {
        let mut ix = ConflationIndex::default();
        // Force a collision: "b" recorded under the hash of "a".
        let h = ix.hash(b"a");
        ix.pushed_hashed(Some((h, Some(Bytes::from_static(b"a")))));
        ix.pushed_hashed(Some((h, Some(Bytes::from_static(b"b")))));
        assert_eq!(ix.find_hashed(h, b"a"), None, "the slot is b's now");
        assert_eq!(ix.find_hashed(h, b"b"), Some(1));
        // a leaving does not remove b's entry.
        ix.front_gone(1);
        assert_eq!(ix.find_hashed(h, b"b"), Some(0));
        ix.front_gone(1);
        assert_eq!(ix.find_hashed(h, b"b"), None);
    }

    #[test]
    fn items_leaving_leave_stale_entries_that_are_swept_in_bounds() {
        let mut ix = ConflationIndex::default();
        // A lagging subscriber of a wide market: distinct keys, each
        // delivered a while after it was queued.
        for i in 0..20_000u32 {
            ix.pushed(k(&format!("t{i}")));
            if i >= 100 {
                ix.front_gone(1);
            }
            assert!(ix.entries() <= 2 * ix.of_item.len() + SWEEP_SLACK + 1);
        }
        assert_eq!(ix.of_item.len(), 100);
        // A stale entry is never a candidate, a live one is.
        assert_eq!(ix.find(b"t0"), None);
        assert_eq!(ix.find(b"t19999"), Some(99));
        assert_eq!(ix.find(b"t19900"), Some(0));
        assert_eq!(ix.find(b"t19899"), None);
        // A key pushed again after its item left is found at its new place.
        ix.pushed(k("t5"));
        assert_eq!(ix.find(b"t5"), Some(100));
        // Everything delivered: the table is swept down to nothing.
        ix.front_gone(usize::MAX);
        assert_eq!(ix.find(b"t5"), None);
        for i in 0..2 * SWEEP_SLACK {
            ix.pushed(k(&format!("u{i}")));
            ix.front_gone(1);
        }
        assert!(ix.entries() <= SWEEP_SLACK + 1, "{}", ix.entries());
    }

    #[test]
    fn heap_bytes_grow_only_as_foretold_and_come_back_after_a_burst() {
        let mut ix = ConflationIndex::keeping_keys();
        assert_eq!(ix.heap_bytes(), 0);
        for i in 0..50_000u32 {
            let (before, grow) = (ix.heap_bytes(), ix.push_growth());
            ix.pushed(k(&format!("t{i}")));
            assert!(
                ix.heap_bytes() <= before + grow,
                "push {i}: {} > {before} + {grow}",
                ix.heap_bytes()
            );
        }
        // The table, the hashes and the kept keys are all counted.
        let full = ix.heap_bytes();
        assert!(full >= 50_000 * (17 + 8 + 32), "{full}");
        for i in 0..50_000 {
            ix.front_gone(1);
            assert!(ix.heap_bytes() <= full, "item {i}");
        }
        assert!(
            ix.heap_bytes() < full / 50,
            "{} of {full} kept",
            ix.heap_bytes()
        );
    }

    #[test]
    fn keys_given_after_unkeyed_and_read_keys_stay_aligned() {
        let mut ix = ConflationIndex::default();
        // Items whose key the queue reads itself, and one without a key.
        ix.pushed_hashed(Some((ix.hash(b"x"), None)));
        ix.pushed_hashed(None);
        assert!(
            ix.given.is_none(),
            "no copy of a key is kept until one is given"
        );
        ix.pushed(k("a"));
        assert_eq!(
            ix.candidate(ix.hash(b"x")).map(|(i, k)| (i, k.is_none())),
            Some((0, true))
        );
        assert_eq!(ix.find(b"a"), Some(2));
        ix.front_gone(1);
        assert_eq!(ix.find(b"a"), Some(1));
        ix.retain(|i| i != 0);
        assert_eq!(ix.find(b"a"), Some(0));
        assert_eq!(ix.given.as_ref().map(|g| g.len()), Some(1));
    }
}
