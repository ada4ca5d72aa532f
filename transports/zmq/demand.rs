//! The bus's demand upstream: inside the bus (`hermes-bus server --zmq`)
//! the proxy subscribes its publishers to the topics the bus's Unix
//! sessions and topic hooks want, and to nothing more, so publishers
//! filter at the source as they do for the proxy's own subscribers.
//!
//! The bus is one more holder of upstream prefixes beside the subscriber
//! peers: its prefixes go into the same reference-counted upstream log
//! (`upstream.rs`), so they coalesce with the subscribers' (a Unix
//! session and a ZeroMQ receiver on `md/` make one upstream `"md/`), and
//! its cancels count in the same bound (`max_upstream_pending_bytes`).
//!
//! - [`Demand`] is the plain state: the prefixes wanted (router interest
//!   changes, see `crate::router::interest`, and the hooks' fixed
//!   prefixes) in topic-frame form, and the upstream changes they make
//!   ([`Ops`]). No I/O, no locks.
//! - [`BusDemand`] is what the bridge registers with the bus: it applies
//!   interest changes under its lock, as the router makes them, and hands
//!   the upstream changes to the running proxy at once, so a Unix
//!   `subscribe` is upstream (and its envelopes are let through to the
//!   router) before it is acknowledged. It also says which envelopes the
//!   router wants at all (the others, wanted only by proxy subscribers,
//!   are not decoded for it).
//!
//! A Unix prefix `P` is matched by publishers against the topic frame, a
//! JSON string, so it goes upstream as `"` + `P` JSON-escaped (ASCII, as
//! Python's `json.dumps`), without the closing quote; `""` goes as the
//! empty subscription (everything), as our `Receiver` subscribes. The
//! escaping maps each character on its own and no escape is a prefix of
//! another, so a topic starts with `P` exactly when its frame starts with
//! that form.
//!
//! Bounds, in bytes like the rest of the upstream: the bus as a holder
//! gets the per-peer limits of a subscriber. A prefix longer than
//! `max_prefix_len` (in frame form) is held cut to that length (a
//! shorter prefix wants more, never less; the router still matches
//! exactly). Past `max_subs_per_peer` distinct prefixes or
//! `max_sub_bytes_per_peer` bytes, the bus holds the everything
//! subscription instead (`bus_everything`, counted in
//! `bus_everything_fallbacks`), and goes back to its exact prefixes once
//! below 3/4 of both.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use bytes::Bytes;

use super::envelope;
use super::prefix_set::PrefixSet;
use super::proxy::{ProxyConfig, ProxyHandle};
use super::stats::ProxyStats;
use crate::router::interest::InterestChange;
use crate::transport::InterestSink;

/// The bounds of the bus as a holder of upstream prefixes.
#[derive(Debug, Clone, Copy)]
pub(super) struct DemandLimits {
    /// Longest prefix held (topic-frame bytes); longer ones are cut.
    pub(super) max_prefix_len: usize,
    /// Most distinct prefixes held before falling back to everything.
    pub(super) max_prefixes: usize,
    /// Most bytes of distinct prefixes held before falling back.
    pub(super) max_bytes: usize,
}

impl DemandLimits {
    /// The per-peer limits of `cfg`'s subscribers.
    pub(super) fn of(cfg: &ProxyConfig) -> DemandLimits {
        DemandLimits {
            max_prefix_len: cfg.max_prefix_len,
            max_prefixes: cfg.max_subs_per_peer,
            max_bytes: cfg.max_sub_bytes_per_peer,
        }
    }
}

/// Upstream changes of the bus as a holder: one reference more for each
/// of `add`, then one less for each of `remove` (in that order, so a
/// prefix in both is never absent in between).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Ops {
    /// Prefixes to hold.
    pub(super) add: Vec<Bytes>,
    /// Prefixes to let go.
    pub(super) remove: Vec<Bytes>,
}

impl Ops {
    fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// What the bus wants from publishers. See the module docs.
#[derive(Debug)]
pub(super) struct Demand {
    /// Topic-frame prefixes wanted, a multiset: one per router prefix
    /// (distinct Unix prefixes can meet once cut) and per hook prefix.
    wanted: PrefixSet,
    /// Distinct prefixes in `wanted`.
    distinct: usize,
    /// Their bytes.
    bytes: usize,
    /// Holding only the everything subscription (past the bounds).
    everything: bool,
    /// Times it fell back to everything.
    fallbacks: u64,
    /// The bounds.
    limits: DemandLimits,
}

impl Demand {
    /// Nothing wanted yet.
    pub(super) fn new(limits: DemandLimits) -> Demand {
        Demand {
            wanted: PrefixSet::default(),
            distinct: 0,
            bytes: 0,
            everything: false,
            fallbacks: 0,
            limits,
        }
    }

    /// The upstream form of Unix topic prefix `p` (cut to the limit).
    pub(super) fn frame_prefix(&self, p: &str) -> Bytes {
        let mut v = envelope::subscription_for(p);
        v.truncate(self.limits.max_prefix_len);
        Bytes::from(v)
    }

    /// The bus wants topics starting with `p` once more.
    pub(super) fn add(&mut self, p: &str, ops: &mut Ops) {
        let fp = self.frame_prefix(p);
        if !self.wanted.insert(fp.clone()) {
            return;
        }
        self.distinct += 1;
        self.bytes += fp.len();
        if self.everything {
            return;
        }
        if self.distinct > self.limits.max_prefixes || self.bytes > self.limits.max_bytes {
            // Hold everything first, then let the exact ones go (those
            // added earlier in `ops` cancel out with their removal).
            self.everything = true;
            self.fallbacks += 1;
            ops.add.push(Bytes::new());
            ops.remove
                .extend(self.wanted.prefixes().filter(|k| **k != fp).cloned());
            return;
        }
        ops.add.push(fp);
    }

    /// The bus wants topics starting with `p` once less.
    pub(super) fn remove(&mut self, p: &str, ops: &mut Ops) {
        let fp = self.frame_prefix(p);
        if !self.wanted.remove(&fp) {
            return;
        }
        self.distinct -= 1;
        self.bytes -= fp.len();
        if !self.everything {
            ops.remove.push(fp);
            return;
        }
        if self.distinct <= self.limits.max_prefixes / 4 * 3
            && self.bytes <= self.limits.max_bytes / 4 * 3
        {
            self.everything = false;
            ops.add.extend(self.wanted.prefixes().cloned());
            ops.remove.push(Bytes::new());
        }
    }

    /// Applies router interest changes.
    pub(super) fn apply(&mut self, changes: &[InterestChange], ops: &mut Ops) {
        for c in changes {
            match c {
                InterestChange::Added(p) => self.add(p, ops),
                InterestChange::Removed(p) => self.remove(p, ops),
            }
        }
    }

    /// What the bus holds upstream now (for a proxy that starts running).
    pub(super) fn held(&self) -> Vec<Bytes> {
        if self.everything {
            vec![Bytes::new()]
        } else {
            self.wanted.prefixes().cloned().collect()
        }
    }

    /// Whether the router wants an envelope with this topic frame (a
    /// superset where prefixes were cut or everything is held: the router
    /// matches exactly).
    pub(super) fn wants(&self, topic_frame: &[u8]) -> bool {
        self.everything || self.wanted.matches(topic_frame)
    }

    /// Updates the proxy's gauges and counters of the bus's demand.
    pub(super) fn publish(&self, st: &ProxyStats) {
        let held = if self.everything { 1 } else { self.distinct };
        st.bus_prefixes.store(held as u64, Ordering::Relaxed);
        st.bus_prefix_bytes
            .store(self.bytes as u64, Ordering::Relaxed);
        st.bus_everything
            .store(u64::from(self.everything), Ordering::Relaxed);
        st.bus_everything_fallbacks
            .store(self.fallbacks, Ordering::Relaxed);
    }
}

/// The plain state and where its upstream changes go.
struct Held {
    /// What the bus wants.
    demand: Demand,
    /// The running proxy (None until it runs: what is wanted meanwhile is
    /// held once it does).
    proxy: Option<ProxyHandle>,
}

/// The bus's demand as the bridge registers it with the bus (an
/// [`InterestSink`]) and as the proxy's sink asks it (`wants`).
pub(super) struct BusDemand {
    /// The state; written per interest change, read per envelope.
    held: RwLock<Held>,
    /// The proxy's counters.
    stats: Arc<ProxyStats>,
}

impl BusDemand {
    /// Nothing wanted, no proxy yet.
    pub(super) fn new(limits: DemandLimits, stats: Arc<ProxyStats>) -> BusDemand {
        BusDemand {
            held: RwLock::new(Held {
                demand: Demand::new(limits),
                proxy: None,
            }),
            stats,
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, Held> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the demand and hands the upstream changes to the proxy.
    fn change(&self, f: impl FnOnce(&mut Demand, &mut Ops)) {
        let mut h = self.write();
        let mut ops = Ops::default();
        f(&mut h.demand, &mut ops);
        if let Some(p) = &h.proxy {
            if !ops.is_empty() {
                p.hold_upstream(&ops.add, &ops.remove);
            }
        }
        h.demand.publish(&self.stats);
    }

    /// Adds fixed prefixes (the hooks': they never change).
    pub(super) fn add_fixed(&self, prefixes: &[String]) {
        self.change(|d, ops| {
            for p in prefixes {
                d.add(p, ops);
            }
        });
    }

    /// The proxy runs: what is wanted is held upstream from now on.
    pub(super) fn attach(&self, proxy: ProxyHandle) {
        let mut h = self.write();
        proxy.hold_upstream(&h.demand.held(), &[]);
        h.proxy = Some(proxy);
        h.demand.publish(&self.stats);
    }

    /// Whether the router wants an envelope with this topic frame.
    pub(super) fn wants(&self, topic_frame: &[u8]) -> bool {
        self.held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .demand
            .wants(topic_frame)
    }
}

impl InterestSink for BusDemand {
    fn changed(&self, changes: &[InterestChange]) {
        self.change(|d, ops| d.apply(changes, ops));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use bytes::BytesMut;

    use super::super::hub::{Hub, PeerSubs, Side, SubPeer};
    use super::super::zmtp::{FrameReader, SubChange};
    use super::*;

    fn limits() -> DemandLimits {
        DemandLimits::of(&ProxyConfig::default())
    }

    /// A publisher as libzmq keeps subscriptions (a set), fed what the
    /// hub's upstream log sends it.
    #[derive(Default)]
    struct Pub {
        held: HashSet<Vec<u8>>,
        subscribes: usize,
    }

    impl Pub {
        fn sync(&mut self, hub: &Hub, id: u64) {
            let mut out = BytesMut::new();
            while hub.take_upstream(id, &mut out, 1 << 20) {}
            let mut r = FrameReader::new(1 << 20);
            r.buf.extend_from_slice(&out);
            while let Some(item) = r.next_item().expect("valid upstream bytes") {
                match SubChange::from_inbound(&item).expect("a subscription change") {
                    SubChange::Subscribe(p) => {
                        self.subscribes += 1;
                        assert!(self.held.insert(p.to_vec()), "subscribed twice: {p:?}");
                    }
                    SubChange::Cancel(p) => {
                        self.held.remove(&p[..]);
                    }
                }
            }
        }

        fn holds(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .held
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            v.sort();
            v
        }

        /// Whether it would send a message with this topic (source
        /// filtering).
        fn sends(&self, topic: &str) -> bool {
            let frame = envelope::topic_frame(topic);
            self.held.iter().any(|p| frame.starts_with(p))
        }
    }

    fn hub() -> Hub {
        Hub::new(ProxyConfig::default(), Arc::new(ProxyStats::default()))
    }

    fn added(p: &str) -> InterestChange {
        InterestChange::Added(p.into())
    }

    fn removed(p: &str) -> InterestChange {
        InterestChange::Removed(p.into())
    }

    #[test]
    fn unix_prefixes_go_upstream_in_their_topic_frame_form() {
        let d = Demand::new(limits());
        assert_eq!(&d.frame_prefix("md/")[..], b"\"md/");
        assert_eq!(&d.frame_prefix("caf\u{e9}/")[..], b"\"caf\\u00e9/");
        assert_eq!(&d.frame_prefix("a\"b")[..], b"\"a\\\"b");
        assert_eq!(&d.frame_prefix("")[..], b"", "everything");
        // Matching the frame form is matching the topic.
        let mut d = Demand::new(limits());
        d.add("caf\u{e9}/", &mut Ops::default());
        assert!(d.wants(&envelope::topic_frame("caf\u{e9}/x")));
        assert!(!d.wants(&envelope::topic_frame("cafe/x")));
        assert!(!d.wants(&envelope::topic_frame("caf")));
    }

    /// The bus's demand feeding a hub that one publisher joined.
    struct Rig {
        hub: Hub,
        id: u64,
        publ: Pub,
        d: Demand,
    }

    impl Rig {
        fn new(limits: DemandLimits) -> Rig {
            let hub = hub();
            let id = hub.join_publisher();
            Rig {
                hub,
                id,
                publ: Pub::default(),
                d: Demand::new(limits),
            }
        }

        /// Applies interest changes as the bridge does, straight into the
        /// hub, then lets the publisher read what the hub sends it.
        fn apply(&mut self, changes: &[InterestChange]) {
            let mut ops = Ops::default();
            self.d.apply(changes, &mut ops);
            self.hub.upstream_apply(&ops.add, &ops.remove);
            self.sync();
        }

        /// Lets the publisher read what the hub sends it.
        fn sync(&mut self) {
            self.publ.sync(&self.hub, self.id);
        }
    }

    /// The union: the bus's prefixes and a subscriber's coalesce in one
    /// upstream log; each publisher holds exactly the union, as it
    /// changes, and filters everything else at the source.
    #[test]
    fn the_union_of_bus_and_subscribers_is_what_publishers_hold() {
        let mut rig = Rig::new(limits());
        // Hooks want "hook/" (fixed), the router's sessions "md/".
        rig.apply(&[added("hook/"), added("md/")]);
        assert_eq!(rig.publ.holds(), vec!["\"hook/", "\"md/"]);
        assert!(rig.publ.sends("md/x") && rig.publ.sends("hook/1") && !rig.publ.sends("news/1"));
        // A ZeroMQ receiver subscribes to "md/" too: no second upstream
        // subscription; and to "news/".
        let peer = Arc::new(SubPeer::new(10, 1 << 20, false, false, Side::Backend));
        let mut subs = PeerSubs::default();
        let sub = |p: &str| SubChange::Subscribe(Bytes::copy_from_slice(p.as_bytes()));
        let cancel = |p: &str| SubChange::Cancel(Bytes::copy_from_slice(p.as_bytes()));
        rig.hub.apply_sub_change(&peer, &mut subs, sub("\"md/"));
        rig.hub.apply_sub_change(&peer, &mut subs, sub("\"news/"));
        rig.sync();
        assert_eq!(rig.publ.holds(), vec!["\"hook/", "\"md/", "\"news/"]);
        assert_eq!(rig.publ.subscribes, 3, "md/ was not sent twice");
        assert_eq!(rig.hub.stats.snapshot().upstream_prefixes, 3);
        // The last Unix session on md/ leaves: the receiver still holds it.
        rig.apply(&[removed("md/")]);
        assert!(rig.publ.sends("md/x"));
        assert!(
            !rig.d.wants(&envelope::topic_frame("md/x")),
            "not for the router"
        );
        // The receiver leaves md/ too: publishers filter it again.
        rig.hub.apply_sub_change(&peer, &mut subs, cancel("\"md/"));
        rig.sync();
        assert_eq!(rig.publ.holds(), vec!["\"hook/", "\"news/"]);
        assert!(!rig.publ.sends("md/x"));
        // A session wants everything: the empty subscription.
        rig.apply(&[added("")]);
        assert!(rig.publ.sends("anything/at/all"));
        rig.apply(&[removed(""), removed("hook/")]);
        assert_eq!(rig.publ.holds(), vec!["\"news/"]);
        // A publisher joining now is sent the union as it is.
        let late = rig.hub.join_publisher();
        let mut p2 = Pub::default();
        p2.sync(&rig.hub, late);
        assert_eq!(p2.holds(), vec!["\"news/"]);
    }

    /// Past the per-peer limits the bus holds everything instead (never
    /// less than it wants), and goes back to its exact prefixes once
    /// well below them; a too-long prefix is held cut.
    #[test]
    fn past_its_bounds_the_bus_holds_everything_then_comes_back() {
        let mut rig = Rig::new(DemandLimits {
            max_prefix_len: 8,
            max_prefixes: 8,
            max_bytes: 1 << 20,
        });
        rig.apply(&[added("a-very-long-prefix/")]);
        assert_eq!(rig.publ.holds(), vec!["\"a-very-"], "cut to 8 bytes");
        assert!(rig.publ.sends("a-very-long-prefix/x"));
        let many: Vec<InterestChange> = (0..8).map(|i| added(&format!("t{i}/"))).collect();
        rig.apply(&many);
        assert_eq!(rig.publ.holds(), vec![""], "9 > 8 distinct: everything");
        assert!(rig.d.wants(&envelope::topic_frame("zzz")));
        let st = rig.hub.stats.snapshot();
        assert_eq!(st.upstream_prefixes, 1);
        rig.d.publish(&rig.hub.stats);
        let st = rig.hub.stats.snapshot();
        assert_eq!((st.bus_everything, st.bus_everything_fallbacks), (1, 1));
        // Down to 7: still everything; to 6 (3/4 of 8): exact again.
        rig.apply(&[removed("t0/"), removed("t1/")]);
        assert_eq!(rig.publ.holds(), vec![""]);
        rig.apply(&[removed("t2/")]);
        assert_eq!(rig.publ.holds().len(), 6);
        assert!(!rig.publ.sends("zzz") && rig.publ.sends("t7/x"));
        rig.d.publish(&rig.hub.stats);
        let st = rig.hub.stats.snapshot();
        assert_eq!((st.bus_everything, st.bus_prefixes), (0, 6));
        assert_eq!(st.upstream_prefixes, 6);
        // Everything let go: publishers hold nothing, no cancel is kept
        // once they took them.
        let rest: Vec<InterestChange> = ["a-very-long-prefix/", "t3/", "t4/", "t5/", "t6/", "t7/"]
            .iter()
            .map(|p| removed(p))
            .collect();
        rig.apply(&rest);
        assert!(rig.publ.holds().is_empty());
        // (The gauges are refreshed at the next change.)
        rig.hub.upstream_apply(&[], &[]);
        assert_eq!(rig.hub.stats.snapshot().upstream_pending_bytes, 0);
    }

    /// Several Unix prefixes cut to the same bytes are one upstream
    /// prefix, held until the last of them goes.
    #[test]
    fn prefixes_cut_to_the_same_bytes_are_counted() {
        let mut rig = Rig::new(DemandLimits {
            max_prefix_len: 4,
            ..limits()
        });
        rig.apply(&[added("abcd1"), added("abcd2")]);
        assert_eq!(rig.publ.holds(), vec!["\"abc"]);
        rig.apply(&[removed("abcd1")]);
        assert_eq!(rig.publ.holds(), vec!["\"abc"]);
        rig.apply(&[removed("abcd2")]);
        assert!(rig.publ.holds().is_empty());
    }
}
