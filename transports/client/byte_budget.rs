//! A byte budget for a client's own queues (what the application handed to
//! `send` and the connection has not written yet; what arrived and the
//! application has not taken with `recv` yet): each queued item holds its
//! bytes of the budget until it is dropped, and a producer waits while the
//! budget is spent. So a client's memory is bounded in bytes, not in items,
//! and a full queue is pushback (on the application's `send`, or on the
//! bus, which then holds back whoever sends to this client), never a drop.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes shared by the items of one queue.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    /// One permit per byte.
    bytes: Arc<Semaphore>,
    /// The whole budget: an item larger than it takes all of it (so it
    /// waits for an empty queue, then goes alone).
    total: u32,
}

/// An item holding its bytes of a [`ByteBudget`]; dropping it gives them
/// back.
#[derive(Debug)]
pub struct Charged<T> {
    /// The item.
    pub item: T,
    /// Its bytes of the budget.
    _bytes: OwnedSemaphorePermit,
}

impl ByteBudget {
    /// A budget of `total` bytes (at least 1, at most 4 GiB - 1).
    pub fn new(total: usize) -> ByteBudget {
        let total = u32::try_from(total.max(1)).unwrap_or(u32::MAX);
        ByteBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `len` bytes of the budget are free, then gives `item`
    /// its charge (None only if the budget were closed, which it never
    /// is). Cancel-safe (nothing is taken until it returns).
    pub async fn charge<T>(&self, item: T, len: usize) -> Option<Charged<T>> {
        let n = u32::try_from(len.max(1))
            .unwrap_or(u32::MAX)
            .min(self.total);
        let permit = self.bytes.clone().acquire_many_owned(n).await.ok()?;
        Some(Charged {
            item,
            _bytes: permit,
        })
    }

    /// Bytes held by queued items now.
    pub fn used(&self) -> usize {
        self.total as usize - self.bytes.available_permits()
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_hold_their_bytes_until_dropped_and_producers_wait() {
        let b = ByteBudget::new(100);
        let a = b.charge("a", 60).await.expect("open");
        assert_eq!(b.used(), 60);
        // 60 more do not fit: the producer waits ...
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.charge("b", 60)).await;
        assert!(waiting.is_err(), "waits while the budget is spent");
        assert_eq!(b.used(), 60, "a cancelled wait takes nothing");
        // ... until the first item is dropped.
        let b2 = b.clone();
        let next = tokio::spawn(async move { b2.charge("b", 60).await.map(|c| c.item) });
        drop(a);
        let got = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(got, Some("b"));
        assert_eq!(b.used(), 0, "dropped in the task");
        // An item larger than the budget takes all of it, alone.
        let big = b.charge("big", 1_000).await.expect("open");
        assert_eq!(b.used(), b.total());
        drop(big);
        assert_eq!(b.used(), 0);
    }
}
