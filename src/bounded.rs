//! One bounded queue, [`Bounded`], between producers that must never wait
//! inside a push and the consumer(s) that drain it: the ZeroMQ proxy's
//! per-subscriber queues and the clients' send queues (wire bytes), the
//! router bridge's queue, the ZeroMQ `Receiver`'s envelope queue, and the
//! Unix sessions' outboxes (deliveries; `outbox.rs` adds the shared byte
//! budget and the slow-consumer verdict around it).
//!
//! - **Bounded in items and in bytes.** What an item costs is its
//!   [`Weigh::weigh`]. Producers never wait inside [`Bounded::push`]: a
//!   full queue refuses the new item and says so ([`Pushed::Full`]), so one
//!   stalled consumer cannot stall its producers (or, through them, anyone
//!   else). [`Bounded::push_forced`] is for what must never be refused for
//!   space (replies): it is counted all the same.
//! - **Outstanding work, not only queued work.** A writer that takes a
//!   batch with [`Bounded::take_batch`] keeps it counted until it reports
//!   it with [`Bounded::written`], so memory stays within the bounds while
//!   a batch is on its way to the socket. [`Bounded::take_all`] and
//!   [`Bounded::pop`] are for consumers that do not report: what they take
//!   is forgotten at once.
//! - **Waiting, outside the push.** A producer that wants no loss waits in
//!   its own task with [`Bounded::wait_room`] (woken once outstanding work
//!   drained to a low-water mark, 3/4 of the bounds unless [`Limits`] say
//!   otherwise, so it is not woken per item); one that also waits on
//!   something kept outside the queue registers with
//!   [`Bounded::room_wait`] before it checks. Every path that gives room
//!   back (a write reported, a pop, a take, a replacement in place) wakes
//!   the waiting producers once at or below the mark. Consumers wait for
//!   items asynchronously ([`Bounded::wait`], [`Bounded::recv`]) or block a
//!   thread ([`Bounded::recv_blocking`]); several consumers may wait at
//!   once, each item goes to one.
//! - **A progress clock.** The consumer records when its socket accepted
//!   bytes ([`Bounded::note_progress`]); work arriving at an idle queue
//!   restarts the clock; [`Bounded::stalled_for`] then tells a slow
//!   consumer from a stuck one. Callers that keep the clock out of their
//!   state pass the time in (`*_at`).
//! - **Closing.** [`Bounded::close`] (optionally discarding what is
//!   queued) or [`Bounded::close_with`] (a last item queued behind
//!   everything, in the same step); [`Bounded::closed`] waits for it.
//!
//! Keyed pushes ([`Bounded::push_keyed`], a queue made with
//! [`Bounded::conflating`]) conflate: the newest value of a key replaces
//! the queued one in its place (the index is `conflation.rs`). The
//! index's memory counts against the byte bound beside the items
//! ([`Bounded::index_bytes`] shows it), including what the next push would
//! make it grow by, so every check of room agrees with the push's.
//!
//! The Unix sessions' outbox (`outbox.rs`) is this queue over deliveries
//! plus what only it needs on top: a byte budget several queues share
//! (passed to [`Bounded::push_within`] as an extra "full"), the stuck
//! verdict ([`Bounded::wake_room`]), replies kept when routed traffic is
//! taken out ([`Bounded::take_where`]), and its own [`Limits`] (low-water
//! marks 1/128 under the bounds; the byte bound reached, not passed).
//!
//! No item is dropped while the lock is held: what a push refuses or
//! replaces, and what a take removes, is dropped (or handed back) after
//! the lock is released, since dropping an item may push into a queue
//! (a delivery's receipt), this one included.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::conflation::ConflationIndex;

/// What an item costs against a queue's byte bound.
pub trait Weigh {
    /// The item's bytes.
    fn weigh(&self) -> usize;
}

impl Weigh for Bytes {
    fn weigh(&self) -> usize {
        self.len()
    }
}

/// Outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Ok,
    /// Dropped: the queue is full.
    Full,
    /// Dropped: the queue is closed (its consumer has stopped).
    Closed,
}

/// The bounds of a [`Bounded`] queue and its low-water marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most items outstanding (at least 1).
    pub max_items: usize,
    /// Most bytes outstanding.
    pub max_bytes: usize,
    /// Outstanding items at or below which producers waiting for room go
    /// on (3/4 of `max_items` by default).
    pub low_items: usize,
    /// Outstanding bytes at or below which producers waiting for room go
    /// on (3/4 of `max_bytes` by default).
    pub low_bytes: usize,
    /// How the byte bound refuses. false (the default): an item that would
    /// pass it is refused. true: a push is refused only once the bound is
    /// reached, so the last item accepted may pass it by its own weight
    /// (the Unix sessions' outbox counts that way).
    pub fill_to_bound: bool,
}

impl Limits {
    /// At most `max_items` items and `max_bytes` bytes outstanding;
    /// waiting producers go on at 3/4 of each.
    pub fn new(max_items: usize, max_bytes: usize) -> Limits {
        let max_items = max_items.max(1);
        Limits {
            max_items,
            max_bytes,
            low_items: max_items / 4 * 3,
            low_bytes: max_bytes / 4 * 3,
            fill_to_bound: false,
        }
    }

    /// The same bounds with waiting producers going on once outstanding
    /// work is at or below `items` items and `bytes` bytes.
    pub fn low_water(self, items: usize, bytes: usize) -> Limits {
        Limits {
            low_items: items,
            low_bytes: bytes,
            ..self
        }
    }

    /// The same bounds, refusing a push only once the byte bound is
    /// reached (the field of the same name tells how).
    pub fn fill_to_bound(self) -> Limits {
        Limits {
            fill_to_bound: true,
            ..self
        }
    }
}

/// What the one push did, with any item it did not keep (dropped by the
/// caller once the lock is released).
enum Outcome<T> {
    /// Queued.
    Queued,
    /// Not queued (full or closed): the item comes back.
    Refused(Pushed, T),
    /// Queued in place of a queued item of the same key, which comes back.
    Replaced(T),
}

/// Where a push's conflation key comes from.
enum Key {
    /// Unkeyed: never replaced, replaces nothing.
    None,
    /// This key (kept beside the item).
    Given(Bytes),
    /// The item's own, read with the queue's `key_of`.
    OfItem,
}

/// Content and counts of a queue, under its lock.
#[derive(Debug)]
struct Inner<T> {
    /// Items waiting for a consumer.
    items: VecDeque<T>,
    /// Sum of the weights of `items`.
    bytes: usize,
    /// Items a writer took with `take_batch` and has not reported
    /// written: they still count against the bounds.
    taken_items: usize,
    /// Bytes of those items.
    taken_bytes: usize,
    /// Producers waiting in `wait_room`, so `written` notifies only when
    /// someone listens.
    room_waiters: usize,
    /// Threads blocked in `recv_blocking`, so a push signals the condition
    /// variable only when someone listens (a signal is a syscall).
    blocked: usize,
    /// Set when the consumer is gone; pushes then fail.
    closed: bool,
    /// For a conflating queue: which queued item holds each key's newest
    /// value. None for a plain queue (it then costs nothing).
    keys: Option<ConflationIndex>,
}

impl<T> Inner<T> {
    /// Removes the first `n` items' bookkeeping beyond the deque itself.
    fn front_gone(&mut self, n: usize) {
        if let Some(k) = &mut self.keys {
            k.front_gone(n);
        }
    }

    /// Items not yet written (queued or in a writer's batch).
    fn out_items(&self) -> usize {
        self.items.len() + self.taken_items
    }

    /// Bytes not yet written.
    fn out_bytes(&self) -> usize {
        self.bytes.saturating_add(self.taken_bytes)
    }

    /// Heap bytes of the conflation index (0 for a plain queue).
    fn index_bytes(&self) -> usize {
        self.keys.as_ref().map_or(0, ConflationIndex::heap_bytes)
    }

    /// What counts against the byte bound: the bytes not yet written and
    /// the conflation index that keeps track of them, with what its next
    /// push would add (so every check of room agrees with the push's: a
    /// producer woken for room finds it).
    fn charged(&self) -> usize {
        let index = self
            .keys
            .as_ref()
            .map_or(0, |k| k.heap_bytes().saturating_add(k.push_growth()));
        self.out_bytes().saturating_add(index)
    }
}

/// A queue bounded in items and bytes, with non-waiting pushes and async
/// and blocking waits (see the module docs).
#[derive(Debug)]
pub struct Bounded<T> {
    /// The items; the lock is held only to push, take or count.
    inner: Mutex<Inner<T>>,
    /// Wakes async consumers when items arrive (or the queue closes).
    ready: Notify,
    /// Wakes blocked consumers likewise.
    ready_blocking: Condvar,
    /// Wakes producers waiting for room once outstanding work drained
    /// to the low-water mark (or the queue closed, or a verdict kept
    /// outside the queue changed, see [`Bounded::wake_room`]).
    room: Notify,
    /// Wakes whoever waits for the queue to close ([`Bounded::closed`]).
    closing: Notify,
    /// The bounds and low-water marks, fixed at creation.
    limits: Limits,
    /// Origin of `progress_ms` (a monotonic clock).
    epoch: Instant,
    /// Milliseconds after `epoch` of the consumer's last progress, or of
    /// the moment work arrived at an idle queue. Atomic so the consumer
    /// records it without the lock.
    progress_ms: AtomicU64,
    /// For a queue made with [`Bounded::conflating_by`]: an item's key,
    /// read from the item itself (so no copy of it is kept).
    key_of: Option<fn(&T) -> &[u8]>,
    /// For a conflating queue (and only for one: it is what makes keyed
    /// pushes conflate): hashes keys (randomly keyed), outside the lock,
    /// for its index.
    key_hasher: Option<RandomState>,
}

impl<T: Weigh> Bounded<T> {
    /// A queue holding at most `max_items` items and `max_bytes` bytes
    /// outstanding (one item is always accepted when nothing is
    /// outstanding, whatever its weight).
    pub fn new(max_items: usize, max_bytes: usize) -> Bounded<T> {
        Bounded::with_limits(Limits::new(max_items, max_bytes), false)
    }

    /// A conflating queue (see [`Bounded::push_keyed`]) with the same
    /// bounds as [`Bounded::new`].
    pub fn conflating(max_items: usize, max_bytes: usize) -> Bounded<T> {
        Bounded::with_limits(Limits::new(max_items, max_bytes), true)
    }

    /// A queue with the given bounds and low-water marks, conflating keyed
    /// pushes when `conflate`.
    pub fn with_limits(limits: Limits, conflate: bool) -> Bounded<T> {
        Bounded::build(limits, conflate.then(ConflationIndex::keeping_keys), None)
    }

    /// The one constructor: `keys` makes the queue conflating (keeping the
    /// keys it is given, or reading them with `key_of`).
    fn build(
        limits: Limits,
        keys: Option<ConflationIndex>,
        key_of: Option<fn(&T) -> &[u8]>,
    ) -> Bounded<T> {
        let conflate = keys.is_some();
        let limits = Limits {
            max_items: limits.max_items.max(1),
            ..limits
        };
        Bounded {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                bytes: 0,
                taken_items: 0,
                taken_bytes: 0,
                room_waiters: 0,
                blocked: 0,
                closed: false,
                keys,
            }),
            ready: Notify::new(),
            ready_blocking: Condvar::new(),
            room: Notify::new(),
            closing: Notify::new(),
            limits,
            epoch: Instant::now(),
            progress_ms: AtomicU64::new(0),
            key_of,
            key_hasher: conflate.then(RandomState::new),
        }
    }

    /// A conflating queue whose items carry their key: `key_of` reads it,
    /// [`Bounded::push_by_key`] pushes under it (nothing is copied or kept
    /// for the key but its hash).
    pub fn conflating_by(
        max_items: usize,
        max_bytes: usize,
        key_of: fn(&T) -> &[u8],
    ) -> Bounded<T> {
        Bounded::build(
            Limits::new(max_items, max_bytes),
            Some(ConflationIndex::default()),
            Some(key_of),
        )
    }

    /// The bounds: most items and bytes outstanding.
    pub fn bounds(&self) -> (usize, usize) {
        (self.limits.max_items, self.limits.max_bytes)
    }

    /// The bounds and low-water marks.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether keyed pushes conflate (made with [`Bounded::conflating`] or
    /// [`Bounded::with_limits`]`(_, true)`).
    pub fn is_conflating(&self) -> bool {
        self.key_hasher.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Milliseconds from `epoch` to `now`.
    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Queues `item` unless full or closed. Never waits. Reads the clock
    /// only when work arrives at an idle queue.
    pub fn push(&self, item: T) -> Pushed {
        self.push_with(item, Key::None, false, false, Instant::now)
            .0
    }

    /// [`Bounded::push`] at a known time `now` (reads no clock).
    pub fn push_at(&self, item: T, now: Instant) -> Pushed {
        self.push_with(item, Key::None, false, false, || now).0
    }

    /// Queues `item` whatever the bounds (it still counts against them,
    /// so later bounded pushes see it); fails only when closed.
    pub fn push_forced(&self, item: T) -> Pushed {
        self.push_with(item, Key::None, true, false, Instant::now).0
    }

    /// Queues `item` under `key` in a conflating queue: if an item with
    /// the same key is still queued (the consumer lags), `item` takes its
    /// place in the queue, whatever the bounds, and the superseded item is
    /// returned (for the caller to count and drop outside the lock).
    /// Otherwise as [`Bounded::push`]. A plain queue ignores the key.
    pub fn push_keyed(&self, item: T, key: Bytes) -> (Pushed, Option<T>) {
        self.push_with(item, Key::Given(key), false, false, Instant::now)
    }

    /// [`Bounded::push_keyed`] under the item's own key, in a queue made
    /// with [`Bounded::conflating_by`] (any other queue pushes it as
    /// [`Bounded::push`] does).
    pub fn push_by_key(&self, item: T) -> (Pushed, Option<T>) {
        self.push_with(item, Key::OfItem, false, false, Instant::now)
    }

    /// [`Bounded::push`] (or [`Bounded::push_by_key`] when `by_key`) that
    /// gives a refused item back, for a producer that waits for room
    /// ([`Bounded::wait_room`]) and offers it again: Ok with the item it
    /// replaced (conflation), if any, or Err with why and the item.
    pub fn offer(&self, item: T, by_key: bool) -> Result<Option<T>, (Pushed, T)> {
        let key = if by_key { Key::OfItem } else { Key::None };
        match self.push_locked(item, key, false, false, Instant::now) {
            Outcome::Queued => Ok(None),
            Outcome::Replaced(old) => Ok(Some(old)),
            Outcome::Refused(why, item) => Err((why, item)),
        }
    }

    /// [`Bounded::push_keyed`] (a plain push when `key` is None) that is
    /// also refused, unless nothing is outstanding, when `also_full`: a
    /// bound the caller keeps outside the queue, such as a byte budget
    /// several queues share. A replacement in place is never refused.
    pub fn push_within(&self, item: T, key: Option<Bytes>, also_full: bool) -> (Pushed, Option<T>) {
        let key = key.map_or(Key::None, Key::Given);
        self.push_with(item, key, false, also_full, Instant::now)
    }

    /// The one push, with what it did not keep dropped here, after the
    /// lock is released.
    fn push_with(
        &self,
        item: T,
        key: Key,
        forced: bool,
        also_full: bool,
        now: impl FnOnce() -> Instant,
    ) -> (Pushed, Option<T>) {
        match self.push_locked(item, key, forced, also_full, now) {
            Outcome::Queued => (Pushed::Ok, None),
            Outcome::Refused(why, item) => {
                drop(item);
                (why, None)
            }
            Outcome::Replaced(old) => (Pushed::Ok, Some(old)),
        }
    }

    /// Pushes under the lock; gives back what it did not keep.
    fn push_locked(
        &self,
        item: T,
        key: Key,
        forced: bool,
        also_full: bool,
        now: impl FnOnce() -> Instant,
    ) -> Outcome<T> {
        let len = item.weigh();
        // The key's hash, made once (before the lock) for the lookup and
        // the record, and the key itself when it is not read from the item.
        let key = match (key, &self.key_hasher, self.key_of) {
            (Key::Given(k), Some(hs), _) => Some((hs.hash_one(&k[..]), Some(k))),
            (Key::OfItem, Some(hs), Some(f)) => Some((hs.hash_one(f(&item)), None)),
            _ => None,
        };
        let (was_empty, blocked) = {
            let mut g = self.lock();
            if g.closed {
                drop(g);
                return Outcome::Refused(Pushed::Closed, item);
            }
            let found = key.as_ref().and_then(|(h, k)| {
                let (i, queued) = g.keys.as_ref()?.candidate(*h)?;
                // The queued item's key and ours: the same key, not only
                // the same hash.
                let same = match (queued, k) {
                    (Some(q), Some(k)) => q == k,
                    (Some(q), None) => q[..] == *self.item_key(&item),
                    (None, Some(k)) => *self.item_key(&g.items[i]) == k[..],
                    (None, None) => self.item_key(&g.items[i]) == self.item_key(&item),
                };
                same.then_some(i)
            });
            if let Some(i) = found {
                let old = std::mem::replace(&mut g.items[i], item);
                g.bytes = (g.bytes + len).saturating_sub(old.weigh());
                // A smaller value may have given room back.
                let wake = self.room_freed(&g);
                drop(g);
                if wake {
                    self.room.notify_waiters();
                }
                return Outcome::Replaced(old);
            }
            let out = g.out_items();
            if !forced && out != 0 && (also_full || self.at_bound(&g, len)) {
                drop(g);
                return Outcome::Refused(Pushed::Full, item);
            }
            if out == 0 {
                // Work arrives at an idle consumer: its no-progress clock
                // starts now, not at its last write long ago.
                self.note_progress_at(now());
            }
            let was_empty = g.items.is_empty();
            g.bytes += len;
            g.items.push_back(item);
            if let Some(k) = &mut g.keys {
                k.pushed_hashed(key);
            }
            (was_empty, g.blocked > 0)
        };
        if was_empty {
            self.ready.notify_one();
        }
        if blocked {
            self.ready_blocking.notify_one();
        }
        Outcome::Queued
    }

    /// An item's key as `key_of` reads it (empty without one).
    fn item_key<'a>(&self, item: &'a T) -> &'a [u8] {
        self.key_of.map_or(&[][..], |f| f(item))
    }

    /// Whether a bounded push adding `len` bytes is refused by the
    /// bounds (the caller has checked that something is outstanding).
    fn at_bound(&self, g: &Inner<T>, len: usize) -> bool {
        let l = &self.limits;
        let bytes = g.charged();
        g.out_items() >= l.max_items
            || if l.fill_to_bound {
                bytes >= l.max_bytes
            } else {
                bytes.saturating_add(len) > l.max_bytes
            }
    }

    /// Whether producers waiting for room should be woken now: some wait
    /// and outstanding work is at or below the low-water mark.
    fn room_freed(&self, g: &Inner<T>) -> bool {
        g.room_waiters > 0 && self.below_low(g)
    }

    /// Takes the first item, which stops counting at once (for consumers
    /// that do not report writes). Never waits.
    pub fn pop(&self) -> Option<T> {
        let mut g = self.lock();
        self.pop_locked(&mut g)
    }

    /// Pops under the lock; hands the wake-up on to another consumer when
    /// items remain (a push wakes one consumer per empty → non-empty).
    fn pop_locked(&self, g: &mut Inner<T>) -> Option<T> {
        let item = g.items.pop_front()?;
        g.front_gone(1);
        g.bytes = g.bytes.saturating_sub(item.weigh());
        if self.room_freed(g) {
            self.room.notify_waiters();
        }
        if !g.items.is_empty() {
            self.ready.notify_one();
            if g.blocked > 0 {
                self.ready_blocking.notify_one();
            }
        }
        Some(item)
    }

    /// Moves every queued item into `batch` (which should be empty) and
    /// stops counting them; returns how many. For consumers that do not
    /// call [`Bounded::written`].
    pub fn take_all(&self, batch: &mut VecDeque<T>) -> usize {
        let mut g = self.lock();
        g.bytes = 0;
        std::mem::swap(&mut g.items, batch);
        let n = batch.len();
        g.front_gone(n);
        if self.room_freed(&g) {
            self.room.notify_waiters();
        }
        n
    }

    /// Moves up to `max_items` items and about `max_bytes` bytes (at least
    /// one item when any is queued) into `batch`; they stay outstanding
    /// until the writer reports them with [`Bounded::written`]. Returns
    /// how many items and bytes were taken.
    pub fn take_batch(
        &self,
        batch: &mut VecDeque<T>,
        max_items: usize,
        max_bytes: usize,
    ) -> (usize, usize) {
        let mut g = self.lock();
        let (mut n, mut bytes) = (0usize, 0usize);
        for item in g.items.iter() {
            let len = item.weigh();
            if n >= max_items.max(1) || (n > 0 && bytes.saturating_add(len) > max_bytes) {
                break;
            }
            n += 1;
            bytes += len;
        }
        if n == g.items.len() && batch.is_empty() {
            std::mem::swap(&mut g.items, batch);
        } else {
            batch.extend(g.items.drain(..n));
            if g.items.is_empty() && g.items.capacity() > 1024 {
                // A burst is over: an idle queue keeps no big allocation.
                g.items = VecDeque::new();
            }
        }
        g.front_gone(n);
        g.bytes = g.bytes.saturating_sub(bytes);
        g.taken_items += n;
        g.taken_bytes += bytes;
        (n, bytes)
    }

    /// Reports `items` items of `bytes` bytes from the writer's batch as
    /// written: they stop counting against the bounds, and producers
    /// waiting for room are woken once outstanding work is at or below
    /// the low-water mark.
    pub fn written(&self, items: usize, bytes: usize) {
        let wake = {
            let mut g = self.lock();
            g.taken_items = g.taken_items.saturating_sub(items);
            g.taken_bytes = g.taken_bytes.saturating_sub(bytes);
            self.room_freed(&g)
        };
        if wake {
            self.room.notify_waiters();
        }
    }

    /// Takes out the queued items (not a writer's batch) for which `pick`
    /// is true, keeping the others in order (and the conflation index
    /// right); what is taken stops counting at once, and producers waiting
    /// for room are woken if that made room. The items are returned so
    /// the caller drops them (or moves them elsewhere) outside the lock.
    pub fn take_where(&self, mut pick: impl FnMut(&T) -> bool) -> VecDeque<T> {
        let mut taken = VecDeque::new();
        let wake = {
            let mut g = self.lock();
            if !g.items.iter().any(&mut pick) {
                return taken;
            }
            let picked: Vec<bool> = g.items.iter().map(&mut pick).collect();
            if let Some(k) = &mut g.keys {
                k.retain(|i| !picked[i]);
            }
            let mut keep = VecDeque::new();
            let mut bytes = 0usize;
            for (item, take) in g.items.drain(..).zip(&picked) {
                if *take {
                    bytes += item.weigh();
                    taken.push_back(item);
                } else {
                    keep.push_back(item);
                }
            }
            g.items = keep;
            g.bytes = g.bytes.saturating_sub(bytes);
            self.room_freed(&g)
        };
        if wake {
            self.room.notify_waiters();
        }
        taken
    }

    /// Items and bytes outstanding: queued plus a writer's batch not yet
    /// reported written.
    pub fn outstanding(&self) -> (usize, usize) {
        let g = self.lock();
        (g.out_items(), g.out_bytes())
    }

    /// Heap bytes of a conflating queue's index (0 for a plain queue),
    /// counted against the byte bound beside [`Bounded::outstanding`].
    pub fn index_bytes(&self) -> usize {
        self.lock().index_bytes()
    }

    /// Whether nothing is outstanding (queued or in a writer's batch).
    pub fn is_idle(&self) -> bool {
        self.lock().out_items() == 0
    }

    /// Whether something is outstanding and a bound is reached (items at
    /// the bound, or bytes at or past it): a bounded push must wait.
    pub fn is_full(&self) -> bool {
        let g = self.lock();
        let out = g.out_items();
        out != 0 && (out >= self.limits.max_items || g.charged() >= self.limits.max_bytes)
    }

    /// Whether a producer waiting for room may go on: outstanding work is
    /// at or below the low-water mark (or nothing is outstanding).
    pub fn has_room(&self) -> bool {
        self.below_low(&self.lock())
    }

    /// Wakes every producer waiting for room (for a verdict kept outside
    /// the queue; each re-checks).
    pub fn wake_room(&self) {
        self.room.notify_waiters();
    }

    /// Whether outstanding work is at or below the low-water mark.
    fn below_low(&self, g: &Inner<T>) -> bool {
        let out = g.out_items();
        out == 0 || (out <= self.limits.low_items && g.charged() <= self.limits.low_bytes)
    }

    /// Records that the consumer made progress (its socket accepted bytes).
    pub fn note_progress(&self) {
        self.note_progress_at(Instant::now());
    }

    /// [`Bounded::note_progress`] at a known time.
    pub fn note_progress_at(&self, now: Instant) {
        self.progress_ms.store(self.ms(now), Ordering::Relaxed);
    }

    /// How long since the consumer last made progress (or since work
    /// arrived at an idle queue). Meaningful while something is
    /// outstanding, e.g. right after a push was refused as full.
    pub fn stalled_for(&self) -> Duration {
        self.stalled_at(Instant::now())
    }

    /// [`Bounded::stalled_for`] as of `now`.
    pub fn stalled_at(&self, now: Instant) -> Duration {
        let last = self.progress_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.ms(now).saturating_sub(last))
    }

    /// Waits until an item of `len` bytes fits with outstanding work at or
    /// below the low-water mark, or the queue is closed. Does not push:
    /// the caller pushes next (and waits again if another producer took
    /// the room first). Cancel-safe.
    pub async fn wait_room(&self, len: usize) {
        // Registered before the check, so a `written` between the check
        // and the await is not missed.
        let wait = self.room_wait();
        {
            let g = self.lock();
            let out = g.out_items();
            let fits = out == 0
                || (out < self.limits.max_items
                    && g.charged().saturating_add(len) <= self.limits.max_bytes);
            if g.closed || (fits && self.below_low(&g)) {
                return;
            }
        }
        wait.wait().await;
    }

    /// Registers a wait for room now: the returned [`RoomWait`] completes
    /// at the next wake-up of producers (outstanding work at or below the
    /// low-water mark after room was given back, the queue closed, or
    /// [`Bounded::wake_room`]). Register first, then check what you wait
    /// for, then await: a wake-up between the check and the await is not
    /// missed.
    pub fn room_wait(&self) -> RoomWait<'_, T> {
        let mut notified = Box::pin(self.room.notified());
        notified.as_mut().enable();
        self.lock().room_waiters += 1;
        RoomWait {
            queue: self,
            notified,
        }
    }

    /// Waits for items; returns false once closed and empty. Cancel-safe.
    pub async fn wait(&self) -> bool {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                if !g.items.is_empty() {
                    return true;
                }
                if g.closed {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// Waits for the next item and takes it (forgotten at once); None once
    /// closed and empty. Cancel-safe.
    pub async fn recv(&self) -> Option<T> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut g = self.lock();
                if let Some(item) = self.pop_locked(&mut g) {
                    return Some(item);
                }
                if g.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Blocks the calling thread until an item arrives and takes it; None
    /// once closed and empty, or after `timeout` (None: no limit). Never
    /// call it on an async runtime thread.
    pub fn recv_blocking(&self, timeout: Option<Duration>) -> Option<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.lock();
        loop {
            if let Some(item) = self.pop_locked(&mut g) {
                return Some(item);
            }
            if g.closed {
                return None;
            }
            g.blocked += 1;
            g = match deadline {
                None => self
                    .ready_blocking
                    .wait(g)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        g.blocked -= 1;
                        return None;
                    }
                    self.ready_blocking
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            g.blocked -= 1;
        }
    }

    /// Whether nothing is queued (a batch being written may remain).
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Number of queued items (not counting a batch being written).
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Bytes of the queued items (not counting a batch being written).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Closes the queue: later pushes fail, consumers drain what is left
    /// and stop, producers waiting for room wake up. Returns how many
    /// items were still queued (when `discard`, dropped).
    pub fn close(&self, discard: bool) -> usize {
        let n;
        let gone = {
            let mut g = self.lock();
            g.closed = true;
            n = g.items.len();
            if discard {
                g.bytes = 0;
                g.front_gone(n);
                std::mem::take(&mut g.items)
            } else {
                VecDeque::new()
            }
        };
        drop(gone);
        self.wake_closed();
        n
    }

    /// Closes the queue after queueing `last` (counted, whatever the
    /// bounds) behind what is there, in one step, so nothing can come
    /// between them. Gives `last` back when the queue was already closed
    /// (for the caller to drop).
    pub fn close_with(&self, last: Option<T>) -> Option<T> {
        {
            let mut g = self.lock();
            if g.closed {
                drop(g);
                return last;
            }
            if let Some(item) = last {
                if g.out_items() == 0 {
                    self.note_progress();
                }
                g.bytes += item.weigh();
                g.items.push_back(item);
                if let Some(k) = &mut g.keys {
                    k.pushed_hashed(None);
                }
            }
            g.closed = true;
        }
        self.wake_closed();
        None
    }

    /// Wakes everyone a close concerns: consumers (to drain and stop),
    /// producers waiting for room, and [`Bounded::closed`].
    fn wake_closed(&self) {
        self.ready.notify_waiters();
        self.ready.notify_one();
        self.ready_blocking.notify_all();
        self.room.notify_waiters();
        self.closing.notify_waiters();
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits until the queue is closed. Cancel-safe.
    pub async fn closed(&self) {
        let notified = self.closing.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_closed() {
            return;
        }
        notified.await;
    }

    /// Opens a closed queue again (a client started anew); what it holds
    /// stays.
    pub fn reopen(&self) {
        self.lock().closed = false;
    }
}

/// A producer's registered wait for room ([`Bounded::room_wait`]). It
/// counts as a waiter until dropped, however the wait ends (woken, timed
/// out, cancelled), so wake-ups are sent only while someone listens.
pub struct RoomWait<'a, T> {
    /// The queue waited on (to uncount the waiter when dropped).
    queue: &'a Bounded<T>,
    /// The wake-up, enabled at registration so none is missed between it
    /// and the await; boxed so the wait can be moved before it is awaited.
    notified: Pin<Box<Notified<'a>>>,
}

impl<T> RoomWait<'_, T> {
    /// Waits for the wake-up (the caller re-checks what it waits for).
    pub async fn wait(mut self) {
        self.notified.as_mut().await;
    }
}

impl<T> std::fmt::Debug for RoomWait<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomWait").finish_non_exhaustive()
    }
}

impl<T> Drop for RoomWait<'_, T> {
    fn drop(&mut self) {
        let mut g = self.queue.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.room_waiters = g.room_waiters.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn a_taken_batch_counts_until_written() {
        let q = Bounded::new(4, 1000);
        for _ in 0..4 {
            assert_eq!(q.push(b(10)), Pushed::Ok);
        }
        assert_eq!(q.push(b(10)), Pushed::Full);
        let mut batch = VecDeque::new();
        assert_eq!(q.take_batch(&mut batch, 3, 1 << 20), (3, 30));
        assert_eq!(q.len(), 1);
        // Taken but not written: still full.
        assert_eq!(q.push(b(10)), Pushed::Full);
        q.written(3, 30);
        assert_eq!(q.push(b(10)), Pushed::Ok);
    }

    #[test]
    fn the_byte_bound_refuses_but_one_item_always_fits_an_idle_queue() {
        let q = Bounded::new(100, 50);
        assert_eq!(q.push(b(80)), Pushed::Ok);
        assert_eq!(q.push(b(1)), Pushed::Full);
        assert_eq!(q.pop().map(|x| x.len()), Some(80));
        assert_eq!(q.push(b(30)), Pushed::Ok);
        assert_eq!(q.push(b(30)), Pushed::Full);
        assert_eq!(q.push(b(20)), Pushed::Ok);
    }

    #[test]
    fn a_forced_push_passes_the_bounds_and_counts() {
        let q = Bounded::new(1, 10);
        assert_eq!(q.push(b(5)), Pushed::Ok);
        assert_eq!(q.push_forced(b(50)), Pushed::Ok);
        assert_eq!(q.len(), 2);
        assert_eq!(q.push(b(1)), Pushed::Full);
        q.close(false);
        assert_eq!(q.push_forced(b(1)), Pushed::Closed);
    }

    #[test]
    fn a_batch_is_bounded_in_items_and_bytes_but_takes_at_least_one() {
        let q = Bounded::new(100, 1 << 20);
        q.push(b(600));
        q.push(b(600));
        q.push(b(10));
        let mut batch = VecDeque::new();
        assert_eq!(q.take_batch(&mut batch, 10, 500), (1, 600));
        assert_eq!(q.take_batch(&mut batch, 10, 1000), (2, 610));
        assert_eq!(batch.len(), 3);
    }

    #[test]
    fn take_all_forgets_what_it_took() {
        let q = Bounded::new(2, 1000);
        q.push(b(1));
        q.push(b(1));
        let mut batch = VecDeque::new();
        assert_eq!(q.take_all(&mut batch), 2);
        assert_eq!(q.push(b(1)), Pushed::Ok);
    }

    /// Fills `q` to its item bound (8) with one-byte items unless full
    /// already, has a writer take them all (still outstanding), and starts
    /// a producer waiting for room.
    async fn fill_take_and_wait(q: &Arc<Bounded<Bytes>>) -> tokio::task::JoinHandle<()> {
        while !q.is_full() {
            q.push(b(1));
        }
        let mut batch = VecDeque::new();
        q.take_batch(&mut batch, 8, 1 << 20);
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.wait_room(1).await })
        };
        tokio::task::yield_now().await;
        waiter
    }

    #[tokio::test]
    async fn wait_room_wakes_below_the_low_water_mark_and_on_close() {
        let q = Arc::new(Bounded::new(8, 1 << 20));
        let waiter = fill_take_and_wait(&q).await;
        // 7 outstanding: above the mark (6), the waiter keeps waiting.
        q.written(1, 1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        q.written(2, 2);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("join");
        // A waiter on a full queue wakes when it closes.
        let q2 = Arc::new(Bounded::new(1, 1 << 20));
        q2.push(b(1));
        let w2 = {
            let q2 = q2.clone();
            tokio::spawn(async move { q2.wait_room(1).await })
        };
        tokio::task::yield_now().await;
        q2.close(true);
        tokio::time::timeout(Duration::from_secs(5), w2)
            .await
            .expect("woken by close")
            .expect("join");
    }

    #[test]
    fn an_idle_queue_restarts_the_no_progress_clock() {
        let q = Bounded::new(4, 1000);
        let t0 = q.epoch;
        q.note_progress_at(t0);
        assert_eq!(
            q.stalled_at(t0 + Duration::from_millis(20)),
            Duration::from_millis(20)
        );
        // Work arrives at an idle queue: the clock restarts at the push.
        q.push_at(b(1), t0 + Duration::from_millis(30));
        assert_eq!(
            q.stalled_at(t0 + Duration::from_millis(35)),
            Duration::from_millis(5)
        );
        // Not at the next push while work is outstanding.
        q.push_at(b(1), t0 + Duration::from_millis(40));
        assert_eq!(
            q.stalled_at(t0 + Duration::from_millis(45)),
            Duration::from_millis(15)
        );
    }

    #[tokio::test]
    async fn several_async_consumers_each_get_items_and_end_on_close() {
        let q = Arc::new(Bounded::new(100, 1 << 20));
        let consumers: Vec<_> = (0..3)
            .map(|_| {
                let q = q.clone();
                tokio::spawn(async move {
                    let mut n = 0;
                    while q.recv().await.is_some() {
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        tokio::task::yield_now().await;
        for _ in 0..30 {
            q.push(b(1));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while !q.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("drained");
        q.close(false);
        let mut total = 0;
        for c in consumers {
            total += tokio::time::timeout(Duration::from_secs(5), c)
                .await
                .expect("ended on close")
                .expect("join");
        }
        assert_eq!(total, 30);
    }

    #[test]
    fn a_blocked_consumer_wakes_for_an_item_a_timeout_and_a_close() {
        let q = Arc::new(Bounded::<Bytes>::new(10, 1 << 20));
        assert_eq!(q.recv_blocking(Some(Duration::from_millis(10))), None);
        let t = {
            let q = q.clone();
            std::thread::spawn(move || {
                let first = q.recv_blocking(None).map(|x| x.len());
                let second = q.recv_blocking(None);
                (first, second)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        q.push(b(7));
        std::thread::sleep(Duration::from_millis(20));
        q.close(false);
        assert_eq!(t.join().expect("join"), (Some(7), None));
        q.reopen();
        assert_eq!(q.push(b(1)), Pushed::Ok);
    }

    fn key(k: &str) -> Bytes {
        Bytes::copy_from_slice(k.as_bytes())
    }

    #[test]
    fn a_conflating_queue_keeps_the_newest_per_key_in_its_place() {
        let q = Bounded::conflating(3, 1 << 20);
        assert_eq!(q.push_keyed(b(1), key("a")), (Pushed::Ok, None));
        assert_eq!(q.push_keyed(b(2), key("b")), (Pushed::Ok, None));
        q.push(b(3));
        // Full in items, yet a newer "a" replaces the queued one in place.
        let (p, old) = q.push_keyed(b(10), key("a"));
        assert_eq!((p, old.map(|x| x.len())), (Pushed::Ok, Some(1)));
        assert_eq!(q.push_keyed(b(4), key("c")).0, Pushed::Full);
        let mut batch = VecDeque::new();
        q.take_batch(&mut batch, 1, 1 << 20);
        assert_eq!(batch[0].len(), 10, "the newest a, first in line");
        // "a" left the queue: a new one is a new item, at the back.
        q.written(1, 10);
        assert_eq!(q.push_keyed(b(11), key("a")), (Pushed::Ok, None));
        let lens: Vec<usize> = std::iter::from_fn(|| q.pop()).map(|x| x.len()).collect();
        assert_eq!(lens, vec![2, 3, 11]);
        // Bytes follow the replacement.
        q.push_keyed(b(5), key("z"));
        q.push_keyed(b(7), key("z"));
        let mut batch = VecDeque::new();
        assert_eq!(q.take_batch(&mut batch, 10, 1 << 20), (1, 7));
    }

    #[test]
    fn a_conflating_queue_counts_its_index_against_the_byte_bound() {
        const BOUND: usize = 1 << 20;
        let plain: Bounded<Bytes> = Bounded::new(1 << 20, BOUND);
        let q: Bounded<Bytes> = Bounded::conflating(1 << 20, BOUND);
        let fill = |q: &Bounded<Bytes>| {
            let mut n = 0usize;
            while q.push_keyed(b(100), key(&format!("topic-{n}"))).0 == Pushed::Ok {
                let (_, bytes) = q.outstanding();
                assert!(bytes + q.index_bytes() <= BOUND, "item {n}: past the bound");
                n += 1;
            }
            n
        };
        let (plain_n, n) = (fill(&plain), fill(&q));
        assert_eq!(plain.index_bytes(), 0, "a plain queue keeps no index");
        assert_eq!(plain_n, BOUND / 100, "the items alone fill a plain queue");
        let index = q.index_bytes();
        assert!(
            index > n * 8,
            "the index is counted: {index} bytes for {n} items"
        );
        assert!(
            n < plain_n,
            "its bookkeeping takes room: {n} items of 100 B"
        );
        assert!(!q.has_room(), "refusing: no room for waiting producers");
        // Delivered: the bookkeeping is given back and the queue takes a
        // full load again.
        while q.pop().is_some() {}
        assert!(
            q.index_bytes() < index / 8,
            "{} of {index} kept",
            q.index_bytes()
        );
        assert!(q.has_room());
        assert_eq!(fill(&q), n);
    }

    #[test]
    fn a_queue_reading_keys_from_its_items_conflates_the_same() {
        // Items are (key, payload) byte strings: the key is the first byte.
        let q: Bounded<Bytes> = Bounded::conflating_by(3, 1 << 20, |b: &Bytes| &b[..1]);
        let item = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(q.push_by_key(item("a1")), (Pushed::Ok, None));
        assert_eq!(q.push_by_key(item("b1")), (Pushed::Ok, None));
        let (p, old) = q.push_by_key(item("a2"));
        assert_eq!((p, old), (Pushed::Ok, Some(item("a1"))));
        q.push(item("c1"));
        // Full: a new key is refused, a queued one still replaced.
        assert_eq!(q.push_by_key(item("d1")).0, Pushed::Full);
        assert_eq!(q.push_by_key(item("b2")).1, Some(item("b1")));
        let all: Vec<Bytes> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(all, vec![item("a2"), item("b2"), item("c1")]);
        // Gone from the queue: a new item at the back.
        assert_eq!(q.push_by_key(item("a3")), (Pushed::Ok, None));
    }

    #[test]
    fn a_plain_queue_ignores_keys() {
        let plain = Bounded::new(10, 1 << 20);
        plain.push_keyed(b(1), key("a"));
        assert_eq!(plain.push_keyed(b(2), key("a")).1, None);
        assert_eq!(plain.len(), 2);
    }

    #[tokio::test]
    async fn settable_low_water_marks_and_the_fill_to_bound_rule() {
        // Waiting producers go on at 7 items (not at 3/4 = 6); bytes
        // refused only once the bound is reached.
        let q = Arc::new(Bounded::with_limits(
            Limits::new(8, 100).low_water(7, 99).fill_to_bound(),
            false,
        ));
        assert_eq!(q.limits().low_items, 7);
        for _ in 0..8 {
            q.push(b(1));
        }
        assert!(q.is_full() && !q.has_room());
        let waiter = fill_take_and_wait(&q).await;
        q.written(1, 1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken at 7")
            .expect("join");
        q.written(7, 7);
        // 90 bytes outstanding: a 50-byte push passes the byte bound, the
        // next one is refused (the bound is reached).
        assert_eq!(q.push(b(90)), Pushed::Ok);
        assert_eq!(q.push(b(50)), Pushed::Ok);
        assert_eq!(q.push(b(1)), Pushed::Full);
        assert!(q.is_full());
        // The default rule refuses the item that would pass the bound.
        let plain = Bounded::new(8, 100);
        assert_eq!(plain.push(b(90)), Pushed::Ok);
        assert_eq!(plain.push(b(50)), Pushed::Full);
    }

    #[tokio::test]
    async fn close_with_queues_the_last_item_then_closes_in_one_step() {
        let q = Arc::new(Bounded::new(1, 1 << 20));
        q.push(b(1));
        let closed = {
            let q = q.clone();
            tokio::spawn(async move { q.closed().await })
        };
        tokio::task::yield_now().await;
        // Past the bounds, still counted.
        assert!(q.close_with(Some(b(2))).is_none());
        assert!(q.is_closed());
        assert_eq!(q.outstanding(), (2, 3));
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("closed() woken")
            .expect("join");
        // Already closed: the last item comes back, nothing is queued.
        assert_eq!(q.close_with(Some(b(9))).map(|x| x.len()), Some(9));
        assert_eq!(q.push_forced(b(1)), Pushed::Closed);
        let lens: Vec<usize> = std::iter::from_fn(|| q.pop()).map(|x| x.len()).collect();
        assert_eq!(lens, vec![1, 2]);
        assert!(!q.wait().await, "closed and empty");
    }

    #[tokio::test]
    async fn take_where_keeps_the_index_and_wakes_waiters() {
        let q = Arc::new(Bounded::conflating(4, 1 << 20));
        q.push_keyed(b(1), key("a"));
        q.push(b(2));
        q.push_keyed(b(3), key("b"));
        q.push_keyed(b(4), key("c"));
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.wait_room(1).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // Take out the unkeyed item and "b": 2 outstanding, at the mark (3).
        let taken = q.take_where(|x| x.len() == 2 || x.len() == 3);
        assert_eq!(taken.iter().map(|x| x.len()).collect::<Vec<_>>(), [2, 3]);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the take")
            .expect("join");
        assert_eq!(q.outstanding(), (2, 5));
        // The index follows: "a" and "c" replaced in their new places,
        // "b" is a new item at the back.
        assert_eq!(q.push_keyed(b(11), key("a")).1.map(|x| x.len()), Some(1));
        assert_eq!(q.push_keyed(b(14), key("c")).1.map(|x| x.len()), Some(4));
        assert_eq!(q.push_keyed(b(13), key("b")).1, None);
        let lens: Vec<usize> = std::iter::from_fn(|| q.pop()).map(|x| x.len()).collect();
        assert_eq!(lens, vec![11, 14, 13]);
        assert!(q.take_where(|_| true).is_empty());
    }

    #[tokio::test]
    async fn every_way_room_comes_back_wakes_a_registered_waiter() {
        // Each case fills a queue of 4 (mark 3), registers a wait, then
        // gives room back one way.
        type Free = fn(&Bounded<Bytes>);
        let cases: [(&str, Free); 5] = [
            ("pop", |q| drop(q.pop())),
            ("take_all", |q| {
                q.take_all(&mut VecDeque::new());
            }),
            ("take_where", |q| drop(q.take_where(|x| x.len() == 1))),
            ("written", |q| {
                q.take_batch(&mut VecDeque::new(), 1, 1 << 20);
                q.written(1, 1);
            }),
            ("wake_room", |q| q.wake_room()),
        ];
        for (name, free) in cases {
            let q = Arc::new(Bounded::new(4, 1 << 20));
            q.push(b(1));
            for _ in 0..3 {
                q.push(b(2));
            }
            let wait = q.room_wait();
            assert!(!q.has_room());
            free(&q);
            tokio::time::timeout(Duration::from_secs(5), wait.wait())
                .await
                .unwrap_or_else(|_| panic!("{name} woke the waiter"));
        }
        // A replacement in place by a smaller value gives bytes back.
        // (Bounds leaving room for the index's few hundred bytes.)
        let q = Bounded::with_limits(Limits::new(10, 2000).low_water(10, 1000), true);
        q.push_keyed(b(900), key("a"));
        q.push(b(100));
        let wait = q.room_wait();
        assert!(!q.has_room());
        q.push_keyed(b(5), key("a"));
        tokio::time::timeout(Duration::from_secs(5), wait.wait())
            .await
            .expect("the replacement woke the waiter");
    }
}
