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
//! it, so a lookup compares the key with the one item the hash points at,
//! and an item leaving the queue removes its entry without hashing or
//! comparing its key again. Two live keys with the same
//! 64-bit hash only lose conflation for the older one (it is delivered,
//! never replaced by the other key's value). The index holds one entry
//! per queued keyed item, so it is bounded by the queue's own bound (its
//! keys are slices of, or as long as, the items' topics, which the queue's
//! byte bound already counts).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;

/// The hash of a key, made by the queue that owns the index (with its
/// randomly keyed hasher, before it takes its lock).
pub(crate) type KeyHash = u64;

/// Key → position of the one queued item holding that key's newest value.
#[derive(Debug, Default)]
pub(crate) struct ConflationIndex {
    /// Key hash → absolute position of its queued item.
    slot: HashMap<KeyHash, u64, BuildHasherDefault<Prehashed>>,
    /// The key's hash of each queued item and the key itself (None when
    /// the queue reads it from the item), in queue order (None: pushed
    /// without a key, never replaced).
    of_item: VecDeque<Option<(KeyHash, Option<Bytes>)>>,
    /// Absolute position of the first queued item.
    head: u64,
}

impl ConflationIndex {
    /// The queued item whose key has hash `h`, if any: its place, and its
    /// key when recorded (otherwise the caller compares the item's own
    /// key: another key may share the hash).
    pub(crate) fn candidate(&self, h: KeyHash) -> Option<(usize, Option<&Bytes>)> {
        let at = *self.slot.get(&h)?;
        let i = usize::try_from(at.checked_sub(self.head)?).ok()?;
        self.of_item.get(i)?.as_ref().map(|(_, k)| (i, k.as_ref()))
    }

    /// Records an item pushed at the back: its key's hash and the key
    /// itself (None when the queue reads it from the item), or None for
    /// an item pushed without a key.
    pub(crate) fn pushed_hashed(&mut self, key: Option<(KeyHash, Option<Bytes>)>) {
        if let Some((h, _)) = &key {
            let at = self.head + self.of_item.len() as u64;
            self.slot.insert(*h, at);
        }
        self.of_item.push_back(key);
    }

    /// Forgets the first `n` queued items (they left the queue).
    pub(crate) fn front_gone(&mut self, n: usize) {
        let n = n.min(self.of_item.len());
        if self.slot.is_empty() {
            // Nothing keyed is queued: no entry to look at.
            self.of_item.drain(..n);
        } else {
            for (i, key) in self.of_item.drain(..n).enumerate() {
                if let Some((h, _)) = key {
                    let at = self.head + i as u64;
                    if let std::collections::hash_map::Entry::Occupied(e) = self.slot.entry(h) {
                        if *e.get() == at {
                            e.remove();
                        }
                    }
                }
            }
        }
        self.head += n as u64;
    }

    /// Rebuilds the index after items were taken from anywhere in the
    /// queue; `kept` tells, per former item in order, whether it stayed.
    pub(crate) fn retain(&mut self, mut kept: impl FnMut(usize) -> bool) {
        let old = std::mem::take(&mut self.of_item);
        self.slot.clear();
        for (i, key) in old.into_iter().enumerate() {
            if kept(i) {
                self.pushed_hashed(key);
            }
        }
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
}
