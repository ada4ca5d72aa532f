//! The hook engine: a bounded queue between the routing path and a runner
//! task that calls the hooks with bounded concurrency and time limits.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};

use super::command::{launch_for, CommandHook};
use super::config::HookConfig;
use super::error::HookError;
use super::event::{EventProps, HookEvent, HookEventKind};
use super::hook::Hook;
use super::stats::{bump, Counters, HookStats};

/// Runs hooks for offered events. Cheap to clone: clones share one engine.
///
/// Call [`HookEngine::shutdown`] to stop it in order; when every handle is
/// dropped without it, queued events are discarded and running hooks are
/// left to finish within their time limits.
#[derive(Clone)]
pub struct HookEngine {
    /// Shared by every clone, and (counters, hooks) by the runner.
    inner: Arc<Inner>,
}

/// The state behind a [`HookEngine`].
struct Inner {
    /// Every active hook, in configuration order, in-process ones last;
    /// read on the routing path to filter.
    hooks: Arc<[Arc<dyn Hook>]>,
    /// The hooks' names, for stats.
    names: Vec<String>,
    /// The queue into the runner; `None` when nothing runs (no hooks, or
    /// started outside a runtime).
    tx: Option<mpsc::Sender<HookEvent>>,
    /// Set when shutdown begins, so `offer` stops queueing at once.
    closed: AtomicBool,
    /// Tallies shared with the runner and its tasks.
    counters: Arc<Counters>,
    /// The effective concurrency bound, for stats.
    max_concurrent: usize,
    /// The effective queue capacity, for stats.
    queue_capacity: usize,
    /// Tells the runner to stop, with the grace its running hooks get.
    shutdown_tx: watch::Sender<Option<Duration>>,
    /// The runner task, taken by the first `shutdown` to await it.
    runner: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for HookEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookEngine")
            .field("hooks", &self.inner.names)
            .field("max_concurrent", &self.inner.max_concurrent)
            .field("queue_capacity", &self.inner.queue_capacity)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl HookEngine {
    /// Starts an engine running the command hooks of `config` and the
    /// in-process hooks `extra`, and spawns its runner task.
    ///
    /// Must be called inside a tokio runtime; outside one it logs an error
    /// and returns an engine that drops (and counts) every event. Command
    /// hooks whose file is neither executable nor a `.py` script are logged
    /// and skipped (counted in `config_errors`); a missing file is logged
    /// and kept, its runs skipped while it is missing (as the reference).
    pub fn start(config: HookConfig, extra: Vec<Arc<dyn Hook>>) -> HookEngine {
        let counters = Arc::new(Counters::default());
        let mut hooks: Vec<Arc<dyn Hook>> = Vec::with_capacity(config.hooks.len() + extra.len());
        for spec in &config.hooks {
            match launch_for(&spec.path) {
                Ok(_) => {}
                Err(HookError::Missing { path }) => {
                    tracing::warn!(hook = %path.display(), "hook file does not exist; skipped while missing")
                }
                Err(e) => {
                    tracing::error!(hook = %spec.path.display(), error = %e, "hook not usable; ignored");
                    bump(&counters.config_errors);
                    continue;
                }
            }
            hooks.push(Arc::new(CommandHook::from_spec(spec)));
        }
        hooks.extend(extra);

        let max_concurrent = config.max_concurrent.max(1);
        let queue_capacity = config.queue_capacity.max(1);
        let hooks: Arc<[Arc<dyn Hook>]> = hooks.into();
        let names = hooks.iter().map(|h| h.name().to_string()).collect();
        let (shutdown_tx, shutdown_rx) = watch::channel(None);

        let mut tx = None;
        let mut runner = None;
        if !hooks.is_empty() {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let (sender, receiver) = mpsc::channel(queue_capacity);
                    let r = Runner {
                        hooks: hooks.clone(),
                        counters: counters.clone(),
                        default_timeout: config.timeout,
                        max_concurrent,
                        tasks: JoinSet::new(),
                    };
                    runner = Some(handle.spawn(r.run(receiver, shutdown_rx)));
                    tx = Some(sender);
                }
                Err(_) => {
                    tracing::error!(
                        "hook engine started outside a tokio runtime; hooks will not run"
                    )
                }
            }
        }
        tracing::info!(hooks = ?names, max_concurrent, queue_capacity, "hook engine started");

        HookEngine {
            inner: Arc::new(Inner {
                hooks,
                names,
                tx,
                closed: AtomicBool::new(false),
                counters,
                max_concurrent,
                queue_capacity,
                shutdown_tx,
                runner: Mutex::new(runner),
            }),
        }
    }

    /// An engine without hooks: `offer` only counts, `wants` is false.
    pub fn disabled() -> HookEngine {
        let (shutdown_tx, _) = watch::channel(None);
        HookEngine {
            inner: Arc::new(Inner {
                hooks: Arc::from(Vec::new()),
                names: Vec::new(),
                tx: None,
                closed: AtomicBool::new(false),
                counters: Arc::new(Counters::default()),
                max_concurrent: 0,
                queue_capacity: 0,
                shutdown_tx,
                runner: Mutex::new(None),
            }),
        }
    }

    /// Whether any hook is active (false for [`HookEngine::disabled`]).
    pub fn is_enabled(&self) -> bool {
        !self.inner.hooks.is_empty()
    }

    /// Whether some hook would run for an event with these properties, so
    /// that callers can skip building the event. False after shutdown.
    pub fn wants(
        &self,
        kind: HookEventKind,
        transport: &str,
        to: Option<&str>,
        topic: Option<&str>,
    ) -> bool {
        let props = EventProps {
            kind,
            transport,
            to,
            topic,
        };
        !self.inner.closed.load(Ordering::Relaxed)
            && self.inner.hooks.iter().any(|h| h.filter().matches(&props))
    }

    /// The topic prefixes the hooks need from `transport` (see
    /// [`super::filter::HookFilter::topic_interest`]): sorted, each once;
    /// `""` when some hook runs for every topic. Hooks are fixed for the
    /// engine's life, so this never changes.
    pub fn topic_interest(&self, transport: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .inner
            .hooks
            .iter()
            .filter_map(|h| h.filter().topic_interest(transport))
            .map(str::to_owned)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Hands an event to the hooks. Never blocks and never waits for a
    /// hook: when no hook matches it returns at once (counted
    /// `filtered_out`), and when the queue is full the event is dropped
    /// (counted `dropped_queue_full`).
    pub fn offer(&self, event: HookEvent) {
        let inner = &*self.inner;
        let c = &inner.counters;
        bump(&c.offered);
        if !inner.hooks.iter().any(|h| h.filter().matches_event(&event)) {
            bump(&c.filtered_out);
            return;
        }
        let tx = match &inner.tx {
            Some(tx) if !inner.closed.load(Ordering::Relaxed) => tx,
            _ => {
                bump(&c.dropped_closed);
                return;
            }
        };
        match tx.try_send(event) {
            Ok(()) => {
                bump(&c.queued);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let n = bump(&c.dropped_queue_full);
                // Log the 1st, 2nd, 4th, 8th ... drop: visible, not a flood.
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "hook queue full; event dropped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bump(&c.dropped_closed);
            }
        }
    }

    /// A snapshot of the counters, the queue and the active hooks.
    pub fn stats(&self) -> HookStats {
        let inner = &*self.inner;
        let mut s = inner.counters.snapshot();
        s.queue_len = inner
            .tx
            .as_ref()
            .map_or(0, |tx| (tx.max_capacity() - tx.capacity()) as u64);
        s.queue_capacity = inner.queue_capacity as u64;
        s.max_concurrent = inner.max_concurrent as u64;
        s.hooks = inner.names.clone();
        s
    }

    /// Stops the engine: new events are refused at once, queued events are
    /// dropped (counted `dropped_at_shutdown`), running hooks get up to
    /// `grace` to finish, then are killed (counted `killed_at_shutdown`).
    /// Returns when the runner has stopped; a second call returns at once.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &*self.inner;
        inner.closed.store(true, Ordering::Relaxed);
        inner.shutdown_tx.send_replace(Some(grace));
        let runner = match inner.runner.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(runner) = runner {
            if let Err(e) = runner.await {
                tracing::error!(error = %e, "hook runner ended abnormally");
            }
        }
    }
}

/// The task between the queue and the hooks.
struct Runner {
    /// The same hooks as the engine's.
    hooks: Arc<[Arc<dyn Hook>]>,
    /// The engine's counters.
    counters: Arc<Counters>,
    /// The limit of a hook without its own.
    default_timeout: Duration,
    /// Runs at once; the runner waits for one to end before starting more.
    max_concurrent: usize,
    /// The running hook calls; its length is the concurrency in use.
    tasks: JoinSet<()>,
}

/// Why the runner's main loop ended.
enum Stop {
    /// `shutdown` was called: give running hooks this long.
    Shutdown(Duration),
    /// Every engine handle is gone: let running hooks finish (each is
    /// bounded by its time limit).
    Dropped,
}

/// Waits for a shutdown request or for the engine to be dropped.
async fn stop_requested(rx: &mut watch::Receiver<Option<Duration>>) -> Stop {
    match rx.wait_for(Option::is_some).await {
        Ok(grace) => Stop::Shutdown(grace.unwrap_or_default()),
        Err(_) => Stop::Dropped,
    }
}

impl Runner {
    /// Takes events off the queue and runs the matching hooks until told to
    /// stop, then winds down.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<HookEvent>,
        mut shutdown: watch::Receiver<Option<Duration>>,
    ) {
        let stop = 'main: loop {
            tokio::select! {
                biased;
                stop = stop_requested(&mut shutdown) => break stop,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => self.note(done),
                event = rx.recv() => {
                    let Some(event) = event else { break Stop::Dropped };
                    let event = Arc::new(event);
                    let hooks = self.hooks.clone();
                    for hook in hooks.iter() {
                        if !hook.filter().matches_event(&event) {
                            continue;
                        }
                        while self.tasks.len() >= self.max_concurrent {
                            tokio::select! {
                                biased;
                                stop = stop_requested(&mut shutdown) => {
                                    // This event is not (fully) dispatched.
                                    bump(&self.counters.dropped_at_shutdown);
                                    break 'main stop;
                                }
                                Some(done) = self.tasks.join_next() => self.note(done),
                            }
                        }
                        self.spawn(hook.clone(), event.clone());
                    }
                }
            }
        };

        rx.close();
        while rx.try_recv().is_ok() {
            bump(&self.counters.dropped_at_shutdown);
        }
        if let Stop::Shutdown(grace) = stop {
            let _ = tokio::time::timeout(grace, async {
                while let Some(done) = self.tasks.join_next().await {
                    self.note(done);
                }
            })
            .await;
            // Dropping a command hook's call kills its process group.
            self.tasks.abort_all();
        }
        while let Some(done) = self.tasks.join_next().await {
            self.note(done);
        }
    }

    /// Starts one hook call as its own task.
    fn spawn(&mut self, hook: Arc<dyn Hook>, event: Arc<HookEvent>) {
        bump(&self.counters.runs_started);
        let in_flight = InFlight::new(self.counters.clone());
        let limit = hook.timeout().unwrap_or(self.default_timeout);
        self.tasks.spawn(async move {
            let counters = &in_flight.0;
            match tokio::time::timeout(limit, hook.call(&event)).await {
                Ok(Ok(())) => {
                    bump(&counters.runs_ok);
                }
                Ok(Err(HookError::Missing { path })) => {
                    bump(&counters.skipped_missing);
                    tracing::debug!(hook = %path.display(), "hook file missing; run skipped");
                }
                Ok(Err(e @ HookError::Timeout { .. })) => {
                    bump(&counters.timeouts);
                    tracing::warn!(hook = hook.name(), error = %e, "hook timed out");
                }
                Ok(Err(e)) => {
                    bump(&counters.runs_failed);
                    tracing::warn!(hook = hook.name(), error = %e, "hook failed");
                }
                Err(_) => {
                    // The call was dropped: a command hook's process group
                    // is killed and reaped by its guard.
                    bump(&counters.timeouts);
                    tracing::warn!(hook = hook.name(), after = ?limit, "hook timed out; stopped");
                }
            }
            drop(in_flight);
        });
    }

    /// Counts how a hook task ended when it did not end by itself.
    fn note(&self, done: Result<(), JoinError>) {
        match done {
            Ok(()) => {}
            Err(e) if e.is_panic() => {
                bump(&self.counters.runs_failed);
                tracing::error!(error = %e, "hook panicked");
            }
            Err(_) => {
                bump(&self.counters.killed_at_shutdown);
            }
        }
    }
}

/// Counts one running hook call for as long as it lives, however it ends
/// (finished, timed out, aborted, panicked).
struct InFlight(Arc<Counters>);

impl InFlight {
    /// Counts a call as running.
    fn new(counters: Arc<Counters>) -> InFlight {
        bump(&counters.in_flight);
        InFlight(counters)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
