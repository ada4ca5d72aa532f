//! The proxy ("PostOffice"): an XSUB side facing publishers, an XPUB side
//! facing subscribers, and an optional capture PUB side, in our own ZMTP
//! over tokio.
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
//!   upstream to every publisher (and are replayed to a new publisher).
//! - A broken peer (reset, half frame, garbage) ends only its connection.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio_util::sync::CancellationToken;

use super::endpoint::{Endpoint, Listener, ReadHalf, Stream, WriteHalf};
use super::queue::{Pushed, WireQueue};
use super::zmtp::{self, FrameReader, Inbound, RawMessage, SocketType, SubChange, ZmtpError};
use super::ZmqError;
use crate::codec::MSGPACK_MARKER;
use crate::envelope;

/// Default address facing publishers (the reference's `XSUB_ADDR`).
pub const DEFAULT_FRONTEND: &str = "tcp://127.0.0.1:6000";
/// Default address facing subscribers (the reference's `XPUB_ADDR`).
pub const DEFAULT_BACKEND: &str = "tcp://127.0.0.1:6001";
/// Default capture address (the reference's `DEBUG_ADDR`).
pub const DEFAULT_CAPTURE: &str = "tcp://127.0.0.1:6002";
/// Default slow-consumer timeout of lossless mode.
pub const DEFAULT_SLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Most items a subscriber's writer takes per batch (the batch counts as
/// outstanding until written, so it must be small next to the queue).
const WRITE_BATCH_ITEMS: usize = 256;
/// Most bytes a writer takes per batch (at least one item).
const WRITE_BATCH_BYTES: usize = 1 << 20;

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
        }
    }
}

pub use super::stats::{ProxySnapshot, ProxyStats, SideCounters, SideSnapshot};

/// Where envelopes read from publishers go besides the subscribers (the
/// router, see `bridge.rs`).
pub trait EnvelopeSink: Send + Sync + 'static {
    /// Offers one message from a publisher that looks like an envelope.
    /// Must not wait; the sink counts what it cannot take or decode.
    fn offer(&self, msg: &RawMessage);
}

/// Which side a subscriber-like peer is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// XPUB: its subscriptions flow upstream.
    Backend,
    /// Capture PUB: its subscriptions stay local.
    Capture,
}

/// One subscriber connection as the fan-out sees it.
#[derive(Debug)]
struct SubPeer {
    /// What the writer task drains.
    queue: WireQueue,
    /// Whether it accepts MessagePack data frames (said so in READY).
    msgpack: bool,
    /// Its side, for the counters.
    side: Side,
    /// Messages dropped because its queue was full.
    drops: AtomicU64,
}

/// A message a subscriber could not take yet (lossless mode): the peer and
/// the wire form meant for it.
type Waiting = (Arc<SubPeer>, Bytes);

/// Outcome of waiting for room at one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// Queued, or dropped and counted (stuck or gone).
    Done,
    /// The connection is shutting down.
    Cancelled,
}

/// A fan-out target with its prefixes, immutable once published.
#[derive(Debug, Clone)]
struct Target {
    /// The peer.
    peer: Arc<SubPeer>,
    /// Its subscription prefixes (a multiset, as ZMQ counts them).
    prefixes: Arc<[Bytes]>,
}

/// Mutable connection state, changed only on connect, disconnect and
/// subscription changes.
#[derive(Debug, Default)]
struct Control {
    /// Next connection id.
    next_id: u64,
    /// Subscriber-like peers and their prefixes.
    subs: HashMap<u64, (Arc<SubPeer>, Vec<Bytes>)>,
    /// Publishers: the queue of control bytes (subscriptions) to each.
    pubs: HashMap<u64, Arc<WireQueue>>,
    /// Union of the backend subscriptions, with reference counts.
    upstream: HashMap<Bytes, usize>,
}

/// State shared by all connection tasks of one proxy.
struct Hub {
    /// Limits.
    cfg: ProxyConfig,
    /// Counters.
    stats: Arc<ProxyStats>,
    /// Connection and subscription state.
    ctl: Mutex<Control>,
    /// The fan-out targets, rebuilt on every change (copy-on-write) so the
    /// hot path takes only a read lock and an `Arc` clone.
    targets: RwLock<Arc<Vec<Target>>>,
    /// The router bridge, when the proxy runs inside the bus.
    sink: Option<Arc<dyn EnvelopeSink>>,
}

impl Hub {
    fn ctl(&self) -> std::sync::MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counters(&self, side: Side) -> &SideCounters {
        match side {
            Side::Backend => &self.stats.subscribers,
            Side::Capture => &self.stats.capture,
        }
    }

    /// Rebuilds the fan-out targets; call with the control lock held.
    fn publish_targets(&self, ctl: &Control) {
        let mut v: Vec<Target> = ctl
            .subs
            .values()
            .map(|(peer, prefixes)| Target {
                peer: peer.clone(),
                prefixes: prefixes.clone().into(),
            })
            .collect();
        v.retain(|t| !t.prefixes.is_empty());
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    /// Sends a subscription change to every publisher.
    fn broadcast_upstream(ctl: &Control, subscribe: bool, prefix: &[u8]) {
        let mut b = BytesMut::new();
        zmtp::put_subscription(&mut b, subscribe, prefix);
        let b = b.freeze();
        for q in ctl.pubs.values() {
            q.push(b.clone());
        }
    }

    /// Adds one reference to an upstream subscription.
    fn upstream_add(ctl: &mut Control, prefix: Bytes) {
        let n = ctl.upstream.entry(prefix.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            Self::broadcast_upstream(ctl, true, &prefix);
        }
    }

    /// Removes one reference to an upstream subscription.
    fn upstream_remove(ctl: &mut Control, prefix: &Bytes) {
        if let Some(n) = ctl.upstream.get_mut(prefix) {
            *n -= 1;
            if *n == 0 {
                ctl.upstream.remove(prefix);
                Self::broadcast_upstream(ctl, false, prefix);
            }
        }
    }

    fn apply_sub_change(&self, id: u64, side: Side, change: SubChange) {
        let mut ctl = self.ctl();
        let ctl = &mut *ctl;
        let Some((_, prefixes)) = ctl.subs.get_mut(&id) else {
            return;
        };
        match change {
            SubChange::Subscribe(p) => {
                self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                prefixes.push(p.clone());
                if side == Side::Backend {
                    Self::upstream_add(ctl, p);
                }
            }
            SubChange::Cancel(p) => {
                if let Some(i) = prefixes.iter().position(|x| *x == p) {
                    self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                    prefixes.swap_remove(i);
                    if side == Side::Backend {
                        Self::upstream_remove(ctl, &p);
                    }
                }
            }
        }
        self.publish_targets(ctl);
    }

    /// Counts one message dropped for `peer`.
    fn count_drop(&self, peer: &SubPeer) {
        peer.drops.fetch_add(1, Ordering::Relaxed);
        self.counters(peer.side)
            .drops
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `peer` made no progress for the slow-consumer timeout (only
    /// meaningful right after its queue refused a push).
    fn is_stuck(&self, peer: &SubPeer) -> bool {
        peer.queue.stalled_for() >= self.cfg.slow_timeout
    }

    /// Queues one message to every matching subscriber and capture peer.
    /// Never waits. With `waiting` (lossless mode, from a publisher's read
    /// loop), a full XPUB-side peer that is not stuck is added there
    /// instead of dropping; the caller then waits with
    /// [`Hub::deliver_waiting`] before it reads on. Without it, or for a
    /// stuck peer, a full queue drops and counts.
    fn dispatch(&self, msg: &RawMessage, mut waiting: Option<&mut Vec<Waiting>>) {
        let targets = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if targets.is_empty() {
            return;
        }
        let topic = msg.first_frame();
        let msgpack = is_msgpack_envelope(msg);
        let mut json_form: Option<Option<Bytes>> = None;
        for t in targets.iter() {
            if !t.prefixes.iter().any(|p| topic.starts_with(p)) {
                continue;
            }
            let wire = if msgpack && !t.peer.msgpack {
                let form = json_form.get_or_insert_with(|| {
                    let j = transcode_to_json(msg);
                    if j.is_some() {
                        self.stats.transcoded.fetch_add(1, Ordering::Relaxed);
                    }
                    j
                });
                match form {
                    Some(b) => b.clone(),
                    None => continue,
                }
            } else {
                msg.wire.clone()
            };
            match t.peer.queue.push(wire.clone()) {
                Pushed::Ok => {}
                Pushed::Full => match waiting.as_deref_mut() {
                    Some(w) if t.peer.side == Side::Backend && !self.is_stuck(&t.peer) => {
                        w.push((t.peer.clone(), wire));
                    }
                    _ => self.count_drop(&t.peer),
                },
                Pushed::Closed => self.count_drop(&t.peer),
            }
        }
    }

    /// Lossless mode: delivers each waiting message in order, waiting for
    /// room at its subscriber (below the queue's low-water mark) for as
    /// long as that subscriber makes progress; drops and counts for a
    /// stuck or closed one. Counts the time spent as publisher pushback.
    async fn deliver_waiting(
        &self,
        waiting: &mut Vec<Waiting>,
        done: &CancellationToken,
    ) -> Waited {
        let start = Instant::now();
        self.stats.publisher_blocks.fetch_add(1, Ordering::Relaxed);
        let mut res = Waited::Done;
        for (peer, wire) in waiting.drain(..) {
            if res == Waited::Cancelled {
                continue;
            }
            res = self.wait_and_push(&peer, wire, done).await;
        }
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.stats
            .publisher_blocked_ms
            .fetch_add(ms, Ordering::Relaxed);
        res
    }

    /// Pushes `wire` to `peer`, waiting for room while it makes progress.
    async fn wait_and_push(&self, peer: &SubPeer, wire: Bytes, done: &CancellationToken) -> Waited {
        loop {
            match peer.queue.push(wire.clone()) {
                Pushed::Ok => return Waited::Done,
                Pushed::Closed => {
                    self.count_drop(peer);
                    return Waited::Done;
                }
                Pushed::Full => {}
            }
            let stalled = peer.queue.stalled_for();
            let Some(left) = self
                .cfg
                .slow_timeout
                .checked_sub(stalled)
                .filter(|d| !d.is_zero())
            else {
                self.stats.stuck_subscribers.fetch_add(1, Ordering::Relaxed);
                self.count_drop(peer);
                tracing::warn!(
                    stalled_ms = stalled.as_millis() as u64,
                    "zmq proxy: subscriber made no progress, dropping for it until it does"
                );
                return Waited::Done;
            };
            tokio::select! {
                _ = done.cancelled() => return Waited::Cancelled,
                // On timeout the loop re-checks progress: a peer that wrote
                // meanwhile gets a fresh timeout.
                _ = tokio::time::timeout(left, peer.queue.wait_room(wire.len())) => {}
            }
        }
    }
}

/// Whether a message is a 4-frame envelope whose data frame is MessagePack.
fn is_msgpack_envelope(msg: &RawMessage) -> bool {
    msg.frames == 4 && msg.frames().nth(2).and_then(|d| d.first().copied()) == Some(MSGPACK_MARKER)
}

/// The same envelope with its data frame as JSON (for peers without the
/// MessagePack opt-in); None when the data cannot be transcoded.
fn transcode_to_json(msg: &RawMessage) -> Option<Bytes> {
    let [t, o, d, ts] = msg.frames_n::<4>()?;
    let raw = crate::codec::to_raw_json(d).ok()?;
    let mut out = BytesMut::with_capacity(msg.wire.len() + 16);
    zmtp::put_message(&mut out, &[t, o, raw.get().as_bytes(), ts]);
    Some(out.freeze())
}

/// Wire bytes of a message (frame headers included), for the counters.
fn count_bytes(msg: &RawMessage) -> u64 {
    msg.wire.len() as u64
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

    /// Serves until `shutdown`. With a `sink`, valid envelopes from
    /// publishers also go there, and the proxy subscribes publishers to
    /// everything so the sink sees all traffic. Returns a handle to push
    /// messages to subscribers from elsewhere (the router bridge) through
    /// `on_ready` before accepting.
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
        let all_upstream = sink.is_some();
        let hub = Arc::new(Hub {
            cfg: self.cfg.clone(),
            stats: self.stats.clone(),
            ctl: Mutex::new(Control::default()),
            targets: RwLock::new(Arc::new(Vec::new())),
            sink,
        });
        if all_upstream {
            // The router wants every topic: keep an everything-subscription
            // upstream for as long as we run.
            Hub::upstream_add(&mut hub.ctl(), Bytes::new());
        }
        on_ready(ProxyHandle { hub: hub.clone() });
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(accept_loop(
            hub.clone(),
            front,
            Role::Publisher,
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(accept_loop(
            hub.clone(),
            back,
            Role::Subscriber(Side::Backend),
            shutdown.clone(),
            tasks.clone(),
        ));
        if let Some(cap) = cap {
            tasks.spawn(accept_loop(
                hub.clone(),
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
    hub: Arc<Hub>,
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
        self.hub.dispatch(&msg, None);
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.hub.stats
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
    hub: Arc<Hub>,
    listener: Listener,
    role: Role,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) {
    let counters = match role {
        Role::Publisher => &hub.stats.publishers,
        Role::Subscriber(side) => hub.counters(side),
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
        if counters.open.load(Ordering::Relaxed) >= hub.cfg.max_connections as u64 {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        counters.open.fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard {
            hub: hub.clone(),
            role,
        };
        let hub = hub.clone();
        let sd = shutdown.clone();
        match role {
            Role::Publisher => tasks.spawn(async move {
                publisher_conn(hub, stream, sd).await;
                drop(guard);
            }),
            Role::Subscriber(side) => tasks.spawn(async move {
                subscriber_conn(hub, stream, side, sd).await;
                drop(guard);
            }),
        };
    }
}

/// Decrements the open-connection count when a connection task ends,
/// whichever way it ends.
struct OpenGuard {
    /// The proxy's state (for its counters).
    hub: Arc<Hub>,
    /// Which side the connection is on.
    role: Role,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let c = match self.role {
            Role::Publisher => &self.hub.stats.publishers,
            Role::Subscriber(side) => self.hub.counters(side),
        };
        c.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection's end by its cause.
fn note_end(counters: &SideCounters, err: &ZmtpError) {
    match err {
        ZmtpError::Io(_) | ZmtpError::Closed => {}
        _ => {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    tracing::debug!(error = %err, "zmq proxy: connection ended");
}

/// Properties our proxy sides announce in READY: we accept MessagePack.
const PROXY_PROPS: &[(&str, &[u8])] = &[(zmtp::CODEC_PROPERTY, b"msgpack")];

async fn publisher_conn(hub: Arc<Hub>, stream: Stream, shutdown: CancellationToken) {
    let c = &hub.stats.publishers;
    let (mut r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(hub.cfg.max_msg_size);
    if let Err(e) = zmtp::handshake(
        &mut r,
        &mut w,
        &mut reader,
        SocketType::XSub,
        PROXY_PROPS,
        hub.cfg.handshake_timeout,
    )
    .await
    {
        note_end(c, &e);
        return;
    }
    let control = Arc::new(WireQueue::new(1 << 16, 64 << 20));
    let id = {
        let mut ctl = hub.ctl();
        ctl.next_id += 1;
        let id = ctl.next_id;
        // Replay every current subscription to the new publisher.
        let mut b = BytesMut::new();
        for p in ctl.upstream.keys() {
            zmtp::put_subscription(&mut b, true, p);
        }
        if !b.is_empty() {
            control.push(b.freeze());
        }
        ctl.pubs.insert(id, control.clone());
        id
    };
    let conn_done = shutdown.child_token();
    let writer = tokio::spawn(writer_task(w, control.clone(), None, conn_done.clone()));
    let res = publisher_read_loop(&hub, &mut r, &mut reader, &control, &conn_done).await;
    if let Err(e) = res {
        note_end(c, &e);
    }
    hub.ctl().pubs.remove(&id);
    control.close(true);
    conn_done.cancel();
    let _ = writer.await;
}

async fn publisher_read_loop(
    hub: &Hub,
    r: &mut ReadHalf,
    reader: &mut FrameReader,
    control: &WireQueue,
    done: &CancellationToken,
) -> Result<(), ZmtpError> {
    let c = &hub.stats.publishers;
    // Lossless mode: messages full subscribers could not take yet. Empty
    // (no allocation) unless a queue was full.
    let mut waiting: Vec<Waiting> = Vec::new();
    let lossless = hub.cfg.lossless;
    loop {
        let (mut n, mut bytes, mut bad, mut big) = (0u64, 0u64, 0u64, 0u64);
        let mut result = Ok(());
        loop {
            match reader.next_item() {
                Ok(Some(Inbound::Message(m))) => {
                    n += 1;
                    bytes += count_bytes(&m);
                    hub.dispatch(&m, lossless.then_some(&mut waiting));
                    if m.frames_n::<4>()
                        .is_some_and(|f| envelope::looks_like_envelope(&f))
                    {
                        if let Some(sink) = &hub.sink {
                            sink.offer(&m);
                        }
                    } else {
                        bad += 1;
                    }
                    // Stop reading this publisher until every full
                    // subscriber took the message (or was found stuck),
                    // so its later messages stay behind it.
                    if !waiting.is_empty()
                        && hub.deliver_waiting(&mut waiting, done).await == Waited::Cancelled
                    {
                        break;
                    }
                }
                Ok(Some(Inbound::Command(name, data))) => {
                    let mut out = BytesMut::new();
                    if zmtp::answer_ping(&name, &data, &mut out) {
                        control.push(out.freeze());
                    }
                }
                Ok(Some(Inbound::Oversized(_))) => big += 1,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if n > 0 {
            c.messages.fetch_add(n, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if bad > 0 {
            c.malformed.fetch_add(bad, Ordering::Relaxed);
        }
        if big > 0 {
            c.drops.fetch_add(big, Ordering::Relaxed);
        }
        result?;
        let more = tokio::select! {
            _ = done.cancelled() => return Ok(()),
            r = reader.fill(r) => r?,
        };
        if !more {
            return Err(ZmtpError::Closed);
        }
    }
}

async fn subscriber_conn(hub: Arc<Hub>, stream: Stream, side: Side, shutdown: CancellationToken) {
    let c = hub.counters(side);
    if hub.cfg.lossless && side == Side::Backend {
        limit_unsent(&stream);
    }
    let (mut r, mut w) = stream.into_split();
    // Subscribers send only subscriptions: a small limit is plenty.
    let mut reader = FrameReader::new(hub.cfg.max_msg_size.min(1 << 20));
    let ours = match side {
        Side::Backend => SocketType::XPub,
        Side::Capture => SocketType::Pub,
    };
    let info = match zmtp::handshake(
        &mut r,
        &mut w,
        &mut reader,
        ours,
        PROXY_PROPS,
        hub.cfg.handshake_timeout,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            note_end(c, &e);
            return;
        }
    };
    let peer = Arc::new(SubPeer {
        queue: WireQueue::new(hub.cfg.sub_queue, hub.cfg.sub_queue_bytes),
        msgpack: info.wants_msgpack(),
        side,
        drops: AtomicU64::new(0),
    });
    let id = {
        let mut ctl = hub.ctl();
        ctl.next_id += 1;
        let id = ctl.next_id;
        ctl.subs.insert(id, (peer.clone(), Vec::new()));
        id
    };
    let conn_done = shutdown.child_token();
    let peer_q = PeerQueue(peer.clone());
    let writer = tokio::spawn(writer_task(
        w,
        peer_q,
        Some((hub.stats.clone(), side)),
        conn_done.clone(),
    ));
    let res = subscriber_read_loop(&hub, id, side, &mut r, &mut reader, &peer, &conn_done).await;
    if let Err(e) = res {
        note_end(c, &e);
    }
    {
        let mut ctl = hub.ctl();
        let ctl = &mut *ctl;
        if let Some((_, prefixes)) = ctl.subs.remove(&id) {
            hub.stats
                .subscriptions
                .fetch_sub(prefixes.len() as u64, Ordering::Relaxed);
            if side == Side::Backend {
                for p in &prefixes {
                    Hub::upstream_remove(ctl, p);
                }
            }
        }
        hub.publish_targets(ctl);
    }
    peer.queue.close(true);
    conn_done.cancel();
    let _ = writer.await;
}

async fn subscriber_read_loop(
    hub: &Hub,
    id: u64,
    side: Side,
    r: &mut ReadHalf,
    reader: &mut FrameReader,
    peer: &SubPeer,
    done: &CancellationToken,
) -> Result<(), ZmtpError> {
    let c = hub.counters(side);
    loop {
        while let Some(item) = reader.next_item()? {
            if let Some(change) = SubChange::from_inbound(&item) {
                hub.apply_sub_change(id, side, change);
                continue;
            }
            match item {
                Inbound::Command(name, data) => {
                    let mut out = BytesMut::new();
                    if zmtp::answer_ping(&name, &data, &mut out) {
                        peer.queue.push(out.freeze());
                    }
                }
                _ => {
                    c.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let more = tokio::select! {
            _ = done.cancelled() => return Ok(()),
            r = reader.fill(r) => r?,
        };
        if !more {
            return Err(ZmtpError::Closed);
        }
    }
}

/// Unsent bytes a lossless-mode subscriber's TCP socket holds at most
/// before it stops accepting writes (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: usize = 128 * 1024;

/// Makes a TCP socket accept writes only while its unsent data is small,
/// so that "the socket accepted bytes" (the writer's progress) follows the
/// subscriber's reading closely instead of the kernel's buffers, which
/// can hold megabytes and wake the writer only after a large part of them
/// drained (a slow but healthy reader would then look stuck). A failure
/// only makes the progress signal coarser, so it is logged, not fatal.
fn limit_unsent(stream: &Stream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Stream::Tcp(s) = stream {
        use std::os::fd::AsRawFd;
        let v = libc::c_int::try_from(NOTSENT_LOWAT).unwrap_or(libc::c_int::MAX);
        // SAFETY: the fd is a TCP socket owned by `s`, open for the whole
        // call; the option value is a c_int living across the call and its
        // exact size is passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                std::ptr::addr_of!(v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "zmq proxy: TCP_NOTSENT_LOWAT not set");
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// Something a writer task drains.
trait Drain: Clone + Send + Sync + Unpin + 'static {
    fn queue(&self) -> &WireQueue;
}

impl Drain for Arc<WireQueue> {
    fn queue(&self) -> &WireQueue {
        self
    }
}

/// A subscriber's queue, seen through its peer.
#[derive(Clone)]
struct PeerQueue(Arc<SubPeer>);

impl Drain for PeerQueue {
    fn queue(&self) -> &WireQueue {
        &self.0.queue
    }
}

/// A socket that records on its queue every time it accepts bytes: the
/// writer's progress, which tells a slow subscriber from a stuck one.
struct ProgressWriter<D: Drain> {
    /// The socket.
    inner: WriteHalf,
    /// Whose progress it is.
    src: D,
}

impl<D: Drain> AsyncWrite for ProgressWriter<D> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.src.queue().note_progress();
            }
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.src.queue().note_progress();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes queued wire bytes in bounded batches (one lock to take a batch
/// and one to report it written, many messages per write syscall, flush
/// when the queue is empty), counting messages and wire bytes per batch
/// on `counters`. A batch stays outstanding in the queue until written,
/// and every write the socket accepts is recorded as progress. Ends on
/// write error, on `done`, or when the queue closes.
async fn writer_task<D: Drain>(
    w: WriteHalf,
    src: D,
    counters: Option<(Arc<ProxyStats>, Side)>,
    done: CancellationToken,
) {
    let mut w = BufWriter::with_capacity(
        64 * 1024,
        ProgressWriter {
            inner: w,
            src: src.clone(),
        },
    );
    let mut batch = VecDeque::new();
    loop {
        let (mut msgs, mut bytes) = (0u64, 0u64);
        let q = src.queue();
        if q.is_empty() {
            if w.flush().await.is_err() {
                break;
            }
            let ready = tokio::select! {
                _ = done.cancelled() => false,
                r = q.wait() => r,
            };
            if !ready {
                break;
            }
        }
        let (taken, taken_bytes) = q.take_batch(&mut batch, WRITE_BATCH_ITEMS, WRITE_BATCH_BYTES);
        let mut failed = false;
        for item in batch.drain(..) {
            if write_item(&mut w, &item).await.is_err() {
                failed = true;
                break;
            }
            msgs += 1;
            bytes += item.len() as u64;
        }
        // All of it leaves the outstanding count, written or (on failure)
        // about to be discarded with the queue.
        q.written(taken, taken_bytes);
        if let Some((stats, side)) = &counters {
            let c = match side {
                Side::Backend => &stats.subscribers,
                Side::Capture => &stats.capture,
            };
            c.messages.fetch_add(msgs, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if failed {
            break;
        }
    }
    src.queue().close(true);
    let _ = tokio::time::timeout(Duration::from_millis(200), w.shutdown()).await;
}

async fn write_item<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    item: &Bytes,
) -> std::io::Result<()> {
    w.write_all(item).await
}
