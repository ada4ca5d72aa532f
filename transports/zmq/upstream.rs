//! The upstream subscriptions of the proxy and the changes its publishers
//! have yet to be sent: one shared log with a cursor per publisher
//! ([`Upstream`]). Plain state: no I/O, no locks, no clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use super::stats::ProxyStats;
use super::zmtp;

/// Default most bytes of pending upstream cancels kept across all
/// publishers (see [`super::proxy::ProxyConfig::max_upstream_pending_bytes`]).
pub const DEFAULT_MAX_UPSTREAM_PENDING_BYTES: usize = 16 << 20;
/// What one pending cancel costs beyond its prefix bytes: its entries in
/// the prefix map and in the two ordered logs (counted so the bound is
/// one of memory, not of prefix bytes alone).
const TOMBSTONE_OVERHEAD: usize = 96;
/// Most bytes of subscription changes a publisher's writer encodes per
/// write (its only buffer: nothing else is queued per publisher).
pub(super) const UPSTREAM_BATCH_BYTES: usize = 64 * 1024;

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

impl UpEntry {
    /// Its change moves it to the head of the log: it takes the next
    /// sequence number from `next_seq`. Returns the old and the new one
    /// (the caller moves its log entry).
    fn renumber(&mut self, next_seq: &mut u64) -> (u64, u64) {
        let old = self.seq;
        self.seq = take_seq(next_seq);
        (old, self.seq)
    }
}

/// Takes the next sequence number of the log.
fn take_seq(next_seq: &mut u64) -> u64 {
    let s = *next_seq;
    *next_seq += 1;
    s
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
pub(super) struct Upstream {
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
    pub(super) fn new(max_pending: usize) -> Upstream {
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
        take_seq(&mut self.next_seq)
    }

    /// Adds one reference to `prefix`; true when it became live (the
    /// publishers' writers then have work).
    pub(super) fn add(&mut self, prefix: &Bytes) -> bool {
        if let Some(e) = self.prefixes.get_mut(&prefix[..]) {
            e.refs += 1;
            if e.refs > 1 {
                return false;
            }
            // Reborn from a tombstone: some publisher may hold it still.
            let (old, seq) = e.renumber(&mut self.next_seq);
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
    pub(super) fn remove(&mut self, prefix: &[u8]) -> bool {
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
        let (old, seq) = e.renumber(&mut self.next_seq);
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
    pub(super) fn join(&mut self, id: u64) {
        let c = PubCursor {
            cursor: 0,
            joined: self.next_seq,
            behind: false,
        };
        *self.keys.entry(c.key()).or_insert(0) += 1;
        self.pubs.insert(id, c);
    }

    /// A publisher left.
    pub(super) fn leave(&mut self, id: u64) {
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
    pub(super) fn take(&mut self, id: u64, out: &mut BytesMut, max_bytes: usize) -> bool {
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
    pub(super) fn publish(&self, st: &ProxyStats) {
        st.upstream_prefixes
            .store(self.live as u64, Ordering::Relaxed);
        st.upstream_pending_bytes
            .store(self.tomb_bytes as u64, Ordering::Relaxed);
        st.upstream_resyncs.store(self.resyncs, Ordering::Relaxed);
        st.upstream_cancels_dropped
            .store(self.trimmed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    use crate::transports::zmq::zmtp::{FrameReader, SubChange};

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
