//! The `Transport` trait and the `Bus` handle every transport is given.
//!
//! A transport turns its wire into router sessions: it attaches sessions,
//! submits what they send, and writes what the router queues for them. A
//! new transport (TCP, WebSocket, shared memory) needs no change to the
//! router or the hook engine: everything it needs is on [`Bus`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::{Delivery, TopicMessage};
use crate::error::ProtocolError;
use crate::hooks::{HookEngine, HookEvent, HookEventKind};
use crate::message::BusMessage;
use crate::outbox::{outbox, OutboxReader};
use crate::router::{Routed, Router, RouterConfig, SessionId};
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

/// Extra status a transport reports (counters per side and the like).
pub trait TransportStatus: Send + Sync + 'static {
    /// The transport's counters as JSON, shown by `status`.
    fn status(&self) -> serde_json::Value;
}

struct Inner {
    /// The routing state; locked only for a routing decision, never across I/O.
    router: Mutex<Router>,
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
                hooks,
                started: Instant::now(),
                statuses: Mutex::new(Vec::new()),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Locks the router for one decision. Never hold the guard across an
    /// await (the router is plain state).
    pub fn router(&self) -> MutexGuard<'_, Router> {
        self.inner.router.lock().unwrap_or_else(|p| p.into_inner())
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
        let cap = self.router().config().outbox_capacity;
        let (tx, rx) = outbox(cap);
        let id = self.router().connect(transport, tx, Instant::now());
        (id, rx)
    }

    /// Opens a transport's own sink session (not evicted for silence),
    /// e.g. the ZeroMQ proxy's bridge into the router.
    pub fn attach(&self, transport: &'static str, capacity: usize) -> (SessionId, OutboxReader) {
        let (tx, rx) = outbox(capacity);
        let id = self.router().connect_sink(transport, tx, Instant::now());
        (id, rx)
    }

    /// Closes a session.
    pub fn detach(&self, sid: SessionId) {
        self.router().disconnect(sid, Instant::now());
    }

    /// The hook event of a routed message, when some hook wants it (the
    /// one place that decides this for every transport).
    pub fn message_hook_event(
        &self,
        transport: &'static str,
        routed: &Routed,
    ) -> Option<HookEvent> {
        self.inner
            .hooks
            .wants(
                HookEventKind::Message,
                transport,
                routed.to.as_deref(),
                None,
            )
            .then(|| HookEvent::message(transport, routed.to.clone(), routed.frame.slice(4..)))
    }

    /// Routes a `message` from a session and offers it to the hooks.
    pub fn route(
        &self,
        transport: &'static str,
        sid: SessionId,
        msg: &mut BusMessage,
    ) -> Result<Routed, ProtocolError> {
        let routed = self.router().route(sid, msg, Instant::now())?;
        if let Some(ev) = self.message_hook_event(transport, &routed) {
            self.inner.hooks.offer(ev);
        }
        Ok(routed)
    }

    /// Publishes a topic message from a session (or a transport's sink) to
    /// every other subscribed session, and offers it to the hooks. The
    /// message is wrapped once: subscribers and the hook event share its
    /// Unix JSON encoding.
    pub fn publish(&self, transport: &'static str, from: SessionId, msg: TopicMessage) -> usize {
        let hooks = &self.inner.hooks;
        let wanted = hooks.wants(HookEventKind::Topic, transport, None, Some(&msg.topic));
        let d = Delivery::topic(msg);
        let n = self.router().publish_delivery(from, &d);
        if wanted {
            if let Some(m) = d.topic_message() {
                hooks.offer(HookEvent::topic(transport, m.topic.clone(), d.unix_json()));
            }
        }
        n
    }

    /// Subscribes a session to a topic prefix.
    pub fn subscribe(&self, sid: SessionId, prefix: &str) {
        self.router().subscribe(sid, prefix);
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
        let router: RouterStats = self.router().stats(Instant::now());
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
                        let evicted = bus.router().sweep(Instant::now());
                        if !evicted.is_empty() {
                            tracing::info!(count = evicted.len(), "evicted silent sessions");
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
