//! The router: plain state that decides where traffic goes.
//!
//! It owns the session table, the endpoint names (live, or held for a
//! client that went away a moment ago), the topic subscriptions and the
//! counters. Every operation runs to completion without awaiting. A
//! delivery is pushed into a bounded outbox; when the outbox is full the
//! router does not drop: it returns the decision "blocked on X"
//! ([`Blocked`]) and the sending session waits (see `Bus::settle`), then
//! hands the decision back ([`Router::resume`]) with a verdict: room, or
//! stuck (no progress for the slow-consumer timeout, when the policy
//! applies), or gone. The transports do all the I/O and all the waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::delivery::{Ack, Delivery, TopicMessage};
use crate::error::{ErrorCode, ProtocolError};
use crate::last_value::{LastValueLimits, LastValues};
use crate::message::{BusMessage, RawJson};
use crate::notice::Notice;
use crate::outbox::{outbox, Bounds, Budget, Outbox, OutboxReader, PushError};
use crate::seq::{Seq, SeqCounters};
use crate::stats::{EndpointStats, FlowStats, RouterStats, SeqStats, SessionCounters, Totals};
use hash::FastHash;
use interest::InterestChange;
use monitor::{Content, EventKind, MonitorSpec, MonitorStats, Monitors, Seen};
use names::{Answer, Hold, HoldLimits, Names, Released, Returned};
use topics::{TopicIndex, TopicLimits};
use traffic::{Traffic, TrafficStats};

mod hash;
pub mod interest;
pub mod monitor;
pub mod names;
pub mod snapshot;
pub mod topics;
pub mod traffic;

/// The longest endpoint name, in bytes (as D-Bus bounds its names): a
/// name is copied into every message's `from`, every list and the status.
pub const MAX_NAME: usize = 255;

/// Identifies a session inside this process (never on the wire; the wire
/// gets the UUID `session_id`).
pub type SessionId = u64;

crate::choice::choice! {
    /// What happens to deliveries for a receiver that made no progress (wrote
    /// nothing to its socket) for the slow-consumer timeout.
    pub enum SlowConsumerPolicy("slow-consumer policy") {
        /// Drop what is queued for it and what comes while it stays stuck,
        /// and count it; it gets traffic again once it reads.
        #[default]
        Drop = "drop",
        /// Disconnect the session, telling it why (`slow_consumer`).
        Disconnect = "disconnect",
    }
}

crate::choice::choice! {
    /// What a lagging topic subscriber's queue does with a topic's values
    /// (`--slow-policy`; the proxy's subscribers take the same choice).
    pub enum SlowPolicy("slow policy") {
        /// Keep every value in order (Unix sessions: the senders wait; the
        /// proxy: drop and count past the bound, or wait with `--lossless`).
        #[default]
        Queue = "queue",
        /// Keep at most one queued value per topic: a newer value replaces
        /// the queued one in its place (counted as `conflated`), so a lagging
        /// subscriber catches up with the latest value of every topic instead
        /// of a stale backlog. For prices and other state-like feeds.
        Conflate = "conflate",
    }
}

/// Limits and timings of the router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// A session silent for longer than this is evicted (reference: 90 s).
    pub heartbeat_timeout: Duration,
    /// How long a name stays held after its session went away, so a client
    /// that reconnects gets what was sent meanwhile. Zero disables holding.
    pub hold_grace: Duration,
    /// At most this many messages are held per name; a sender to a full
    /// mailbox waits for the name to come back (or its grace to end).
    pub hold_limit: usize,
    /// At most this many bytes are held per name (same rule).
    pub hold_bytes: usize,
    /// Deliveries a session's outbox holds before its senders wait.
    pub outbox_capacity: usize,
    /// Bytes a session's outbox holds before its senders wait.
    pub outbox_bytes: usize,
    /// Bytes all outboxes and held mailboxes together may hold.
    pub memory_budget: usize,
    /// A receiver that wrote nothing to its socket for this long, while
    /// senders wait for it, gets the slow-consumer policy; its senders then
    /// go on. Nobody else ever waits for it.
    pub slow_consumer_timeout: Duration,
    /// What the policy does.
    pub slow_consumer: SlowConsumerPolicy,
    /// What a topic subscriber's outbox does with a topic's values while
    /// the subscriber lags (conflation replaces a queued value in place).
    pub topic_policy: SlowPolicy,
    /// Bounds on topic subscriptions.
    pub topics: TopicLimits,
    /// Bound in bytes of the bus's per-topic numbering counters (topic +
    /// 64 bytes each); past it the least recently used are forgotten and
    /// counted.
    pub seq_bytes: usize,
    /// Keep the newest value of each topic within these bounds, for
    /// subscribers that ask for a snapshot (`--last-value`); None: none
    /// kept, and such a subscribe is refused (`no_last_value`).
    pub last_value: Option<LastValueLimits>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            heartbeat_timeout: Duration::from_secs(90),
            hold_grace: Duration::from_secs(5),
            hold_limit: 4096,
            hold_bytes: 16 << 20,
            outbox_capacity: 16384,
            outbox_bytes: 32 << 20,
            memory_budget: 512 << 20,
            slow_consumer_timeout: Duration::from_secs(10),
            slow_consumer: SlowConsumerPolicy::Drop,
            topic_policy: SlowPolicy::Queue,
            topics: TopicLimits::default(),
            seq_bytes: crate::seq::DEFAULT_SEQ_BYTES,
            last_value: None,
        }
    }
}

/// One connection (or a transport's sink) known to the router.
struct Session {
    /// Which transport owns it, for status and hook filters.
    transport: &'static str,
    /// Whether silence past the heartbeat timeout evicts it (client
    /// connections do; a transport's own sink does not).
    expires: bool,
    /// The registered endpoint name, once registered.
    name: Option<String>,
    /// The UUID given at register (what the wire calls `session_id`).
    uuid: String,
    /// Where its deliveries go.
    outbox: Outbox,
    /// Last inbound traffic; any frame counts as liveness.
    last_seen: Instant,
    /// Its counters.
    counters: SessionCounters,
}

/// What a blocked sender waits for.
#[derive(Debug, Clone)]
pub enum WaitOn {
    /// A live session's outbox is full: wait for its writer to drain it
    /// below the low-water mark, or for the slow-consumer verdict.
    Session {
        /// The receiving session.
        sid: SessionId,
        /// Its name, to find it again if it reconnects meanwhile.
        name: Option<String>,
        /// Its outbox, to wait on.
        outbox: Outbox,
    },
    /// A held name's mailbox is full: wait for the name to register again
    /// (its mailbox is then replayed) or for its grace to end.
    Held {
        /// The name.
        name: String,
    },
}

/// The decision "blocked": a delivery that some targets could not take
/// yet. The other targets already have it.
#[derive(Debug)]
pub struct Blocked {
    /// The delivery still owed to `waits`.
    pub delivery: Delivery,
    /// The targets that were full, in routing order.
    pub waits: Vec<WaitOn>,
}

/// How a wait on a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The receiver drained below its low-water mark: deliver.
    Room,
    /// The receiver made no progress for the slow-consumer timeout: the
    /// policy applies.
    Stuck,
    /// The receiver's session closed meanwhile.
    Gone,
}

/// The result of routing one `message`.
#[derive(Debug)]
pub struct Routed {
    /// The message as delivered (one Unix frame, header included).
    pub frame: Bytes,
    /// Sessions it was queued to.
    pub delivered: usize,
    /// Held names it was queued for.
    pub held: usize,
    /// Targets that were full: the sender must wait for them before it
    /// sends anything else.
    pub blocked: Option<Blocked>,
}

/// The routing state. See the module docs.
pub struct Router {
    /// Limits and timings.
    cfg: RouterConfig,
    /// Every open session.
    sessions: HashMap<SessionId, Session, FastHash>,
    /// Endpoint names, live or held.
    names: Names,
    /// Topic subscriptions.
    topics: TopicIndex,
    /// Scratch list of a publish's targets (kept to reuse its memory).
    targets: Vec<SessionId>,
    /// The next SessionId.
    next_id: SessionId,
    /// Counters since start.
    totals: Totals,
    /// The byte budget every outbox and held mailbox shares.
    budget: Arc<Budget>,
    /// Senders waiting right now (a gauge for status).
    blocked_now: usize,
    /// Sessions that monitor the traffic (usually none).
    monitors: Monitors,
    /// Counters by transport and topic.
    traffic: Traffic,
    /// Where ids and wall-clock times come from.
    stamps: Stamps,
    /// The next number of each topic the bus numbers itself.
    numbers: SeqCounters,
    /// The bus's numbering origin (`hermes-bus#epoch`).
    seq_origin: Arc<str>,
    /// The newest topic delivery of each topic (with `last_value`).
    last_values: Option<LastValues<Delivery>>,
    /// Kept values sent to sessions in snapshots.
    replayed: u64,
    /// Kept values a snapshot could not queue (stuck or closed session).
    replay_dropped: u64,
}

use crate::clock::Stamps;

/// An error reply: `{"type":"error","code":..,"detail":..,"id":..}`.
pub fn error_frame(err: &ProtocolError, id: Option<RawJson<'_>>) -> Delivery {
    Delivery::notice(Notice::error(err.clone(), id.map(|i| i.to_raw_value())))
}

/// An error delivery for a copy the slow-consumer policy dropped.
fn slow_error(name: Option<&str>) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::SlowConsumer,
        match name {
            Some(n) => format!("dropped: receiver '{n}' made no progress (slow consumer)"),
            None => "dropped: the receiver made no progress (slow consumer)".to_owned(),
        },
    )
}

/// An error for a copy whose receiver went away for good.
fn gone_error() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::NotDelivered,
        "dropped: the receiver went away before it was written",
    )
}

impl Router {
    /// An empty router.
    pub fn new(cfg: RouterConfig) -> Self {
        let budget = Budget::new(cfg.memory_budget);
        let topics = TopicIndex::new(cfg.topics);
        let cfg_seq_bytes = cfg.seq_bytes;
        let last_values = cfg.last_value.map(LastValues::new);
        let holds = HoldLimits {
            grace: cfg.hold_grace,
            count: cfg.hold_limit,
            bytes: cfg.hold_bytes,
        };
        Router {
            cfg,
            sessions: HashMap::default(),
            names: Names::new(holds, budget.clone()),
            topics,
            targets: Vec::new(),
            next_id: 1,
            totals: Totals::default(),
            budget,
            blocked_now: 0,
            monitors: Monitors::default(),
            traffic: Traffic::default(),
            stamps: Stamps::default(),
            numbers: SeqCounters::new(cfg_seq_bytes),
            seq_origin: crate::seq::new_origin("hermes-bus").into(),
            last_values,
            replayed: 0,
            replay_dropped: 0,
        }
    }

    /// The same router stamping ids and times from `stamps` (tests pass
    /// their own).
    pub fn with_stamps(mut self, stamps: Stamps) -> Self {
        self.stamps = stamps;
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// A new outbox with the configured bounds, charging the shared budget.
    pub fn new_outbox(&self) -> (Outbox, OutboxReader) {
        outbox(
            Bounds::new(self.cfg.outbox_capacity, self.cfg.outbox_bytes)
                .conflating(self.cfg.topic_policy == SlowPolicy::Conflate),
            self.budget.clone(),
        )
    }

    /// The byte budget shared by every queue.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Adds a client session whose deliveries go to `outbox`; it is
    /// evicted after the heartbeat timeout of silence.
    pub fn connect(&mut self, transport: &'static str, outbox: Outbox, now: Instant) -> SessionId {
        self.add_session(transport, outbox, now, true)
    }

    /// Adds a transport's own sink session (never evicted for silence).
    pub fn connect_sink(
        &mut self,
        transport: &'static str,
        outbox: Outbox,
        now: Instant,
    ) -> SessionId {
        self.add_session(transport, outbox, now, false)
    }

    fn add_session(
        &mut self,
        transport: &'static str,
        outbox: Outbox,
        now: Instant,
        expires: bool,
    ) -> SessionId {
        let id = self.next_id;
        self.next_id += 1;
        self.totals.connections += 1;
        self.sessions.insert(
            id,
            Session {
                transport,
                expires,
                name: None,
                uuid: String::new(),
                outbox,
                last_seen: now,
                counters: SessionCounters::default(),
            },
        );
        id
    }

    /// Notes inbound traffic from a session (any frame refreshes liveness).
    pub fn touch(&mut self, sid: SessionId, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.last_seen = now;
            s.counters.received += 1;
        }
    }

    /// Queues a reply to one session (pong, error, lists). Replies are
    /// never dropped for space: they count against the requester's own
    /// outbox, and a requester that does not read them is held back by
    /// its session (it stops reading requests). Counts errors.
    pub fn reply(&mut self, sid: SessionId, d: Delivery, is_error: bool) {
        if is_error {
            self.totals.errors += 1;
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            if is_error {
                s.counters.errors += 1;
            }
            let _ = s.outbox.push_forced(d);
        }
    }

    /// Registers `name` for the session: answers `registered`, takes the
    /// name from a live holder (who is told `replaced` and closed), and
    /// replays, in order, what was held for the name.
    pub fn register(
        &mut self,
        sid: SessionId,
        name: &str,
        now: Instant,
    ) -> Result<String, ProtocolError> {
        if name.is_empty() {
            return Err(ProtocolError::new(
                ErrorCode::BadField,
                "field 'endpoint' must be a non-empty string",
            ));
        }
        if name.len() > MAX_NAME {
            return Err(ProtocolError::new(
                ErrorCode::NameTooLong,
                format!(
                    "endpoint name of {} bytes exceeds the limit of {MAX_NAME} bytes",
                    name.len()
                ),
            ));
        }
        let Some(s) = self.sessions.get(&sid) else {
            return Err(ProtocolError::new(
                ErrorCode::ShuttingDown,
                "session is closed",
            ));
        };
        if let Some(old) = &s.name {
            return Err(ProtocolError::new(
                ErrorCode::AlreadyRegistered,
                format!("this connection is already registered as '{old}'"),
            ));
        }
        let claimed = self.names.claim(name, sid, now);
        self.totals.dropped_held += claimed.expired;
        if let Some(o) = claimed.replaced.and_then(|old| self.sessions.get_mut(&old)) {
            o.name = None;
            let err = ProtocolError::new(
                ErrorCode::Replaced,
                format!("endpoint '{name}' was registered by another connection"),
            );
            o.outbox.close(Some(error_frame(&err, None)));
            self.totals.replaced += 1;
        }
        let uuid = (self.stamps.id)();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Err(ProtocolError::new(
                ErrorCode::ShuttingDown,
                "session is closed",
            ));
        };
        s.name = Some(name.to_owned());
        s.uuid = uuid.clone();
        s.last_seen = now;
        let reply = Notice::Registered {
            endpoint: name.to_owned(),
            session_id: uuid.clone(),
        };
        let _ = s.outbox.push_forced(Delivery::notice(reply));
        for d in claimed.replay {
            if s.outbox.push_forced(d).is_ok() {
                s.counters.delivered += 1;
                self.totals.delivered += 1;
            }
        }
        Ok(uuid)
    }

    /// Routes a `message`: notes the sender's traffic (as [`Router::touch`]
    /// does, so a transport need not lock twice), fills in `id`, `ts` and
    /// (for a registered sender) `from`, encodes it once, and queues it to
    /// its target or to every registered endpoint. A field `"ack": true`
    /// (ours) is taken off and answered once the message was written to
    /// every receiver's socket (or held for its name). `Err(EndpointNotFound)`
    /// when `to` names nobody; the message is then not routed.
    pub fn route(
        &mut self,
        sid: SessionId,
        msg: &mut BusMessage,
        now: Instant,
    ) -> Result<Routed, ProtocolError> {
        self.route_with(sid, msg, now, Full::Wait)
    }

    /// [`Router::route`], with what a full live target means (`Wait`, or
    /// `Force` for a sender that has just waited its turn).
    pub fn route_with(
        &mut self,
        sid: SessionId,
        msg: &mut BusMessage,
        now: Instant,
        full: Full,
    ) -> Result<Routed, ProtocolError> {
        let sender = self.sessions.get_mut(&sid).map(|s| {
            s.last_seen = now;
            s.counters.received += 1;
            &*s
        });
        if let Some(name) = sender.and_then(|s| s.name.as_deref()) {
            msg.set_str("from", name);
        }
        // The target's type is checked before anything is stamped; the
        // target itself is read again below, borrowed (no copy per
        // message), once the message is no longer changed.
        msg.str_field("to")?;
        if !msg.contains("id") {
            msg.set_str("id", &(self.stamps.id)());
        }
        if !msg.contains("ts") {
            msg.set("ts", &(self.stamps.unix_now)());
        }
        let wants_ack = msg.contains("ack") && msg.remove("ack").is_some_and(|v| v.get() == "true");
        let msg = &*msg;
        let to = msg.str_field("to")?.filter(|t| !t.is_empty());
        // One lookup of the target: found (live, or held within its
        // grace), or an error before anything is encoded.
        let target = match to.as_deref() {
            Some(target) => match self.names.open_answer(target, now) {
                Some(answer) => Some((target, answer)),
                None => {
                    self.totals.dropped_held += self.names.expire(target, now);
                    return Err(ProtocolError::new(
                        ErrorCode::EndpointNotFound,
                        format!("Endpoint '{target}' is not connected"),
                    ));
                }
            },
            None => None,
        };
        let mut d = Delivery::frame(msg.to_frame());
        if wants_ack {
            if let Some(s) = self.sessions.get(&sid) {
                let id = msg.raw("id").map(|r| r.to_raw_value());
                d = d.with_ack(Ack::new(s.outbox.clone(), id));
            }
        }
        self.totals.routed += 1;
        let (mut delivered, mut held) = (0, 0);
        let mut waits = Vec::new();
        match target {
            Some((target, answer)) => {
                let live = matches!(answer, Answer::Live(_));
                match self.offer_name(target, Some(answer), &d, full, Full::Wait, now) {
                    Offered::Queued if live => delivered += 1,
                    Offered::Queued => held += 1,
                    Offered::Wait(w) => waits.push(w),
                    Offered::Dropped => {}
                }
            }
            None => {
                // Every live member gets it (waiting for the full ones);
                // a held mailbox gets it if it has room: a broadcast waits
                // for members that are reading, not for one that left.
                let mut targets = std::mem::take(&mut self.targets);
                targets.extend(self.names.live().map(|(_, id)| id));
                for id in &targets {
                    if let Some(s) = self.sessions.get_mut(id) {
                        match offer(&self.cfg, &mut self.totals, *id, s, &d, full, None) {
                            Offered::Queued => delivered += 1,
                            Offered::Wait(w) => waits.push(w),
                            Offered::Dropped => {}
                        }
                    }
                }
                targets.clear();
                self.targets = targets;
                let (queued, refused) = self.names.hold_all(&d, now);
                held += queued as usize;
                self.totals.held += queued;
                if refused > 0 {
                    self.totals.dropped_held += refused;
                    d.fail(gone_error);
                }
            }
        }
        let transport = self.sessions.get(&sid).map_or("unknown", |s| s.transport);
        let copies = delivered + held + waits.len();
        let frame = d.unix_frame().clone();
        self.traffic.message(transport, frame.len() - 4, copies);
        if !self.monitors.is_empty() {
            self.monitor_message(transport, msg, &frame, to.as_deref(), copies);
        }
        let blocked = self.blocked(d, waits);
        Ok(Routed {
            frame,
            delivered,
            held,
            blocked,
        })
    }

    fn blocked(&mut self, delivery: Delivery, waits: Vec<WaitOn>) -> Option<Blocked> {
        if waits.is_empty() {
            return None;
        }
        self.totals.blocked += 1;
        self.blocked_now += 1;
        Some(Blocked { delivery, waits })
    }

    /// Offers a delivery to whoever answers to `name` (live session or
    /// held mailbox), as `answer` says (the caller looked the name up:
    /// routing once for its check and the offer together).
    /// `live` says what a full live outbox means, `held` what a full
    /// mailbox means.
    fn offer_name(
        &mut self,
        name: &str,
        answer: Option<Answer>,
        d: &Delivery,
        live: Full,
        held: Full,
        now: Instant,
    ) -> Offered {
        match answer {
            None => Offered::Dropped,
            Some(Answer::Live(id)) => match self.sessions.get_mut(&id) {
                Some(s) => offer(&self.cfg, &mut self.totals, id, s, d, live, None),
                None => Offered::Dropped,
            },
            Some(Answer::Held) => self.hold(name, d, held, now),
        }
    }

    /// Offers a delivery to `name`'s held mailbox; `full` says what a
    /// full mailbox means.
    fn hold(&mut self, name: &str, d: &Delivery, full: Full, now: Instant) -> Offered {
        match self.names.hold(name, d, full == Full::Force, now) {
            Hold::Queued => {
                // Held counts as delivered for the sender's receipt.
                self.totals.held += 1;
                Offered::Queued
            }
            Hold::Full if full == Full::Wait => Offered::Wait(WaitOn::Held {
                name: name.to_owned(),
            }),
            Hold::Full | Hold::Closed => {
                self.totals.dropped_held += 1;
                d.fail(gone_error);
                Offered::Dropped
            }
        }
    }

    /// Takes back a [`Blocked`] decision once its sender waited for `wait`
    /// (the verdict says how the wait ended) and delivers, drops by the
    /// policy, or reroutes (the receiver reconnected under its name).
    /// `waited` is how long the sender was held back.
    pub fn resume(
        &mut self,
        wait: &WaitOn,
        d: &Delivery,
        verdict: Verdict,
        now: Instant,
    ) -> Option<WaitOn> {
        match wait {
            WaitOn::Session { sid, name, outbox } => {
                let same = self
                    .sessions
                    .get(sid)
                    .is_some_and(|s| s.outbox.same(outbox));
                if same && verdict != Verdict::Gone {
                    let s = self.sessions.get_mut(sid)?;
                    match verdict {
                        Verdict::Room => {
                            if s.outbox.push_forced(d.clone()).is_ok() {
                                s.counters.delivered += 1;
                                self.totals.delivered += 1;
                            } else {
                                s.counters.dropped += 1;
                                self.totals.dropped_slow += 1;
                                d.fail(gone_error);
                            }
                        }
                        _ => apply_policy(&self.cfg, &mut self.totals, s, d),
                    }
                    return None;
                }
                // The session went away, or its queue closed (it is going
                // away): its name, if any, may be held now, or live again
                // on a new connection. A name still answered by this very
                // session, whose queue is closed, takes nothing more: the
                // copy is counted as lost at once (offering it to the name
                // again would only find the same closed queue, and wait on
                // it again without end).
                let answer = name.as_deref().and_then(|n| self.names.answer(n));
                let still_this = matches!(answer, Some(Answer::Live(id)) if id == *sid);
                match name {
                    Some(n) if answer.is_some() && !still_this => {
                        match self.offer_name(n, answer, d, Full::Wait, Full::Drop, now) {
                            Offered::Wait(w) => Some(w),
                            _ => None,
                        }
                    }
                    _ => {
                        self.totals.dropped_slow += 1;
                        d.fail(gone_error);
                        None
                    }
                }
            }
            WaitOn::Held { name } => match self.names.answer(name) {
                // Back: after what was held for it, whatever its bound (the
                // sender has waited already).
                Some(live @ Answer::Live(_)) => {
                    match self.offer_name(name, Some(live), d, Full::Force, Full::Wait, now) {
                        Offered::Queued | Offered::Dropped => None,
                        Offered::Wait(w) => Some(w),
                    }
                }
                Some(Answer::Held) => {
                    match self.offer_name(name, Some(Answer::Held), d, Full::Wait, Full::Wait, now)
                    {
                        Offered::Wait(w) => Some(w),
                        _ => None,
                    }
                }
                None => {
                    self.totals.dropped_held += 1;
                    d.fail(gone_error);
                    None
                }
            },
        }
    }

    /// Counts copies a sender still owed when its session closed while it
    /// waited.
    pub fn abandon(&mut self, copies: usize) {
        self.totals.dropped_slow += copies as u64;
    }

    /// Counts what a closed session's writer could not write, when its
    /// session had no name to hold it for.
    pub fn count_unsent(&mut self, unsent: VecDeque<Delivery>) {
        self.count_lost(&unsent);
    }

    /// Notes that a session stopped reading because its own outbox is
    /// full (its peer does not read what it is sent).
    pub fn begin_own_wait(&mut self) {
        self.totals.blocked += 1;
        self.blocked_now += 1;
    }

    /// Notes that a sender's wait ended after `waited` (status counters).
    pub fn end_wait(&mut self, waited: Duration) {
        self.blocked_now = self.blocked_now.saturating_sub(1);
        self.totals.blocked_ms += waited.as_millis() as u64;
    }

    /// Subscribes a session to a topic prefix ("" = every topic); refused
    /// past the session's limits. A client session's prefixes are demand
    /// (see [`Router::watch_interest`]); a transport's sink only relays
    /// topics to its own peers, so its prefixes are not.
    pub fn subscribe(&mut self, sid: SessionId, prefix: &str) -> Result<(), ProtocolError> {
        if let Some(s) = self.sessions.get(&sid) {
            if s.expires {
                self.topics.subscribe(sid, prefix)?;
            } else {
                self.topics.subscribe_relay(sid, prefix)?;
            }
        }
        Ok(())
    }

    /// Starts recording interest changes: the topic prefixes client
    /// sessions want, as the first session to want one and the last to
    /// let it go ([`interest`]). Returns every prefix wanted now; changes
    /// follow from there ([`Router::take_interest_changes`]).
    pub fn watch_interest(&mut self) -> Vec<Box<str>> {
        self.topics.watch_interest()
    }

    /// Stops recording interest changes.
    pub fn unwatch_interest(&mut self) {
        self.topics.interest.unwatch();
    }

    /// Whether interest changes wait to be taken.
    pub fn has_interest_changes(&self) -> bool {
        self.topics.interest.has_pending()
    }

    /// Moves the interest changes recorded so far, in order, into `out`.
    pub fn take_interest_changes(&mut self, out: &mut Vec<InterestChange>) {
        self.topics.interest.take(out);
    }

    /// Distinct topic prefixes some client session wants.
    pub fn wanted_prefixes(&self) -> usize {
        self.topics.wanted()
    }

    /// Removes a topic prefix; true when the session had it.
    pub fn unsubscribe(&mut self, sid: SessionId, prefix: &str) -> bool {
        self.topics.unsubscribe(sid, prefix)
    }

    /// Publishes a topic message to every other session subscribed to a
    /// prefix of its topic, dropping (and counting) for full ones (PUB
    /// semantics, for transports that cannot wait); returns how many it
    /// was queued to.
    pub fn publish(&mut self, from: SessionId, msg: TopicMessage) -> usize {
        let d = self.topic_delivery(msg);
        self.publish_delivery(from, &d, Full::Drop).0
    }

    /// The delivery of a topic message about to be published, numbered
    /// by the bus (its own origin, per topic) when it came without a
    /// number (a Unix `publish`, an unnumbered ZeroMQ publisher), so that
    /// the sessions that asked for numbers can see every loss, the
    /// router's own drops included. One map lookup; allocates only for a
    /// new topic.
    pub fn topic_delivery(&mut self, mut msg: TopicMessage) -> Delivery {
        if msg.seq.is_none() {
            let n = self.numbers.next(msg.topic.as_bytes());
            msg.seq = Some(Seq {
                origin: self.seq_origin.clone(),
                n,
            });
        }
        Delivery::topic(msg)
    }

    /// [`Router::publish`] of a topic delivery the caller already made
    /// (so its encodings are shared with, e.g., the hook event). With
    /// `wait`, full subscribers are returned as [`Blocked`] instead of
    /// dropped.
    pub fn publish_delivery(
        &mut self,
        from: SessionId,
        d: &Delivery,
        full: Full,
    ) -> (usize, Option<Blocked>) {
        self.totals.routed += 1;
        self.remember(d);
        let topic = d.topic_message().map(|m| m.topic.as_str()).unwrap_or("");
        let mut n = 0;
        let mut waits = Vec::new();
        let mut targets = std::mem::take(&mut self.targets);
        self.topics.matches(topic, &mut targets);
        // Conflation replaces a queued value of the same topic.
        let key = (self.cfg.topic_policy == SlowPolicy::Conflate && !targets.is_empty())
            .then(|| Bytes::copy_from_slice(topic.as_bytes()));
        for id in &targets {
            if *id == from {
                continue;
            }
            if let Some(s) = self.sessions.get_mut(id) {
                match offer(&self.cfg, &mut self.totals, *id, s, d, full, key.as_ref()) {
                    Offered::Queued => n += 1,
                    Offered::Wait(w) => waits.push(w),
                    Offered::Dropped => {}
                }
            }
        }
        targets.clear();
        self.targets = targets;
        if let Some(m) = d.topic_message() {
            let transport = self.sessions.get(&from).map_or("unknown", |s| s.transport);
            let copies = n + waits.len();
            self.traffic
                .publish(transport, &m.topic, m.data.get().len(), copies);
            if !self.monitors.is_empty() {
                let seen = Seen {
                    kind: EventKind::Publish,
                    transport,
                    from: &m.origin,
                    to: &m.topic,
                    id: None,
                    ts: m.ts,
                    size: m.data.get().len(),
                    delivered: copies,
                };
                self.monitors
                    .offer(&seen, || Content::Topic(d.without_ack()));
            }
        }
        let blocked = self.blocked(d.clone(), waits);
        (n, blocked)
    }

    /// Offers a routed message to the monitors.
    fn monitor_message(
        &mut self,
        transport: &'static str,
        msg: &BusMessage,
        frame: &Bytes,
        to: Option<&str>,
        delivered: usize,
    ) {
        let from = msg.str_field("from").ok().flatten();
        let ts = msg
            .raw("ts")
            .and_then(|r| r.get().parse::<f64>().ok())
            .unwrap_or_else(self.stamps.unix_now);
        let seen = Seen {
            kind: if to.is_some() {
                EventKind::Message
            } else {
                EventKind::Broadcast
            },
            transport,
            from: from.as_deref().unwrap_or(""),
            to: to.unwrap_or(""),
            id: msg.raw("id").map(|i| i.get()),
            ts,
            size: msg.raw("body").map_or(0, |b| b.get().len()),
            delivered,
        };
        let json = frame.slice(4..);
        self.monitors
            .offer(&seen, || Content::Message(json.clone()));
    }

    /// Starts (or changes) monitoring for a session: from now on it is
    /// sent a `monitor` event for each routed message its filter selects,
    /// into a queue bounded by the spec's bytes (at most the outbox
    /// bound), dropping (and counting) past it. Returns the spec in force.
    pub fn monitor(
        &mut self,
        sid: SessionId,
        spec: MonitorSpec,
    ) -> Result<MonitorSpec, ProtocolError> {
        spec.check()?;
        let Some(s) = self.sessions.get(&sid) else {
            return Err(ProtocolError::new(
                ErrorCode::ShuttingDown,
                "session is closed",
            ));
        };
        let limit = self.cfg.outbox_bytes;
        Ok(self.monitors.start(sid, s.outbox.clone(), spec, limit))
    }

    /// The monitors' counters.
    pub fn monitor_stats(&self) -> MonitorStats {
        self.monitors.stats()
    }

    /// Traffic by transport and topic.
    pub fn traffic(&self) -> TrafficStats {
        self.traffic.stats()
    }

    /// Removes a session (its connection ended). A registered name is held
    /// for the grace period so a reconnecting client loses nothing; what
    /// its outbox still held is kept for the name too. Returns the held
    /// name, for [`Router::restore`].
    pub fn disconnect(&mut self, sid: SessionId, now: Instant) -> Option<String> {
        self.disconnect_with(sid, VecDeque::new(), now)
    }

    /// [`Router::disconnect`] for a session whose writer ended already:
    /// `unsent`, what it could not write, goes before what is still
    /// queued, and all of it is held for the name in the same step (a
    /// new session of the name, registering meanwhile, gets it replayed
    /// in order).
    pub fn disconnect_with(
        &mut self,
        sid: SessionId,
        mut unsent: VecDeque<Delivery>,
        now: Instant,
    ) -> Option<String> {
        let Some(s) = self.sessions.remove(&sid) else {
            self.count_lost(&unsent);
            return None;
        };
        self.monitors.stop(sid);
        s.outbox.take_routed(&mut unsent);
        s.outbox.close(None);
        self.topics.remove_session(sid);
        if let Some(name) = s.name {
            if self.names.release(&name, sid, now) == Released::Held {
                self.restore(&name, unsent, now);
                return Some(name);
            }
        }
        self.count_lost(&unsent);
        None
    }

    fn count_lost(&mut self, unsent: &VecDeque<Delivery>) {
        let mut n = 0;
        for d in unsent.iter().filter(|d| !d.is_reply()) {
            d.fail(gone_error);
            n += 1;
        }
        self.totals.dropped_slow += n;
    }

    /// Gives back deliveries a gone session's writer could not write: they
    /// go to the front of the name's held queue (they are older than
    /// anything routed there since), or straight to the name's new session
    /// if it is already back. Replies are not kept. A mailbox is not
    /// bounded against these: they were accepted already.
    pub fn restore(&mut self, name: &str, undelivered: VecDeque<Delivery>, now: Instant) {
        let items: VecDeque<Delivery> = undelivered.into_iter().filter(|d| !d.is_reply()).collect();
        if items.is_empty() {
            return;
        }
        match self.names.give_back(name, items, now) {
            Returned::Held => {}
            Returned::Live(id, items) => {
                // The name is back already: straight to its session, but a
                // copy first held longer ago than the grace expires here as
                // it would in the mailbox (a client that re-registers and
                // drops every time never reads it).
                let grace = self.cfg.hold_grace;
                if let Some(s) = self.sessions.get_mut(&id) {
                    for d in items {
                        if d.held_at().is_some_and(|t| now.duration_since(t) >= grace) {
                            self.totals.dropped_held += 1;
                            d.fail(gone_error);
                        } else {
                            let _ = s.outbox.push_forced(d);
                        }
                    }
                }
            }
            Returned::Unknown(items) => {
                self.totals.dropped_held += items.len() as u64;
                for d in &items {
                    d.fail(gone_error);
                }
            }
        }
    }

    /// Periodic upkeep: closes sessions silent past the heartbeat timeout
    /// (telling them why) and forgets held names past their grace,
    /// counting what they held as dropped. Returns the evicted sessions.
    pub fn sweep(&mut self, now: Instant) -> Vec<SessionId> {
        let timeout = self.cfg.heartbeat_timeout;
        let mut evicted = Vec::new();
        for (id, s) in &self.sessions {
            if s.expires && now.duration_since(s.last_seen) > timeout && !s.outbox.is_closed() {
                let err = ProtocolError::new(
                    ErrorCode::HeartbeatTimeout,
                    format!("no traffic for more than {} s", timeout.as_secs_f64()),
                );
                s.outbox.close(Some(error_frame(&err, None)));
                evicted.push(*id);
            }
        }
        // The sessions end (and are disconnected) once their writer has
        // sent the reason; until then their outbox refuses new traffic.
        self.totals.evicted += evicted.len() as u64;
        // Held names past their grace go, and copies that went round a
        // session that never read them keep their first hold's clock.
        self.totals.dropped_held += self.names.sweep(now);
        evicted
    }

    /// Registered endpoints and their session ids (what `list_endpoints`
    /// answers). Held names are not listed: nobody is connected there.
    pub fn endpoints(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .names
            .live()
            .filter_map(|(name, id)| {
                self.sessions
                    .get(&id)
                    .map(|s| (name.to_owned(), s.uuid.clone()))
            })
            .collect();
        out.sort();
        out
    }

    /// The registered name of a session.
    pub fn name_of(&self, sid: SessionId) -> Option<&str> {
        self.sessions.get(&sid).and_then(|s| s.name.as_deref())
    }

    /// Counters since start.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// A snapshot for `status`.
    pub fn stats(&self, now: Instant) -> RouterStats {
        let mut endpoints: Vec<EndpointStats> = self
            .sessions
            .values()
            .filter_map(|s| {
                s.name.as_ref().map(|name| EndpointStats {
                    name: name.clone(),
                    session_id: s.uuid.clone(),
                    transport: s.transport.to_owned(),
                    queued: s.outbox.len(),
                    queued_bytes: s.outbox.bytes(),
                    index_bytes: s.outbox.index_bytes(),
                    stuck: s.outbox.is_stuck(),
                    counters: s.counters,
                })
            })
            .collect();
        endpoints.sort_by(|a, b| a.name.cmp(&b.name));
        let held = self.names.held_stats(now);
        RouterStats {
            sessions: self.sessions.len(),
            endpoints,
            held,
            totals: self.totals,
            subscriptions: self.topics.count(),
            subscription_bytes: self.topics.bytes(),
            seq: SeqStats {
                origin: self.seq_origin.to_string(),
                topics: self.numbers.len(),
                bytes: self.numbers.bytes(),
                limit: self.cfg.seq_bytes,
                forgotten: self.numbers.forgotten(),
            },
            last_value: self.last_value_stats(),
            flow: FlowStats {
                blocked_now: self.blocked_now,
                budget_used: self.budget.used(),
                budget_limit: self.budget.limit(),
                outbox_bytes: self.cfg.outbox_bytes,
                outbox_capacity: self.cfg.outbox_capacity,
                slow_consumer_timeout_ms: self.cfg.slow_consumer_timeout.as_millis() as u64,
            },
        }
    }

    /// Closes every session (shutdown): each outbox is drained by its
    /// writer after the given last frame, then the connection ends.
    pub fn close_all(&mut self, last: Option<Delivery>) {
        for s in self.sessions.values() {
            s.outbox.close(last.clone());
        }
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

/// What a full live target means for one offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The sender waits for it (a client session).
    Wait,
    /// The copy is dropped and counted (a sender that cannot wait).
    Drop,
    /// Queued past the bound: the sender has just waited its turn and
    /// routes the rest of what it had read (a few KiB at most, see the
    /// Unix reader's held pace), so every waiting sender gets through
    /// each time room comes, not only the first ones woken.
    Force,
}

/// The outcome of offering a delivery to one target.
enum Offered {
    /// Queued (to a session or a held mailbox).
    Queued,
    /// Full: the sender must wait for this.
    Wait(WaitOn),
    /// Not queued, and counted (stuck receiver, closed session, or full
    /// for a sender that cannot wait).
    Dropped,
}

/// Offers `d` to a session. A full outbox is a wait (or, for a sender
/// that cannot wait, a counted drop); a stuck receiver's copy is dropped
/// and counted at once.
#[allow(clippy::too_many_arguments)]
fn offer(
    cfg: &RouterConfig,
    totals: &mut Totals,
    sid: SessionId,
    s: &mut Session,
    d: &Delivery,
    full: Full,
    key: Option<&Bytes>,
) -> Offered {
    let mut pushed = match key {
        None => s.outbox.push(d.clone()),
        Some(key) => s.outbox.push_keyed(d.clone(), key.clone()).map(|old| {
            if old.is_some() {
                totals.conflated += 1;
            }
        }),
    };
    if full == Full::Force && pushed == Err(PushError::Full) {
        pushed = s.outbox.push_forced(d.clone());
    }
    let wait = full == Full::Wait;
    match pushed {
        Ok(()) => {
            s.counters.delivered += 1;
            totals.delivered += 1;
            Offered::Queued
        }
        Err(PushError::Full) if wait => Offered::Wait(WaitOn::Session {
            sid,
            name: s.name.clone(),
            outbox: s.outbox.clone(),
        }),
        Err(PushError::Full) | Err(PushError::Stuck) => {
            s.counters.dropped += 1;
            totals.dropped_slow += 1;
            d.fail(|| slow_error(s.name.as_deref()));
            if cfg.slow_consumer == SlowConsumerPolicy::Disconnect && s.outbox.is_stuck() {
                apply_policy(cfg, totals, s, d);
            }
            Offered::Dropped
        }
        Err(PushError::Closed) => {
            s.counters.dropped += 1;
            totals.dropped_slow += 1;
            d.fail(gone_error);
            Offered::Dropped
        }
    }
}

/// The slow-consumer policy for a receiver that made no progress: its
/// queue is dropped (and counted, senders' receipts told), and it is
/// either left to catch up (drop) or closed with a reason (disconnect).
fn apply_policy(cfg: &RouterConfig, totals: &mut Totals, s: &mut Session, d: &Delivery) {
    s.outbox.mark_stuck();
    d.fail(|| slow_error(s.name.as_deref()));
    let discarded = match cfg.slow_consumer {
        SlowConsumerPolicy::Drop => s.outbox.discard(),
        SlowConsumerPolicy::Disconnect => {
            if s.outbox.is_closed() {
                Vec::new()
            } else {
                totals.slow_disconnects += 1;
                let err = ProtocolError::new(
                    ErrorCode::SlowConsumer,
                    format!(
                        "no progress for {} s while senders waited: disconnected",
                        cfg.slow_consumer_timeout.as_secs_f64()
                    ),
                );
                s.outbox.abort(Some(error_frame(&err, None)))
            }
        }
    };
    // Copies taken back out of the queue were counted delivered when
    // queued: they move to dropped.
    let taken = discarded.iter().filter(|x| !x.is_reply()).count() as u64;
    for x in &discarded {
        x.fail(|| slow_error(s.name.as_deref()));
    }
    s.counters.delivered = s.counters.delivered.saturating_sub(taken);
    totals.delivered = totals.delivered.saturating_sub(taken);
    s.counters.dropped += taken + 1;
    totals.dropped_slow += taken + 1;
    // The discarded copies are dropped here, outside every queue lock
    // (their receipts may go into other outboxes).
    drop(discarded);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{standalone, OutboxReader};

    fn frames(rx: &mut OutboxReader) -> Vec<serde_json::Value> {
        let mut b = VecDeque::new();
        rx.try_recv_batch(&mut b);
        b.iter()
            .map(|d| serde_json::from_slice(&d.unix_frame()[4..]).unwrap())
            .collect()
    }

    fn msg(to: &str, n: u64) -> BusMessage {
        BusMessage::parse(
            format!(r#"{{"type":"message","to":"{to}","from":"spoof","body":{{"n":{n}}}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    /// A router with the default configuration, and the time it starts at.
    fn router() -> (Router, Instant) {
        (Router::new(RouterConfig::default()), Instant::now())
    }

    fn session(r: &mut Router, now: Instant) -> (SessionId, OutboxReader) {
        let (tx, rx) = standalone(8, 1 << 20);
        (r.connect("unix", tx, now), rx)
    }

    /// A session registered as `name`.
    fn registered(r: &mut Router, name: &str, now: Instant) -> (SessionId, OutboxReader) {
        let (id, rx) = session(r, now);
        r.register(id, name, now).unwrap();
        (id, rx)
    }

    #[test]
    fn ids_and_times_come_from_the_callers_stamps() {
        let t0 = Instant::now();
        let stamps = Stamps {
            id: || "id-7".to_owned(),
            unix_now: || 42.5,
        };
        let mut r = Router::new(RouterConfig::default()).with_stamps(stamps);
        let (a, mut ra) = session(&mut r, t0);
        let (b, mut rb) = session(&mut r, t0);
        assert_eq!(r.register(a, "a", t0).unwrap(), "id-7");
        r.register(b, "b", t0).unwrap();
        assert_eq!(frames(&mut ra)[0]["session_id"], "id-7");
        frames(&mut rb);
        let mut m = BusMessage::parse(br#"{"type":"message","to":"b","body":1}"#).unwrap();
        r.route(a, &mut m, t0).unwrap();
        let got = frames(&mut rb);
        assert_eq!(
            (got[0]["id"].as_str(), got[0]["ts"].as_f64()),
            (Some("id-7"), Some(42.5))
        );
        // What the client stamped itself is kept.
        let mut m =
            BusMessage::parse(br#"{"type":"message","to":"b","id":"mine","ts":1.0}"#).unwrap();
        r.route(a, &mut m, t0).unwrap();
        let got = frames(&mut rb);
        assert_eq!(
            (got[0]["id"].as_str(), got[0]["ts"].as_f64()),
            (Some("mine"), Some(1.0))
        );
    }

    #[test]
    fn routes_point_to_point_and_broadcast_and_sets_from() {
        let (mut r, t0) = router();
        let (a, mut ra) = registered(&mut r, "a", t0);
        let (_, mut rb) = registered(&mut r, "b", t0);
        let (anon, mut rn) = session(&mut r, t0);
        assert_eq!(frames(&mut ra)[0]["type"], "registered");
        frames(&mut rb);
        let out = r.route(a, &mut msg("b", 1), t0).unwrap();
        assert_eq!(out.delivered, 1);
        let got = frames(&mut rb);
        assert_eq!(got[0]["from"], "a", "registered name, not the spoofed one");
        assert!(got[0]["id"].is_string() && got[0]["ts"].is_f64());
        let out = r.route(anon, &mut msg("", 2), t0).unwrap();
        assert_eq!(
            out.delivered, 2,
            "every registered session, not the anonymous sender"
        );
        assert_eq!(
            frames(&mut ra)[0]["from"],
            "spoof",
            "anonymous senders keep their from"
        );
        assert_eq!(frames(&mut rb).len(), 1);
        assert!(frames(&mut rn).is_empty());
        let err = r.route(anon, &mut msg("zed", 3), t0).unwrap_err();
        assert_eq!(err.code, ErrorCode::EndpointNotFound);
    }

    #[test]
    fn holds_for_a_gone_name_then_replays_in_order_or_expires() {
        let t0 = Instant::now();
        let cfg = RouterConfig {
            hold_grace: Duration::from_secs(5),
            hold_limit: 2,
            ..RouterConfig::default()
        };
        let mut r = Router::new(cfg);
        let (a, _ra) = registered(&mut r, "a", t0);
        let (b, _rb) = registered(&mut r, "b", t0);
        assert_eq!(r.disconnect(b, t0).as_deref(), Some("b"));
        let mut blocked = None;
        for n in 0..3 {
            let out = r
                .route(a, &mut msg("b", n), t0 + Duration::from_secs(1))
                .unwrap();
            assert_eq!(out.held, usize::from(n < 2));
            blocked = out.blocked;
        }
        // The third found the mailbox full: its sender waits, nothing is
        // dropped.
        let blocked = blocked.expect("a full mailbox is a wait");
        assert_eq!(r.totals().dropped_held, 0);
        let w = &blocked.waits[0];
        let again = r.resume(
            w,
            &blocked.delivery,
            Verdict::Room,
            t0 + Duration::from_secs(1),
        );
        assert!(
            matches!(again, Some(WaitOn::Held { .. })),
            "still full: wait on"
        );
        assert!(
            r.endpoints().iter().all(|(n, _)| n != "b"),
            "held names are not listed"
        );
        let (b2, mut rb2) = session(&mut r, t0);
        r.register(b2, "b", t0 + Duration::from_secs(2)).unwrap();
        assert!(r
            .resume(
                w,
                &blocked.delivery,
                Verdict::Room,
                t0 + Duration::from_secs(2)
            )
            .is_none());
        let got = frames(&mut rb2);
        assert_eq!(got[0]["type"], "registered");
        assert_eq!(got[1]["body"]["n"], 0);
        assert_eq!(got[2]["body"]["n"], 1);
        assert_eq!(
            got[3]["body"]["n"], 2,
            "the waiting one comes after the held ones"
        );

        // Gone for good: swept after the grace, held ones counted.
        r.disconnect(b2, t0 + Duration::from_secs(3));
        r.route(a, &mut msg("b", 9), t0 + Duration::from_secs(4))
            .unwrap();
        r.sweep(t0 + Duration::from_secs(9));
        assert_eq!(r.totals().dropped_held, 1);
        assert_eq!(r.budget().used(), 0, "a swept mailbox gives its bytes back");
        let err = r
            .route(a, &mut msg("b", 10), t0 + Duration::from_secs(9))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::EndpointNotFound);
    }

    #[test]
    fn a_copy_given_back_to_a_name_live_again_still_expires_after_its_grace() {
        let (mut r, t0) = router();
        let (a, _ra) = registered(&mut r, "a", t0);
        let (b, _rb) = registered(&mut r, "b", t0);
        r.disconnect(b, t0);
        assert_eq!(r.route(a, &mut msg("b", 1), t0).unwrap().held, 1);
        // A new session of the name gets it replayed, but goes away before
        // writing it: its writer gives it back...
        let (b2, mut rb2) = session(&mut r, t0);
        r.register(b2, "b", t0 + Duration::from_secs(1)).unwrap();
        let mut unsent = VecDeque::new();
        rb2.try_recv_batch(&mut unsent);
        assert_eq!(
            r.disconnect(b2, t0 + Duration::from_secs(2)).as_deref(),
            Some("b")
        );
        // ...after yet another session took the name, past the copy's
        // grace (first held at t0): it expires, counted, not delivered.
        let (b3, mut rb3) = session(&mut r, t0);
        r.register(b3, "b", t0 + Duration::from_secs(6)).unwrap();
        r.restore("b", unsent, t0 + Duration::from_secs(6));
        assert_eq!(r.totals().dropped_held, 1);
        let got = frames(&mut rb3);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "registered");
    }

    #[test]
    fn a_broadcast_never_waits_for_the_mailbox_of_a_name_that_left() {
        let t0 = Instant::now();
        let cfg = RouterConfig {
            hold_limit: 2,
            ..RouterConfig::default()
        };
        let mut r = Router::new(cfg);
        let (a, _ra) = registered(&mut r, "a", t0);
        let (b, _rb) = registered(&mut r, "b", t0);
        let (c, mut rc) = session(&mut r, t0);
        r.register(c, "c", t0).unwrap();
        r.disconnect(b, t0);
        frames(&mut rc);
        for n in 0..5 {
            let out = r.route(a, &mut msg("", n), t0).unwrap();
            assert!(out.blocked.is_none(), "message {n} waited for a gone name");
            frames(&mut rc);
        }
        assert_eq!(r.totals().held, 2);
        assert_eq!(r.totals().dropped_held, 3, "counted, not waited for");
        // Point to point, a full mailbox is still a wait.
        let out = r.route(a, &mut msg("b", 9), t0).unwrap();
        assert!(out.blocked.is_some());
    }

    #[test]
    fn register_kicks_the_old_holder_and_refuses_a_second_name() {
        let (mut r, t0) = router();
        let (old, mut ro) = registered(&mut r, "svc", t0);
        let (new, _rn) = registered(&mut r, "svc", t0);
        let got = frames(&mut ro);
        assert_eq!(got.last().unwrap()["code"], "replaced");
        assert_eq!(r.totals().replaced, 1);
        assert_eq!(
            r.register(new, "other", t0).unwrap_err().code,
            ErrorCode::AlreadyRegistered
        );
        // The kicked session's later disconnect does not disturb the name.
        assert_eq!(r.disconnect(old, t0), None);
        assert_eq!(r.endpoints().len(), 1);
    }

    fn written(rx: &mut OutboxReader) -> usize {
        let mut b = VecDeque::new();
        rx.try_recv_batch(&mut b);
        let bytes = b.iter().map(Delivery::charge).sum();
        rx.written(b.len(), bytes);
        b.len()
    }

    /// Routes numbered messages from `from` to `to` until one finds the
    /// target full; returns that wait.
    fn route_until_blocked(r: &mut Router, from: SessionId, to: &str, t0: Instant) -> Blocked {
        (0..)
            .find_map(|n| r.route(from, &mut msg(to, n), t0).unwrap().blocked)
            .unwrap()
    }

    #[test]
    fn a_wait_on_a_queue_closed_under_its_live_name_ends_and_counts_the_loss() {
        let (mut r, t0) = router();
        let (a, _ra) = registered(&mut r, "a", t0);
        let (_, _rb) = registered(&mut r, "b", t0);
        let blocked = route_until_blocked(&mut r, a, "b", t0);
        // B's queue closes at its bound (declared slow, shut down) while
        // its session still holds the name: the sender's wait ends "gone".
        let WaitOn::Session { outbox, .. } = &blocked.waits[0] else {
            panic!("a wait on b's queue: {:?}", blocked.waits);
        };
        outbox.close(None);
        let dropped = r.totals().dropped_slow;
        for w in &blocked.waits {
            // Before: offered to the name again, the same closed queue said
            // full, and the sender waited on it again, without end.
            assert!(r.resume(w, &blocked.delivery, Verdict::Gone, t0).is_none());
        }
        assert_eq!(r.totals().dropped_slow, dropped + 1, "the loss is counted");
    }

    #[test]
    fn full_outbox_blocks_the_sender_then_room_delivers_in_order() {
        let (mut r, t0) = router();
        let (a, _ra) = registered(&mut r, "a", t0);
        let (_, mut rb) = registered(&mut r, "b", t0);
        // Capacity 8, one slot taken by `registered`.
        let mut blocked = None;
        let mut n = 0;
        while blocked.is_none() {
            let out = r.route(a, &mut msg("b", n), t0).unwrap();
            blocked = out.blocked;
            n += 1;
        }
        assert_eq!(n, 8, "the eighth message found the outbox full");
        assert_eq!(r.totals().delivered, 7);
        assert_eq!(r.totals().dropped_slow, 0, "full is a wait, not a drop");
        assert_eq!(r.stats(t0).flow.blocked_now, 1);
        let blocked = blocked.unwrap();
        // The writer drains; the sender's wait ends with room.
        assert_eq!(written(&mut rb), 8);
        for w in &blocked.waits {
            assert!(r.resume(w, &blocked.delivery, Verdict::Room, t0).is_none());
        }
        r.end_wait(Duration::from_millis(3));
        let got = frames(&mut rb);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["body"]["n"], 7);
        let t = r.totals();
        assert_eq!(
            (t.delivered, t.dropped_slow, t.blocked, t.blocked_ms),
            (8, 0, 1, 3)
        );
        assert_eq!(r.stats(t0).flow.blocked_now, 0);
    }

    #[test]
    fn stuck_receiver_gets_the_policy_and_its_senders_go_on() {
        let (mut r, t0) = router();
        let (a, _ra) = registered(&mut r, "a", t0);
        let (_, _rb) = registered(&mut r, "b", t0);
        let blocked = route_until_blocked(&mut r, a, "b", t0);
        for w in &blocked.waits {
            r.resume(w, &blocked.delivery, Verdict::Stuck, t0);
        }
        // The 7 queued and the waiting one are dropped and counted.
        assert_eq!(r.totals().dropped_slow, 8);
        // While stuck, what comes for it is dropped at once: no wait.
        let out = r.route(a, &mut msg("b", 99), t0).unwrap();
        assert!(out.blocked.is_none());
        assert_eq!(r.totals().dropped_slow, 9);
        let eb = r
            .stats(t0)
            .endpoints
            .into_iter()
            .find(|e| e.name == "b")
            .unwrap();
        assert!(eb.stuck);
        assert_eq!(eb.counters.dropped, 9);
    }

    #[test]
    fn acks_come_when_written_and_errors_when_dropped() {
        let (mut r, t0) = router();
        let (a, mut ra) = registered(&mut r, "a", t0);
        let (_, mut rb) = registered(&mut r, "b", t0);
        frames(&mut ra);
        let mut m =
            BusMessage::parse(br#"{"type":"message","to":"b","id":"m1","ack":true,"body":{}}"#)
                .unwrap();
        r.route(a, &mut m, t0).unwrap();
        assert!(frames(&mut ra).is_empty(), "no ack before it is written");
        let got = frames(&mut rb);
        assert_eq!(got.len(), 2, "registered + the message");
        assert!(
            got[1].get("ack").is_none(),
            "the ack field is ours, not passed on"
        );
        let acks = frames(&mut ra);
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0]["type"], "ack");
        assert_eq!(acks[0]["id"], "m1");

        // Dropped by the policy: the sender hears it, by id.
        let mut blocked = None;
        let mut n = 0;
        while blocked.is_none() {
            let text =
                format!(r#"{{"type":"message","to":"b","id":"x{n}","ack":true,"body":{{}}}}"#);
            blocked = r
                .route(a, &mut BusMessage::parse(text.as_bytes()).unwrap(), t0)
                .unwrap()
                .blocked;
            n += 1;
        }
        let blocked = blocked.unwrap();
        for w in &blocked.waits {
            r.resume(w, &blocked.delivery, Verdict::Stuck, t0);
        }
        drop(blocked);
        let errs = frames(&mut ra);
        assert_eq!(errs.len(), n as usize, "{errs:?}");
        assert!(errs
            .iter()
            .all(|e| e["type"] == "error" && e["code"] == "slow_consumer"));
        assert_eq!(errs[0]["id"], "x0");
    }

    #[test]
    fn topics_go_to_matching_prefixes_once_and_not_back_to_the_sender() {
        let (mut r, t0) = router();
        let (p, mut rp) = session(&mut r, t0);
        let (s1, mut r1) = session(&mut r, t0);
        let (s2, mut r2) = session(&mut r, t0);
        r.subscribe(p, "").unwrap();
        r.subscribe(s1, "md/").unwrap();
        r.subscribe(s1, "md/BTC").unwrap();
        r.subscribe(s2, "news/").unwrap();
        let data = serde_json::value::to_raw_value(&serde_json::json!([1, 2])).unwrap();
        let n = r.publish(
            p,
            TopicMessage {
                topic: "md/BTC/node".into(),
                origin: "node".into(),
                data,
                ts: 1.0,
                seq: None,
            },
        );
        assert_eq!(n, 1);
        let got = frames(&mut r1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["type"], "publish");
        assert_eq!(got[0]["data"], serde_json::json!([1, 2]));
        assert!(frames(&mut r2).is_empty());
        assert!(frames(&mut rp).is_empty());
    }

    #[test]
    fn topic_messages_without_a_number_are_numbered_per_topic_by_the_bus() {
        let mut r = Router::new(RouterConfig {
            seq_bytes: 2 * (1 + crate::seq::ENTRY_OVERHEAD),
            ..RouterConfig::default()
        });
        let mk = |topic: &str, seq: Option<Seq>| TopicMessage {
            topic: topic.into(),
            origin: "o".into(),
            data: serde_json::value::to_raw_value(&1).unwrap(),
            ts: 1.0,
            seq,
        };
        let mut number = |topic: &str, seq: Option<Seq>| {
            let d = r.topic_delivery(mk(topic, seq));
            d.topic_message()
                .and_then(|m| m.seq.clone())
                .expect("numbered")
        };
        let a1 = number("a", None);
        assert!(a1.origin.starts_with("hermes-bus#"), "{a1:?}");
        assert_eq!((a1.n, number("a", None).n, number("b", None).n), (1, 2, 1));
        // A message numbered by its publisher keeps its number.
        let theirs = Seq {
            origin: "feed#0000000000000001".into(),
            n: 42,
        };
        assert_eq!(number("a", Some(theirs.clone())), theirs);
        assert_eq!(number("a", None).n, 3);
        // Past the byte bound the least recently used counter goes: its
        // topic starts again at 1, and status counts it.
        assert_eq!(number("c", None).n, 1);
        assert_eq!(number("b", None).n, 1);
        let st = r.stats(Instant::now()).seq;
        assert_eq!((st.topics, st.forgotten), (2, 2));
        assert!(st.bytes <= st.limit);
        assert_eq!(st.origin, &*a1.origin);
    }

    /// A client session's prefixes are demand, a transport sink's are
    /// not; a session's close takes its demand with it.
    #[test]
    fn client_subscriptions_are_interest_and_a_sink_relays() {
        let (mut r, t0) = router();
        let (tx, _sink_rx) = standalone(8, 1 << 20);
        let sink = r.connect_sink("zmq", tx, t0);
        assert!(r.watch_interest().is_empty());
        r.subscribe(sink, "").unwrap();
        assert!(
            !r.has_interest_changes(),
            "a sink's subscription is no demand"
        );
        let (a, _ra) = session(&mut r, t0);
        let (b, _rb) = session(&mut r, t0);
        r.subscribe(a, "md/").unwrap();
        r.subscribe(b, "md/").unwrap();
        r.subscribe(b, "news/").unwrap();
        // Both prefixes, as `change`s.
        let both = |change: fn(Box<str>) -> InterestChange| {
            vec![change("md/".into()), change("news/".into())]
        };
        let mut out = Vec::new();
        r.take_interest_changes(&mut out);
        assert_eq!(out, both(InterestChange::Added));
        assert_eq!(r.wanted_prefixes(), 2);
        out.clear();
        assert!(r.unsubscribe(a, "md/"));
        assert!(!r.has_interest_changes());
        r.disconnect(b, t0);
        r.take_interest_changes(&mut out);
        out.sort_by(|x, y| x.prefix().cmp(y.prefix()));
        assert_eq!(out, both(InterestChange::Removed));
        assert_eq!(r.wanted_prefixes(), 0);
    }
}
