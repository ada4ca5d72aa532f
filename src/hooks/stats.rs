//! Counters of the hook engine and their serializable snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

crate::counters::counters! {
    /// The live counters behind [`HookStats`]; relaxed atomics, since each
    /// is an independent tally read only for reporting.
    pub(crate) struct Counters;

    /// A snapshot of the hook engine's counters, for `status` and tests.
    ///
    /// Every offered event is counted exactly once as `filtered_out`,
    /// `dropped_queue_full`, `dropped_closed` or `queued`. Every started run
    /// ends as exactly one of `runs_ok`, `runs_failed`, `timeouts`,
    /// `skipped_missing` or `killed_at_shutdown`, or is still `in_flight`.
    #[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
    pub struct HookStats {
        /// Events given to `offer`.
        offered,
        /// Events no hook's filter matched (not queued).
        filtered_out,
        /// Events dropped because the queue was full.
        dropped_queue_full,
        /// Events offered after shutdown began (or to an engine that never ran).
        dropped_closed,
        /// Events accepted into the queue.
        queued,
        /// Queued events not (fully) dispatched to their hooks when shutdown
        /// began; those hooks never ran for them.
        dropped_at_shutdown,
        /// Hook runs begun (one per matching hook per event).
        runs_started,
        /// Runs that succeeded.
        runs_ok,
        /// Runs that failed: non-zero exit, spawn error, hook error or panic.
        runs_failed,
        /// Runs stopped at their time limit (processes killed).
        timeouts,
        /// Runs of a command hook whose file did not exist (skipped quietly,
        /// as the reference does).
        skipped_missing,
        /// Runs still going at the end of the shutdown grace, killed.
        killed_at_shutdown,
        /// Configured hooks rejected at start (not executable, not `.py`).
        config_errors,
        /// Runs going on now.
        in_flight;
        /// Events waiting in the queue now.
        queue_len: u64,
        /// The queue's capacity.
        queue_capacity: u64,
        /// The bound on runs at once.
        max_concurrent: u64,
        /// The active hooks' names (paths for command hooks), in order.
        hooks: Vec<String>,
    }
}

/// Adds one to a counter and returns the new value.
pub(crate) fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}
