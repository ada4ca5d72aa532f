//! The bounded queue between the router and one session's writer, and the
//! byte budget all queues share.
//!
//! A queue is the crate's one bounded queue, [`Bounded`], over
//! deliveries (each weighs its [`Delivery::charge`]), plus what only
//! sessions need on top: the shared [`Budget`], the stuck verdict, and
//! replies kept when routed traffic is taken out. The queue, its item and
//! byte counts, the progress clock, the writer's wake-up, the conflation
//! index and closing all live in the [`Bounded`].
//!
//! A queue is bounded in bytes and in deliveries. What counts is every
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

use crate::bounded::{Bounded, Limits, Pushed, Weigh};
use crate::delivery::Delivery;

/// The low-water mark of a bound: a sender blocked on a full queue goes on
/// once the queue is below it. It sits 1/128 of the bound under the
/// bound, not far below it: a waiting sender stops reading its socket,
/// and some clients give up a write the bus holds back for long (the
/// reference 0.7.0 client drops, silently, a message whose write took
/// 1 s). So a wait lasts while the receiver reads 1/128 of its queue (128
/// deliveries by default), not a quarter of it; the gap still spares a
/// wake-up per written delivery.
fn low_water(bound: usize) -> usize {
    bound - (bound / 128).max(1).min(bound)
}

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

    /// Gives back `n` bytes charged for a push that was then refused: no
    /// wake-up (nothing was queued, so no room was made).
    fn refund(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
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
    /// topic delivery of the same topic (conflation).
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

    /// The same bounds, conflating when `on`.
    pub fn conflating(self, on: bool) -> Bounds {
        Bounds {
            conflate: on,
            ..self
        }
    }
}

impl Weigh for Delivery {
    fn weigh(&self) -> usize {
        self.charge()
    }
}

/// What both ends of a session's queue share.
struct Shared {
    /// The deliveries outstanding, their counts, the progress clock, the
    /// writer's and waiting senders' wake-ups, the conflation index and
    /// the closed flag.
    queue: Bounded<Delivery>,
    /// The budget every outbox of the bus shares: charged at push, given
    /// back when a delivery is written, forgotten or taken out.
    budget: Arc<Budget>,
    /// Declared by a sender that waited past the slow-consumer timeout;
    /// cleared by the next write.
    stuck: AtomicBool,
}

impl Shared {
    /// Charges the budget for `d` before it is pushed (so a write reported
    /// right after the push never gives back bytes not yet charged), and
    /// pushes it; a refusal gives the charge back.
    fn push(
        &self,
        d: Delivery,
        key: Option<Bytes>,
        forced: bool,
    ) -> Result<Option<Delivery>, PushError> {
        let n = d.charge();
        // Read before this push is charged: the budget refuses once it is
        // full, as each queue's own byte bound does.
        let budget_full = !forced && self.budget.full();
        self.budget.charge(n);
        let (pushed, old) = if forced {
            (self.queue.push_forced(d), None)
        } else {
            self.queue.push_within(d, key, budget_full)
        };
        match pushed {
            Pushed::Ok => {
                if let Some(old) = &old {
                    self.budget.release(old.charge());
                }
                Ok(old)
            }
            Pushed::Full => {
                self.budget.refund(n);
                Err(PushError::Full)
            }
            Pushed::Closed => {
                self.budget.refund(n);
                Err(PushError::Closed)
            }
        }
    }

    /// Whether at or past a bound (the queue's own, or the budget while
    /// something is outstanding).
    fn over_bound(&self) -> bool {
        self.queue.is_full() || (self.budget.full() && !self.queue.is_idle())
    }

    /// Gives back the budget of deliveries taken out of the queue.
    fn release<'a>(&self, gone: impl IntoIterator<Item = &'a Delivery>) {
        self.budget
            .release(gone.into_iter().map(Delivery::charge).sum());
    }
}

/// The router's end of a session's queue (cheap to clone).
#[derive(Clone)]
pub struct Outbox {
    /// The queue, shared with the writer's end.
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
    /// The queue, shared with the router's end.
    shared: Arc<Shared>,
}

/// Makes a queue with the given bounds, charging `budget`.
pub fn outbox(bounds: Bounds, budget: Arc<Budget>) -> (Outbox, OutboxReader) {
    // Waiting senders go on below `low_water` of each bound (the queue's
    // marks are inclusive, hence the -1); the byte bound refuses once
    // reached, so a push may pass it by its own length.
    let limits = Limits::new(bounds.items, bounds.bytes)
        .low_water(
            low_water(bounds.items).saturating_sub(1),
            low_water(bounds.bytes).saturating_sub(1),
        )
        .fill_to_bound();
    let shared = Arc::new(Shared {
        queue: Bounded::with_limits(limits, bounds.conflate),
        budget,
        stuck: AtomicBool::new(false),
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
        match sh.push(d, None, false) {
            Ok(_) => Ok(()),
            // A closed queue at its bound says Full (its sender waits and
            // then sees it gone), as it always has.
            Err(PushError::Closed) if sh.over_bound() => Err(PushError::Full),
            Err(e) => Err(e),
        }
    }

    /// [`Outbox::push`] of a topic delivery under its topic `key`: in a
    /// conflating outbox a queued delivery of the same topic (not yet
    /// taken by the writer) is replaced in its place, whatever the bounds,
    /// and returned for the caller to count (and drop outside the lock).
    pub fn push_keyed(&self, d: Delivery, key: Bytes) -> Result<Option<Delivery>, PushError> {
        let sh = &*self.shared;
        if !sh.queue.is_conflating() {
            return self.push(d).map(|()| None);
        }
        if sh.stuck.load(Ordering::Relaxed) {
            return Err(PushError::Stuck);
        }
        sh.push(d, Some(key), false)
    }

    /// Enqueues past the bounds, still counted: replies and acks (which
    /// are never dropped), held messages replayed at re-register, and a
    /// message its sender already waited for.
    pub fn push_forced(&self, d: Delivery) -> Result<(), PushError> {
        self.shared.push(d, None, true).map(|_| ())
    }

    /// Closes the queue: `last` (a reason frame) is queued after what is
    /// already there, the writer drains it all and ends the connection.
    pub fn close(&self, last: Option<Delivery>) {
        let sh = &*self.shared;
        let n = last.as_ref().map_or(0, Delivery::charge);
        sh.budget.charge(n);
        if let Some(back) = sh.queue.close_with(last) {
            // Already closed: `last` is not queued.
            sh.budget.refund(n);
            drop(back);
        }
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
        self.shared.stuck.store(true, Ordering::Relaxed);
        self.shared.queue.wake_room();
    }

    /// True while declared stuck.
    pub fn is_stuck(&self) -> bool {
        self.shared.stuck.load(Ordering::Relaxed)
    }

    /// True when a sender blocked on this queue may go on: below the
    /// low-water mark of each bound (see `low_water`) with room in the
    /// budget, or empty.
    pub fn has_room(&self) -> bool {
        let sh = &*self.shared;
        // The queue's room includes "nothing outstanding"; an idle queue
        // has room whatever the budget.
        sh.queue.has_room() && (sh.budget.has_room() || sh.queue.is_idle())
    }

    /// True when at or past a bound (its own session should stop reading
    /// requests until its replies drain).
    pub fn over_bound(&self) -> bool {
        self.shared.over_bound()
    }

    /// Waits until the writer drained some, the queue closed or was
    /// declared stuck, or the budget freed up; the caller re-checks.
    pub async fn room(&self) {
        let sh = &*self.shared;
        // Registered before the checks, so a wake-up between them and the
        // await is not missed.
        let wait = sh.queue.room_wait();
        if self.has_room() || self.is_closed() || self.is_stuck() {
            return;
        }
        if !sh.budget.has_room() {
            tokio::select! {
                _ = wait.wait() => {}
                _ = sh.budget.room() => {}
            }
        } else {
            wait.wait().await;
        }
    }

    /// How long since the receiver last made progress (a write, or work
    /// arriving while nothing was outstanding).
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

    /// Bytes of the conflation index (a conflating outbox; 0 otherwise),
    /// counted against the outbox's byte bound beside [`Self::bytes`].
    pub fn index_bytes(&self) -> usize {
        self.shared.queue.index_bytes()
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
            // None when a take-out emptied the queue since the wake-up.
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
        self.shared.queue.closed().await;
    }

    /// Gives back the bytes of deliveries the writer took and will not
    /// write (its connection ended); not progress.
    pub fn forget(&self, items: usize, bytes: usize) {
        let sh = &*self.shared;
        sh.budget.release(bytes);
        sh.queue.written(items, bytes);
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

    fn topic(t: &str, v: u64) -> Delivery {
        Delivery::topic(crate::TopicMessage {
            topic: t.into(),
            origin: "o".into(),
            data: serde_json::value::to_raw_value(&v).unwrap(),
            ts: 0.0,
            seq: None,
        })
    }

    fn key(t: &str) -> Bytes {
        Bytes::copy_from_slice(t.as_bytes())
    }

    #[test]
    fn a_conflating_outbox_replaces_a_queued_topic_in_its_place() {
        let (tx, mut rx) = outbox(
            Bounds::new(2, 1 << 20).conflating(true),
            Budget::new(1 << 30),
        );
        assert!(tx.push_keyed(topic("a", 1), key("a")).unwrap().is_none());
        assert!(tx.push_keyed(topic("b", 1), key("b")).unwrap().is_none());
        // Full at two, yet a newer "a" takes the queued one's place.
        assert!(tx.push_keyed(topic("a", 2), key("a")).unwrap().is_some());
        assert_eq!(
            tx.push_keyed(topic("c", 1), key("c")).err(),
            Some(PushError::Full)
        );
        let mut b = VecDeque::new();
        assert_eq!(rx.try_recv_batch(&mut b), 2);
        let topics: Vec<_> = b
            .iter()
            .map(|d| d.topic_message().unwrap().topic.clone())
            .collect();
        assert_eq!(topics, ["a", "b"]);
        let newest = b[0].topic_message().unwrap().data.get().to_owned();
        assert_eq!(newest, "2", "the newest a");
        // Taken by the writer: a new "a" is a new item.
        let bytes = b.iter().map(Delivery::charge).sum();
        rx.written(2, bytes);
        assert!(tx.push_keyed(topic("a", 3), key("a")).unwrap().is_none());
        tx.push_forced(Delivery::notice(crate::notice::Notice::Pong {
            keepalive: true,
        }))
        .unwrap();
        // Routed traffic taken out; the reply stays and the index follows.
        assert_eq!(tx.discard().len(), 1);
        assert!(tx.push_keyed(topic("a", 4), key("a")).unwrap().is_none());
        assert!(tx.push_keyed(topic("a", 5), key("a")).unwrap().is_some());
        assert_eq!(tx.len(), 2);
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

    #[tokio::test]
    async fn waiters_wake_when_work_is_taken_out_forgotten_or_the_queue_closes() {
        // A queue of 256 (low-water mark 254: room below it): fill it,
        // wait, give room back one way; each way must wake the waiter.
        type Free = fn(&Outbox, &mut OutboxReader);
        let ways: [(&str, Free); 4] = [
            ("take_routed", |tx, _| drop(tx.discard())),
            ("forget", |_, rx| {
                let mut b = VecDeque::new();
                rx.try_recv_batch(&mut b);
                let bytes = b.iter().take(3).map(Delivery::charge).sum();
                rx.forget(3, bytes);
            }),
            ("close", |tx, _| tx.close(None)),
            ("abort", |tx, _| drop(tx.abort(None))),
        ];
        for (name, free) in ways {
            let (tx, mut rx) = standalone(256, 1 << 20);
            for n in 0..256 {
                tx.push(d(n as u8)).unwrap();
            }
            assert_eq!(tx.push(d(0)), Err(PushError::Full));
            let waiter = {
                let tx = tx.clone();
                tokio::spawn(async move { tx.room().await })
            };
            tokio::task::yield_now().await;
            free(&tx, &mut rx);
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .unwrap_or_else(|_| panic!("{name} woke the waiter"))
                .unwrap();
        }
        // Two writes leave 254 outstanding, not below the mark: no
        // wake-up; the third wakes the waiter.
        let (tx, mut rx) = standalone(256, 1 << 20);
        for n in 0..256 {
            tx.push(d(n as u8)).unwrap();
        }
        let mut b = VecDeque::new();
        rx.try_recv_batch(&mut b);
        let one = b[0].charge();
        rx.written(2, 2 * one);
        assert!(!tx.has_room(), "254 outstanding, mark 254");
        let waiter = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.room().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        rx.written(1, one);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken below the mark")
            .unwrap();
        assert!(tx.has_room());
    }

    #[test]
    fn the_budget_is_charged_once_and_given_back_whatever_the_path() {
        let budget = Budget::new(1 << 30);
        let (tx, mut rx) = outbox(Bounds::new(2, 1 << 20).conflating(true), budget.clone());
        tx.push_keyed(topic("a", 1), key("a")).unwrap();
        tx.push(d(1)).unwrap();
        // Refused: nothing charged.
        assert_eq!(tx.push(d(2)), Err(PushError::Full));
        assert_eq!(budget.used(), tx.bytes());
        // Replaced in place: the difference.
        tx.push_keyed(topic("a", 22), key("a")).unwrap();
        assert_eq!(budget.used(), tx.bytes());
        tx.push_forced(d(3)).unwrap();
        let mut b = VecDeque::new();
        rx.try_recv_batch(&mut b);
        rx.written(1, b[0].charge());
        assert_eq!(budget.used(), tx.bytes());
        tx.close(Some(d(4)));
        assert_eq!(budget.used(), tx.bytes());
        // Closed: a push and a second close charge nothing.
        assert_eq!(tx.push_forced(d(5)), Err(PushError::Closed));
        tx.close(Some(d(6)));
        assert_eq!(budget.used(), tx.bytes());
        let rest: usize = b.iter().skip(1).map(Delivery::charge).sum();
        rx.forget(b.len() - 1, rest);
        drop(tx.abort(None));
        assert_eq!((tx.len(), budget.used()), (0, 0));
    }
}
