//! The bounded queue between the router and one session's writer, and the
//! byte budget all queues share.
//!
//! A queue is the crate's one bounded queue, [`Bounded`], over
//! deliveries, plus what only sessions need: the shared [`Budget`], the
//! stuck verdict, and replies kept when routed traffic is taken out.
//! It is bounded in bytes and in deliveries. What counts is every
//! delivery pushed and not yet written to the socket: the ones waiting
//! here and the small batch the writer has taken. The router pushes
//! without ever waiting: a push into a full queue fails with
//! [`PushError::Full`] and the router tells the sending session to wait
//! ("blocked on X"); the sender then awaits [`Outbox::room`] until the
//! writer has drained below the low-water mark. The writer reports every
//! write ([`OutboxReader::written`]), which is also the queue's *progress*:
//! a queue that holds deliveries and made no progress for the
//! slow-consumer timeout is declared stuck ([`Outbox::mark_stuck`]), and
//! its senders stop waiting for it.
//!
//! Replies (errors, acks, lists) and replays are pushed with
//! [`Outbox::push_forced`]: never refused for space, always counted, so a
//! requester that does not read its replies sees its own queue full and is
//! held back like any other sender.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::bounded::{Bounded, Pushed, Weigh};
use crate::delivery::Delivery;

/// Why a push did not enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue (or the shared budget) is at its bound: the sender waits.
    #[error("outbox full")]
    Full,
    /// The receiver made no progress for the slow-consumer timeout; what
    /// is sent to it now is dropped (and counted) until it writes again.
    #[error("receiver stuck")]
    Stuck,
    /// The session is closing; nothing more is accepted.
    #[error("outbox closed")]
    Closed,
}

/// The byte budget shared by every outbox and held mailbox of a bus: a
/// bound on everything the bus keeps queued, whoever it is for.
#[derive(Debug)]
pub struct Budget {
    /// Bytes charged now.
    used: AtomicUsize,
    /// The bound; a bounded push that would pass it is refused.
    limit: usize,
    /// The most charged since [`Budget::take_peak`] last looked.
    peak: AtomicUsize,
    /// Senders waiting for the budget to fall below its low-water mark.
    waiters: AtomicUsize,
    /// Wakes them.
    room: Notify,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit: limit.max(1),
            peak: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            room: Notify::new(),
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// True when a bounded push must wait.
    pub fn full(&self) -> bool {
        self.used() >= self.limit
    }

    /// True when a waiting sender may go on (below 7/8 of the bound).
    pub fn has_room(&self) -> bool {
        self.used() < self.limit - self.limit / 8
    }

    /// Charges `n` bytes.
    pub fn charge(&self, n: usize) {
        let now = self.used.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// The most charged since the last call, and the use now.
    pub fn take_peak(&self) -> (usize, usize) {
        let used = self.used();
        (self.peak.swap(used, Ordering::Relaxed), used)
    }

    /// Gives back `n` bytes, waking waiters once below the low-water mark.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::Relaxed);
        if self.waiters.load(Ordering::Relaxed) > 0 && self.has_room() {
            self.room.notify_waiters();
        }
    }

    /// Waits until the budget has room (the caller re-checks).
    pub async fn room(&self) {
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let _guard = Decrement(&self.waiters);
        if self.has_room() {
            return;
        }
        notified.await;
    }
}

/// Decrements a waiter count when a wait ends, however it ends.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The bounds of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most deliveries outstanding (queued or being written).
    pub items: usize,
    /// Most bytes outstanding (each delivery counts its wire length plus
    /// [`Delivery::OVERHEAD`]).
    pub bytes: usize,
    /// Whether keyed pushes ([`Outbox::push_keyed`]) replace a queued
    /// delivery of the same key (conflation).
    pub conflate: bool,
}

impl Bounds {
    /// A queue bounded at `items` deliveries and `bytes` bytes.
    pub fn new(items: usize, bytes: usize) -> Bounds {
        Bounds {
            items: items.max(1),
            bytes: bytes.max(1),
            conflate: false,
        }
    }

    /// The same bounds for a conflating queue.
    pub fn conflating(self, on: bool) -> Bounds {
        Bounds {
            conflate: on,
            ..self
        }
    }
}

/// What both ends of one session's queue share.
struct Shared {
    /// The deliveries: bounded in items and bytes, outstanding until the
    /// writer reports them written, with the progress clock the
    /// slow-consumer verdict reads.
    queue: Bounded<Delivery>,
    /// The budget every outbox of the bus shares: charged at push, given
    /// back at write.
    budget: Arc<Budget>,
    /// Declared by a sender that waited past the slow-consumer timeout;
    /// cleared by the next write.
    stuck: AtomicBool,
    /// Wakes senders waiting on the shared budget alone when a verdict
    /// comes (stuck or closed).
    verdict: Notify,
    /// Wakes whoever waits for the queue to close (the writer, to bound
    /// how long it may still take).
    closing: Notify,
}

impl Weigh for Delivery {
    fn weigh(&self) -> usize {
        self.charge()
    }
}

impl Shared {
    /// Gives back the budget of deliveries that stopped counting.
    fn release<'a>(&self, gone: impl IntoIterator<Item = &'a Delivery>) {
        let bytes: usize = gone.into_iter().map(Delivery::charge).sum();
        self.budget.release(bytes);
    }

    fn pushed(&self, r: Pushed, charge: usize) -> Result<(), PushError> {
        match r {
            Pushed::Ok => {
                self.budget.charge(charge);
                Ok(())
            }
            Pushed::Full => Err(PushError::Full),
            Pushed::Closed => Err(PushError::Closed),
        }
    }
}

/// The router's end of a session's queue (cheap to clone).
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("items", &self.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// The writer's end of a session's queue.
pub struct OutboxReader {
    shared: Arc<Shared>,
}

/// Makes a queue with the given bounds, charging `budget`.
pub fn outbox(bounds: Bounds, budget: Arc<Budget>) -> (Outbox, OutboxReader) {
    let shared = Arc::new(Shared {
        queue: if bounds.conflate {
            Bounded::conflating(bounds.items, bounds.bytes)
        } else {
            Bounded::new(bounds.items, bounds.bytes)
        },
        budget,
        stuck: AtomicBool::new(false),
        verdict: Notify::new(),
        closing: Notify::new(),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReader { shared },
    )
}

/// A queue with its own budget of `bytes` (tests, transports' sinks).
pub fn standalone(items: usize, bytes: usize) -> (Outbox, OutboxReader) {
    outbox(Bounds::new(items, bytes), Budget::new(usize::MAX / 2))
}

impl Outbox {
    /// Enqueues within the bounds. `Full` means: wait for [`Outbox::room`]
    /// (an empty queue always takes one delivery, so a message larger
    /// than the bound still goes through, alone).
    pub fn push(&self, d: Delivery) -> Result<(), PushError> {
        let sh = &*self.shared;
        if sh.stuck.load(Ordering::Relaxed) {
            return Err(PushError::Stuck);
        }
        let charge = d.charge();
        sh.pushed(sh.queue.push_unless(d, sh.budget.full()), charge)
    }

    /// [`Outbox::push`] under `key` (a topic): in a conflating outbox a
    /// delivery of the same key still queued is replaced in its place,
    /// whatever the bounds, and returned (the caller counts it). A plain
    /// outbox ignores the key.
    pub fn push_keyed(&self, d: Delivery, key: Bytes) -> Result<Option<Delivery>, PushError> {
        let sh = &*self.shared;
        if sh.stuck.load(Ordering::Relaxed) {
            return Err(PushError::Stuck);
        }
        let charge = d.charge();
        let (pushed, old) = sh.queue.push_keyed(d, key, sh.budget.full());
        sh.pushed(pushed, charge)?;
        if let Some(old) = &old {
            sh.budget.release(old.charge());
        }
        Ok(old)
    }

    /// Enqueues past the bounds, still counted: replies and acks (which
    /// are never dropped), held messages replayed at re-register, and a
    /// message its sender already waited for.
    pub fn push_forced(&self, d: Delivery) -> Result<(), PushError> {
        let sh = &*self.shared;
        let charge = d.charge();
        sh.pushed(sh.queue.push_forced(d), charge)
    }

    /// Closes the queue: `last` (a reason frame) is queued after what is
    /// already there, the writer drains it all and ends the connection.
    pub fn close(&self, last: Option<Delivery>) {
        let sh = &*self.shared;
        let charge = last.as_ref().map_or(0, Delivery::charge);
        match sh.queue.close_with(last) {
            // Already closed: `last` is dropped here, outside the lock.
            Some(_) => return,
            None => sh.budget.charge(charge),
        }
        sh.verdict.notify_waiters();
        sh.closing.notify_waiters();
    }

    /// Takes out the routed traffic queued that the writer has not taken
    /// yet (the writer's current batch and replies stay: replies are never
    /// dropped). The bytes are given back.
    pub fn discard(&self) -> Vec<Delivery> {
        let mut out = VecDeque::new();
        self.take_routed(&mut out);
        out.into()
    }

    /// Closes the queue and takes out everything it holds, replies too (a
    /// slow consumer being disconnected gets only `last`). Returns what
    /// was taken out.
    pub fn abort(&self, last: Option<Delivery>) -> Vec<Delivery> {
        let taken = self.shared.queue.take_where(|_| true);
        self.shared.release(&taken);
        self.close(last);
        taken.into()
    }

    /// Moves the routed traffic queued into `out` (the session is going
    /// away and its name is held); replies stay for the writer to send.
    pub fn take_routed(&self, out: &mut VecDeque<Delivery>) {
        let moved = self.shared.queue.take_where(|d| !d.is_reply());
        self.shared.release(&moved);
        out.extend(moved);
    }

    /// Declares the receiver stuck (no progress for the slow-consumer
    /// timeout): pushes fail with `Stuck` until it writes again, and every
    /// waiting sender is woken to see it.
    pub fn mark_stuck(&self) {
        let sh = &*self.shared;
        sh.stuck.store(true, Ordering::Relaxed);
        sh.queue.wake_producers();
        sh.verdict.notify_waiters();
    }

    /// True while declared stuck.
    pub fn is_stuck(&self) -> bool {
        self.shared.stuck.load(Ordering::Relaxed)
    }

    /// True when a sender blocked on this queue may go on: below the
    /// low-water mark (3/4 of each bound) with the shared budget below
    /// its own, or empty.
    pub fn has_room(&self) -> bool {
        let sh = &*self.shared;
        let (items, _) = sh.queue.outstanding();
        items == 0 || (sh.queue.has_room() && sh.budget.has_room())
    }

    /// True when at or past a bound (its own session should stop reading
    /// requests until its replies drain).
    pub fn over_bound(&self) -> bool {
        let sh = &*self.shared;
        sh.queue.is_full() || (sh.budget.full() && !sh.queue.is_idle())
    }

    /// Waits until the writer drained some, the queue closed or was
    /// declared stuck, or the budget freed up; the caller re-checks.
    pub async fn room(&self) {
        let sh = &*self.shared;
        let stuck = || sh.stuck.load(Ordering::Relaxed);
        if !sh.queue.has_room() {
            // Woken below the low-water mark, at close, or by a verdict.
            sh.queue.wait_room_unless(0, stuck).await;
            return;
        }
        // Only the shared budget is short (or nothing is).
        let verdict = sh.verdict.notified();
        tokio::pin!(verdict);
        verdict.as_mut().enable();
        if stuck() || sh.budget.has_room() || sh.queue.is_closed() {
            return;
        }
        tokio::select! {
            _ = verdict => {}
            _ = sh.budget.room() => {}
        }
    }

    /// How long the receiver has made no progress (nothing written since
    /// work arrived at its idle queue or since its last write).
    pub fn stalled_for(&self) -> Duration {
        self.shared.queue.stalled_for()
    }

    /// Deliveries outstanding now (queued or being written).
    pub fn len(&self) -> usize {
        self.shared.queue.outstanding().0
    }

    /// Bytes outstanding now.
    pub fn bytes(&self) -> usize {
        self.shared.queue.outstanding().1
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.shared.queue.is_idle()
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.shared.queue.is_closed()
    }

    /// True when both handles are the same queue.
    pub fn same(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Most deliveries a writer takes at once: the rest stay in the queue,
/// where a slow-consumer decision can still discard them.
pub const WRITER_BATCH: usize = 256;

impl OutboxReader {
    /// Waits until something is queued, then moves up to
    /// [`WRITER_BATCH`] deliveries into `batch` (appending). Returns false
    /// when the outbox is closed and empty: the writer should end the
    /// connection.
    pub async fn recv_batch(&mut self, batch: &mut VecDeque<Delivery>) -> bool {
        loop {
            if !self.shared.queue.wait().await {
                return false;
            }
            if self.try_recv_batch(batch) > 0 {
                return true;
            }
        }
    }

    /// Takes up to [`WRITER_BATCH`] deliveries now without waiting.
    pub fn try_recv_batch(&mut self, batch: &mut VecDeque<Delivery>) -> usize {
        self.shared
            .queue
            .take_batch(batch, WRITER_BATCH, usize::MAX)
            .0
    }

    /// Reports deliveries written to the socket (or given up by the
    /// writer): their bytes are given back, the receiver made progress.
    pub fn written(&self, items: usize, bytes: usize) {
        let sh = &*self.shared;
        sh.queue.note_progress();
        if sh.stuck.load(Ordering::Relaxed) {
            sh.stuck.store(false, Ordering::Relaxed);
        }
        self.forget(items, bytes);
    }

    /// Waits until the queue is closed.
    pub async fn closed(&self) {
        let notified = self.shared.closing.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.shared.queue.is_closed() {
            return;
        }
        notified.await;
    }

    /// Gives back the bytes of deliveries the writer took and will not
    /// write (its connection ended); not progress.
    pub fn forget(&self, items: usize, bytes: usize) {
        if items == 0 && bytes == 0 {
            return;
        }
        self.shared.queue.written(items, bytes);
        self.shared.budget.release(bytes);
    }

    /// A handle for pushing into this same queue (e.g. the session's own
    /// replies).
    pub fn outbox(&self) -> Outbox {
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Delivery {
        Delivery::frame(Bytes::from(vec![0, 0, 0, 1, n]))
    }

    fn drain_all(rx: &mut OutboxReader) -> Vec<u8> {
        let mut b = VecDeque::new();
        rx.try_recv_batch(&mut b);
        let bytes = b.iter().map(Delivery::charge).sum();
        rx.written(b.len(), bytes);
        b.iter().map(|x| x.unix_frame()[4]).collect()
    }

    #[tokio::test]
    async fn bounded_backpressure_then_room_after_writes() {
        let (tx, mut rx) = standalone(4, 1 << 20);
        for n in 0..4 {
            tx.push(d(n)).unwrap();
        }
        assert_eq!(tx.push(d(9)), Err(PushError::Full));
        assert!(!tx.has_room());
        // Replies are never refused for space, and they count.
        tx.push_forced(d(4)).unwrap();
        assert_eq!(tx.len(), 5);
        assert_eq!(drain_all(&mut rx), vec![0, 1, 2, 3, 4]);
        assert!(tx.has_room() && tx.is_empty());
        tokio::time::timeout(std::time::Duration::from_secs(1), tx.room())
            .await
            .expect("room is there at once");
        tx.close(Some(d(5)));
        assert_eq!(tx.push(d(6)), Err(PushError::Closed));
        assert_eq!(drain_all(&mut rx), vec![5]);
        let mut b = VecDeque::new();
        assert!(!rx.recv_batch(&mut b).await);
    }

    #[tokio::test]
    async fn bytes_bound_and_budget_refuse_and_a_lone_big_one_passes() {
        let budget = Budget::new(10_000);
        let (tx, mut rx) = outbox(Bounds::new(100, 1_000), budget.clone());
        let big = Delivery::frame(Bytes::from(vec![0u8; 5_000]));
        tx.push(big.clone())
            .expect("an empty queue takes one of any size");
        assert_eq!(tx.push(d(1)), Err(PushError::Full));
        assert_eq!(budget.used(), big.charge());
        drain_all(&mut rx);
        assert_eq!(budget.used(), 0);
        // The shared budget refuses even when this queue has room.
        let (other, _orx) = outbox(Bounds::new(100, 1 << 20), budget.clone());
        other
            .push(Delivery::frame(Bytes::from(vec![0u8; 10_000])))
            .unwrap();
        tx.push(d(1)).unwrap();
        assert_eq!(tx.push(d(2)), Err(PushError::Full));
    }

    #[tokio::test]
    async fn waiters_wake_on_drain_and_on_stuck() {
        // Fills the queue, then waits for room in a task of its own.
        let full_then_wait = |tx: &Outbox| {
            for n in 0..4 {
                tx.push(d(n)).unwrap();
            }
            let tx = tx.clone();
            tokio::spawn(async move { tx.room().await })
        };
        let (tx, mut rx) = standalone(4, 1 << 20);
        let waiter = full_then_wait(&tx);
        tokio::task::yield_now().await;
        drain_all(&mut rx);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the drain")
            .unwrap();

        let waiter = full_then_wait(&tx);
        tokio::task::yield_now().await;
        tx.mark_stuck();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the verdict")
            .unwrap();
        assert_eq!(tx.push(d(9)), Err(PushError::Stuck));
        assert_eq!(tx.discard().len(), 4);
        rx.written(0, 0);
        assert!(!tx.is_stuck(), "progress clears the verdict");
    }

    #[test]
    fn writer_takes_a_bounded_batch() {
        let (tx, mut rx) = standalone(10_000, 1 << 30);
        for _ in 0..(WRITER_BATCH + 10) {
            tx.push(d(0)).unwrap();
        }
        let mut b = VecDeque::new();
        assert_eq!(rx.try_recv_batch(&mut b), WRITER_BATCH);
        assert_eq!(tx.discard().len(), 10);
        assert_eq!(tx.len(), WRITER_BATCH, "the writer's batch still counts");
    }
}
