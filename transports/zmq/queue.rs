//! The bounded per-peer queue between whoever produces wire bytes and the
//! one writer task of a connection.
//!
//! - Producers never wait inside [`WireQueue::push`]: a full queue refuses
//!   the new item and says so, so one stalled peer cannot stall the
//!   producers (or, through them, every other peer). A producer that wants
//!   no loss (the proxy's lossless mode) waits *outside*, in its own async
//!   read loop, with [`WireQueue::wait_room`], and gives up on a peer whose
//!   writer made no progress for a while ([`WireQueue::stalled_for`]).
//! - The limits bound what is *outstanding*: queued items plus the batch a
//!   writer took with [`WireQueue::take_batch`] and has not yet reported
//!   written with [`WireQueue::written`]. So the writer holds a bounded
//!   batch, and memory per peer stays within the limits.
//! - [`WireQueue::take_all`] is the simple form for consumers that do not
//!   report what they wrote: it hands over everything and forgets it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

/// Counts and content of a queue, under its lock.
#[derive(Debug, Default)]
struct Inner {
    /// Wire bytes waiting for the writer.
    items: VecDeque<Bytes>,
    /// Sum of the lengths of `items` (for the byte limit).
    bytes: usize,
    /// Items the writer took with `take_batch` and has not reported
    /// written: they still count against the limits, so a writer cannot
    /// hold an unbounded batch outside them.
    taken_items: usize,
    /// Bytes of those items.
    taken_bytes: usize,
    /// Producers waiting in `wait_room`, so `written` notifies only when
    /// someone listens.
    room_waiters: usize,
    /// Set when the writer is gone; pushes then fail.
    closed: bool,
}

impl Inner {
    /// Items not yet written (queued or in the writer's batch).
    fn out_items(&self) -> usize {
        self.items.len() + self.taken_items
    }

    /// Bytes not yet written.
    fn out_bytes(&self) -> usize {
        self.bytes + self.taken_bytes
    }
}

/// A bounded queue of wire bytes with one consumer.
#[derive(Debug)]
pub struct WireQueue {
    /// The items; the lock is held only to push, take a batch or count.
    inner: Mutex<Inner>,
    /// Wakes the writer when the queue goes from empty to non-empty.
    notify: Notify,
    /// Wakes producers waiting for room once outstanding work drained
    /// below the low-water mark (or the queue closed).
    room: Notify,
    /// Maximum number of outstanding items.
    max_items: usize,
    /// Maximum number of outstanding bytes.
    max_bytes: usize,
    /// Items at or below which a waiting producer may push again (3/4 of
    /// the bound: hysteresis, so a waiter is not woken for every item).
    low_items: usize,
    /// Bytes at or below which a waiting producer may push again.
    low_bytes: usize,
    /// Origin of `progress_ms` (a monotonic clock).
    epoch: Instant,
    /// Milliseconds after `epoch` of the writer's last progress (bytes
    /// accepted by its socket), or of the moment work arrived at an idle
    /// queue. Atomic so the writer records it without the lock.
    progress_ms: AtomicU64,
}

/// Outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Ok,
    /// Dropped: the queue is full.
    Full,
    /// Dropped: the writer has stopped.
    Closed,
}

impl WireQueue {
    /// A queue holding at most `max_items` items and `max_bytes` bytes
    /// outstanding (one item is always accepted when nothing is
    /// outstanding).
    pub fn new(max_items: usize, max_bytes: usize) -> WireQueue {
        let max_items = max_items.max(1);
        WireQueue {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            room: Notify::new(),
            max_items,
            max_bytes,
            low_items: max_items / 4 * 3,
            low_bytes: max_bytes / 4 * 3,
            epoch: Instant::now(),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Milliseconds since `epoch`, now.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Queues `item` unless full or closed. Never waits.
    pub fn push(&self, item: Bytes) -> Pushed {
        let was_empty;
        {
            let mut g = self.lock();
            if g.closed {
                return Pushed::Closed;
            }
            let out = g.out_items();
            if out != 0
                && (out >= self.max_items
                    || g.out_bytes().saturating_add(item.len()) > self.max_bytes)
            {
                return Pushed::Full;
            }
            if out == 0 {
                // Work arrives at an idle writer: its no-progress clock
                // starts now, not at its last write long ago.
                self.note_progress();
            }
            was_empty = g.items.is_empty();
            g.bytes += item.len();
            g.items.push_back(item);
        }
        if was_empty {
            self.notify.notify_one();
        }
        Pushed::Ok
    }

    /// Moves every queued item into `batch` (which should be empty) and
    /// stops counting them; returns how many. For consumers that do not
    /// call [`WireQueue::written`].
    pub fn take_all(&self, batch: &mut VecDeque<Bytes>) -> usize {
        let mut g = self.lock();
        g.bytes = 0;
        std::mem::swap(&mut g.items, batch);
        batch.len()
    }

    /// Moves up to `max_items` items and about `max_bytes` bytes (at least
    /// one item when any is queued) into `batch`; they stay outstanding
    /// until the writer reports them with [`WireQueue::written`]. Returns
    /// how many items and bytes were taken.
    pub fn take_batch(
        &self,
        batch: &mut VecDeque<Bytes>,
        max_items: usize,
        max_bytes: usize,
    ) -> (usize, usize) {
        let mut g = self.lock();
        let (mut n, mut bytes) = (0usize, 0usize);
        for item in g.items.iter() {
            if n >= max_items.max(1) || (n > 0 && bytes.saturating_add(item.len()) > max_bytes) {
                break;
            }
            n += 1;
            bytes += item.len();
        }
        batch.extend(g.items.drain(..n));
        g.bytes = g.bytes.saturating_sub(bytes);
        g.taken_items += n;
        g.taken_bytes += bytes;
        (n, bytes)
    }

    /// Reports `items` items of `bytes` bytes from the writer's batch as
    /// written: they stop counting against the limits, and producers
    /// waiting for room are woken once outstanding work is at or below
    /// the low-water mark.
    pub fn written(&self, items: usize, bytes: usize) {
        let wake = {
            let mut g = self.lock();
            g.taken_items = g.taken_items.saturating_sub(items);
            g.taken_bytes = g.taken_bytes.saturating_sub(bytes);
            g.room_waiters > 0 && self.below_low(&g)
        };
        if wake {
            self.room.notify_waiters();
        }
    }

    /// Whether outstanding work is at or below the low-water mark.
    fn below_low(&self, g: &Inner) -> bool {
        g.out_items() <= self.low_items && g.out_bytes() <= self.low_bytes
    }

    /// Records that the writer made progress (its socket accepted bytes).
    pub fn note_progress(&self) {
        self.progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long since the writer last made progress (or since work
    /// arrived at an idle queue). Meaningful while something is
    /// outstanding, e.g. right after a push was refused as full.
    pub fn stalled_for(&self) -> Duration {
        let last = self.progress_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(last))
    }

    /// Waits until an item of `len` bytes fits with outstanding work at or
    /// below the low-water mark, or the queue is closed. Does not push:
    /// the caller pushes next (and waits again if another producer took
    /// the room first). Cancel-safe.
    pub async fn wait_room(&self, len: usize) {
        let notified = self.room.notified();
        tokio::pin!(notified);
        // Registered before the check, so a `written` between the check
        // and the await is not missed.
        notified.as_mut().enable();
        let _waiter = {
            let mut g = self.lock();
            let out = g.out_items();
            let fits = out == 0
                || (out < self.max_items && g.out_bytes().saturating_add(len) <= self.max_bytes);
            if g.closed || (fits && self.below_low(&g)) {
                return;
            }
            g.room_waiters += 1;
            WaiterGuard(self)
        };
        notified.await;
    }

    /// Waits for items; returns false once closed and empty.
    pub async fn wait(&self) -> bool {
        loop {
            let notified = self.notify.notified();
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

    /// Whether nothing is queued (a batch being written may remain).
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Number of queued items (not counting a batch being written).
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Closes the queue: later pushes fail, the writer drains and stops,
    /// producers waiting for room wake up. Returns how many items were
    /// still queued (when `discard`, dropped).
    pub fn close(&self, discard: bool) -> usize {
        let n;
        {
            let mut g = self.lock();
            g.closed = true;
            n = g.items.len();
            if discard {
                g.items.clear();
                g.bytes = 0;
            }
        }
        self.notify.notify_one();
        self.room.notify_waiters();
        n
    }
}

/// Counts one producer in `wait_room` until it stops waiting, however it
/// stops (woken, timed out, cancelled).
struct WaiterGuard<'a>(&'a WireQueue);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.room_waiters = g.room_waiters.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn a_taken_batch_counts_until_written() {
        let q = WireQueue::new(4, 1000);
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
    fn a_batch_is_bounded_in_items_and_bytes_but_takes_at_least_one() {
        let q = WireQueue::new(100, 1 << 20);
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
        let q = WireQueue::new(2, 1000);
        q.push(b(1));
        q.push(b(1));
        let mut batch = VecDeque::new();
        assert_eq!(q.take_all(&mut batch), 2);
        assert_eq!(q.push(b(1)), Pushed::Ok);
    }

    #[tokio::test]
    async fn wait_room_wakes_below_the_low_water_mark_and_on_close() {
        let q = std::sync::Arc::new(WireQueue::new(8, 1 << 20));
        for _ in 0..8 {
            q.push(b(1));
        }
        let mut batch = VecDeque::new();
        q.take_batch(&mut batch, 8, 1 << 20);
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.wait_room(1).await })
        };
        tokio::task::yield_now().await;
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
        let q2 = std::sync::Arc::new(WireQueue::new(1, 1 << 20));
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
        let q = WireQueue::new(4, 1000);
        q.progress_ms.store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert!(q.stalled_for() >= Duration::from_millis(20));
        q.push(b(1));
        // The clock restarted at the push (stored time moved forward).
        assert!(q.progress_ms.load(Ordering::Relaxed) >= 20);
        // Not at the next push while work is outstanding.
        let at = q.progress_ms.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        q.push(b(1));
        assert_eq!(q.progress_ms.load(Ordering::Relaxed), at);
    }
}
