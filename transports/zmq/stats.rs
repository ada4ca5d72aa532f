//! Counters of the proxy, per side, and their plain snapshots (what
//! `status` shows).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one side of the proxy.
#[derive(Debug, Default)]
pub struct SideCounters {
    /// Messages received (publisher side) or written (subscriber sides).
    pub messages: AtomicU64,
    /// Wire bytes of those messages (frame headers included).
    pub bytes: AtomicU64,
    /// Messages dropped: oversized (publisher side) or a full queue
    /// (subscriber sides; in lossless mode only for a stuck subscriber,
    /// on the capture side, or for traffic from the router bridge).
    pub drops: AtomicU64,
    /// Messages that are not valid hermes envelopes (forwarded anyway, not
    /// routed), or unusable control messages from subscribers.
    pub malformed: AtomicU64,
    /// Connections closed for breaking ZMTP (bad greeting, bad frames).
    pub protocol_errors: AtomicU64,
    /// Connections currently open (handshakes in progress included, so
    /// the connection limit also bounds half-open peers).
    pub open: AtomicU64,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections refused for the connection limit.
    pub rejected: AtomicU64,
}

/// A plain copy of [`SideCounters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct SideSnapshot {
    /// See [`SideCounters::messages`].
    pub messages: u64,
    /// See [`SideCounters::bytes`].
    pub bytes: u64,
    /// See [`SideCounters::drops`].
    pub drops: u64,
    /// See [`SideCounters::malformed`].
    pub malformed: u64,
    /// See [`SideCounters::protocol_errors`].
    pub protocol_errors: u64,
    /// See [`SideCounters::open`].
    pub open: u64,
    /// See [`SideCounters::accepted`].
    pub accepted: u64,
    /// See [`SideCounters::rejected`].
    pub rejected: u64,
}

impl SideCounters {
    /// A plain copy.
    pub fn snapshot(&self) -> SideSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SideSnapshot {
            messages: l(&self.messages),
            bytes: l(&self.bytes),
            drops: l(&self.drops),
            malformed: l(&self.malformed),
            protocol_errors: l(&self.protocol_errors),
            open: l(&self.open),
            accepted: l(&self.accepted),
            rejected: l(&self.rejected),
        }
    }
}

/// All counters of a proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// XSUB side (publishers).
    pub publishers: SideCounters,
    /// XPUB side (subscribers).
    pub subscribers: SideCounters,
    /// Capture side.
    pub capture: SideCounters,
    /// Envelopes handed to the router.
    pub to_bus: AtomicU64,
    /// Envelopes the router bridge could not take (its queue was full).
    pub to_bus_dropped: AtomicU64,
    /// Topic messages from the router forwarded to subscribers.
    pub from_bus: AtomicU64,
    /// MessagePack data frames transcoded to JSON for peers that did not
    /// opt in.
    pub transcoded: AtomicU64,
    /// Subscription prefixes currently held by subscriber and capture
    /// peers (a gauge).
    pub subscriptions: AtomicU64,
    /// Lossless mode: times a publisher connection stopped reading because
    /// a matching subscriber's queue was full (once per waiting message),
    /// so the pushback on publishers is visible.
    pub publisher_blocks: AtomicU64,
    /// Lossless mode: total time publisher connections spent stopped that
    /// way, in milliseconds.
    pub publisher_blocked_ms: AtomicU64,
    /// Lossless mode: times a waiting publisher gave up on a subscriber
    /// that made no progress for the slow-consumer timeout (its message
    /// then counts in that side's `drops`, like every later one while it
    /// stays stuck).
    pub stuck_subscribers: AtomicU64,
    /// Subscriptions ignored because their prefix was longer than
    /// `max_prefix_len` (never forwarded upstream).
    pub subs_too_long: AtomicU64,
    /// Subscriptions ignored because their peer held `max_subs_per_peer`.
    pub subs_over_count: AtomicU64,
    /// Subscriptions ignored because their peer's prefixes would pass
    /// `max_sub_bytes_per_peer`.
    pub subs_over_bytes: AtomicU64,
    /// Connections closed for staying idle (no subscription, no message)
    /// for `idle_timeout` after their handshake.
    pub idle_closed: AtomicU64,
    /// Distinct prefixes subscribed upstream (a gauge; the router's
    /// everything-subscription inside the bus counts).
    pub upstream_prefixes: AtomicU64,
    /// Bytes of upstream cancels kept for publishers that have not been
    /// sent them yet (a gauge, bounded by `max_upstream_pending_bytes`).
    pub upstream_pending_bytes: AtomicU64,
    /// Publishers that fell behind that bound and were resynced.
    pub upstream_resyncs: AtomicU64,
    /// Upstream cancels discarded for that bound.
    pub upstream_cancels_dropped: AtomicU64,
}

/// A plain copy of [`ProxyStats`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProxySnapshot {
    /// Publisher side.
    pub publishers: SideSnapshot,
    /// Subscriber side.
    pub subscribers: SideSnapshot,
    /// Capture side.
    pub capture: SideSnapshot,
    /// See [`ProxyStats::to_bus`].
    pub to_bus: u64,
    /// See [`ProxyStats::to_bus_dropped`].
    pub to_bus_dropped: u64,
    /// See [`ProxyStats::from_bus`].
    pub from_bus: u64,
    /// See [`ProxyStats::transcoded`].
    pub transcoded: u64,
    /// See [`ProxyStats::subscriptions`].
    pub subscriptions: u64,
    /// See [`ProxyStats::publisher_blocks`].
    pub publisher_blocks: u64,
    /// See [`ProxyStats::publisher_blocked_ms`].
    pub publisher_blocked_ms: u64,
    /// See [`ProxyStats::stuck_subscribers`].
    pub stuck_subscribers: u64,
    /// See [`ProxyStats::subs_too_long`].
    pub subs_too_long: u64,
    /// See [`ProxyStats::subs_over_count`].
    pub subs_over_count: u64,
    /// See [`ProxyStats::subs_over_bytes`].
    pub subs_over_bytes: u64,
    /// See [`ProxyStats::idle_closed`].
    pub idle_closed: u64,
    /// See [`ProxyStats::upstream_prefixes`].
    pub upstream_prefixes: u64,
    /// See [`ProxyStats::upstream_pending_bytes`].
    pub upstream_pending_bytes: u64,
    /// See [`ProxyStats::upstream_resyncs`].
    pub upstream_resyncs: u64,
    /// See [`ProxyStats::upstream_cancels_dropped`].
    pub upstream_cancels_dropped: u64,
}

impl ProxyStats {
    /// A plain copy of every counter.
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            publishers: self.publishers.snapshot(),
            subscribers: self.subscribers.snapshot(),
            capture: self.capture.snapshot(),
            to_bus: self.to_bus.load(Ordering::Relaxed),
            to_bus_dropped: self.to_bus_dropped.load(Ordering::Relaxed),
            from_bus: self.from_bus.load(Ordering::Relaxed),
            transcoded: self.transcoded.load(Ordering::Relaxed),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            publisher_blocks: self.publisher_blocks.load(Ordering::Relaxed),
            publisher_blocked_ms: self.publisher_blocked_ms.load(Ordering::Relaxed),
            stuck_subscribers: self.stuck_subscribers.load(Ordering::Relaxed),
            subs_too_long: self.subs_too_long.load(Ordering::Relaxed),
            subs_over_count: self.subs_over_count.load(Ordering::Relaxed),
            subs_over_bytes: self.subs_over_bytes.load(Ordering::Relaxed),
            idle_closed: self.idle_closed.load(Ordering::Relaxed),
            upstream_prefixes: self.upstream_prefixes.load(Ordering::Relaxed),
            upstream_pending_bytes: self.upstream_pending_bytes.load(Ordering::Relaxed),
            upstream_resyncs: self.upstream_resyncs.load(Ordering::Relaxed),
            upstream_cancels_dropped: self.upstream_cancels_dropped.load(Ordering::Relaxed),
        }
    }
}
