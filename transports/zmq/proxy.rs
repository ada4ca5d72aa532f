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
//! - A connection that neither subscribes nor publishes within the idle
//!   timeout after its handshake is closed, so idle peers cannot hold the
//!   connection limit.
//! - A broken peer (reset, half frame, garbage) ends only its connection.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
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
/// Prefixes a disconnecting subscriber's cleanup removes per lock taken
/// (it yields between chunks, so a peer with many prefixes never holds
/// the index or the runtime for long).
const CLEANUP_CHUNK: usize = 256;
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

/// Every subscriber-like peer's prefixes for matching: prefix → the peers
/// holding it (each once, however many times it subscribed), plus the
/// prefix lengths in use, so a message probes only the prefixes of its
/// topic frame whose length is in use. A change costs O(1) (plus the
/// peers sharing that exact prefix); a message costs its topic's length
/// in probes plus its matches, whatever the total count.
#[derive(Debug, Default)]
struct SubIndex {
    /// Prefix → peers subscribed to exactly it.
    by_prefix: HashMap<Bytes, Vec<Arc<SubPeer>>>,
    /// Prefix length → how many distinct prefixes have it.
    lengths: BTreeMap<usize, usize>,
}

impl SubIndex {
    /// Adds `peer` under `prefix` (the peer's first reference to it).
    fn add(&mut self, prefix: Bytes, peer: &Arc<SubPeer>) {
        let len = prefix.len();
        let v = self.by_prefix.entry(prefix).or_default();
        if v.is_empty() {
            *self.lengths.entry(len).or_insert(0) += 1;
        }
        v.push(peer.clone());
    }

    /// Removes `peer` from under `prefix` (its last reference went).
    fn remove(&mut self, prefix: &[u8], peer: &Arc<SubPeer>) {
        let Some(v) = self.by_prefix.get_mut(prefix) else {
            return;
        };
        if let Some(i) = v.iter().position(|x| Arc::ptr_eq(x, peer)) {
            v.swap_remove(i);
        }
        if v.is_empty() {
            self.by_prefix.remove(prefix);
            if let Some(n) = self.lengths.get_mut(&prefix.len()) {
                *n -= 1;
                if *n == 0 {
                    self.lengths.remove(&prefix.len());
                }
            }
        }
    }
}

/// One subscriber peer's own subscriptions, owned by its connection task
/// (its only writer), so a change touches nothing shared but the index
/// entry of that prefix.
#[derive(Debug, Default)]
struct PeerSubs {
    /// Prefix → how many times this peer subscribed to it.
    prefixes: HashMap<Bytes, usize>,
    /// Subscriptions held (the multiset's size).
    count: usize,
    /// Their bytes.
    bytes: usize,
    /// Whether it ever had a subscription accepted (not idle then).
    active: bool,
}

thread_local! {
    /// Reused scratch of `dispatch` for messages matching several
    /// prefixes (deduplication of peers), so dispatch does not allocate
    /// per message.
    static MATCHED: RefCell<Vec<Arc<SubPeer>>> = const { RefCell::new(Vec::new()) };
}

/// Default most bytes of pending upstream cancels kept across all
/// publishers (see [`ProxyConfig::max_upstream_pending_bytes`]).
pub const DEFAULT_MAX_UPSTREAM_PENDING_BYTES: usize = 16 << 20;
/// What one pending cancel costs beyond its prefix bytes: its entries in
/// the prefix map and in the two ordered logs (counted so the bound is
/// one of memory, not of prefix bytes alone).
const TOMBSTONE_OVERHEAD: usize = 96;
/// Most bytes of subscription changes a publisher's writer encodes per
/// write (its only buffer: nothing else is queued per publisher).
const UPSTREAM_BATCH_BYTES: usize = 64 * 1024;

/// One upstream prefix: live (held by some subscriber) or a tombstone (a
/// cancel some publisher may still have to be sent).
#[derive(Debug, Clone, Copy)]
struct UpEntry {
    /// Subscriber peers holding it (0: a tombstone).
    refs: usize,
    /// Sequence number of its latest change (its place in the log).
    seq: u64,
    /// When its latest life began fresh (no publisher held it: it had no
    /// tombstone left), the sequence number of that start, else 0. A
    /// publisher whose cursor has not passed it never saw it: a plain
    /// subscribe is exact while it lives, and nothing at all is needed
    /// once it died (a subscribe and cancel before the publisher got
    /// either cancel out).
    fresh_at: u64,
}

/// One publisher's place in the upstream log.
#[derive(Debug, Clone, Copy)]
struct PubCursor {
    /// Every log entry below this was encoded for it.
    cursor: u64,
    /// The head of the log when it connected: it held nothing then, so
    /// tombstones older than this are nothing to it.
    joined: u64,
    /// It fell behind the bound and cancels meant for it were discarded:
    /// every live prefix it is sent from now on is sent as a cancel and a
    /// subscribe (exact whatever it holds).
    behind: bool,
}

impl PubCursor {
    /// The oldest tombstone this publisher may still need.
    fn key(&self) -> u64 {
        self.cursor.max(self.joined)
    }
}

/// The upstream subscriptions and the changes publishers have yet to be
/// sent, once for all publishers.
///
/// - Every upstream prefix is in one log ordered by the sequence number of
///   its latest change; a change moves it to the head. Each publisher has
///   a cursor; its writer walks the log from there, encoding each prefix's
///   *current* state, so changes coalesce (a subscribe then cancel of the
///   same prefix before a publisher got either is one cancel at most, and
///   only the net state is ever sent) and a new publisher's replay is the
///   same walk from the start, in bounded batches.
/// - Live prefixes stay in the log (that is the replay); what the log keeps
///   beyond the live set are tombstones: cancels some publisher has not
///   passed yet. They are dropped once every publisher passed them, and
///   their bytes are bounded in total across publishers
///   (`max_upstream_pending_bytes`). Past the bound the oldest are
///   discarded and the publishers that still needed them are resynced
///   (`behind`): from then on each live prefix is sent to them as a
///   cancel and a subscribe, so they end up with the exact live set
///   whatever they held. A cancel so discarded can leave that publisher
///   with a stale subscription: it may then send topics nobody wants,
///   which the proxy matches against no one and drops, as it does for
///   any publisher (PUB peers may send anything).
/// - Subscriptions are exact at publishers that count them (a multiset,
///   as our `Publisher` does) as well as at those that keep a set (libzmq):
///   no publisher is ever sent a subscribe for a prefix it holds.
#[derive(Debug)]
struct Upstream {
    /// Next sequence number (0 is never used: a cursor of 0 is the start).
    next_seq: u64,
    /// Prefix → its state (live and tombstones).
    prefixes: HashMap<Bytes, UpEntry>,
    /// Sequence number → prefix, every entry of `prefixes`.
    log: BTreeMap<u64, Bytes>,
    /// Sequence number → prefix, the tombstones only (to trim them).
    tombs: BTreeMap<u64, Bytes>,
    /// Bytes the tombstones cost (prefix + `TOMBSTONE_OVERHEAD` each).
    tomb_bytes: usize,
    /// Live prefixes.
    live: usize,
    /// Publisher id → its cursor.
    pubs: HashMap<u64, PubCursor>,
    /// The publishers' keys ([`PubCursor::key`]) as a multiset, so the
    /// oldest one still needed is known at once.
    keys: BTreeMap<u64, usize>,
    /// Bound of `tomb_bytes`.
    max_pending: usize,
    /// Publishers resynced since start (a counter).
    resyncs: u64,
    /// Tombstones discarded for the bound since start.
    trimmed: u64,
}

impl Upstream {
    fn new(max_pending: usize) -> Upstream {
        Upstream {
            next_seq: 1,
            prefixes: HashMap::new(),
            log: BTreeMap::new(),
            tombs: BTreeMap::new(),
            tomb_bytes: 0,
            live: 0,
            pubs: HashMap::new(),
            keys: BTreeMap::new(),
            max_pending,
            resyncs: 0,
            trimmed: 0,
        }
    }

    fn tomb_cost(prefix: &[u8]) -> usize {
        prefix.len() + TOMBSTONE_OVERHEAD
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Adds one reference to `prefix`; true when it became live (the
    /// publishers' writers then have work).
    fn add(&mut self, prefix: &Bytes) -> bool {
        if let Some(e) = self.prefixes.get_mut(&prefix[..]) {
            e.refs += 1;
            if e.refs > 1 {
                return false;
            }
            // Reborn from a tombstone: some publisher may hold it still.
            let old = e.seq;
            let seq = self.next_seq;
            self.next_seq += 1;
            e.seq = seq;
            e.fresh_at = 0;
            let k = self.log.remove(&old).unwrap_or_else(|| prefix.clone());
            self.tombs.remove(&old);
            self.tomb_bytes -= Self::tomb_cost(&k);
            self.log.insert(seq, k);
            self.live += 1;
            return true;
        }
        let seq = self.seq();
        self.prefixes.insert(
            prefix.clone(),
            UpEntry {
                refs: 1,
                seq,
                fresh_at: seq,
            },
        );
        self.log.insert(seq, prefix.clone());
        self.live += 1;
        true
    }

    /// Removes one reference to `prefix`; true when it stopped being live.
    fn remove(&mut self, prefix: &[u8]) -> bool {
        let Some(e) = self.prefixes.get_mut(prefix) else {
            return false;
        };
        if e.refs == 0 {
            return false;
        }
        e.refs -= 1;
        if e.refs > 0 {
            return false;
        }
        let old = e.seq;
        let seq = self.next_seq;
        self.next_seq += 1;
        e.seq = seq;
        self.live -= 1;
        let Some(k) = self.log.remove(&old) else {
            return false;
        };
        self.tomb_bytes += Self::tomb_cost(&k);
        self.log.insert(seq, k.clone());
        self.tombs.insert(seq, k);
        self.trim();
        self.enforce_bound();
        true
    }

    /// A new publisher: it holds nothing, its writer starts at the start.
    fn join(&mut self, id: u64) {
        let c = PubCursor {
            cursor: 0,
            joined: self.next_seq,
            behind: false,
        };
        *self.keys.entry(c.key()).or_insert(0) += 1;
        self.pubs.insert(id, c);
    }

    /// A publisher left.
    fn leave(&mut self, id: u64) {
        if let Some(c) = self.pubs.remove(&id) {
            self.unkey(c.key());
            self.trim();
        }
    }

    fn unkey(&mut self, key: u64) {
        if let Some(n) = self.keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(&key);
            }
        }
    }

    /// Drops the tombstones every publisher passed (all of them when no
    /// publisher is connected).
    fn trim(&mut self) {
        let min = self.keys.keys().next().copied().unwrap_or(u64::MAX);
        while let Some(entry) = self.tombs.first_entry() {
            if *entry.key() >= min {
                break;
            }
            let (seq, k) = entry.remove_entry();
            self.drop_tomb(seq, &k);
        }
    }

    fn drop_tomb(&mut self, seq: u64, k: &Bytes) {
        self.log.remove(&seq);
        self.prefixes.remove(&k[..]);
        self.tomb_bytes -= Self::tomb_cost(k);
    }

    /// Past the bound: discards the oldest tombstones down to 3/4 of it
    /// (so this runs once per quarter of the bound, not per cancel) and
    /// resyncs the publishers that still needed one of them.
    fn enforce_bound(&mut self) {
        if self.tomb_bytes <= self.max_pending {
            return;
        }
        let target = self.max_pending / 4 * 3;
        let mut last = 0;
        while self.tomb_bytes > target {
            let Some((seq, k)) = self.tombs.pop_first() else {
                break;
            };
            self.drop_tomb(seq, &k);
            self.trimmed += 1;
            last = seq;
        }
        for c in self.pubs.values_mut() {
            if c.key() <= last && !c.behind {
                c.behind = true;
                self.resyncs += 1;
            }
        }
    }

    /// Encodes into `out` the changes publisher `id` has not been sent,
    /// up to about `max_bytes`, and moves its cursor past them. Returns
    /// whether more remain.
    fn take(&mut self, id: u64, out: &mut BytesMut, max_bytes: usize) -> bool {
        let Some(c) = self.pubs.get_mut(&id) else {
            return false;
        };
        let old_key = c.key();
        let mut last = None;
        let mut more = false;
        for (&seq, p) in self.log.range(c.cursor..) {
            if out.len() >= max_bytes {
                more = true;
                break;
            }
            let Some(e) = self.prefixes.get(&p[..]) else {
                continue;
            };
            if e.refs > 0 {
                // A reborn prefix may be held by a publisher that walked
                // past it before it died; cancel first, so it ends with
                // exactly one.
                if c.behind || (e.fresh_at == 0 && seq >= c.joined) {
                    zmtp::put_subscription(out, false, p);
                }
                zmtp::put_subscription(out, true, p);
            } else if seq >= c.joined && (c.behind || e.fresh_at == 0 || c.cursor > e.fresh_at) {
                // It may hold it (it walked past its start, or that start
                // was not fresh): cancel. Else it never got it.
                zmtp::put_subscription(out, false, p);
            }
            last = Some(seq);
        }
        let Some(last) = last else {
            return more;
        };
        c.cursor = last + 1;
        let new_key = c.key();
        if new_key != old_key {
            self.unkey(old_key);
            *self.keys.entry(new_key).or_insert(0) += 1;
            self.trim();
        }
        more
    }

    /// Whether publisher `id` has changes not yet taken.
    #[cfg(test)]
    fn has_work(&self, id: u64) -> bool {
        self.pubs
            .get(&id)
            .is_some_and(|c| self.log.range(c.cursor..).next().is_some())
    }

    /// Updates the proxy's gauges and counters of upstream state.
    fn publish(&self, st: &ProxyStats) {
        st.upstream_prefixes
            .store(self.live as u64, Ordering::Relaxed);
        st.upstream_pending_bytes
            .store(self.tomb_bytes as u64, Ordering::Relaxed);
        st.upstream_resyncs.store(self.resyncs, Ordering::Relaxed);
        st.upstream_cancels_dropped
            .store(self.trimmed, Ordering::Relaxed);
    }
}

/// Mutable connection state, changed only on connect, disconnect and
/// upstream subscription changes.
#[derive(Debug)]
struct Control {
    /// Next connection id.
    next_id: u64,
    /// Union of the backend subscriptions (reference-counted, one per
    /// peer holding the prefix) and what publishers have yet to be sent.
    up: Upstream,
}

/// State shared by all connection tasks of one proxy.
struct Hub {
    /// Limits.
    cfg: ProxyConfig,
    /// Counters.
    stats: Arc<ProxyStats>,
    /// Connection and upstream subscription state.
    ctl: Mutex<Control>,
    /// The subscription index the hot path matches against (read lock;
    /// a change takes the write lock for one entry).
    index: RwLock<SubIndex>,
    /// The router bridge, when the proxy runs inside the bus.
    sink: Option<Arc<dyn EnvelopeSink>>,
    /// Wakes idle publisher writers when the upstream log grew.
    upstream_changed: tokio::sync::Notify,
}

impl Hub {
    fn ctl(&self) -> std::sync::MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, SubIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn counters(&self, side: Side) -> &SideCounters {
        match side {
            Side::Backend => &self.stats.subscribers,
            Side::Capture => &self.stats.capture,
        }
    }

    /// Adds one reference to an upstream subscription (and wakes the
    /// publishers' writers when it became live).
    fn upstream_add(&self, prefix: &Bytes) {
        let changed = {
            let mut ctl = self.ctl();
            let c = ctl.up.add(prefix);
            ctl.up.publish(&self.stats);
            c
        };
        if changed {
            self.upstream_changed.notify_waiters();
        }
    }

    /// Removes references to upstream subscriptions, one per prefix.
    fn upstream_remove<'a>(&self, prefixes: impl IntoIterator<Item = &'a Bytes>) {
        let mut changed = false;
        {
            let mut ctl = self.ctl();
            for p in prefixes {
                changed |= ctl.up.remove(p);
            }
            ctl.up.publish(&self.stats);
        }
        if changed {
            self.upstream_changed.notify_waiters();
        }
    }

    /// Applies one subscription change of `peer`, within its limits.
    /// Takes the index lock (and the control lock for an upstream change)
    /// for this one change only.
    fn apply_sub_change(&self, peer: &Arc<SubPeer>, subs: &mut PeerSubs, change: SubChange) {
        let st = &self.stats;
        match change {
            SubChange::Subscribe(p) => {
                if p.len() > self.cfg.max_prefix_len {
                    st.subs_too_long.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if subs.count >= self.cfg.max_subs_per_peer {
                    st.subs_over_count.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if subs.bytes.saturating_add(p.len()) > self.cfg.max_sub_bytes_per_peer {
                    st.subs_over_bytes.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                subs.count += 1;
                subs.bytes += p.len();
                subs.active = true;
                st.subscriptions.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = subs.prefixes.get_mut(&p[..]) {
                    *n += 1;
                    return;
                }
                // Our own copy: a slice would pin the whole read buffer.
                let p = Bytes::copy_from_slice(&p);
                subs.prefixes.insert(p.clone(), 1);
                self.index_mut().add(p.clone(), peer);
                if peer.side == Side::Backend {
                    self.upstream_add(&p);
                }
            }
            SubChange::Cancel(p) => {
                let Some(n) = subs.prefixes.get_mut(&p[..]) else {
                    return;
                };
                *n -= 1;
                subs.count -= 1;
                subs.bytes -= p.len();
                st.subscriptions.fetch_sub(1, Ordering::Relaxed);
                if *n > 0 {
                    return;
                }
                let Some((k, _)) = subs.prefixes.remove_entry(&p[..]) else {
                    return;
                };
                self.index_mut().remove(&k, peer);
                if peer.side == Side::Backend {
                    self.upstream_remove([&k]);
                }
            }
        }
    }

    /// Removes every subscription of a leaving peer, a chunk per lock
    /// taken, yielding between chunks.
    async fn drop_subs(&self, peer: &Arc<SubPeer>, subs: PeerSubs) {
        self.stats
            .subscriptions
            .fetch_sub(subs.count as u64, Ordering::Relaxed);
        let all: Vec<Bytes> = subs.prefixes.into_keys().collect();
        for chunk in all.chunks(CLEANUP_CHUNK) {
            {
                let mut idx = self.index_mut();
                for p in chunk {
                    idx.remove(p, peer);
                }
            }
            if peer.side == Side::Backend {
                self.upstream_remove(chunk);
            }
            if all.len() > CLEANUP_CHUNK {
                tokio::task::yield_now().await;
            }
        }
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
        let idx = self.index.read().unwrap_or_else(|p| p.into_inner());
        if idx.by_prefix.is_empty() {
            return;
        }
        let topic = msg.first_frame();
        // The first matching prefix's peers, and whether more prefixes
        // match (then peers are deduplicated through the scratch list).
        let mut first: Option<&Vec<Arc<SubPeer>>> = None;
        let mut several = false;
        for &len in idx.lengths.range(..=topic.len()).map(|(l, _)| l) {
            if let Some(v) = idx.by_prefix.get(&topic[..len]) {
                if first.is_some() {
                    several = true;
                    break;
                }
                first = Some(v);
            }
        }
        let Some(first) = first else {
            return;
        };
        let msgpack = is_msgpack_envelope(msg);
        let mut json_form: Option<Option<Bytes>> = None;
        let mut deliver = |peer: &Arc<SubPeer>| {
            let wire = if msgpack && !peer.msgpack {
                let form = json_form.get_or_insert_with(|| {
                    let j = transcode_to_json(msg);
                    if j.is_some() {
                        self.stats.transcoded.fetch_add(1, Ordering::Relaxed);
                    }
                    j
                });
                match form {
                    Some(b) => b.clone(),
                    None => return,
                }
            } else {
                msg.wire.clone()
            };
            match peer.queue.push(wire.clone()) {
                Pushed::Ok => {}
                Pushed::Full => match waiting.as_deref_mut() {
                    Some(w) if peer.side == Side::Backend && !self.is_stuck(peer) => {
                        w.push((peer.clone(), wire));
                    }
                    _ => self.count_drop(peer),
                },
                Pushed::Closed => self.count_drop(peer),
            }
        };
        if !several {
            first.iter().for_each(&mut deliver);
            return;
        }
        MATCHED.with(|cell| {
            let mut m = std::mem::take(&mut *cell.borrow_mut());
            for &len in idx.lengths.range(..=topic.len()).map(|(l, _)| l) {
                if let Some(v) = idx.by_prefix.get(&topic[..len]) {
                    m.extend(v.iter().cloned());
                }
            }
            m.sort_unstable_by_key(|p| Arc::as_ptr(p) as usize);
            m.dedup_by(|a, b| Arc::ptr_eq(a, b));
            m.iter().for_each(&mut deliver);
            m.clear();
            *cell.borrow_mut() = m;
        });
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
            ctl: Mutex::new(Control {
                next_id: 0,
                up: Upstream::new(self.cfg.max_upstream_pending_bytes),
            }),
            index: RwLock::new(SubIndex::default()),
            sink,
            upstream_changed: tokio::sync::Notify::new(),
        });
        if all_upstream {
            // The router wants every topic: keep an everything-subscription
            // upstream for as long as we run.
            hub.upstream_add(&Bytes::new());
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
    // Only our answers to its pings are queued for it (a few, small);
    // its subscriptions come from the shared upstream log.
    let control = Arc::new(WireQueue::new(PONG_QUEUE_ITEMS, PONG_QUEUE_BYTES));
    let id = {
        let mut ctl = hub.ctl();
        ctl.next_id += 1;
        let id = ctl.next_id;
        // Its writer replays every current subscription, then follows.
        ctl.up.join(id);
        id
    };
    let conn_done = shutdown.child_token();
    let writer = tokio::spawn(publisher_writer(
        hub.clone(),
        id,
        w,
        control.clone(),
        conn_done.clone(),
    ));
    let res = publisher_read_loop(&hub, &mut r, &mut reader, &control, &conn_done).await;
    if let Err(e) = res {
        note_end(c, &e);
    }
    {
        let mut ctl = hub.ctl();
        ctl.up.leave(id);
        ctl.up.publish(&hub.stats);
    }
    control.close(true);
    conn_done.cancel();
    let _ = writer.await;
}

/// Most pong answers queued for one publisher (it sent pings faster than
/// it reads: later ones are dropped, as a full queue does).
const PONG_QUEUE_ITEMS: usize = 64;
/// Most bytes of them.
const PONG_QUEUE_BYTES: usize = 64 * 1024;

/// Writes to one publisher: the upstream subscription changes it has not
/// been sent (encoded from the shared log in batches of at most
/// `UPSTREAM_BATCH_BYTES`, the only bytes held for it) and pongs. While
/// the publisher does not read, its cursor stays and nothing is queued
/// for it; the log's tombstones are bounded across all publishers.
async fn publisher_writer(
    hub: Arc<Hub>,
    id: u64,
    mut w: WriteHalf,
    pongs: Arc<WireQueue>,
    done: CancellationToken,
) {
    let mut out = BytesMut::new();
    let mut batch = VecDeque::new();
    loop {
        let changed = hub.upstream_changed.notified();
        tokio::pin!(changed);
        // Registered before looking, so a change after the look wakes us.
        changed.as_mut().enable();
        out.clear();
        pongs.take_all(&mut batch);
        for b in batch.drain(..) {
            out.extend_from_slice(&b);
        }
        hub.ctl().up.take(id, &mut out, UPSTREAM_BATCH_BYTES);
        if out.is_empty() {
            if out.capacity() > 2 * UPSTREAM_BATCH_BYTES {
                out = BytesMut::new();
            }
            let go = tokio::select! {
                _ = done.cancelled() => false,
                _ = &mut changed => true,
                r = pongs.wait() => r,
            };
            if !go {
                break;
            }
            continue;
        }
        let ok = tokio::select! {
            _ = done.cancelled() => false,
            r = w.write_all(&out) => r.is_ok(),
        };
        if !ok {
            break;
        }
    }
    pongs.close(true);
    let _ = tokio::time::timeout(Duration::from_millis(200), w.shutdown()).await;
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
    let idle_at = tokio::time::Instant::now() + hub.cfg.idle_timeout;
    let mut active = false;
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
        if n > 0 || big > 0 {
            active = true;
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
        let deadline = (!active).then_some(idle_at);
        let more = tokio::select! {
            _ = done.cancelled() => return Ok(()),
            _ = idle_deadline(deadline) => {
                hub.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
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
    let conn_done = shutdown.child_token();
    let peer_q = PeerQueue(peer.clone());
    let writer = tokio::spawn(writer_task(
        w,
        peer_q,
        Some((hub.stats.clone(), side)),
        conn_done.clone(),
    ));
    let mut subs = PeerSubs::default();
    let res = subscriber_read_loop(&hub, &mut subs, &mut r, &mut reader, &peer, &conn_done).await;
    if let Err(e) = res {
        note_end(c, &e);
    }
    hub.drop_subs(&peer, subs).await;
    peer.queue.close(true);
    conn_done.cancel();
    let _ = writer.await;
}

/// Waits until `deadline`, or forever without one.
async fn idle_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn subscriber_read_loop(
    hub: &Hub,
    subs: &mut PeerSubs,
    r: &mut ReadHalf,
    reader: &mut FrameReader,
    peer: &Arc<SubPeer>,
    done: &CancellationToken,
) -> Result<(), ZmtpError> {
    let c = hub.counters(peer.side);
    let idle_at = tokio::time::Instant::now() + hub.cfg.idle_timeout;
    loop {
        while let Some(item) = reader.next_item()? {
            if let Some(change) = SubChange::from_inbound(&item) {
                hub.apply_sub_change(peer, subs, change);
                // A storm of changes shares the runtime with everyone.
                tokio::task::consume_budget().await;
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
        let deadline = (!subs.active).then_some(idle_at);
        let more = tokio::select! {
            _ = done.cancelled() => return Ok(()),
            _ = idle_deadline(deadline) => {
                hub.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A publisher as our `Publisher` keeps subscriptions: a multiset.
    #[derive(Default)]
    struct Model {
        held: HashMap<Vec<u8>, usize>,
        subscribes: usize,
        cancels: usize,
    }

    impl Model {
        /// Applies what its writer would write; a subscribe for a prefix
        /// it holds would be a duplicate (an inexact proxy).
        fn apply(&mut self, wire: &[u8]) {
            let mut r = FrameReader::new(1 << 20);
            r.buf.extend_from_slice(wire);
            while let Some(item) = r.next_item().expect("valid upstream bytes") {
                match SubChange::from_inbound(&item).expect("a subscription change") {
                    SubChange::Subscribe(p) => {
                        self.subscribes += 1;
                        let n = self.held.entry(p.to_vec()).or_insert(0);
                        *n += 1;
                        assert_eq!(*n, 1, "subscribed twice: {p:?}");
                    }
                    SubChange::Cancel(p) => {
                        self.cancels += 1;
                        if let Some(n) = self.held.get_mut(&p[..]) {
                            *n -= 1;
                            if *n == 0 {
                                self.held.remove(&p[..]);
                            }
                        }
                    }
                }
            }
        }

        fn take(&mut self, up: &mut Upstream, id: u64, max: usize) -> bool {
            let mut out = BytesMut::new();
            let more = up.take(id, &mut out, max);
            self.apply(&out);
            more
        }

        fn drain(&mut self, up: &mut Upstream, id: u64) {
            while self.take(up, id, 1 << 20) {}
            assert!(!up.has_work(id));
        }

        fn holds(&self) -> HashSet<Vec<u8>> {
            self.held.keys().cloned().collect()
        }
    }

    /// xorshift64: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_subscribe_and_cancel_before_the_publisher_got_either_cancel_out() {
        let mut up = Upstream::new(1 << 20);
        up.join(1);
        let mut m = Model::default();
        for i in 0..1000 {
            up.add(&b(&format!("storm/{i}")));
        }
        for i in 0..1000 {
            up.remove(format!("storm/{i}").as_bytes());
        }
        m.drain(&mut up, 1);
        assert_eq!((m.subscribes, m.cancels), (0, 0));
        // Nobody needs the cancels: none is kept.
        assert_eq!(up.tomb_bytes, 0);
        assert!(up.prefixes.is_empty() && up.log.is_empty());
    }

    #[test]
    fn reference_counts_dedupe_and_a_new_publisher_gets_the_live_set() {
        let mut up = Upstream::new(1 << 20);
        up.join(1);
        let mut m1 = Model::default();
        assert!(up.add(&b("a")));
        assert!(!up.add(&b("a")));
        assert!(up.add(&b("b")));
        m1.drain(&mut up, 1);
        assert!(!up.remove(b"a"));
        m1.drain(&mut up, 1);
        assert_eq!(m1.holds(), HashSet::from([b"a".to_vec(), b"b".to_vec()]));
        assert!(up.remove(b"a"));
        up.join(2);
        let mut m2 = Model::default();
        m2.drain(&mut up, 2);
        m1.drain(&mut up, 1);
        assert_eq!(m2.holds(), HashSet::from([b"b".to_vec()]));
        assert_eq!(m1.holds(), m2.holds());
        // The newcomer was sent no cancel for what died before it came.
        assert_eq!(m2.cancels, 0);
    }

    /// Random changes, publishers joining and taking in small batches at
    /// random times: each always ends with exactly the live set, never a
    /// duplicate subscribe, and nothing is kept once all caught up.
    #[test]
    fn random_changes_leave_every_publisher_exact() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut up = Upstream::new(usize::MAX);
        let mut live: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut models: Vec<(u64, Model)> = Vec::new();
        let mut next_id = 0;
        for step in 0..20_000 {
            match rng.below(10) {
                0..=3 => {
                    let p = format!("p{}", rng.below(60));
                    up.add(&b(&p));
                    *live.entry(p.into_bytes()).or_insert(0) += 1;
                }
                4..=6 => {
                    let p = format!("p{}", rng.below(60)).into_bytes();
                    if let Some(n) = live.get_mut(&p) {
                        up.remove(&p);
                        *n -= 1;
                        if *n == 0 {
                            live.remove(&p);
                        }
                    }
                }
                7 if models.len() < 5 || step % 97 == 0 => {
                    next_id += 1;
                    up.join(next_id);
                    models.push((next_id, Model::default()));
                }
                7 if models.len() > 1 => {
                    let i = rng.below(models.len() as u64) as usize;
                    let (id, _) = models.swap_remove(i);
                    up.leave(id);
                }
                _ => {
                    if !models.is_empty() {
                        let i = rng.below(models.len() as u64) as usize;
                        let max = 1 + rng.below(200) as usize;
                        let (id, m) = &mut models[i];
                        m.take(&mut up, *id, max);
                    }
                }
            }
        }
        let want: HashSet<Vec<u8>> = live.keys().cloned().collect();
        for (id, m) in &mut models {
            m.drain(&mut up, *id);
            assert_eq!(m.holds(), want, "publisher {id}");
        }
        assert_eq!(up.tomb_bytes, 0);
        assert_eq!(up.live, want.len());
        assert_eq!(up.resyncs, 0);
    }

    /// A publisher that never takes cannot make the cancels kept for it
    /// pass the bound: the oldest go, it is resynced, and once it reads
    /// it holds every live prefix exactly once.
    #[test]
    fn a_lagging_publisher_is_resynced_within_the_bound() {
        let bound = 50 * (TOMBSTONE_OVERHEAD + 16);
        let mut up = Upstream::new(bound);
        up.join(1);
        up.join(2);
        let (mut slow, mut fast) = (Model::default(), Model::default());
        up.add(&b("keep/a"));
        slow.drain(&mut up, 1);
        for round in 0..20 {
            for i in 0..30 {
                up.add(&b(&format!("storm/{round}/{i:04}")));
            }
            fast.take(&mut up, 2, 512);
            for i in 0..30 {
                up.remove(format!("storm/{round}/{i:04}").as_bytes());
            }
            // Some of them come back: reborn prefixes.
            for i in 0..3 {
                up.add(&b(&format!("storm/{round}/{i:04}")));
            }
            fast.drain(&mut up, 2);
            assert!(up.tomb_bytes <= bound, "{} > {bound}", up.tomb_bytes);
        }
        assert_eq!(up.resyncs, 1);
        assert!(up.trimmed > 0);
        slow.drain(&mut up, 1);
        let live: HashSet<Vec<u8>> = up
            .prefixes
            .iter()
            .filter(|(_, e)| e.refs > 0)
            .map(|(k, _)| k.to_vec())
            .collect();
        assert_eq!(live.len(), 1 + 20 * 3);
        assert_eq!(fast.holds(), live);
        assert!(live.is_subset(&slow.holds()));
        assert_eq!(up.tomb_bytes, 0);
    }
}
