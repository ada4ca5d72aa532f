//! The proxy ("PostOffice"): an XSUB side facing publishers, an XPUB side
//! facing subscribers, and an optional capture PUB side, in our own ZMTP
//! over tokio. This file holds its configuration, bind and accept, and
//! the public [`ZmqProxy`] / [`ProxyHandle`]; the parts:
//!
//! - `hub.rs`: subscriptions and fan-out, plain state (`upstream.rs`: the
//!   upstream log shared by all publishers);
//! - `publisher_conn.rs`, `subscriber_conn.rs`: the connection loops
//!   (`conn.rs`: what they share);
//! - `queue.rs` (`crate::bounded`): the per-subscriber queues.
//!
//! - Every connection has a reader task and a writer task; nothing is
//!   awaited while a lock is held.
//! - A message read from a publisher is one `Bytes` of its wire form; it is
//!   queued, without copy or re-encoding, to every subscriber whose prefixes
//!   match (bounded per-subscriber queues: by default a full queue drops and
//!   counts, ZeroMQ PUB semantics, so a stalled subscriber never holds the
//!   others back).
//! - Lossless mode (opt-in, the idea of libzmq's `ZMQ_XPUB_NODROP`): a full
//!   queue of a subscriber that still makes progress makes the publisher
//!   connection stop reading (so the kernel pushes back on the publishing
//!   process) until that queue drains below its low-water mark; the others
//!   got the message at once. A subscriber that made no progress for the
//!   slow-consumer timeout is stuck: it gets the default policy (drop and
//!   count) until its writer writes again, so it delays its publishers at
//!   most that long and nobody else at all. Dispatch itself never waits:
//!   it returns the full peers, and the publisher's async read loop waits.
//! - Subscriptions are reference-counted across subscribers and flow
//!   upstream to every publisher (and are replayed to a new publisher)
//!   from one shared log with a cursor per publisher: changes coalesce
//!   per prefix, nothing is queued per publisher beyond one 64 KiB
//!   batch, and the cancels kept for lagging publishers are bounded in
//!   bytes across all of them (see `Upstream`).
//!   They live in an index (prefix → peers, plus the prefix lengths in
//!   use), so a change and a message cost the same whatever the total
//!   count; each peer's own multiset belongs to its connection task.
//!   Per-peer limits (count, bytes, prefix length) ignore and count
//!   what breaks them, which then never goes upstream.
//! - A subscription that is a bare topic prefix (`RAW/`, as the reference
//!   `Receiver` sends) also means the quoted prefix of its topic frames
//!   (`"RAW/`), unless `strict_subscriptions` (see `subscription.rs`).
//! - With `last_value`, the newest envelope of each topic is kept (bounded
//!   in topics and bytes) and replayed to a subscriber when it subscribes,
//!   before its live traffic (see `replay.rs`).
//! - A connection that neither subscribes nor publishes within the idle
//!   timeout after its handshake is closed, so idle peers cannot hold the
//!   connection limit.
//! - A broken peer (reset, half frame, garbage) ends only its connection.
//! - Heartbeats (opt-in, `heartbeat.rs`): PINGs to every peer and a
//!   timeout for silent ones, so peers of a host that died (half-open TCP
//!   connections) are dropped in seconds; every TCP socket also has TCP
//!   keepalive (minutes).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio_util::sync::CancellationToken;

use super::conn::Shared;
use super::endpoint::{Endpoint, Listener};
use super::heartbeat::HeartbeatConfig;
use super::hub::{Hub, Side};
use super::publisher_conn::publisher_conn;
use super::subscriber_conn::subscriber_conn;
use super::zmtp::{self, RawMessage};
use super::ZmqError;
use crate::last_value::LastValueLimits;

/// Default address facing publishers (the reference's `XSUB_ADDR`).
pub const DEFAULT_FRONTEND: &str = "tcp://127.0.0.1:6000";
/// Default address facing subscribers (the reference's `XPUB_ADDR`).
pub const DEFAULT_BACKEND: &str = "tcp://127.0.0.1:6001";
/// Default capture address (the reference's `DEBUG_ADDR`).
pub const DEFAULT_CAPTURE: &str = "tcp://127.0.0.1:6002";
/// Default slow-consumer timeout of lossless mode.
pub const DEFAULT_SLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most subscriptions one subscriber peer may hold.
pub const DEFAULT_MAX_SUBS_PER_PEER: usize = 100_000;
/// Default most bytes of prefixes one subscriber peer may hold.
pub const DEFAULT_MAX_SUB_BYTES_PER_PEER: usize = 16 << 20;
/// Default longest subscription prefix (topics are short routing keys).
pub const DEFAULT_MAX_PREFIX_LEN: usize = 1024;
/// Default time a connection may stay idle after its handshake.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Limits and addresses of a proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// XSUB side, where publishers connect.
    pub frontend: String,
    /// XPUB side, where subscribers connect.
    pub backend: String,
    /// Optional PUB side that gets a copy of all traffic.
    pub capture: Option<String>,
    /// Largest message accepted (sum of its frames); larger ones are
    /// skipped and counted (libzmq has no limit by default).
    pub max_msg_size: usize,
    /// Per-subscriber queue limit in messages (libzmq's SNDHWM is 1000; we
    /// hold more so bursts are absorbed, and drop and count beyond it).
    pub sub_queue: usize,
    /// Per-subscriber queue limit in bytes.
    pub sub_queue_bytes: usize,
    /// How long a peer may take to complete the ZMTP handshake.
    pub handshake_timeout: Duration,
    /// Maximum open connections per side; more are closed and counted.
    pub max_connections: usize,
    /// Lossless mode: a full subscriber queue pushes back on the publisher
    /// (it stops being read) instead of dropping, for subscribers that
    /// make progress. Off by default: ZeroMQ PUB semantics (drop and
    /// count), which is what libzmq peers expect of a proxy. Applies to
    /// the XPUB side only: the capture side is a debugging copy and must
    /// never slow production, and messages from the router bridge are
    /// still dropped and counted when a queue is full (the bridge cannot
    /// wait on one subscriber without delaying the router).
    pub lossless: bool,
    /// Lossless mode: a subscriber whose socket accepted nothing for this
    /// long while it had work is stuck; waiting publishers then drop for
    /// it (counted) and read on, so one dead peer delays its publishers at
    /// most this long. Progress is seen at our end of the socket (which
    /// in this mode keeps little unsent data), so a healthy subscriber
    /// still working through megabytes in its own receive buffer can look
    /// idle for a while (TCP reopens a closed window only once the reader
    /// freed a good part of that buffer): keep this well above that time.
    pub slow_timeout: Duration,
    /// Most subscriptions (a multiset: a repeated prefix counts again) one
    /// subscriber peer may hold; more are ignored and counted
    /// (`subs_over_count`), never forwarded upstream.
    pub max_subs_per_peer: usize,
    /// Most bytes of prefixes one subscriber peer may hold; more are
    /// ignored and counted (`subs_over_bytes`).
    pub max_sub_bytes_per_peer: usize,
    /// Longest prefix accepted; longer ones are ignored and counted
    /// (`subs_too_long`).
    pub max_prefix_len: usize,
    /// A connection that completed its handshake but neither subscribed
    /// (subscriber sides) nor published (publisher side) for this long is
    /// closed and counted (`idle_closed`), so idle peers cannot hold the
    /// connection limit. A peer that did either once is never idle.
    pub idle_timeout: Duration,
    /// Most bytes of upstream cancels kept for publishers that have not
    /// been sent them yet, across all publishers (prefix bytes plus a
    /// fixed cost per entry; gauge `upstream_pending_bytes`). Live
    /// subscriptions are held once for all publishers and bounded by the
    /// per-peer limits; changes coalesce per prefix, so only cancels of
    /// prefixes that left while some publisher lagged take room here.
    /// Past it the oldest are discarded and the publishers that needed
    /// them are resynced (`upstream_resyncs`, `upstream_cancels_dropped`).
    pub max_upstream_pending_bytes: usize,
    /// What a lagging subscriber's queue does with a topic's envelopes:
    /// queue them all (the default: ZeroMQ PUB semantics, or pushback with
    /// `lossless`) or conflate (at most one queued envelope per topic, the
    /// newest in the place of the old, counted as `conflated`).
    pub slow_policy: crate::router::SlowPolicy,
    /// ZMTP 3.1 heartbeats with every peer (libzmq's
    /// `ZMQ_HEARTBEAT_IVL` / `_TIMEOUT` / `_TTL`): a PING every interval,
    /// and a peer silent for the timeout after one is dropped (counted as
    /// `heartbeat_timeouts`). Off by default, as in libzmq. A peer's own
    /// PINGs are answered, and the TTL they carry honoured, either way.
    /// A subscriber that reads nothing for the timeout (stuck, or too
    /// slow to reach our PING) is dropped too, as libzmq does.
    pub heartbeat: HeartbeatConfig,
    /// Last-value cache (`--last-value`): keep the newest envelope of each
    /// topic, within these bounds, and replay the matching ones to a
    /// subscriber of the XPUB side when it subscribes (before its live
    /// traffic, to it alone; see [`LastValueReplay`] for which ones). The
    /// proxy then subscribes its publishers to everything, so the cache
    /// sees every topic (no filtering at the source). None: no cache, no
    /// replay.
    pub last_value: Option<LastValueLimits>,
    /// With `last_value`: which subscribers get the replay.
    pub last_value_replay: LastValueReplay,
    /// Keep only libzmq's raw byte-prefix meaning for every subscription.
    /// Off by default: a subscription that is not empty and does not start
    /// with `"` is also read as a prefix of the topic's text (the
    /// reference `Receiver` subscribes with `RAW/`, which matches no JSON
    /// topic frame): its quoted form (`"RAW/`) is held beside the bytes as
    /// sent, and both are matched, counted and forwarded upstream.
    pub strict_subscriptions: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            frontend: DEFAULT_FRONTEND.into(),
            backend: DEFAULT_BACKEND.into(),
            capture: None,
            max_msg_size: 16 * 1024 * 1024,
            sub_queue: 100_000,
            sub_queue_bytes: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(5),
            max_connections: 4096,
            lossless: false,
            slow_timeout: DEFAULT_SLOW_TIMEOUT,
            max_subs_per_peer: DEFAULT_MAX_SUBS_PER_PEER,
            max_sub_bytes_per_peer: DEFAULT_MAX_SUB_BYTES_PER_PEER,
            max_prefix_len: DEFAULT_MAX_PREFIX_LEN,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_upstream_pending_bytes: DEFAULT_MAX_UPSTREAM_PENDING_BYTES,
            slow_policy: crate::router::SlowPolicy::Queue,
            heartbeat: HeartbeatConfig::OFF,
            last_value: None,
            last_value_replay: LastValueReplay::All,
            strict_subscriptions: false,
        }
    }
}

crate::choice::choice! {
    /// Which subscribers a last-value cache replays to when they subscribe.
    pub enum LastValueReplay("replay mode", parse_listed) {
        /// Every subscriber but those that declined in their READY
        /// (`X-Hermes-Last-Value: 0`): a plain libzmq SUB gets it unmodified.
        /// Note that the reference `hermes-zmq` `Receiver` stops itself on an
        /// envelope more than 1 s old, which a replayed value usually is.
        #[default]
        All = "all",
        /// Only subscribers that asked in their READY (`X-Hermes-Last-Value:
        /// 1`, our `Receiver` with `last_value: Some(true)`): every other peer
        /// sees what it would see without a cache.
        OptIn = "opt-in",
    }
}

pub use super::stats::{ProxyCounters, ProxySnapshot, ProxyStats, SideCounters, SideSnapshot};
pub use super::upstream::DEFAULT_MAX_UPSTREAM_PENDING_BYTES;

/// Where envelopes read from publishers go besides the subscribers (the
/// router, see `bridge.rs`).
pub trait EnvelopeSink: Send + Sync + 'static {
    /// Offers one message from a publisher that looks like an envelope.
    /// Must not wait; the sink counts what it cannot take or decode.
    fn offer(&self, msg: &RawMessage);
}

/// The addresses a proxy actually bound.
#[derive(Debug, Clone)]
pub struct ProxyEndpoints {
    /// XSUB side (publishers connect here).
    pub frontend: Endpoint,
    /// XPUB side (subscribers connect here).
    pub backend: Endpoint,
    /// Capture side, when enabled.
    pub capture: Option<Endpoint>,
}

/// The ZeroMQ proxy. Bind it, then run it (standalone, or as the bus's
/// ZeroMQ transport through `Transport::serve`).
pub struct ZmqProxy {
    /// Addresses and limits.
    cfg: ProxyConfig,
    /// Bound listeners (front, back, capture), set by [`ZmqProxy::bind`].
    listeners: Option<(Listener, Listener, Option<Listener>)>,
    /// Counters, shared with whoever asked for them.
    stats: Arc<ProxyStats>,
}

impl ZmqProxy {
    /// A proxy that binds when it starts serving.
    pub fn new(cfg: ProxyConfig) -> ZmqProxy {
        ZmqProxy {
            cfg,
            listeners: None,
            stats: Arc::new(ProxyStats::default()),
        }
    }

    /// A proxy bound now (so ports are known, e.g. `tcp://127.0.0.1:0`).
    pub async fn bind(cfg: ProxyConfig) -> Result<ZmqProxy, ZmqError> {
        let mut p = ZmqProxy::new(cfg);
        p.ensure_bound().await?;
        Ok(p)
    }

    async fn ensure_bound(&mut self) -> Result<(), ZmqError> {
        if self.listeners.is_some() {
            return Ok(());
        }
        let front = Listener::bind(&self.cfg.frontend.parse()?).await?;
        let back = Listener::bind(&self.cfg.backend.parse()?).await?;
        let cap = match &self.cfg.capture {
            Some(c) => Some(Listener::bind(&c.parse()?).await?),
            None => None,
        };
        self.listeners = Some((front, back, cap));
        Ok(())
    }

    /// The bound addresses (None before binding).
    pub fn endpoints(&self) -> Option<ProxyEndpoints> {
        let (f, b, c) = self.listeners.as_ref()?;
        Some(ProxyEndpoints {
            frontend: f.local_endpoint().ok()?,
            backend: b.local_endpoint().ok()?,
            capture: match c {
                Some(c) => Some(c.local_endpoint().ok()?),
                None => None,
            },
        })
    }

    /// The proxy's counters (live).
    pub fn stats(&self) -> Arc<ProxyStats> {
        self.stats.clone()
    }

    /// Its addresses and limits.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Serves until `shutdown`. With a `sink`, valid envelopes from
    /// publishers also go there (those the sink wants: it filters). The
    /// proxy subscribes publishers to nothing on the sink's behalf: its
    /// owner holds the upstream prefixes it needs through the handle
    /// (the bus's bridge holds what Unix sessions and hooks want). Hands
    /// `on_ready` a handle, before accepting, to push messages to
    /// subscribers from elsewhere (the router bridge) and hold upstream
    /// prefixes.
    pub async fn run_with(
        mut self,
        sink: Option<Arc<dyn EnvelopeSink>>,
        on_ready: impl FnOnce(ProxyHandle),
        shutdown: CancellationToken,
    ) -> Result<(), ZmqError> {
        self.ensure_bound().await?;
        let Some((front, back, cap)) = self.listeners.take() else {
            return Err(ZmqError::NotBound);
        };
        // A last-value cache wants every topic from the publishers.
        let all_upstream = self.cfg.last_value.is_some();
        let shared = Arc::new(Shared {
            hub: Hub::new(self.cfg.clone(), self.stats.clone()),
            sink,
            upstream_changed: tokio::sync::Notify::new(),
        });
        if all_upstream {
            // Keep an everything-subscription upstream for as long as we
            // run.
            shared.upstream(shared.hub.upstream_add(&Bytes::new()));
        }
        on_ready(ProxyHandle {
            shared: shared.clone(),
        });
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(accept_loop(
            shared.clone(),
            front,
            Role::Publisher,
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(accept_loop(
            shared.clone(),
            back,
            Role::Subscriber(Side::Backend),
            shutdown.clone(),
            tasks.clone(),
        ));
        if let Some(cap) = cap {
            tasks.spawn(accept_loop(
                shared.clone(),
                cap,
                Role::Subscriber(Side::Capture),
                shutdown.clone(),
                tasks.clone(),
            ));
        }
        shutdown.cancelled().await;
        tasks.close();
        // Writers get a moment to flush what is queued.
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        Ok(())
    }

    /// Serves standalone (no router) until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ZmqError> {
        self.run_with(None, |_| {}, shutdown).await
    }
}

/// Lets other parts of the process (the router bridge) send messages to
/// the proxy's subscribers.
#[derive(Clone)]
pub struct ProxyHandle {
    /// The running proxy's shared state.
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Sends one multipart message to every matching subscriber (and the
    /// capture side), as if a publisher had sent it. Never waits: a full
    /// queue drops and counts, in lossless mode too.
    pub fn send(&self, frames: &[&[u8]]) {
        let mut out = BytesMut::new();
        zmtp::put_message(&mut out, frames);
        let msg = RawMessage {
            wire: out.freeze(),
            frames: frames.len(),
        };
        self.shared.hub.dispatch(&msg, Instant::now(), None, false);
    }

    /// [`ProxyHandle::send`] of a numbered envelope: its fifth frame is a
    /// sequence frame (`sequence.rs`), passed to the subscribers that asked
    /// for numbers and left off for the others.
    pub fn send_numbered(&self, frames: &[&[u8]; 5]) {
        let mut out = BytesMut::new();
        zmtp::put_message(&mut out, frames);
        let msg = RawMessage {
            wire: out.freeze(),
            frames: 5,
        };
        self.shared.hub.dispatch(&msg, Instant::now(), None, true);
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.hub.stats
    }

    /// Changes the upstream references of one holder beside the
    /// subscribers (the bus's demand): one more for each of `add`, then
    /// one less for each of `remove`; publishers' writers are woken at
    /// once when the upstream changed.
    pub(super) fn hold_upstream(&self, add: &[Bytes], remove: &[Bytes]) {
        let sh = &self.shared;
        sh.upstream(sh.hub.upstream_apply(add, remove));
    }
}

/// What a listener's connections are.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// XSUB side.
    Publisher,
    /// XPUB or capture side.
    Subscriber(Side),
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Listener,
    role: Role,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) {
    let counters = match role {
        Role::Publisher => &shared.hub.stats.publishers,
        Role::Subscriber(side) => shared.hub.counters(side),
    };
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "zmq proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        if counters.open.load(Ordering::Relaxed) >= shared.hub.cfg.max_connections as u64 {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        counters.open.fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard {
            shared: shared.clone(),
            role,
        };
        let shared = shared.clone();
        let sd = shutdown.clone();
        match role {
            Role::Publisher => tasks.spawn(async move {
                publisher_conn(shared, stream, sd).await;
                drop(guard);
            }),
            Role::Subscriber(side) => tasks.spawn(async move {
                subscriber_conn(shared, stream, side, sd).await;
                drop(guard);
            }),
        };
    }
}

/// Decrements the open-connection count when a connection task ends,
/// whichever way it ends.
struct OpenGuard {
    /// The proxy's state (for its counters).
    shared: Arc<Shared>,
    /// Which side the connection is on.
    role: Role,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let c = match self.role {
            Role::Publisher => &self.shared.hub.stats.publishers,
            Role::Subscriber(side) => self.shared.hub.counters(side),
        };
        c.open.fetch_sub(1, Ordering::Relaxed);
    }
}
