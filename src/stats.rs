//! Counters: plain numbers the router keeps, and the snapshot that
//! `{"type":"stats"}` and `hermes-busd status` show.

use serde::{Deserialize, Serialize};

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionCounters {
    /// Frames received from this session.
    pub received: u64,
    /// Deliveries queued to this session.
    pub delivered: u64,
    /// Deliveries meant for this session that a bound dropped.
    pub dropped: u64,
    /// Error replies sent to this session.
    pub errors: u64,
}

/// Counters of the whole bus.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Totals {
    /// Messages and topic publications accepted for routing.
    pub routed: u64,
    /// Deliveries queued to sessions (one message to ten sessions is ten).
    pub delivered: u64,
    /// Deliveries dropped by a full outbox (slow consumer).
    pub dropped_slow: u64,
    /// Topic values replaced in a lagging subscriber's outbox by a newer
    /// value of the same topic (`--slow-policy conflate`).
    pub conflated: u64,
    /// Messages queued for a name whose client went away a moment ago
    /// (delivered when it registers again).
    pub held: u64,
    /// Messages held for a recently gone name and dropped: the hold bound
    /// was full, or the name did not come back within the grace period.
    pub dropped_held: u64,
    /// Error replies sent.
    pub errors: u64,
    /// Sessions closed for silence past the heartbeat timeout.
    pub evicted: u64,
    /// Sessions closed because another connection took their name.
    pub replaced: u64,
    /// Sessions disconnected by the slow-consumer policy.
    pub slow_disconnects: u64,
    /// Connections accepted since start.
    pub connections: u64,
    /// Times a sender was held back because a receiver's outbox (or a
    /// held mailbox, or the byte budget) was full.
    pub blocked: u64,
    /// Milliseconds senders spent held back, added up.
    pub blocked_ms: u64,
}

/// Flow control now: who waits, and how much of the byte budget is used.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowStats {
    /// Sending sessions held back right now.
    pub blocked_now: usize,
    /// Bytes queued in every outbox and held mailbox together.
    pub budget_used: usize,
    /// The bound on that (`--memory-budget`).
    pub budget_limit: usize,
    /// Bytes one outbox holds before its senders wait (`--outbox-bytes`).
    pub outbox_bytes: usize,
    /// Deliveries one outbox holds before its senders wait.
    pub outbox_capacity: usize,
    /// Milliseconds without progress after which a receiver gets the
    /// slow-consumer policy.
    pub slow_consumer_timeout_ms: u64,
}

/// One registered endpoint in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointStats {
    /// The endpoint name.
    pub name: String,
    /// The session id given at register.
    pub session_id: String,
    /// Which transport the session uses.
    pub transport: String,
    /// Deliveries waiting in its outbox (or being written).
    pub queued: usize,
    /// Their bytes.
    #[serde(default)]
    pub queued_bytes: usize,
    /// Bytes of its outbox's conflation index (`--slow-policy conflate`;
    /// 0 otherwise), counted against the outbox's byte bound too.
    #[serde(default)]
    pub index_bytes: usize,
    /// True while declared stuck by the slow-consumer timeout.
    #[serde(default)]
    pub stuck: bool,
    /// Its counters.
    pub counters: SessionCounters,
}

/// A name held for a client that went away a moment ago.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldStats {
    /// The endpoint name.
    pub name: String,
    /// Messages waiting for it.
    pub queued: usize,
    /// Their bytes.
    #[serde(default)]
    pub bytes: usize,
    /// Milliseconds since it went away.
    pub gone_ms: u64,
}

/// The router's last-value cache (`--last-value`): what it keeps and what
/// snapshots sent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LastValueStats {
    /// Whether the bus keeps last values.
    pub enabled: bool,
    /// Topics whose newest value is kept (a gauge).
    pub cached_topics: u64,
    /// Bytes they are charged (a gauge, bounded by `--last-value-bytes`).
    pub cached_bytes: u64,
    /// Values evicted (or never kept) for the bounds.
    pub cache_evictions: u64,
    /// Kept values sent to sessions that subscribed with a snapshot.
    pub replayed: u64,
    /// Kept values a snapshot could not queue (its session was stuck or
    /// closing).
    pub replay_dropped: u64,
}

/// Everything `status` shows about the router.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterStats {
    /// Open sessions (registered or not).
    pub sessions: usize,
    /// Registered endpoints.
    pub endpoints: Vec<EndpointStats>,
    /// Names held for reconnect.
    pub held: Vec<HeldStats>,
    /// Totals since start.
    pub totals: Totals,
    /// Topic subscriptions held, all sessions together.
    #[serde(default)]
    pub subscriptions: usize,
    /// Their bytes.
    #[serde(default)]
    pub subscription_bytes: usize,
    /// Flow control now.
    #[serde(default)]
    pub flow: FlowStats,
    /// The bus's own topic numbering (see [`crate::seq`]).
    #[serde(default)]
    pub seq: SeqStats,
    /// The last-value cache.
    #[serde(default)]
    pub last_value: LastValueStats,
}

/// The bus's numbering of the topic messages that arrive without a number.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeqStats {
    /// The bus's origin id (`hermes-bus#epoch`).
    pub origin: String,
    /// Topics numbered now.
    pub topics: usize,
    /// Bytes of their counters now.
    pub bytes: usize,
    /// The bound on those bytes.
    pub limit: usize,
    /// Counters forgotten for that bound (the topic starts again at 1).
    pub forgotten: u64,
}
