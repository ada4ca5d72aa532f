//! The `Transport` trait and the `Bus` handle every transport is given.
//!
//! A transport turns its wire into router sessions: it attaches sessions,
//! submits what they send, and writes what the router queues for them. A
//! new transport (TCP, WebSocket, shared memory) needs no change to the
//! router or the hook engine: everything it needs is on [`Bus`].

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::{Delivery, TopicMessage};
use crate::error::ProtocolError;
use crate::hooks::{HookEngine, HookEvent, HookEventKind};
use crate::message::BusMessage;
use crate::notice::Notice;
use crate::outbox::{outbox, Bounds, Outbox, OutboxReader};
use crate::router::interest::InterestChange;
use crate::router::{Blocked, Full, Routed, Router, RouterConfig, SessionId, Verdict, WaitOn};
use crate::stats::RouterStats;

/// A way into the bus (Unix socket, ZeroMQ proxy, ...).
#[async_trait]
pub trait Transport: Send + 'static {
    /// A short name for logs, status and hook filters ("unix", "zmq").
    fn name(&self) -> &'static str;

    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// its sessions drain for a bounded time, and cleans up (e.g. removes
    /// its socket file).
    async fn serve(self: Box<Self>, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()>;
}

/// What a session sends for the router to route. Sessions batch these:
/// [`Bus::submit`] routes many under one router lock, in order.
// A `message` is by far the most common item and moves through the batch
// as it is: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Inbound {
    /// A `message`, routed to its `to` or broadcast.
    Message(BusMessage),
    /// A topic publish.
    Publish(Publish),
}

/// A topic publish as a session sent it.
#[derive(Debug)]
pub struct Publish {
    /// The topic.
    pub topic: String,
    /// The origin the client named (a registered sender's own name wins
    /// over it; "anonymous" when neither).
    pub origin: Option<String>,
    /// The payload, raw JSON.
    pub data: Box<serde_json::value::RawValue>,
    /// The client's timestamp (now, when it gave none).
    pub ts: Option<f64>,
}

/// Extra status a transport reports (counters per side and the like).
pub trait TransportStatus: Send + Sync + 'static {
    /// The transport's counters as JSON, shown by `status`.
    fn status(&self) -> serde_json::Value;
}

/// A transport that asks its own sources for only the topics the bus's
/// sessions want (the ZeroMQ proxy subscribes its publishers upstream to
/// them): it is told every change of that union ([`Bus::watch_interest`]).
pub trait InterestSink: Send + Sync + 'static {
    /// The union of prefixes client sessions want changed: called in
    /// order, under the router lock, right after the decision that caused
    /// it (so a `subscribe` is in force before it is acknowledged). Must
    /// not block or await; it may take locks of its own, never the
    /// router's.
    fn changed(&self, changes: &[InterestChange]);
}

/// The router, locked for one decision (from [`Bus::router`]). When it is
/// released, the interest changes that decision made are handed to the
/// watching transports ([`InterestSink`]) first, still under the lock, so
/// they see every change in order whichever path made it.
pub struct RouterGuard<'a> {
    /// The lock held.
    guard: MutexGuard<'a, Router>,
    /// Who is told of interest changes.
    sinks: &'a Mutex<Vec<Arc<dyn InterestSink>>>,
}

impl Deref for RouterGuard<'_> {
    type Target = Router;

    fn deref(&self) -> &Router {
        &self.guard
    }
}

impl DerefMut for RouterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Router {
        &mut self.guard
    }
}

impl Drop for RouterGuard<'_> {
    fn drop(&mut self) {
        if !self.guard.has_interest_changes() {
            return;
        }
        let mut changes = Vec::new();
        self.guard.take_interest_changes(&mut changes);
        for s in self.sinks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s.changed(&changes);
        }
    }
}

struct Inner {
    /// The routing state; locked only for a routing decision, never across I/O.
    router: Mutex<Router>,
    /// Transports told of interest changes (locked after the router, never
    /// before it).
    interest: Mutex<Vec<Arc<dyn InterestSink>>>,
    /// Runs hooks off the routing path.
    hooks: HookEngine,
    /// When the bus started, for status.
    started: Instant,
    /// Status sources registered by transports, by name.
    statuses: Mutex<Vec<(&'static str, Arc<dyn TransportStatus>)>>,
    /// Tracks session tasks so shutdown can wait for them to drain.
    tasks: TaskTracker,
}

/// The handle transports use: router, hook engine, counters. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    /// A bus with the given router limits and hook engine.
    pub fn new(cfg: RouterConfig, hooks: HookEngine) -> Bus {
        Bus {
            inner: Arc::new(Inner {
                router: Mutex::new(Router::new(cfg)),
                interest: Mutex::new(Vec::new()),
                hooks,
                started: Instant::now(),
                statuses: Mutex::new(Vec::new()),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Locks the router for one decision. Never hold the guard across an
    /// await (the router is plain state). Releasing it hands the
    /// decision's interest changes to the watching transports.
    pub fn router(&self) -> RouterGuard<'_> {
        RouterGuard {
            guard: self.inner.router.lock().unwrap_or_else(|p| p.into_inner()),
            sinks: &self.inner.interest,
        }
    }

    /// Tells `sink` the topic prefixes client sessions want, now (every
    /// prefix as [`InterestChange::Added`]) and at every change from now
    /// on, in order, until [`Bus::unwatch_interest`].
    pub fn watch_interest(&self, sink: Arc<dyn InterestSink>) {
        let mut r = self.router();
        let now: Vec<InterestChange> = r
            .watch_interest()
            .into_iter()
            .map(InterestChange::Added)
            .collect();
        if !now.is_empty() {
            sink.changed(&now);
        }
        self.inner
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sink);
        drop(r);
    }

    /// Stops telling `sink` of interest changes.
    pub fn unwatch_interest(&self, sink: &Arc<dyn InterestSink>) {
        let mut r = self.router();
        let mut sinks = self
            .inner
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        sinks.retain(|s| !Arc::ptr_eq(s, sink));
        if sinks.is_empty() {
            r.unwatch_interest();
        }
        drop(sinks);
        drop(r);
    }

    /// The hook engine.
    pub fn hooks(&self) -> &HookEngine {
        &self.inner.hooks
    }

    /// The tracker of session tasks (spawn them here so shutdown waits).
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Opens a client session for `transport`; returns its id and the
    /// reader end of its outbox.
    pub fn connect(&self, transport: &'static str) -> (SessionId, OutboxReader) {
        let mut r = self.router();
        let (tx, rx) = r.new_outbox();
        let id = r.connect(transport, tx, Instant::now());
        (id, rx)
    }

    /// Opens a transport's own sink session (not evicted for silence),
    /// e.g. the ZeroMQ proxy's bridge into the router, bounded at
    /// `capacity` deliveries (and the configured bytes).
    pub fn attach(&self, transport: &'static str, capacity: usize) -> (SessionId, OutboxReader) {
        let mut r = self.router();
        let bounds = Bounds::new(capacity, r.config().outbox_bytes);
        let (tx, rx) = outbox(bounds, r.budget().clone());
        let id = r.connect_sink(transport, tx, Instant::now());
        (id, rx)
    }

    /// Waits out a [`Blocked`] decision for the sending session: for each
    /// full target in turn, until it drained below its low-water mark
    /// (the message is then delivered), or made no progress for the
    /// slow-consumer timeout (its policy applies), or went away. Meanwhile
    /// the sender reads nothing more, so the kernel pushes back on the
    /// sending process. Returns false when `cancel` fired first (the
    /// sender's session is closing; what was still owed is counted as
    /// dropped).
    pub async fn settle(&self, blocked: Blocked, cancel: &CancellationToken) -> bool {
        let started = Instant::now();
        let timeout = self.router().config().slow_consumer_timeout;
        let Blocked { delivery, waits } = blocked;
        let mut waits: std::collections::VecDeque<WaitOn> = waits.into();
        let mut done = true;
        while let Some(w) = waits.pop_front() {
            // A wait that ends at once, again and again, must still let
            // the rest of the runtime run (the session whose end would
            // settle it among them): one unit of the task's budget per
            // round, a yield when it is spent.
            tokio::task::consume_budget().await;
            let verdict = match &w {
                WaitOn::Session { outbox, .. } => wait_session(outbox, timeout, cancel).await,
                // A held mailbox drains only when its name comes back (or
                // its grace ends): look again every few milliseconds.
                WaitOn::Held { .. } => tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => Some(Verdict::Room),
                    _ = cancel.cancelled() => None,
                },
            };
            let Some(verdict) = verdict else {
                waits.push_front(w);
                done = false;
                break;
            };
            if let Some(next) = self.router().resume(&w, &delivery, verdict, Instant::now()) {
                waits.push_front(next);
            }
        }
        let mut r = self.router();
        if !done {
            delivery.fail(|| {
                ProtocolError::new(
                    crate::error::ErrorCode::NotDelivered,
                    "dropped: the sending session closed while it waited",
                )
            });
            r.abandon(waits.len());
        }
        r.end_wait(started.elapsed());
        done
    }

    /// Closes a session. A registered name is held for the grace period;
    /// returns it, for [`Bus::give_back`].
    pub fn detach(&self, sid: SessionId) -> Option<String> {
        self.router().disconnect(sid, Instant::now())
    }

    /// Closes a session whose writer ended already, with what it could
    /// not write (see [`Router::disconnect_with`]).
    pub fn detach_with(&self, sid: SessionId, unsent: std::collections::VecDeque<Delivery>) {
        self.router().disconnect_with(sid, unsent, Instant::now());
    }

    /// Gives back what a closed session's writer could not write: held
    /// for its name (returned by [`Bus::detach`]), or counted as lost.
    pub fn give_back(&self, name: Option<&str>, unsent: std::collections::VecDeque<Delivery>) {
        if unsent.is_empty() {
            return;
        }
        let mut r = self.router();
        match name {
            Some(name) => r.restore(name, unsent, Instant::now()),
            None => r.count_unsent(unsent),
        }
    }

    /// Notes inbound traffic from a session that routes nothing (a
    /// request, or a frame refused).
    pub fn touch(&self, sid: SessionId) {
        self.router().touch(sid, Instant::now());
    }

    /// Registers `name` for the session (the router answers `registered`
    /// and replays what was held for the name).
    pub fn register(&self, sid: SessionId, name: &str) -> Result<(), ProtocolError> {
        self.router()
            .register(sid, name, Instant::now())
            .map(|_| ())
    }

    /// The registered endpoints and their session ids, sorted.
    pub fn endpoints(&self) -> Vec<(String, String)> {
        self.router().endpoints()
    }

    /// Notes that a session stopped reading because its own outbox is
    /// full (its peer does not read what it is sent); [`Bus::end_wait`]
    /// when it goes on.
    pub fn begin_own_wait(&self) {
        self.router().begin_own_wait();
    }

    /// Notes that a wait begun by [`Bus::begin_own_wait`] ended after
    /// `waited`.
    pub fn end_wait(&self, waited: Duration) {
        self.router().end_wait(waited);
    }

    /// The hook event of a routed message, when some hook wants it (the
    /// one place that decides this for every transport).
    pub fn message_hook_event(
        &self,
        transport: &'static str,
        msg: &BusMessage,
        routed: &Routed,
    ) -> Option<HookEvent> {
        // The target as routed (a bad one never got here).
        let to = msg.str_field("to").ok().flatten().filter(|t| !t.is_empty());
        self.inner
            .hooks
            .wants(HookEventKind::Message, transport, to.as_deref(), None)
            .then(|| {
                let to = to.map(|t| t.into_owned());
                HookEvent::message(transport, to, routed.frame.slice(4..))
            })
    }

    /// Publishes a topic message from a transport that cannot wait (the
    /// ZeroMQ bridge: PUB semantics, a full subscriber's copy is dropped
    /// and counted) to every other subscribed session, and offers it to
    /// the hooks. The message is wrapped once: subscribers and the hook
    /// event share its Unix JSON encoding.
    pub fn publish(&self, transport: &'static str, from: SessionId, msg: TopicMessage) -> usize {
        let hooks = &self.inner.hooks;
        let wanted = hooks.wants(HookEventKind::Topic, transport, None, Some(&msg.topic));
        let (n, d) = {
            let mut r = self.router();
            let d = r.topic_delivery(msg);
            (r.publish_delivery(from, &d, Full::Drop).0, d)
        };
        if wanted {
            if let Some(m) = d.topic_message() {
                hooks.offer(HookEvent::topic(transport, m.topic.clone(), d.unix_json()));
            }
        }
        n
    }

    /// Routes what a session sent, in order, under one router lock: each
    /// item is noted as the session's traffic; a message is routed (a
    /// receipt asked for with `"ack": true` is sent once written) or
    /// answered with an error; a publish goes to every other subscribed
    /// session. Stops after an item that found a target full and returns
    /// that decision: the session waits it out ([`Bus::settle`]), then
    /// submits the rest, with `full` [`Full::Force`] for what it had
    /// already read (see [`Full`]). The routed items are offered to the
    /// hooks outside the lock.
    pub fn submit(
        &self,
        transport: &'static str,
        sid: SessionId,
        batch: &mut Vec<Inbound>,
        full: Full,
    ) -> Option<Blocked> {
        if batch.is_empty() {
            return None;
        }
        let hooks = &self.inner.hooks;
        let mut events: Vec<HookEvent> = Vec::new();
        let mut blocked = None;
        let mut done = 0;
        {
            let now = Instant::now();
            let unix_now = crate::clock::unix_now();
            let mut r = self.router();
            for item in batch.iter_mut() {
                done += 1;
                let b = match item {
                    Inbound::Message(msg) => match r.route_with(sid, msg, now, full) {
                        Ok(mut routed) => {
                            events.extend(self.message_hook_event(transport, msg, &routed));
                            routed.blocked.take()
                        }
                        Err(e) => {
                            tracing::debug!(sid, code = %e.code, detail = %e.detail, "protocol error");
                            let id = msg.raw("id").map(|i| i.to_raw_value());
                            r.reply(sid, Delivery::notice(Notice::error(e, id)), true);
                            None
                        }
                    },
                    Inbound::Publish(p) => {
                        r.touch(sid, now);
                        let origin = match r.name_of(sid) {
                            Some(name) => name.to_owned(),
                            None => p.origin.take().unwrap_or_else(|| "anonymous".to_owned()),
                        };
                        let data = std::mem::replace(&mut p.data, null_json());
                        let d = r.topic_delivery(TopicMessage {
                            topic: std::mem::take(&mut p.topic),
                            origin,
                            data,
                            ts: p.ts.unwrap_or(unix_now),
                            seq: None,
                        });
                        let (_, b) = r.publish_delivery(sid, &d, full);
                        if let Some(m) = d.topic_message() {
                            if hooks.wants(HookEventKind::Topic, transport, None, Some(&m.topic)) {
                                events.push(HookEvent::topic(
                                    transport,
                                    m.topic.clone(),
                                    d.unix_json(),
                                ));
                            }
                        }
                        b
                    }
                };
                if b.is_some() {
                    blocked = b;
                    break;
                }
            }
        }
        if done == batch.len() {
            batch.clear();
        } else {
            batch.drain(..done);
        }
        for ev in events {
            hooks.offer(ev);
        }
        blocked
    }

    /// Subscribes a session to a topic prefix (refused past its limits).
    pub fn subscribe(&self, sid: SessionId, prefix: &str) -> Result<(), ProtocolError> {
        self.router().subscribe(sid, prefix)
    }

    /// Subscribes a session to a topic prefix and starts its snapshot of
    /// the kept values (None: it held the prefix already); refused when
    /// the bus keeps none (`no_last_value`) or past its limits.
    pub fn subscribe_snapshot(
        &self,
        sid: SessionId,
        prefix: &str,
    ) -> Result<Option<crate::router::snapshot::Snapshot>, ProtocolError> {
        self.router().subscribe_snapshot(sid, prefix)
    }

    /// Queues the next chunk of a snapshot (one router lock).
    pub fn snapshot_chunk(
        &self,
        sid: SessionId,
        snap: &mut crate::router::snapshot::Snapshot,
    ) -> crate::router::snapshot::SnapshotStep {
        self.router().snapshot_chunk(sid, snap)
    }

    /// Starts (or changes) traffic monitoring for a session (see
    /// [`crate::router::monitor`]); returns the filter and bound in force.
    pub fn monitor(
        &self,
        sid: SessionId,
        spec: crate::router::monitor::MonitorSpec,
    ) -> Result<crate::router::monitor::MonitorSpec, ProtocolError> {
        self.router().monitor(sid, spec)
    }

    /// Removes a topic prefix of a session.
    pub fn unsubscribe(&self, sid: SessionId, prefix: &str) -> bool {
        self.router().unsubscribe(sid, prefix)
    }

    /// Registers a transport's status source.
    pub fn add_status(&self, name: &'static str, src: Arc<dyn TransportStatus>) {
        self.inner
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, src));
    }

    /// The router's snapshot, the hooks' counters and each transport's
    /// status, as JSON (the `stats` reply and `status` output).
    pub fn status(&self) -> serde_json::Value {
        let (router, traffic, monitors): (RouterStats, _, _) = {
            let r = self.router();
            (r.stats(Instant::now()), r.traffic(), r.monitor_stats())
        };
        let mut transports = serde_json::Map::new();
        for (name, src) in self
            .inner
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            transports.insert((*name).to_owned(), src.status());
        }
        serde_json::json!({
            "uptime_s": self.inner.started.elapsed().as_secs_f64(),
            "pid": std::process::id(),
            "router": router,
            "traffic": traffic,
            "monitors": monitors,
            "hooks": self.inner.hooks.stats(),
            "transports": transports,
        })
    }

    /// Runs the router's upkeep (heartbeat eviction, held-name expiry)
    /// every `every` until `shutdown`.
    pub fn spawn_sweeper(
        &self,
        every: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let bus = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let (evicted, peak, used) = {
                            let mut r = bus.router();
                            let evicted = r.sweep(Instant::now());
                            let (peak, used) = r.budget().take_peak();
                            (evicted, peak, used)
                        };
                        if !evicted.is_empty() {
                            tracing::info!(count = evicted.len(), "evicted silent sessions");
                        }
                        // After a burst, give the freed memory back to the
                        // system (the allocator keeps it otherwise).
                        if peak > 16 << 20 && used < peak / 4 {
                            release_free_memory();
                        }
                    }
                }
            }
        })
    }

    /// Closes every session's outbox (shutdown): writers drain, then end.
    pub fn close_all(&self, last: Option<Delivery>) {
        self.router().close_all(last);
    }

    /// The reply end for a session's own answers (used by transports that
    /// queue replies without a routing decision).
    pub fn reply(&self, sid: SessionId, d: Delivery, is_error: bool) {
        self.router().reply(sid, d, is_error);
    }
}

/// Waits on one full outbox: room (below its low-water mark), the stuck
/// verdict (no progress for `timeout`; declared here if nobody did yet),
/// or gone (closed). None when `cancel` fired first.
async fn wait_session(
    outbox: &Outbox,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Option<Verdict> {
    loop {
        if outbox.is_closed() {
            return Some(Verdict::Gone);
        }
        if outbox.is_stuck() {
            return Some(Verdict::Stuck);
        }
        if outbox.has_room() {
            return Some(Verdict::Room);
        }
        let stalled = outbox.stalled_for();
        if stalled >= timeout {
            outbox.mark_stuck();
            return Some(Verdict::Stuck);
        }
        tokio::select! {
            // Room came (or the queue closed, or was declared stuck):
            // every sender waiting at that moment goes on, even if one
            // woken before it filled the queue again; each pushes what it
            // had read, a bounded overrun (see `Full::Force`).
            _ = outbox.room() => {
                if outbox.is_closed() {
                    return Some(Verdict::Gone);
                }
                if outbox.is_stuck() {
                    return Some(Verdict::Stuck);
                }
                return Some(Verdict::Room);
            }
            _ = tokio::time::sleep(timeout - stalled) => {}
            _ = cancel.cancelled() => return None,
        }
    }
}

/// Returns the allocator's free memory to the system, where the C
/// library can (glibc's `malloc_trim`).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// JSON `null`, raw.
fn null_json() -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string("null".to_owned())
        .unwrap_or_else(|_| unreachable!("null is JSON"))
}
