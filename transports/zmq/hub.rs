//! The proxy's subscription hub: who subscribed to what, and where a
//! message goes. No I/O, no awaits, no clock reads (the time comes in as
//! an `Instant`); it answers with decisions the connection tasks act on:
//! whether the publishers' upstream changed (their writers then have
//! work), which full subscribers a message waits for (lossless mode),
//! whether a subscriber is stuck.
//!
//! - [`SubIndex`]: prefix → peers, plus the prefix lengths in use, so a
//!   change and a message cost the same whatever the total count.
//! - [`PeerSubs`]: one subscriber's own multiset, owned by its connection
//!   task; [`Hub::apply_sub_change`] applies one change within the
//!   per-peer limits (what breaks them is ignored, counted, and never
//!   goes upstream).
//! - Upstream subscriptions are reference-counted across subscribers in
//!   [`Upstream`], the log every publisher's writer reads from.
//! - [`Hub::dispatch`] queues a message, without copy or re-encoding, to
//!   every matching subscriber (transcoding MessagePack data once for the
//!   peers that did not opt in, and making the 4-frame form of a numbered
//!   envelope once for the peers that did not ask for numbers, see
//!   `sequence.rs`); a full queue drops and counts (ZeroMQ PUB
//!   semantics), or in lossless mode hands the full peer back to the
//!   publisher's read loop, which waits for it.
//! - A subscription is first read as `subscription::normalize` says: a
//!   bare topic prefix stands for the quoted prefix of its topic frames
//!   and for its own bytes, both held and matched (only its bytes with
//!   `strict_subscriptions`).
//! - With `last_value`, dispatch also keeps the newest envelope of each
//!   topic frame (a [`LastValues`]), updated *before* the message is
//!   queued to anyone; a new subscription is then replayed what is kept
//!   (`replay.rs`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::proxy::ProxyConfig;
use super::queue::{Pushed, WireQueue};
use super::stats::{ProxyStats, SideCounters};
use super::subscription;
use super::upstream::Upstream;
use super::zmtp::{self, RawMessage, SubChange};
use crate::codec::MSGPACK_MARKER;
use crate::last_value::LastValues;

/// Which side a subscriber-like peer is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// XPUB: its subscriptions flow upstream.
    Backend,
    /// Capture PUB: its subscriptions stay local.
    Capture,
}

/// One subscriber connection as the fan-out sees it.
#[derive(Debug)]
pub(super) struct SubPeer {
    /// What its writer task drains.
    pub(super) queue: WireQueue,
    /// Whether it accepts MessagePack data frames (said so in READY).
    pub(super) msgpack: bool,
    /// Whether it wants numbered envelopes (the fifth, sequence frame;
    /// said so in READY). Others get every envelope in four frames.
    pub(super) seq: bool,
    /// Its side, for the counters.
    pub(super) side: Side,
    /// Messages dropped because its queue was full.
    pub(super) drops: AtomicU64,
    /// Whether its queue conflates by topic (a newer envelope of a topic
    /// replaces the queued one).
    pub(super) conflate: bool,
}

impl SubPeer {
    /// A peer with a queue of `items` items and `bytes` bytes, taking
    /// MessagePack data and sequence frames as it said in READY.
    pub(super) fn new(items: usize, bytes: usize, msgpack: bool, seq: bool, side: Side) -> SubPeer {
        SubPeer {
            queue: WireQueue::new(items, bytes),
            msgpack,
            seq,
            side,
            drops: AtomicU64::new(0),
            conflate: false,
        }
    }

    /// The same peer with a queue that conflates by topic frame (read
    /// from each queued message's wire bytes: nothing is kept per item
    /// for the key but its hash).
    pub(super) fn conflating(self) -> SubPeer {
        let (items, bytes) = self.queue.bounds();
        SubPeer {
            queue: WireQueue::conflating_by(items, bytes, |w| zmtp::first_frame_of(w)),
            conflate: true,
            ..self
        }
    }
}

/// A message a subscriber could not take yet (lossless mode): the peer and
/// the wire form meant for it.
pub(super) type Waiting = (Arc<SubPeer>, Bytes);

/// Every subscriber-like peer's prefixes for matching: prefix → the peers
/// holding it (each once, however many times it subscribed), plus the
/// prefix lengths in use, so a message probes only the prefixes of its
/// topic frame whose length is in use. A change costs O(1) (plus the
/// peers sharing that exact prefix); a message costs its topic's length
/// in probes plus its matches, whatever the total count.
#[derive(Debug, Default)]
pub(super) struct SubIndex {
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

    /// Calls `f` once for every peer holding a prefix of `topic`.
    fn for_each_match(&self, topic: &[u8], mut f: impl FnMut(&Arc<SubPeer>)) {
        if self.by_prefix.is_empty() {
            return;
        }
        // The first matching prefix's peers, and whether more prefixes
        // match (then peers are deduplicated through the scratch list).
        let mut first: Option<&Vec<Arc<SubPeer>>> = None;
        let mut several = false;
        for &len in self.lengths.range(..=topic.len()).map(|(l, _)| l) {
            if let Some(v) = self.by_prefix.get(&topic[..len]) {
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
        if !several {
            first.iter().for_each(f);
            return;
        }
        MATCHED.with(|cell| {
            let mut m = std::mem::take(&mut *cell.borrow_mut());
            for &len in self.lengths.range(..=topic.len()).map(|(l, _)| l) {
                if let Some(v) = self.by_prefix.get(&topic[..len]) {
                    m.extend(v.iter().cloned());
                }
            }
            m.sort_unstable_by_key(|p| Arc::as_ptr(p) as usize);
            m.dedup_by(|a, b| Arc::ptr_eq(a, b));
            m.iter().for_each(&mut f);
            m.clear();
            *cell.borrow_mut() = m;
        });
    }
}

thread_local! {
    /// Reused scratch of `for_each_match` for messages matching several
    /// prefixes (deduplication of peers), so dispatch does not allocate
    /// per message.
    static MATCHED: RefCell<Vec<Arc<SubPeer>>> = const { RefCell::new(Vec::new()) };
}

/// One subscriber peer's own subscriptions, owned by its connection task
/// (its only writer), so a change touches nothing shared but the index
/// entry of that prefix.
#[derive(Debug, Default)]
pub(super) struct PeerSubs {
    /// Prefix → how many times this peer subscribed to it.
    prefixes: HashMap<Bytes, usize>,
    /// Prefix length → how many of its distinct prefixes have it (so
    /// [`PeerSubs::covers_other`] probes only lengths in use).
    lengths: BTreeMap<usize, usize>,
    /// Subscriptions held (the multiset's size).
    count: usize,
    /// Their bytes.
    bytes: usize,
    /// Whether it ever had a subscription accepted (not idle then).
    pub(super) active: bool,
}

impl PeerSubs {
    /// Whether a prefix this peer holds, other than `except`, starts
    /// `topic` (it then gets that topic live already, so a replay for
    /// `except` skips it).
    pub(super) fn covers_other(&self, topic: &[u8], except: &[u8]) -> bool {
        self.lengths
            .range(..=topic.len())
            .any(|(&len, _)| topic[..len] != *except && self.prefixes.contains_key(&topic[..len]))
    }

    fn add_len(&mut self, len: usize) {
        *self.lengths.entry(len).or_insert(0) += 1;
    }

    fn remove_len(&mut self, len: usize) {
        if let Some(n) = self.lengths.get_mut(&len) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&len);
            }
        }
    }
}

/// What one subscription change did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Applied {
    /// The publishers' upstream changed (their writers have work).
    pub(super) upstream: bool,
    /// A subscribe made this peer hold a prefix it did not hold: that
    /// prefix, as matched (after `subscription::normalize`). A replay of
    /// the last values is for these only.
    pub(super) added: Option<Bytes>,
}

/// State shared by all connection tasks of one proxy: the index the hot
/// path matches against, the upstream log, the limits and the counters.
/// Its locks are held for one change or one message, never across an
/// await (it has none).
#[derive(Debug)]
pub(super) struct Hub {
    /// Limits.
    pub(super) cfg: ProxyConfig,
    /// Counters.
    pub(super) stats: Arc<ProxyStats>,
    /// The subscription index (read lock per message; a change takes the
    /// write lock for one entry).
    index: RwLock<SubIndex>,
    /// Union of the backend subscriptions (reference-counted, one per
    /// peer holding the prefix) and what publishers have yet to be sent.
    up: Mutex<Upstream>,
    /// Last publisher id given.
    last_id: AtomicU64,
    /// The newest envelope of each topic frame (with `last_value`); its
    /// lock is taken per message for the update, and per replay chunk.
    cache: Option<Mutex<LastValues<Kept>>>,
}

impl Hub {
    /// An empty hub with `cfg`'s limits, counting on `stats`.
    pub(super) fn new(cfg: ProxyConfig, stats: Arc<ProxyStats>) -> Hub {
        Hub {
            up: Mutex::new(Upstream::new(cfg.max_upstream_pending_bytes)),
            stats,
            index: RwLock::new(SubIndex::default()),
            last_id: AtomicU64::new(0),
            cache: cfg.last_value.map(|l| Mutex::new(LastValues::new(l))),
            cfg,
        }
    }

    /// The last-value cache, locked (None without `last_value`). Held for
    /// one update or one replay chunk, never across an await.
    pub(super) fn cache(&self) -> Option<MutexGuard<'_, LastValues<Kept>>> {
        self.cache
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn up(&self) -> MutexGuard<'_, Upstream> {
        self.up.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index_mut(&self) -> RwLockWriteGuard<'_, SubIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters of a subscriber side.
    pub(super) fn counters(&self, side: Side) -> &SideCounters {
        match side {
            Side::Backend => &self.stats.subscribers,
            Side::Capture => &self.stats.capture,
        }
    }

    /// Adds one reference to an upstream subscription; true when it
    /// became live (the publishers' writers then have work).
    pub(super) fn upstream_add(&self, prefix: &Bytes) -> bool {
        let mut up = self.up();
        let changed = up.add(prefix);
        up.publish(&self.stats);
        changed
    }

    /// Removes references to upstream subscriptions, one per prefix; true
    /// when one stopped being live.
    fn upstream_remove<'a>(&self, prefixes: impl IntoIterator<Item = &'a Bytes>) -> bool {
        let mut up = self.up();
        let mut changed = false;
        for p in prefixes {
            changed |= up.remove(p);
        }
        up.publish(&self.stats);
        changed
    }

    /// One holder's references to upstream subscriptions change: one more
    /// for each of `add`, then one less for each of `remove` (adds first,
    /// so a prefix moving between them is never absent in between). The
    /// bus's own demand is such a holder (see `demand.rs`). True when the
    /// upstream changed.
    pub(super) fn upstream_apply(&self, add: &[Bytes], remove: &[Bytes]) -> bool {
        let mut up = self.up();
        let mut changed = false;
        for p in add {
            changed |= up.add(p);
        }
        for p in remove {
            changed |= up.remove(p);
        }
        up.publish(&self.stats);
        changed
    }

    /// A new publisher: its id; its writer replays every current
    /// subscription from the log, then follows.
    pub(super) fn join_publisher(&self) -> u64 {
        let id = self.last_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.up().join(id);
        id
    }

    /// A publisher left.
    pub(super) fn leave_publisher(&self, id: u64) {
        let mut up = self.up();
        up.leave(id);
        up.publish(&self.stats);
    }

    /// Encodes into `out` the upstream changes publisher `id` has not been
    /// sent, up to about `max_bytes`; returns whether more remain.
    pub(super) fn take_upstream(&self, id: u64, out: &mut BytesMut, max_bytes: usize) -> bool {
        self.up().take(id, out, max_bytes)
    }

    /// Applies one subscription change of `peer`, within its limits. A
    /// bare prefix (see `subscription::normalize`) stands for two: its
    /// quoted form (the JSON topic frames it means) and its own bytes (what
    /// libzmq would match), each held, counted against the limits and sent
    /// upstream as a subscription of its own; with `strict_subscriptions`
    /// only its bytes. Takes the index lock (and the upstream lock for an
    /// upstream change) for one prefix at a time.
    pub(super) fn apply_sub_change(
        &self,
        peer: &Arc<SubPeer>,
        subs: &mut PeerSubs,
        change: SubChange,
    ) -> Applied {
        let (subscribe, raw) = match &change {
            SubChange::Subscribe(p) => (true, p),
            SubChange::Cancel(p) => (false, p),
        };
        let (quoted, bare) = subscription::normalize(raw, self.cfg.strict_subscriptions);
        let mut done = Applied::default();
        if bare {
            if subscribe {
                self.stats
                    .bare_subscriptions
                    .fetch_add(1, Ordering::Relaxed);
            }
            done = self.apply_prefix(peer, subs, subscribe, &quoted);
        }
        let own = self.apply_prefix(peer, subs, subscribe, raw);
        Applied {
            upstream: done.upstream || own.upstream,
            // A bare prefix's own bytes never start a topic frame: only
            // its quoted form has last values to replay.
            added: done.added.or(if bare { None } else { own.added }),
        }
    }

    /// Subscribes (or cancels one reference of) one prefix of `peer`.
    fn apply_prefix(
        &self,
        peer: &Arc<SubPeer>,
        subs: &mut PeerSubs,
        subscribe: bool,
        p: &[u8],
    ) -> Applied {
        let st = &self.stats;
        if subscribe {
            if p.len() > self.cfg.max_prefix_len {
                st.subs_too_long.fetch_add(1, Ordering::Relaxed);
                return Applied::default();
            }
            if subs.count >= self.cfg.max_subs_per_peer {
                st.subs_over_count.fetch_add(1, Ordering::Relaxed);
                return Applied::default();
            }
            if subs.bytes.saturating_add(p.len()) > self.cfg.max_sub_bytes_per_peer {
                st.subs_over_bytes.fetch_add(1, Ordering::Relaxed);
                return Applied::default();
            }
            subs.count += 1;
            subs.bytes += p.len();
            subs.active = true;
            st.subscriptions.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = subs.prefixes.get_mut(p) {
                *n += 1;
                return Applied::default();
            }
            // Our own copy: a slice would pin the whole read buffer.
            let p = Bytes::copy_from_slice(p);
            subs.prefixes.insert(p.clone(), 1);
            subs.add_len(p.len());
            self.index_mut().add(p.clone(), peer);
            return Applied {
                upstream: peer.side == Side::Backend && self.upstream_add(&p),
                added: Some(p),
            };
        }
        let Some(n) = subs.prefixes.get_mut(p) else {
            return Applied::default();
        };
        *n -= 1;
        subs.count -= 1;
        subs.bytes -= p.len();
        st.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if *n > 0 {
            return Applied::default();
        }
        let Some((k, _)) = subs.prefixes.remove_entry(p) else {
            return Applied::default();
        };
        subs.remove_len(k.len());
        self.index_mut().remove(&k, peer);
        Applied {
            upstream: peer.side == Side::Backend && self.upstream_remove([&k]),
            added: None,
        }
    }

    /// A peer left: its subscriptions leave the gauge, and its distinct
    /// prefixes are returned for [`Hub::remove_prefixes`] (in chunks, so
    /// a peer with many never holds the locks for long).
    pub(super) fn peer_left(&self, subs: PeerSubs) -> Vec<Bytes> {
        self.stats
            .subscriptions
            .fetch_sub(subs.count as u64, Ordering::Relaxed);
        subs.prefixes.into_keys().collect()
    }

    /// Removes `peer` from under `prefixes` (its last references), one
    /// lock taken for all of them; returns whether the upstream changed.
    pub(super) fn remove_prefixes(&self, peer: &Arc<SubPeer>, prefixes: &[Bytes]) -> bool {
        {
            let mut idx = self.index_mut();
            for p in prefixes {
                idx.remove(p, peer);
            }
        }
        peer.side == Side::Backend && self.upstream_remove(prefixes)
    }

    /// Counts one message dropped for `peer`.
    pub(super) fn count_drop(&self, peer: &SubPeer) {
        peer.drops.fetch_add(1, Ordering::Relaxed);
        self.counters(peer.side)
            .drops
            .fetch_add(1, Ordering::Relaxed);
    }

    /// How long a full `peer` may still be waited for as of `now`: None
    /// once it made no progress for the slow-consumer timeout (stuck).
    /// Meaningful right after its queue refused a push.
    pub(super) fn patience_left(&self, peer: &SubPeer, now: Instant) -> Option<Duration> {
        self.cfg
            .slow_timeout
            .checked_sub(peer.queue.stalled_at(now))
            .filter(|d| !d.is_zero())
    }

    /// Queues one message to every matching subscriber and capture peer,
    /// at `now`, each in the wire form it takes (see [`Forms`]). `numbered`:
    /// the message comes from a peer that announced sequence frames, so a
    /// fifth frame is one. Never waits. With `waiting` (lossless mode, from a
    /// publisher's read loop), a full XPUB-side peer that is not stuck is
    /// added there instead of dropping; the caller then waits for those
    /// before it reads on. Without it, or for a stuck peer, a full queue
    /// drops and counts.
    pub(super) fn dispatch(
        &self,
        msg: &RawMessage,
        now: Instant,
        mut waiting: Option<&mut Vec<Waiting>>,
        numbered: bool,
    ) {
        // Before anyone is queued the message: a replay that reads the
        // cache after this point finds this value or a newer one.
        self.remember(msg, numbered);
        let idx = self.index.read().unwrap_or_else(|p| p.into_inner());
        let mut forms = Forms::new(msg, numbered);
        idx.for_each_match(msg.first_frame(), |peer| {
            let Some(wire) = forms.for_peer(peer, &self.stats) else {
                return;
            };
            let pushed = if peer.conflate {
                let (pushed, old) = peer.queue.push_by_key(wire.clone());
                if old.is_some() {
                    self.stats.conflated.fetch_add(1, Ordering::Relaxed);
                }
                pushed
            } else {
                peer.queue.push_at(wire.clone(), now)
            };
            match pushed {
                Pushed::Ok => {}
                Pushed::Full => match waiting.as_deref_mut() {
                    Some(w)
                        if peer.side == Side::Backend
                            && self.patience_left(peer, now).is_some() =>
                    {
                        w.push((peer.clone(), wire));
                    }
                    _ => self.count_drop(peer),
                },
                Pushed::Closed => self.count_drop(peer),
            }
        });
    }
}

/// One topic's newest envelope in the last-value cache.
#[derive(Debug, Clone)]
pub(super) struct Kept {
    /// Its wire bytes (our own copy).
    pub(super) wire: Bytes,
    /// Its frame count (5 for a numbered envelope).
    pub(super) frames: usize,
    /// It came from a numbering publisher (its fifth frame is a sequence
    /// number), as `dispatch` was told.
    pub(super) numbered: bool,
}

impl Hub {
    /// Keeps `msg` as the newest value of its topic frame, when the cache
    /// is on and `msg` has an envelope's shape (4 frames, or 5 from a
    /// numbering publisher; a JSON string first). Its bytes are copied:
    /// the message shares its read buffer, which a long-lived slice would
    /// keep whole.
    fn remember(&self, msg: &RawMessage, numbered: bool) {
        let Some(mut cache) = self.cache() else {
            return;
        };
        let topic = msg.first_frame();
        let shape = msg.frames == 4 || (numbered && msg.frames == 5);
        if !shape || topic.first() != Some(&b'"') {
            return;
        }
        let wire = Bytes::copy_from_slice(&msg.wire);
        let weight = wire.len();
        let kept = Kept {
            wire,
            frames: msg.frames,
            numbered,
        };
        cache.put(topic, kept, weight);
        self.publish_cache_gauges(&cache);
    }

    /// Copies the cache's sizes and evictions into the counters.
    pub(super) fn publish_cache_gauges(&self, cache: &LastValues<Kept>) {
        let st = &self.stats;
        st.cached_topics
            .store(cache.len() as u64, Ordering::Relaxed);
        st.cached_bytes
            .store(cache.bytes() as u64, Ordering::Relaxed);
        st.cache_evictions
            .store(cache.evictions(), Ordering::Relaxed);
    }
}

/// The wire forms of one message being dispatched: as received, and the
/// others made lazily, once each, for the peers that need them: data as
/// JSON (peers without the MessagePack opt-in), without the sequence frame
/// (peers that did not ask for numbers: byte-identical to the envelope of
/// an unnumbered publisher), or both. A form that cannot be made (data
/// that does not transcode) is not sent to those peers.
pub(super) struct Forms<'a> {
    /// The message as received.
    msg: &'a RawMessage,
    /// A 4- or 5-frame envelope whose data frame is MessagePack.
    msgpack: bool,
    /// For a numbered envelope: the header offsets of its 5 frames.
    seq: Option<[usize; 5]>,
    /// Made forms: [JSON data with the sequence frame, without the
    /// sequence frame, JSON data without it].
    made: [Option<Option<Bytes>>; 3],
}

impl<'a> Forms<'a> {
    /// Looks at frame headers only (no decoding): frame count, the data
    /// frame's first byte, where the frames start.
    pub(super) fn new(msg: &'a RawMessage, numbered: bool) -> Forms<'a> {
        let seq = if numbered && msg.frames == 5 {
            zmtp::frame_offsets::<5>(&msg.wire).map(|(at, _)| at)
        } else {
            None
        };
        let msgpack = (msg.frames == 4 || seq.is_some())
            && msg.frames().nth(2).and_then(|d| d.first().copied()) == Some(MSGPACK_MARKER);
        Forms {
            msg,
            msgpack,
            seq,
            made: [None, None, None],
        }
    }

    /// The form `peer` takes; None when it cannot be made.
    pub(super) fn for_peer(&mut self, peer: &SubPeer, stats: &ProxyStats) -> Option<Bytes> {
        let json = self.msgpack && !peer.msgpack;
        let strip = self.seq.is_some() && !peer.seq;
        let slot = match (json, strip) {
            (false, false) => return Some(self.msg.wire.clone()),
            (true, false) => 0,
            (false, true) => 1,
            (true, true) => 2,
        };
        let (msg, seq) = (self.msg, self.seq);
        self.made[slot]
            .get_or_insert_with(|| {
                let form = if json {
                    transcode_to_json(msg, !strip)
                } else {
                    seq.map(|at| strip_seq(msg, at))
                };
                if form.is_some() {
                    let c = if json {
                        &stats.transcoded
                    } else {
                        &stats.seq_stripped
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                }
                form
            })
            .clone()
    }
}

/// A numbered envelope without its sequence frame: the first four frames,
/// the fourth one's MORE flag cleared (one copy of the wire bytes).
fn strip_seq(msg: &RawMessage, at: [usize; 5]) -> Bytes {
    let mut out = BytesMut::from(&msg.wire[..at[4]]);
    zmtp::clear_more(&mut out, at[3]);
    out.freeze()
}

/// The same envelope with its data frame as JSON (for peers without the
/// MessagePack opt-in), with its sequence frame if it has one and
/// `keep_seq`; None when the data cannot be transcoded.
fn transcode_to_json(msg: &RawMessage, keep_seq: bool) -> Option<Bytes> {
    let mut it = msg.frames();
    let (t, o, d, ts) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let seq = it.next().filter(|_| keep_seq);
    let raw = crate::codec::to_raw_json(d).ok()?;
    let mut out = BytesMut::with_capacity(msg.wire.len() + 16);
    match seq {
        Some(seq) => zmtp::put_message(&mut out, &[t, o, raw.get().as_bytes(), ts, seq]),
        None => zmtp::put_message(&mut out, &[t, o, raw.get().as_bytes(), ts]),
    }
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A hub with `cfg`, byte-prefix subscriptions (these tests use
    /// plain topics; the bare-prefix reading has its own tests).
    fn hub(cfg: ProxyConfig) -> Hub {
        Hub::new(
            ProxyConfig {
                strict_subscriptions: true,
                ..cfg
            },
            Arc::new(ProxyStats::default()),
        )
    }

    fn peer(items: usize, side: Side) -> Arc<SubPeer> {
        Arc::new(SubPeer::new(items, 1 << 20, false, false, side))
    }

    fn sub(p: &str) -> SubChange {
        SubChange::Subscribe(Bytes::copy_from_slice(p.as_bytes()))
    }

    fn cancel(p: &str) -> SubChange {
        SubChange::Cancel(Bytes::copy_from_slice(p.as_bytes()))
    }

    fn msg(frames: &[&[u8]]) -> RawMessage {
        let mut out = BytesMut::new();
        zmtp::put_message(&mut out, frames);
        RawMessage {
            wire: out.freeze(),
            frames: frames.len(),
        }
    }

    /// What `peer`'s writer would take now.
    fn drain(peer: &SubPeer) -> Vec<Bytes> {
        let mut b = VecDeque::new();
        peer.queue.take_all(&mut b);
        b.into()
    }

    /// The upstream bytes publisher `id` would be sent now.
    fn upstream(h: &Hub, id: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        while h.take_upstream(id, &mut out, 1 << 20) {}
        out.to_vec()
    }

    fn subscription(on: bool, p: &str) -> Vec<u8> {
        let mut out = BytesMut::new();
        zmtp::put_subscription(&mut out, on, p.as_bytes());
        out.to_vec()
    }

    #[test]
    fn a_message_goes_once_to_each_peer_holding_a_prefix_of_its_topic() {
        let h = hub(ProxyConfig::default());
        let (a, b, c) = (
            peer(10, Side::Backend),
            peer(10, Side::Backend),
            peer(10, Side::Capture),
        );
        let (mut sa, mut sb, mut sc) = Default::default();
        h.apply_sub_change(&a, &mut sa, sub("md/"));
        h.apply_sub_change(&a, &mut sa, sub("md/x"));
        h.apply_sub_change(&a, &mut sa, sub("md/x"));
        h.apply_sub_change(&b, &mut sb, sub("other"));
        h.apply_sub_change(&c, &mut sc, sub(""));
        let now = Instant::now();
        let m = msg(&[b"md/xy", b"body"]);
        h.dispatch(&m, now, None, false);
        h.dispatch(&msg(&[b"nothing"]), now, None, false);
        // Two matching prefixes, one delivery; the same bytes, no copy.
        assert_eq!(drain(&a), vec![m.wire.clone()]);
        assert!(drain(&b).is_empty());
        assert_eq!(drain(&c).len(), 2);
        assert_eq!(h.stats.snapshot().subscriptions, 5);
        // A cancel removes one reference; the last one unmatches.
        h.apply_sub_change(&a, &mut sa, cancel("md/x"));
        h.apply_sub_change(&a, &mut sa, cancel("md/"));
        h.dispatch(&m, now, None, false);
        assert_eq!(drain(&a).len(), 1);
        h.apply_sub_change(&a, &mut sa, cancel("md/x"));
        h.dispatch(&m, now, None, false);
        assert!(drain(&a).is_empty());
    }

    #[test]
    fn upstream_is_reference_counted_across_peers_and_skips_the_capture_side() {
        let h = hub(ProxyConfig::default());
        let id = h.join_publisher();
        let (a, b, cap) = (
            peer(10, Side::Backend),
            peer(10, Side::Backend),
            peer(10, Side::Capture),
        );
        let (mut sa, mut sb, mut sc) = Default::default();
        assert!(h.apply_sub_change(&a, &mut sa, sub("t")).upstream);
        assert!(
            !h.apply_sub_change(&a, &mut sa, sub("t")).upstream,
            "same peer again"
        );
        assert!(
            !h.apply_sub_change(&b, &mut sb, sub("t")).upstream,
            "another peer"
        );
        assert!(
            !h.apply_sub_change(&cap, &mut sc, sub("c")).upstream,
            "capture stays local"
        );
        assert_eq!(upstream(&h, id), subscription(true, "t"));
        assert!(!h.apply_sub_change(&a, &mut sa, cancel("t")).upstream);
        assert!(!h.apply_sub_change(&a, &mut sa, cancel("t")).upstream);
        // `a` is gone from "t"; `b` still holds it: nothing upstream.
        assert!(upstream(&h, id).is_empty());
        // The last holder leaves: one cancel upstream.
        let left = h.peer_left(sb);
        assert!(h.remove_prefixes(&b, &left));
        assert_eq!(upstream(&h, id), subscription(false, "t"));
        // A publisher joining now gets nothing.
        let late = h.join_publisher();
        assert!(upstream(&h, late).is_empty());
        assert_eq!(h.stats.snapshot().upstream_prefixes, 0);
    }

    #[test]
    fn per_peer_limits_ignore_count_and_never_go_upstream() {
        let h = hub(ProxyConfig {
            max_prefix_len: 4,
            max_subs_per_peer: 2,
            max_sub_bytes_per_peer: 5,
            ..ProxyConfig::default()
        });
        let id = h.join_publisher();
        let a = peer(10, Side::Backend);
        let mut s = PeerSubs::default();
        assert!(!h.apply_sub_change(&a, &mut s, sub("toolong")).upstream);
        assert!(!s.active, "an ignored subscription does not make it active");
        assert!(h.apply_sub_change(&a, &mut s, sub("abc")).upstream);
        assert!(
            !h.apply_sub_change(&a, &mut s, sub("xyz")).upstream,
            "bytes: 3 + 3 > 5"
        );
        assert!(h.apply_sub_change(&a, &mut s, sub("q")).upstream);
        assert!(
            !h.apply_sub_change(&a, &mut s, sub("r")).upstream,
            "count: 2 held"
        );
        // A cancel of what it never held changes nothing.
        assert!(!h.apply_sub_change(&a, &mut s, cancel("zz")).upstream);
        let st = h.stats.snapshot();
        assert_eq!(
            (st.subs_too_long, st.subs_over_bytes, st.subs_over_count),
            (1, 1, 1)
        );
        assert_eq!(st.subscriptions, 2);
        let mut want = subscription(true, "abc");
        want.extend(subscription(true, "q"));
        assert_eq!(upstream(&h, id), want);
    }

    #[test]
    fn a_bare_subscription_matches_and_goes_upstream_as_its_quoted_form() {
        let h = Hub::new(ProxyConfig::default(), Arc::new(ProxyStats::default()));
        let id = h.join_publisher();
        let (a, b) = (peer(10, Side::Backend), peer(10, Side::Backend));
        let (mut sa, mut sb) = (PeerSubs::default(), PeerSubs::default());
        assert!(h.apply_sub_change(&a, &mut sa, sub("RAW/")).upstream);
        // The quoted form is the same prefix: one upstream reference.
        assert!(!h.apply_sub_change(&b, &mut sb, sub("\"RAW/")).upstream);
        let mut want = subscription(true, "\"RAW/");
        want.extend(subscription(true, "RAW/"));
        assert_eq!(
            upstream(&h, id),
            want,
            "the quoted form, and the bytes as sent"
        );
        let now = Instant::now();
        let m = msg(&[b"\"RAW/x\"", b"\"o\"", b"1", b"1.0"]);
        let raw = msg(&[b"RAW/x", b"o"]);
        h.dispatch(&m, now, None, false);
        h.dispatch(&raw, now, None, false);
        // The bare subscriber gets both (what libzmq matched, and the
        // JSON topic its text means); the quoted one only the envelope.
        assert_eq!(drain(&a), vec![m.wire.clone(), raw.wire.clone()]);
        assert_eq!(drain(&b), vec![m.wire.clone()]);
        let st = h.stats.snapshot();
        assert_eq!((st.bare_subscriptions, st.subscriptions), (1, 3));
        // A bare cancel removes both forms.
        h.apply_sub_change(&a, &mut sa, cancel("RAW/"));
        h.dispatch(&m, now, None, false);
        h.dispatch(&raw, now, None, false);
        assert!(drain(&a).is_empty());
        assert_eq!(h.stats.snapshot().subscriptions, 1);
        // b still holds the quoted form: only the bytes are cancelled.
        assert_eq!(upstream(&h, id), subscription(false, "RAW/"));
        // Strict: raw bytes, as libzmq.
        let strict = hub(ProxyConfig::default());
        let c = peer(10, Side::Backend);
        let mut sc = PeerSubs::default();
        strict.apply_sub_change(&c, &mut sc, sub("RAW/"));
        strict.dispatch(&m, now, None, false);
        assert!(drain(&c).is_empty());
        strict.dispatch(&msg(&[b"RAW/x", b"o"]), now, None, false);
        assert_eq!(drain(&c).len(), 1);
        assert_eq!(strict.stats.snapshot().bare_subscriptions, 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_by_default() {
        let h = hub(ProxyConfig::default());
        let a = peer(1, Side::Backend);
        let mut s = PeerSubs::default();
        h.apply_sub_change(&a, &mut s, sub(""));
        let now = Instant::now();
        h.dispatch(&msg(&[b"t"]), now, None, false);
        h.dispatch(&msg(&[b"t"]), now, None, false);
        assert_eq!(drain(&a).len(), 1);
        assert_eq!(a.drops.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.snapshot().subscribers.drops, 1);
    }

    #[test]
    fn a_conflating_peer_keeps_the_newest_envelope_of_each_topic_in_place() {
        let h = hub(ProxyConfig::default());
        let a = Arc::new(SubPeer::new(2, 1 << 20, false, false, Side::Backend).conflating());
        let mut s = PeerSubs::default();
        h.apply_sub_change(&a, &mut s, sub(""));
        let now = Instant::now();
        let m = |t: &str, v: &str| msg(&[t.as_bytes(), v.as_bytes()]);
        for (t, v) in [
            ("\"x\"", "1"),
            ("\"y\"", "1"),
            ("\"x\"", "2"),
            ("\"x\"", "3"),
        ] {
            h.dispatch(&m(t, v), now, None, false);
        }
        // Full at two, yet nothing dropped: x's newest took x's place.
        assert_eq!(drain(&a), vec![m("\"x\"", "3").wire, m("\"y\"", "1").wire]);
        assert_eq!(a.drops.load(Ordering::Relaxed), 0);
        assert_eq!(h.stats.snapshot().conflated, 2);
    }

    #[test]
    fn lossless_dispatch_returns_full_subscribers_until_they_are_stuck() {
        let h = hub(ProxyConfig {
            lossless: true,
            slow_timeout: Duration::from_secs(10),
            ..ProxyConfig::default()
        });
        let (a, cap) = (peer(1, Side::Backend), peer(1, Side::Capture));
        let (mut sa, mut sc) = Default::default();
        h.apply_sub_change(&a, &mut sa, sub(""));
        h.apply_sub_change(&cap, &mut sc, sub(""));
        let t0 = Instant::now();
        let mut waiting = Vec::new();
        h.dispatch(&msg(&[b"1"]), t0, Some(&mut waiting), false);
        assert!(waiting.is_empty());
        // Full, making progress: the backend peer is waited for; the
        // capture peer drops (it never slows production).
        let m2 = msg(&[b"2"]);
        h.dispatch(&m2, t0 + Duration::from_secs(1), Some(&mut waiting), false);
        assert_eq!(waiting.len(), 1);
        assert!(Arc::ptr_eq(&waiting[0].0, &a) && waiting[0].1 == m2.wire);
        assert_eq!(h.stats.snapshot().capture.drops, 1);
        assert_eq!(
            h.patience_left(&a, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        // No progress for the slow-consumer timeout: stuck, drops.
        waiting.clear();
        let late = t0 + Duration::from_secs(11);
        assert_eq!(h.patience_left(&a, late), None);
        h.dispatch(&msg(&[b"3"]), late, Some(&mut waiting), false);
        assert!(waiting.is_empty());
        assert_eq!(h.stats.snapshot().subscribers.drops, 1);
        // Progress makes it a waited-for peer again.
        a.queue.note_progress_at(late);
        h.dispatch(&msg(&[b"4"]), late, Some(&mut waiting), false);
        assert_eq!(waiting.len(), 1);
    }

    #[test]
    fn msgpack_data_is_transcoded_once_for_the_peers_that_did_not_opt_in() {
        let h = hub(ProxyConfig::default());
        let json_a = peer(10, Side::Backend);
        let json_b = peer(10, Side::Backend);
        let mp = Arc::new(SubPeer::new(10, 1 << 20, true, false, Side::Backend));
        for p in [&json_a, &json_b, &mp] {
            h.apply_sub_change(p, &mut PeerSubs::default(), sub(""));
        }
        let data = crate::codec::encode(crate::codec::Codec::MsgPack, &serde_json::json!({"p": 1}))
            .expect("msgpack");
        let m = msg(&[b"\"t\"", b"\"o\"", &data, b"1.0"]);
        h.dispatch(&m, Instant::now(), None, false);
        let (a, b, c) = (drain(&json_a), drain(&json_b), drain(&mp));
        assert_eq!(c, vec![m.wire.clone()]);
        assert_eq!(a, b);
        assert_ne!(a[0], m.wire);
        assert_eq!(h.stats.snapshot().transcoded, 1);
    }

    /// A numbered envelope goes as it is to the peers that asked for
    /// numbers and, to the others, as the 4-frame envelope an unnumbered
    /// publisher would have sent (made once); MessagePack data is
    /// transcoded for the peers without that opt-in, keeping or dropping
    /// the sequence frame as each wants. A 5-frame message from a peer that
    /// did not announce numbers is forwarded untouched.
    #[test]
    fn numbered_envelopes_reach_each_peer_in_its_form() {
        use crate::transports::zmq::sequence::SeqFramer;
        let h = hub(ProxyConfig::default());
        let mk = |msgpack, seq| Arc::new(SubPeer::new(10, 1 << 20, msgpack, seq, Side::Backend));
        let (plain_a, plain_b, seq_json, seq_mp, mp_only) = (
            mk(false, false),
            mk(false, false),
            mk(false, true),
            mk(true, true),
            mk(true, false),
        );
        for p in [&plain_a, &plain_b, &seq_json, &seq_mp, &mp_only] {
            h.apply_sub_change(p, &mut PeerSubs::default(), sub(""));
        }
        let framer = SeqFramer::new("feed#0000000000000001");
        let numbered = |data: &[u8]| {
            let mut out = BytesMut::new();
            for f in [&b"\"t\""[..], b"\"o\"", data, b"1.5"] {
                zmtp::put_frame(&mut out, true, f);
            }
            framer.put(&mut out, 7);
            RawMessage {
                wire: out.freeze(),
                frames: 5,
            }
        };
        let json_data = br#"{"p":1}"#;
        let m = numbered(json_data);
        h.dispatch(&m, Instant::now(), None, true);
        let four = msg(&[b"\"t\"", b"\"o\"", json_data, b"1.5"]).wire;
        let (a, b) = (drain(&plain_a), drain(&plain_b));
        assert_eq!(
            a,
            vec![four.clone()],
            "byte-identical to an unnumbered envelope"
        );
        assert_eq!(a[0].as_ptr(), b[0].as_ptr(), "made once, shared");
        assert_eq!(drain(&seq_json), vec![m.wire.clone()]);
        assert_eq!(drain(&seq_mp), vec![m.wire.clone()]);
        assert_eq!(drain(&mp_only), vec![four]);
        assert_eq!(h.stats.snapshot().seq_stripped, 1);

        // MessagePack data: four forms.
        let mp = crate::codec::encode(crate::codec::Codec::MsgPack, &serde_json::json!({"p": 1}))
            .expect("msgpack");
        let m = numbered(&mp);
        h.dispatch(&m, Instant::now(), None, true);
        assert_eq!(drain(&seq_mp), vec![m.wire.clone()]);
        let frames = |b: &Bytes| {
            let r = RawMessage {
                wire: b.clone(),
                frames: 0,
            };
            r.frames().map(<[u8]>::to_vec).collect::<Vec<_>>()
        };
        let sj = drain(&seq_json);
        assert_eq!(frames(&sj[0]).len(), 5);
        assert_eq!(frames(&sj[0])[2], json_data.to_vec());
        let pa = drain(&plain_a);
        assert_eq!(
            frames(&pa[0]),
            frames(&msg(&[b"\"t\"", b"\"o\"", json_data, b"1.5"]).wire)
        );
        assert_eq!(pa[0], msg(&[b"\"t\"", b"\"o\"", json_data, b"1.5"]).wire);
        let mo = drain(&mp_only);
        assert_eq!(mo[0], msg(&[b"\"t\"", b"\"o\"", &mp, b"1.5"]).wire);
        drain(&plain_b);

        // Not announced as numbered: forwarded untouched to everyone.
        h.dispatch(&m, Instant::now(), None, false);
        let nm = drain(&plain_a);
        assert_eq!(nm, vec![m.wire.clone()]);
    }
}
