//! Counters of the proxy, per side and proxy-wide, and their plain
//! snapshots (what `status` shows), declared with the crate's `counters!`
//! macro (src/counters.rs).

use serde::Serialize;

use crate::counters::counters;

counters! {
    /// Counters of one side of the proxy.
    pub struct SideCounters;

    /// A plain copy of [`SideCounters`].
    #[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
    pub struct SideSnapshot {
        /// Messages received (publisher side) or written (subscriber sides).
        messages,
        /// Wire bytes of those messages (frame headers included).
        bytes,
        /// Messages dropped: oversized (publisher side) or a full queue
        /// (subscriber sides; in lossless mode only for a stuck subscriber,
        /// on the capture side, or for traffic from the router bridge).
        drops,
        /// Messages that are not valid hermes envelopes (forwarded anyway,
        /// not routed), or unusable control messages from subscribers.
        malformed,
        /// Connections closed for breaking ZMTP (bad greeting, bad frames).
        protocol_errors,
        /// Connections currently open (handshakes in progress included, so
        /// the connection limit also bounds half-open peers).
        open,
        /// Connections accepted since start.
        accepted,
        /// Connections refused for the connection limit.
        rejected,
        /// ZMTP heartbeat PINGs sent (`heartbeat_ivl`).
        pings_sent,
        /// PINGs received from peers (each answered with a PONG).
        pings_received,
        /// PONGs received from peers.
        pongs_received,
        /// Connections closed because the peer went silent: nothing
        /// within the heartbeat timeout after a PING, or within the TTL
        /// its own PING asked for.
        heartbeat_timeouts,
        /// PONG answers dropped: the peer sent PINGs faster than it read.
        pongs_dropped,
    }
}

counters! {
    /// The proxy-wide counters (the per-side ones are beside them in
    /// [`ProxyStats`]).
    pub struct ProxyCounters;

    /// A plain copy of [`ProxyStats`].
    #[derive(Debug, Clone, Copy, Default, Serialize)]
    pub struct ProxySnapshot {
        /// Envelopes handed to the router.
        to_bus,
        /// Envelopes the router bridge could not take (its queue was full).
        to_bus_dropped,
        /// Topic messages from the router forwarded to subscribers.
        from_bus,
        /// MessagePack data frames transcoded to JSON for peers that did
        /// not opt in.
        transcoded,
        /// Numbered envelopes given their 4-frame form (once per message)
        /// for subscribers that did not ask for sequence numbers.
        seq_stripped,
        /// Envelopes replaced in a lagging subscriber's queue by a newer
        /// one of the same topic (`--slow-policy conflate`).
        conflated,
        /// Subscription prefixes currently held by subscriber and capture
        /// peers (a gauge).
        subscriptions,
        /// Lossless mode: times a publisher connection stopped reading
        /// because a matching subscriber's queue was full (once per waiting
        /// message), so the pushback on publishers is visible.
        publisher_blocks,
        /// Lossless mode: total time publisher connections spent stopped
        /// that way, in milliseconds.
        publisher_blocked_ms,
        /// Lossless mode: times a waiting publisher gave up on a subscriber
        /// that made no progress for the slow-consumer timeout (its message
        /// then counts in that side's `drops`, like every later one while
        /// it stays stuck).
        stuck_subscribers,
        /// Subscriptions ignored because their prefix was longer than
        /// `max_prefix_len` (never forwarded upstream).
        subs_too_long,
        /// Subscriptions ignored because their peer held
        /// `max_subs_per_peer`.
        subs_over_count,
        /// Subscriptions ignored because their peer's prefixes would pass
        /// `max_sub_bytes_per_peer`.
        subs_over_bytes,
        /// Connections closed for staying idle (no subscription, no
        /// message) for `idle_timeout` after their handshake.
        idle_closed,
        /// Distinct prefixes subscribed upstream (a gauge; inside the bus
        /// the bus's own prefixes count, see `bus_prefixes`).
        upstream_prefixes,
        /// Bytes of upstream cancels kept for publishers that have not been
        /// sent them yet (a gauge, bounded by `max_upstream_pending_bytes`).
        upstream_pending_bytes,
        /// Publishers that fell behind that bound and were resynced.
        upstream_resyncs,
        /// Upstream cancels discarded for that bound.
        upstream_cancels_dropped,
        /// Inside the bus: prefixes the bus holds upstream for its Unix
        /// sessions and topic hooks (a gauge; one, the everything
        /// subscription, while `bus_everything`).
        bus_prefixes,
        /// Inside the bus: bytes of the distinct prefixes the bus wants, in
        /// their topic-frame form (a gauge, bounded: see `bus_everything`).
        bus_prefix_bytes,
        /// Inside the bus: 1 while the bus's prefixes passed the per-peer
        /// subscription limits (`max_subs_per_peer`,
        /// `max_sub_bytes_per_peer`) and it holds the everything
        /// subscription instead (a gauge).
        bus_everything,
        /// Inside the bus: times the bus fell back to the everything
        /// subscription that way.
        bus_everything_fallbacks,
        /// Inside the bus: envelopes from publishers that no Unix session
        /// or hook wanted (a proxy subscriber did): not handed to the
        /// router.
        to_bus_unwanted,
        /// Subscriptions read as a bare topic prefix (the reference
        /// `Receiver`'s `RAW/`) and matched as its quoted form (`"RAW/`);
        /// none with `strict_subscriptions`.
        bare_subscriptions,
        /// With `last_value`: topics whose newest envelope is kept (a
        /// gauge, bounded by the cache's topic bound).
        cached_topics,
        /// With `last_value`: bytes the kept envelopes are charged (a
        /// gauge, bounded by the cache's byte bound).
        cached_bytes,
        /// With `last_value`: envelopes evicted from the cache (or never
        /// kept) for its bounds.
        cache_evictions,
        /// With `last_value`: kept envelopes replayed to subscribers that
        /// subscribed after they were published.
        replayed,
        /// With `last_value`: replayed envelopes dropped because the
        /// subscriber's queue stayed full while it made no progress.
        replay_dropped;
        /// Publisher side.
        publishers: SideSnapshot,
        /// Subscriber side.
        subscribers: SideSnapshot,
        /// Capture side.
        capture: SideSnapshot,
    }
}

/// All counters of a proxy: one [`SideCounters`] per side and the
/// proxy-wide [`ProxyCounters`] (reached as fields of this struct too,
/// through `Deref`, e.g. `stats.to_bus`).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// XSUB side (publishers).
    pub publishers: SideCounters,
    /// XPUB side (subscribers).
    pub subscribers: SideCounters,
    /// Capture side.
    pub capture: SideCounters,
    /// Proxy-wide counters.
    pub totals: ProxyCounters,
}

impl std::ops::Deref for ProxyStats {
    type Target = ProxyCounters;

    fn deref(&self) -> &ProxyCounters {
        &self.totals
    }
}

impl ProxyStats {
    /// A plain copy of every counter.
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            publishers: self.publishers.snapshot(),
            subscribers: self.subscribers.snapshot(),
            capture: self.capture.snapshot(),
            ..self.totals.snapshot()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn a_snapshot_copies_the_sides_and_the_totals() {
        let st = ProxyStats::default();
        st.to_bus.fetch_add(2, Ordering::Relaxed);
        st.subscribers.drops.fetch_add(3, Ordering::Relaxed);
        st.capture.open.fetch_add(1, Ordering::Relaxed);
        let s = st.snapshot();
        assert_eq!(s.to_bus, 2);
        assert_eq!(s.subscribers.drops, 3);
        assert_eq!(s.capture.open, 1);
        assert_eq!(s.publishers, SideSnapshot::default());
    }
}
