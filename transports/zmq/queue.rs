//! The bounded per-peer queue between whoever produces wire bytes and the
//! one writer task of a connection. Producers never wait: a full queue
//! drops the new item and says so, so one stalled peer cannot stall the
//! producers (or, through them, every other peer). The writer takes the
//! whole backlog in one lock and writes it in one batch.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// Counts and content of a queue, under its lock.
#[derive(Debug, Default)]
struct Inner {
    /// Wire bytes waiting for the writer.
    items: VecDeque<Bytes>,
    /// Sum of the lengths of `items` (for the byte limit).
    bytes: usize,
    /// Set when the writer is gone; pushes then fail.
    closed: bool,
}

/// A bounded queue of wire bytes with one consumer.
#[derive(Debug)]
pub struct WireQueue {
    /// The items; the lock is held only to push or to swap out a batch.
    inner: Mutex<Inner>,
    /// Wakes the writer when the queue goes from empty to non-empty.
    notify: Notify,
    /// Maximum number of queued items.
    max_items: usize,
    /// Maximum number of queued bytes.
    max_bytes: usize,
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
    /// (one item is always accepted into an empty queue).
    pub fn new(max_items: usize, max_bytes: usize) -> WireQueue {
        WireQueue {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            max_items: max_items.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` unless full or closed. Never waits.
    pub fn push(&self, item: Bytes) -> Pushed {
        let was_empty;
        {
            let mut g = self.lock();
            if g.closed {
                return Pushed::Closed;
            }
            if !g.items.is_empty()
                && (g.items.len() >= self.max_items || g.bytes + item.len() > self.max_bytes)
            {
                return Pushed::Full;
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

    /// Moves every queued item into `batch` (which should be empty);
    /// returns how many.
    pub fn take_all(&self, batch: &mut VecDeque<Bytes>) -> usize {
        let mut g = self.lock();
        g.bytes = 0;
        std::mem::swap(&mut g.items, batch);
        batch.len()
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

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Closes the queue: later pushes fail, the writer drains and stops.
    /// Returns how many items were still queued (when `discard`, dropped).
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
        n
    }
}
