//! The conflation index of a queue: which queued item holds each key's
//! newest value, so a newer value of the same key replaces it in place
//! (`--slow-policy conflate`). Used by [`crate::bounded::Bounded`] (the
//! proxy's subscriber queues, the `Receiver`'s queue) and by the Unix
//! sessions' [`crate::outbox`], each beside its own `VecDeque`.
//!
//! Positions are absolute (counted from the queue's first push), so taking
//! items from the front moves no entry; a lookup and a push cost one hash
//! probe. The index holds one entry per queued keyed item, so it is bounded
//! by the queue's own bound (its keys are slices of, or as long as, the
//! items' topics, which the queue's byte bound already counts).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// Key → position of the one queued item holding that key's newest value.
#[derive(Debug, Default)]
pub(crate) struct ConflationIndex {
    /// Key → absolute position of its queued item.
    slot: HashMap<Bytes, u64>,
    /// The key of each queued item, in queue order (None: pushed without
    /// one, never replaced).
    of_item: VecDeque<Option<Bytes>>,
    /// Absolute position of the first queued item.
    head: u64,
}

impl ConflationIndex {
    /// Where in the queue (from its front) the item holding `key` is.
    pub(crate) fn find(&self, key: &[u8]) -> Option<usize> {
        let at = *self.slot.get(key)?;
        usize::try_from(at - self.head).ok()
    }

    /// Records an item pushed at the back, under `key` if any.
    pub(crate) fn pushed(&mut self, key: Option<Bytes>) {
        if let Some(k) = &key {
            let at = self.head + self.of_item.len() as u64;
            self.slot.insert(k.clone(), at);
        }
        self.of_item.push_back(key);
    }

    /// Forgets the first `n` queued items (they left the queue).
    pub(crate) fn front_gone(&mut self, n: usize) {
        let n = n.min(self.of_item.len());
        for (i, key) in self.of_item.drain(..n).enumerate() {
            if let Some(key) = key {
                if self.slot.get(&key) == Some(&(self.head + i as u64)) {
                    self.slot.remove(&key);
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
                self.pushed(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
