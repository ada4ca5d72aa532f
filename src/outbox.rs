//! The bounded queue between the router and one session's writer, and the
//! byte budget all queues share.
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::conflation::ConflationIndex;
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

/// Milliseconds on a process-wide monotonic clock (the progress stamps).
pub fn clock_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 never means "now" for a stamp taken at start.
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
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

struct State {
    /// Deliveries waiting for the writer, oldest first.
    queue: VecDeque<Delivery>,
    /// Set once the session is closing: the writer drains what is queued,
    /// then ends the connection.
    closed: bool,
    /// For a conflating outbox: which queued topic delivery holds each
    /// topic's newest value. None otherwise (it then costs nothing).
    keys: Option<ConflationIndex>,
}

impl State {
    /// Moves up to [`WRITER_BATCH`] deliveries into the writer's `batch`.
    fn take(&mut self, batch: &mut VecDeque<Delivery>) -> usize {
        let n = take(&mut self.queue, batch);
        if let Some(k) = &mut self.keys {
            k.front_gone(n);
        }
        n
    }
}

struct Shared {
    /// Queue and closed flag; held only to push or take, never across
    /// I/O, and no delivery is dropped while it is held (dropping one may
    /// send an ack into another, or this same, outbox).
    state: Mutex<State>,
    /// Wakes the writer when something was pushed or the outbox closed.
    notify: Notify,
    /// Wakes senders waiting for room (or for the stuck verdict).
    room: Notify,
    /// Wakes whoever waits for the queue to close (the writer, to bound
    /// how long it may still take).
    closing: Notify,
    /// Senders waiting on `room` now (so the writer notifies only then).
    waiters: AtomicUsize,
    /// Deliveries pushed and not yet written or discarded.
    items: AtomicUsize,
    /// Their bytes (charge of each, see [`Delivery::charge`]).
    bytes: AtomicUsize,
    /// The bounds in force.
    bounds: Bounds,
    /// The budget every outbox of the bus shares.
    budget: Arc<Budget>,
    /// [`clock_ms`] of the last write to the socket, or of the moment the
    /// queue last went from empty to non-empty (a receiver cannot be slow
    /// before it has something to read).
    progress_ms: AtomicU64,
    /// Declared by a sender that waited past the slow-consumer timeout;
    /// cleared by the next write.
    stuck: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue invalid
        // (every critical section is a push or a take), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn charge(&self, d: &Delivery) {
        let n = d.charge();
        if self.items.fetch_add(1, Ordering::Relaxed) == 0 {
            self.progress_ms.store(clock_ms(), Ordering::Relaxed);
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.budget.charge(n);
    }

    fn release(&self, items: usize, bytes: usize) {
        if items == 0 && bytes == 0 {
            return;
        }
        self.items.fetch_sub(items, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.release(bytes);
        if self.waiters.load(Ordering::Relaxed) > 0 && self.below_low_water() {
            self.room.notify_waiters();
        }
    }

    fn over_bound(&self) -> bool {
        let items = self.items.load(Ordering::Relaxed);
        items > 0
            && (items >= self.bounds.items
                || self.bytes.load(Ordering::Relaxed) >= self.bounds.bytes
                || self.budget.full())
    }

    fn below_low_water(&self) -> bool {
        self.items.load(Ordering::Relaxed) < low_water(self.bounds.items)
            && self.bytes.load(Ordering::Relaxed) < low_water(self.bounds.bytes)
    }

    fn push_locked(&self, st: &mut State, d: Delivery, key: Option<Bytes>) -> bool {
        self.charge(&d);
        let was_empty = st.queue.is_empty();
        st.queue.push_back(d);
        if let Some(k) = &mut st.keys {
            k.pushed(key);
        }
        was_empty
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
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
            keys: bounds.conflate.then(ConflationIndex::default),
        }),
        notify: Notify::new(),
        room: Notify::new(),
        closing: Notify::new(),
        waiters: AtomicUsize::new(0),
        items: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        bounds,
        budget,
        progress_ms: AtomicU64::new(clock_ms()),
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
        if sh.over_bound() {
            return Err(PushError::Full);
        }
        self.push_forced(d)
    }

    /// [`Outbox::push`] of a topic delivery under its topic `key`: in a
    /// conflating outbox a queued delivery of the same topic (not yet
    /// taken by the writer) is replaced in its place, whatever the bounds,
    /// and returned for the caller to count (and drop outside the lock).
    pub fn push_keyed(&self, d: Delivery, key: Bytes) -> Result<Option<Delivery>, PushError> {
        let sh = &*self.shared;
        if !sh.bounds.conflate {
            return self.push(d).map(|()| None);
        }
        if sh.stuck.load(Ordering::Relaxed) {
            return Err(PushError::Stuck);
        }
        let mut st = sh.lock();
        if st.closed {
            drop(st);
            return Err(PushError::Closed);
        }
        if let Some(i) = st.keys.as_ref().and_then(|k| k.find(&key)) {
            let (new, old) = (d.charge(), st.queue[i].charge());
            let old_d = std::mem::replace(&mut st.queue[i], d);
            drop(st);
            sh.bytes.fetch_add(new, Ordering::Relaxed);
            sh.budget.charge(new);
            sh.release(0, old);
            return Ok(Some(old_d));
        }
        if sh.over_bound() {
            drop(st);
            return Err(PushError::Full);
        }
        let wake = sh.push_locked(&mut st, d, Some(key));
        drop(st);
        if wake {
            sh.notify.notify_one();
        }
        Ok(None)
    }

    /// Enqueues past the bounds, still counted: replies and acks (which
    /// are never dropped), held messages replayed at re-register, and a
    /// message its sender already waited for.
    pub fn push_forced(&self, d: Delivery) -> Result<(), PushError> {
        let mut st = self.shared.lock();
        if st.closed {
            drop(st);
            drop(d);
            return Err(PushError::Closed);
        }
        let wake = self.shared.push_locked(&mut st, d, None);
        drop(st);
        // The writer drains the queue whenever it wakes, so only the push
        // that makes the queue non-empty needs to wake it.
        if wake {
            self.shared.notify.notify_one();
        }
        Ok(())
    }

    /// Closes the queue: `last` (a reason frame) is queued after what is
    /// already there, the writer drains it all and ends the connection.
    pub fn close(&self, last: Option<Delivery>) {
        let mut st = self.shared.lock();
        if st.closed {
            drop(st);
            return;
        }
        if let Some(d) = last {
            self.shared.push_locked(&mut st, d, None);
        }
        st.closed = true;
        drop(st);
        self.shared.notify.notify_one();
        self.shared.room.notify_waiters();
        self.shared.closing.notify_waiters();
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
        let taken: Vec<Delivery> = {
            let mut st = self.shared.lock();
            let n = st.queue.len();
            if let Some(k) = &mut st.keys {
                k.front_gone(n);
            }
            st.queue.drain(..).collect()
        };
        let bytes = taken.iter().map(Delivery::charge).sum();
        self.shared.release(taken.len(), bytes);
        self.close(last);
        taken
    }

    /// Moves the routed traffic queued into `out` (the session is going
    /// away and its name is held); replies stay for the writer to send.
    pub fn take_routed(&self, out: &mut VecDeque<Delivery>) {
        let mut moved = VecDeque::new();
        {
            let mut st = self.shared.lock();
            if st.queue.iter().all(|d| d.is_reply()) {
                return;
            }
            let State { queue, keys, .. } = &mut *st;
            if let Some(k) = keys {
                k.retain(|i| queue[i].is_reply());
            }
            let mut keep = VecDeque::new();
            for d in st.queue.drain(..) {
                if d.is_reply() {
                    keep.push_back(d);
                } else {
                    moved.push_back(d);
                }
            }
            st.queue = keep;
        }
        let bytes = moved.iter().map(Delivery::charge).sum();
        self.shared.release(moved.len(), bytes);
        out.extend(moved);
    }

    /// Declares the receiver stuck (no progress for the slow-consumer
    /// timeout): pushes fail with `Stuck` until it writes again, and every
    /// waiting sender is woken to see it.
    pub fn mark_stuck(&self) {
        self.shared.stuck.store(true, Ordering::Relaxed);
        self.shared.room.notify_waiters();
    }

    /// True while declared stuck.
    pub fn is_stuck(&self) -> bool {
        self.shared.stuck.load(Ordering::Relaxed)
    }

    /// True when a sender blocked on this queue may go on: below the
    /// low-water mark of each bound (see `low_water`), or empty.
    pub fn has_room(&self) -> bool {
        let sh = &*self.shared;
        sh.items.load(Ordering::Relaxed) == 0 || (sh.below_low_water() && sh.budget.has_room())
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
        let notified = sh.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        sh.waiters.fetch_add(1, Ordering::Relaxed);
        let _guard = Decrement(&sh.waiters);
        if self.has_room() || self.is_closed() || self.is_stuck() {
            return;
        }
        if !sh.budget.has_room() {
            tokio::select! {
                _ = notified => {}
                _ = sh.budget.room() => {}
            }
        } else {
            notified.await;
        }
    }

    /// [`clock_ms`] of the receiver's last progress.
    pub fn progress_ms(&self) -> u64 {
        self.shared.progress_ms.load(Ordering::Relaxed)
    }

    /// Deliveries outstanding now (queued or being written).
    pub fn len(&self) -> usize {
        self.shared.items.load(Ordering::Relaxed)
    }

    /// Bytes outstanding now.
    pub fn bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
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
            let notified = self.shared.notify.notified();
            {
                let mut st = self.shared.lock();
                if !st.queue.is_empty() {
                    st.take(batch);
                    return true;
                }
                if st.closed {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// Takes up to [`WRITER_BATCH`] deliveries now without waiting.
    pub fn try_recv_batch(&mut self, batch: &mut VecDeque<Delivery>) -> usize {
        self.shared.lock().take(batch)
    }

    /// Reports deliveries written to the socket (or given up by the
    /// writer): their bytes are given back, the receiver made progress.
    pub fn written(&self, items: usize, bytes: usize) {
        let sh = &*self.shared;
        sh.progress_ms.store(clock_ms(), Ordering::Relaxed);
        if sh.stuck.load(Ordering::Relaxed) {
            sh.stuck.store(false, Ordering::Relaxed);
        }
        sh.release(items, bytes);
    }

    /// Waits until the queue is closed.
    pub async fn closed(&self) {
        let notified = self.shared.closing.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.shared.lock().closed {
            return;
        }
        notified.await;
    }

    /// Gives back the bytes of deliveries the writer took and will not
    /// write (its connection ended); not progress.
    pub fn forget(&self, items: usize, bytes: usize) {
        self.shared.release(items, bytes);
    }

    /// A handle for pushing into this same queue (e.g. the session's own
    /// replies).
    pub fn outbox(&self) -> Outbox {
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

fn take(queue: &mut VecDeque<Delivery>, batch: &mut VecDeque<Delivery>) -> usize {
    let n = queue.len().min(WRITER_BATCH);
    if n == queue.len() && batch.is_empty() {
        std::mem::swap(queue, batch);
    } else {
        batch.extend(queue.drain(..n));
        if queue.is_empty() && queue.capacity() > 1024 {
            // A burst is over: an idle queue keeps no big allocation.
            *queue = VecDeque::new();
        }
    }
    n
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
}
