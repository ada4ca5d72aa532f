//! The bounded queue between the router and one session's writer.
//!
//! The router pushes without ever waiting: when the queue is full the push
//! fails and the router applies the session's slow-consumer policy. The
//! writer takes everything queued at once, so it can write a whole batch
//! with one syscall and flush only when the queue is empty.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::delivery::Delivery;

/// Why a push did not enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue holds `capacity` deliveries already.
    #[error("outbox full")]
    Full,
    /// The session is closing; nothing more is accepted.
    #[error("outbox closed")]
    Closed,
}

struct State {
    /// Deliveries waiting for the writer, oldest first.
    queue: VecDeque<Delivery>,
    /// Set once the session is closing: the writer drains what is queued,
    /// then ends the connection.
    closed: bool,
}

struct Shared {
    /// Queue and closed flag; held only for a push or a swap, never across I/O.
    state: Mutex<State>,
    /// Wakes the writer when something was pushed or the outbox closed.
    notify: Notify,
    /// The bound that makes a slow reader cost memory no bigger than this.
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue invalid
        // (every critical section is a push or a swap), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The router's end of a session's queue (cheap to clone).
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The writer's end of a session's queue.
pub struct OutboxReader {
    shared: Arc<Shared>,
}

/// Makes a queue bounded at `capacity` deliveries.
pub fn outbox(capacity: usize) -> (Outbox, OutboxReader) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
        }),
        notify: Notify::new(),
        capacity: capacity.max(1),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        OutboxReader { shared },
    )
}

impl Outbox {
    /// Enqueues within the bound.
    pub fn push(&self, d: Delivery) -> Result<(), PushError> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        if st.queue.len() >= self.shared.capacity {
            return Err(PushError::Full);
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back(d);
        drop(st);
        // The writer drains the whole queue whenever it wakes, so only the
        // push that makes the queue non-empty needs to wake it.
        if was_empty {
            self.shared.notify.notify_one();
        }
        Ok(())
    }

    /// Enqueues past the bound; for a bounded burst the bus itself decided
    /// on (held messages replayed at re-register, a final error reply).
    pub fn push_unbounded(&self, d: Delivery) -> Result<(), PushError> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back(d);
        drop(st);
        if was_empty {
            self.shared.notify.notify_one();
        }
        Ok(())
    }

    /// Closes the queue: `last` (a reason frame) is queued after what is
    /// already there, the writer drains it all and ends the connection.
    pub fn close(&self, last: Option<Delivery>) {
        let mut st = self.shared.lock();
        if st.closed {
            return;
        }
        if let Some(d) = last {
            st.queue.push_back(d);
        }
        st.closed = true;
        drop(st);
        self.shared.notify.notify_one();
    }

    /// Closes the queue and discards what it holds (a slow consumer being
    /// disconnected gets only `last`).
    pub fn abort(&self, last: Option<Delivery>) -> usize {
        let mut st = self.shared.lock();
        let discarded = st.queue.len();
        st.queue.clear();
        if let Some(d) = last {
            st.queue.push_back(d);
        }
        st.closed = true;
        drop(st);
        self.shared.notify.notify_one();
        discarded
    }

    /// Moves the routed traffic queued into `out` (the session is going
    /// away and its name is held); replies stay for the writer to send.
    pub fn take_routed(&self, out: &mut VecDeque<Delivery>) {
        let mut st = self.shared.lock();
        if st.queue.iter().all(|d| d.is_reply()) {
            return;
        }
        let mut keep = VecDeque::new();
        for d in st.queue.drain(..) {
            if d.is_reply() {
                keep.push_back(d);
            } else {
                out.push_back(d);
            }
        }
        st.queue = keep;
    }

    /// Deliveries waiting now.
    pub fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }
}

impl OutboxReader {
    /// Waits until something is queued, then moves everything queued into
    /// `batch` (appending). Returns false when the outbox is closed and
    /// empty: the writer should end the connection.
    pub async fn recv_batch(&mut self, batch: &mut VecDeque<Delivery>) -> bool {
        loop {
            {
                let mut st = self.shared.lock();
                if !st.queue.is_empty() {
                    if batch.is_empty() {
                        std::mem::swap(batch, &mut st.queue);
                    } else {
                        batch.extend(st.queue.drain(..));
                    }
                    return true;
                }
                if st.closed {
                    return false;
                }
            }
            self.shared.notify.notified().await;
        }
    }

    /// Takes whatever is queued now without waiting.
    pub fn try_recv_batch(&mut self, batch: &mut VecDeque<Delivery>) -> usize {
        let mut st = self.shared.lock();
        let n = st.queue.len();
        batch.extend(st.queue.drain(..));
        n
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
    use bytes::Bytes;

    fn d(n: u8) -> Delivery {
        Delivery::frame(Bytes::from(vec![0, 0, 0, 1, n]))
    }

    #[tokio::test]
    async fn bounded_and_drains_in_order() {
        let (tx, mut rx) = outbox(2);
        tx.push(d(1)).unwrap();
        tx.push(d(2)).unwrap();
        assert_eq!(tx.push(d(3)), Err(PushError::Full));
        tx.push_unbounded(d(4)).unwrap();
        tx.close(Some(d(5)));
        assert_eq!(tx.push(d(6)), Err(PushError::Closed));
        let mut b = VecDeque::new();
        assert!(rx.recv_batch(&mut b).await);
        let got: Vec<u8> = b.iter().map(|x| x.unix_frame()[4]).collect();
        assert_eq!(got, vec![1, 2, 4, 5]);
        b.clear();
        assert!(!rx.recv_batch(&mut b).await);
    }
}
