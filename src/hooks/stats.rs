//! Counters of the hook engine and their serializable snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A snapshot of the hook engine's counters, for `status` and tests.
///
/// Every offered event is counted exactly once as `filtered_out`,
/// `dropped_queue_full`, `dropped_closed` or `queued`. Every started run
/// ends as exactly one of `runs_ok`, `runs_failed`, `timeouts`,
/// `skipped_missing` or `killed_at_shutdown`, or is still `in_flight`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct HookStats {
    /// Events given to `offer`.
    pub offered: u64,
    /// Events no hook's filter matched (not queued).
    pub filtered_out: u64,
    /// Events dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Events offered after shutdown began (or to an engine that never ran).
    pub dropped_closed: u64,
    /// Events accepted into the queue.
    pub queued: u64,
    /// Queued events not (fully) dispatched to their hooks when shutdown
    /// began; those hooks never ran for them.
    pub dropped_at_shutdown: u64,
    /// Hook runs begun (one per matching hook per event).
    pub runs_started: u64,
    /// Runs that succeeded.
    pub runs_ok: u64,
    /// Runs that failed: non-zero exit, spawn error, hook error or panic.
    pub runs_failed: u64,
    /// Runs stopped at their time limit (processes killed).
    pub timeouts: u64,
    /// Runs of a command hook whose file did not exist (skipped quietly,
    /// as the reference does).
    pub skipped_missing: u64,
    /// Runs still going at the end of the shutdown grace, killed.
    pub killed_at_shutdown: u64,
    /// Configured hooks rejected at start (not executable, not `.py`).
    pub config_errors: u64,
    /// Runs going on now.
    pub in_flight: u64,
    /// Events waiting in the queue now.
    pub queue_len: u64,
    /// The queue's capacity.
    pub queue_capacity: u64,
    /// The bound on runs at once.
    pub max_concurrent: u64,
    /// The active hooks' names (paths for command hooks), in order.
    pub hooks: Vec<String>,
}

/// The live counters behind [`HookStats`]; relaxed atomics, since each is
/// an independent tally read only for reporting.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) offered: AtomicU64,
    pub(crate) filtered_out: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_closed: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) dropped_at_shutdown: AtomicU64,
    pub(crate) runs_started: AtomicU64,
    pub(crate) runs_ok: AtomicU64,
    pub(crate) runs_failed: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) skipped_missing: AtomicU64,
    pub(crate) killed_at_shutdown: AtomicU64,
    pub(crate) config_errors: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

/// Adds one to a counter and returns the new value.
pub(crate) fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}

impl Counters {
    /// The counters as plain numbers; the caller fills in the rest.
    pub(crate) fn snapshot(&self) -> HookStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HookStats {
            offered: get(&self.offered),
            filtered_out: get(&self.filtered_out),
            dropped_queue_full: get(&self.dropped_queue_full),
            dropped_closed: get(&self.dropped_closed),
            queued: get(&self.queued),
            dropped_at_shutdown: get(&self.dropped_at_shutdown),
            runs_started: get(&self.runs_started),
            runs_ok: get(&self.runs_ok),
            runs_failed: get(&self.runs_failed),
            timeouts: get(&self.timeouts),
            skipped_missing: get(&self.skipped_missing),
            killed_at_shutdown: get(&self.killed_at_shutdown),
            config_errors: get(&self.config_errors),
            in_flight: get(&self.in_flight),
            ..HookStats::default()
        }
    }
}
