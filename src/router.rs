//! The router: plain state that decides where traffic goes.
//!
//! It owns the session table, the endpoint names (live, or held for a
//! client that went away a moment ago), the topic subscriptions and the
//! counters. Every operation runs to completion without awaiting: a
//! delivery is pushed into a bounded outbox or dropped and counted; a slow
//! session never slows the router. The transports do all the I/O.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::delivery::{encode_frame, Delivery, TopicMessage};
use crate::error::{ErrorCode, ProtocolError};
use crate::message::{BusMessage, RawJson};
use crate::outbox::{Outbox, PushError};
use crate::stats::{EndpointStats, HeldStats, RouterStats, SessionCounters, Totals};

/// Identifies a session inside this process (never on the wire; the wire
/// gets the UUID `session_id`).
pub type SessionId = u64;

/// What to do with a session whose outbox is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Drop the new delivery for that session and count it.
    #[default]
    Drop,
    /// Disconnect the session, telling it why (`slow_consumer`).
    Disconnect,
}

impl std::str::FromStr for SlowConsumerPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(SlowConsumerPolicy::Drop),
            "disconnect" => Ok(SlowConsumerPolicy::Disconnect),
            other => Err(format!(
                "unknown slow-consumer policy '{other}' (drop|disconnect)"
            )),
        }
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
    /// At most this many messages are held per name; more are dropped and
    /// counted.
    pub hold_limit: usize,
    /// Deliveries a session's outbox holds before the slow-consumer policy
    /// applies.
    pub outbox_capacity: usize,
    /// What a full outbox means.
    pub slow_consumer: SlowConsumerPolicy,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            heartbeat_timeout: Duration::from_secs(90),
            hold_grace: Duration::from_secs(5),
            hold_limit: 4096,
            outbox_capacity: 16384,
            slow_consumer: SlowConsumerPolicy::Drop,
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
    /// Topic prefixes it subscribed to.
    topics: Vec<String>,
}

/// Who answers to an endpoint name.
enum Slot {
    /// A connected session.
    Live(SessionId),
    /// Nobody right now: the session went away at `since`; messages wait.
    Held {
        /// When the session went away; the hold ends at `since + grace`.
        since: Instant,
        /// Messages routed to the name meanwhile, oldest first.
        queue: VecDeque<Delivery>,
    },
}

impl Slot {
    /// True when a message for this name is taken: a live session, or a
    /// name held within its grace.
    fn open(&self, now: Instant, grace: Duration) -> bool {
        match self {
            Slot::Live(_) => true,
            Slot::Held { since, .. } => now.duration_since(*since) < grace,
        }
    }
}

/// The result of routing one `message`.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The message as delivered (one Unix frame, header included).
    pub frame: Bytes,
    /// The target endpoint, or None for a broadcast.
    pub to: Option<String>,
    /// Sessions it was queued to.
    pub delivered: usize,
    /// Held names it was queued for.
    pub held: usize,
}

/// The routing state. See the module docs.
pub struct Router {
    /// Limits and timings.
    cfg: RouterConfig,
    /// Every open session.
    sessions: HashMap<SessionId, Session, FastHash>,
    /// Endpoint names, live or held.
    names: HashMap<String, Slot, FastHash>,
    /// Sessions with at least one topic subscription (publish scans only these).
    subscribers: Vec<SessionId>,
    /// The next SessionId.
    next_id: SessionId,
    /// Counters since start.
    totals: Totals,
}

/// The hasher of the router's maps: a multiply-rotate hash (as rustc's
/// FxHash), several times cheaper than SipHash on the per-message
/// lookups. Keys are session ids the bus assigns and endpoint names from
/// the bus's own user (peer credentials are checked), so resistance to
/// hash flooding buys nothing here.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const FX_K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `BuildHasher` of [`FxHasher`].
type FastHash = BuildHasherDefault<FxHasher>;

/// Float Unix seconds now (the protocol's `ts`).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An error reply frame: `{"type":"error","code":..,"detail":..,"id":..}`.
pub fn error_frame(err: &ProtocolError, id: Option<RawJson<'_>>) -> Delivery {
    let mut m = BusMessage::with_type("error");
    m.set_str("code", err.code.as_str());
    m.set_str("detail", &err.detail);
    if let Some(id) = id {
        m.set_json("id", id);
    }
    Delivery::reply(m.to_frame())
}

impl Router {
    /// An empty router.
    pub fn new(cfg: RouterConfig) -> Self {
        Router {
            cfg,
            sessions: HashMap::default(),
            names: HashMap::default(),
            subscribers: Vec::new(),
            next_id: 1,
            totals: Totals::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
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
                topics: Vec::new(),
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

    /// Queues a reply to one session (pong, error, lists). Counts errors.
    pub fn reply(&mut self, sid: SessionId, d: Delivery, is_error: bool) {
        if is_error {
            self.totals.errors += 1;
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            if is_error {
                s.counters.errors += 1;
            }
            // Replies are bounded like traffic but not counted as
            // deliveries; a reply a full outbox cannot take is a drop.
            if s.outbox.push(d).is_err() {
                s.counters.dropped += 1;
                self.totals.dropped_slow += 1;
            }
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
        let mut replay = VecDeque::new();
        match self.names.remove(name) {
            Some(Slot::Live(old)) if old != sid => {
                if let Some(o) = self.sessions.get_mut(&old) {
                    o.name = None;
                    let err = ProtocolError::new(
                        ErrorCode::Replaced,
                        format!("endpoint '{name}' was registered by another connection"),
                    );
                    o.outbox.close(Some(error_frame(&err, None)));
                    self.totals.replaced += 1;
                }
            }
            Some(Slot::Held { since, queue }) => {
                if now.duration_since(since) < self.cfg.hold_grace {
                    replay = queue;
                } else {
                    self.totals.dropped_held += queue.len() as u64;
                }
            }
            _ => {}
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Err(ProtocolError::new(
                ErrorCode::ShuttingDown,
                "session is closed",
            ));
        };
        s.name = Some(name.to_owned());
        s.uuid = uuid.clone();
        s.last_seen = now;
        self.names.insert(name.to_owned(), Slot::Live(sid));
        let reply = encode_frame(&serde_json::json!({
            "type": "registered", "endpoint": name, "session_id": uuid,
        }));
        let _ = s.outbox.push_unbounded(Delivery::reply(reply));
        for d in replay {
            if s.outbox.push_unbounded(d).is_ok() {
                s.counters.delivered += 1;
                self.totals.delivered += 1;
            }
        }
        Ok(uuid)
    }

    /// Routes a `message`: notes the sender's traffic (as [`Router::touch`]
    /// does, so a transport need not lock twice), fills in `id`, `ts` and
    /// (for a registered sender) `from`, encodes it once, and queues it to
    /// its target or to every registered endpoint. `Err(EndpointNotFound)`
    /// when `to` names nobody; the message is then not routed.
    pub fn route(
        &mut self,
        sid: SessionId,
        msg: &mut BusMessage,
        now: Instant,
    ) -> Result<Routed, ProtocolError> {
        let sender = self.sessions.get_mut(&sid).map(|s| {
            s.last_seen = now;
            s.counters.received += 1;
            &*s
        });
        if let Some(name) = sender.and_then(|s| s.name.as_deref()) {
            msg.set_str("from", name);
        }
        let to = msg
            .str_field("to")?
            .map(|c| c.into_owned())
            .filter(|t| !t.is_empty());
        if !msg.contains("id") {
            msg.set_str("id", &uuid::Uuid::new_v4().to_string());
        }
        if !msg.contains("ts") {
            msg.set("ts", &unix_now());
        }
        // One lookup of the target: found (live, or held within its
        // grace), or an error before anything is encoded.
        let slot = match &to {
            Some(target) => match self.names.get_mut(target.as_str()) {
                Some(slot) if slot.open(now, self.cfg.hold_grace) => Some(slot),
                _ => {
                    self.expire_name(target, now);
                    return Err(ProtocolError::new(
                        ErrorCode::EndpointNotFound,
                        format!("Endpoint '{target}' is not connected"),
                    ));
                }
            },
            None => None,
        };
        let frame = msg.to_frame();
        let d = Delivery::frame(frame.clone());
        self.totals.routed += 1;
        let (mut delivered, mut held) = (0, 0);
        let cfg = &self.cfg;
        let totals = &mut self.totals;
        let sessions = &mut self.sessions;
        let mut offer = |slot: &mut Slot| match slot {
            Slot::Live(id) => {
                if let Some(s) = sessions.get_mut(id) {
                    if deliver(cfg, totals, s, &d) {
                        delivered += 1;
                    }
                }
            }
            Slot::Held { queue, .. } => {
                if queue.len() < cfg.hold_limit {
                    queue.push_back(d.clone());
                    totals.held += 1;
                    held += 1;
                } else {
                    totals.dropped_held += 1;
                }
            }
        };
        match slot {
            Some(slot) => offer(slot),
            None => self.names.values_mut().for_each(offer),
        }
        Ok(Routed {
            frame,
            to,
            delivered,
            held,
        })
    }

    /// Drops a held name whose grace has passed, counting what it held.
    fn expire_name(&mut self, name: &str, now: Instant) {
        if let Some(Slot::Held { since, queue }) = self.names.get(name) {
            if now.duration_since(*since) >= self.cfg.hold_grace {
                self.totals.dropped_held += queue.len() as u64;
                self.names.remove(name);
            }
        }
    }

    /// Subscribes a session to a topic prefix ("" = every topic).
    pub fn subscribe(&mut self, sid: SessionId, prefix: &str) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            if !s.topics.iter().any(|t| t == prefix) {
                s.topics.push(prefix.to_owned());
            }
            if !self.subscribers.contains(&sid) {
                self.subscribers.push(sid);
            }
        }
    }

    /// Removes a topic prefix; true when the session had it.
    pub fn unsubscribe(&mut self, sid: SessionId, prefix: &str) -> bool {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return false;
        };
        let before = s.topics.len();
        s.topics.retain(|t| t != prefix);
        let had = s.topics.len() != before;
        if s.topics.is_empty() {
            self.subscribers.retain(|x| *x != sid);
        }
        had
    }

    /// Publishes a topic message to every other session subscribed to a
    /// prefix of its topic; returns how many it was queued to.
    pub fn publish(&mut self, from: SessionId, msg: TopicMessage) -> usize {
        self.publish_delivery(from, &Delivery::topic(msg))
    }

    /// [`Router::publish`] of a topic delivery the caller already made
    /// (so its encodings are shared with, e.g., the hook event).
    pub fn publish_delivery(&mut self, from: SessionId, d: &Delivery) -> usize {
        self.totals.routed += 1;
        let topic = d.topic_message().map(|m| m.topic.as_str()).unwrap_or("");
        let mut n = 0;
        for id in &self.subscribers {
            if *id == from {
                continue;
            }
            if let Some(s) = self.sessions.get_mut(id) {
                if s.topics.iter().any(|p| topic.starts_with(p.as_str()))
                    && deliver(&self.cfg, &mut self.totals, s, d)
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// Removes a session (its connection ended). A registered name is held
    /// for the grace period so a reconnecting client loses nothing; what
    /// its outbox still held is kept for the name too. Returns the held
    /// name, for [`Router::restore`].
    pub fn disconnect(&mut self, sid: SessionId, now: Instant) -> Option<String> {
        let s = self.sessions.remove(&sid)?;
        let mut unsent = VecDeque::new();
        s.outbox.take_routed(&mut unsent);
        s.outbox.close(None);
        if !s.topics.is_empty() {
            self.subscribers.retain(|x| *x != sid);
        }
        if let Some(name) = s.name {
            if matches!(self.names.get(&name), Some(Slot::Live(id)) if *id == sid) {
                if self.cfg.hold_grace.is_zero() {
                    self.names.remove(&name);
                    self.count_lost(&unsent);
                } else {
                    self.names.insert(
                        name.clone(),
                        Slot::Held {
                            since: now,
                            queue: VecDeque::new(),
                        },
                    );
                    self.restore(&name, unsent);
                    return Some(name);
                }
            } else {
                self.count_lost(&unsent);
            }
        } else {
            self.count_lost(&unsent);
        }
        None
    }

    fn count_lost(&mut self, unsent: &VecDeque<Delivery>) {
        let n = unsent.iter().filter(|d| !d.is_reply()).count() as u64;
        self.totals.dropped_slow += n;
    }

    /// Gives back deliveries a gone session's writer could not write: they
    /// go to the front of the name's held queue (they are older than
    /// anything routed there since), or straight to the name's new session
    /// if it is already back. Replies are not kept.
    pub fn restore(&mut self, name: &str, undelivered: VecDeque<Delivery>) {
        let mut items: VecDeque<Delivery> =
            undelivered.into_iter().filter(|d| !d.is_reply()).collect();
        if items.is_empty() {
            return;
        }
        match self.names.get_mut(name) {
            Some(Slot::Held { queue, .. }) => {
                let room = self.cfg.hold_limit.saturating_sub(queue.len());
                if items.len() > room {
                    self.totals.dropped_held += (items.len() - room) as u64;
                    items.truncate(room);
                }
                while let Some(d) = items.pop_back() {
                    queue.push_front(d);
                }
            }
            Some(Slot::Live(id)) => {
                if let Some(s) = self.sessions.get_mut(id) {
                    for d in items {
                        let _ = s.outbox.push_unbounded(d);
                    }
                }
            }
            None => self.totals.dropped_held += items.len() as u64,
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
        let grace = self.cfg.hold_grace;
        let mut dropped = 0u64;
        self.names.retain(|_, slot| match slot {
            Slot::Held { since, queue } if now.duration_since(*since) >= grace => {
                dropped += queue.len() as u64;
                false
            }
            _ => true,
        });
        self.totals.dropped_held += dropped;
        evicted
    }

    /// Registered endpoints and their session ids (what `list_endpoints`
    /// answers). Held names are not listed: nobody is connected there.
    pub fn endpoints(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .names
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Live(id) => self
                    .sessions
                    .get(id)
                    .map(|s| (name.clone(), s.uuid.clone())),
                Slot::Held { .. } => None,
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
                    counters: s.counters,
                })
            })
            .collect();
        endpoints.sort_by(|a, b| a.name.cmp(&b.name));
        let mut held: Vec<HeldStats> = self
            .names
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Held { since, queue } => Some(HeldStats {
                    name: name.clone(),
                    queued: queue.len(),
                    gone_ms: now.duration_since(*since).as_millis() as u64,
                }),
                Slot::Live(_) => None,
            })
            .collect();
        held.sort_by(|a, b| a.name.cmp(&b.name));
        RouterStats {
            sessions: self.sessions.len(),
            endpoints,
            held,
            totals: self.totals,
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

/// Queues `d` to a session, applying its slow-consumer policy when full.
/// True when queued.
fn deliver(cfg: &RouterConfig, totals: &mut Totals, s: &mut Session, d: &Delivery) -> bool {
    match s.outbox.push(d.clone()) {
        Ok(()) => {
            s.counters.delivered += 1;
            totals.delivered += 1;
            true
        }
        Err(PushError::Full) => {
            s.counters.dropped += 1;
            totals.dropped_slow += 1;
            if cfg.slow_consumer == SlowConsumerPolicy::Disconnect {
                let err = ProtocolError::new(
                    ErrorCode::SlowConsumer,
                    format!(
                        "outbox full ({} messages): disconnected",
                        cfg.outbox_capacity
                    ),
                );
                let discarded = s.outbox.abort(Some(error_frame(&err, None)));
                s.counters.dropped += discarded as u64;
                totals.dropped_slow += discarded as u64;
                totals.slow_disconnects += 1;
            }
            false
        }
        Err(PushError::Closed) => {
            s.counters.dropped += 1;
            totals.dropped_slow += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{outbox, OutboxReader};

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

    fn session(r: &mut Router, now: Instant) -> (SessionId, OutboxReader) {
        let (tx, rx) = outbox(8);
        (r.connect("unix", tx, now), rx)
    }

    #[test]
    fn routes_point_to_point_and_broadcast_and_sets_from() {
        let t0 = Instant::now();
        let mut r = Router::new(RouterConfig::default());
        let (a, mut ra) = session(&mut r, t0);
        let (b, mut rb) = session(&mut r, t0);
        let (anon, mut rn) = session(&mut r, t0);
        r.register(a, "a", t0).unwrap();
        r.register(b, "b", t0).unwrap();
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
        let (a, _ra) = session(&mut r, t0);
        let (b, _rb) = session(&mut r, t0);
        r.register(a, "a", t0).unwrap();
        r.register(b, "b", t0).unwrap();
        assert_eq!(r.disconnect(b, t0).as_deref(), Some("b"));
        for n in 0..3 {
            let out = r
                .route(a, &mut msg("b", n), t0 + Duration::from_secs(1))
                .unwrap();
            assert_eq!(out.held, usize::from(n < 2));
        }
        assert_eq!(r.totals().dropped_held, 1);
        assert!(
            r.endpoints().iter().all(|(n, _)| n != "b"),
            "held names are not listed"
        );
        let (b2, mut rb2) = session(&mut r, t0);
        r.register(b2, "b", t0 + Duration::from_secs(2)).unwrap();
        let got = frames(&mut rb2);
        assert_eq!(got[0]["type"], "registered");
        assert_eq!(got[1]["body"]["n"], 0);
        assert_eq!(got[2]["body"]["n"], 1);

        // Gone for good: swept after the grace, held ones counted.
        r.disconnect(b2, t0 + Duration::from_secs(3));
        r.route(a, &mut msg("b", 9), t0 + Duration::from_secs(4))
            .unwrap();
        r.sweep(t0 + Duration::from_secs(9));
        assert_eq!(r.totals().dropped_held, 2);
        let err = r
            .route(a, &mut msg("b", 10), t0 + Duration::from_secs(9))
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::EndpointNotFound);
    }

    #[test]
    fn register_kicks_the_old_holder_and_refuses_a_second_name() {
        let t0 = Instant::now();
        let mut r = Router::new(RouterConfig::default());
        let (old, mut ro) = session(&mut r, t0);
        let (new, _rn) = session(&mut r, t0);
        r.register(old, "svc", t0).unwrap();
        r.register(new, "svc", t0).unwrap();
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

    #[test]
    fn full_outbox_drops_and_counts_without_blocking() {
        let t0 = Instant::now();
        let mut r = Router::new(RouterConfig::default());
        let (a, _ra) = session(&mut r, t0);
        let (b, _rb) = session(&mut r, t0);
        r.register(a, "a", t0).unwrap();
        r.register(b, "b", t0).unwrap();
        for n in 0..20 {
            r.route(a, &mut msg("b", n), t0).unwrap();
        }
        // Capacity 8, one slot taken by `registered`.
        assert_eq!(r.totals().delivered, 7);
        assert_eq!(r.totals().dropped_slow, 13);
        let st = r.stats(t0);
        let eb = st.endpoints.iter().find(|e| e.name == "b").unwrap();
        assert_eq!(eb.counters.dropped, 13);
    }

    #[test]
    fn topics_go_to_matching_prefixes_once_and_not_back_to_the_sender() {
        let t0 = Instant::now();
        let mut r = Router::new(RouterConfig::default());
        let (p, mut rp) = session(&mut r, t0);
        let (s1, mut r1) = session(&mut r, t0);
        let (s2, mut r2) = session(&mut r, t0);
        r.subscribe(p, "");
        r.subscribe(s1, "md/");
        r.subscribe(s1, "md/BTC");
        r.subscribe(s2, "news/");
        let data = serde_json::value::to_raw_value(&serde_json::json!([1, 2])).unwrap();
        let n = r.publish(
            p,
            TopicMessage {
                topic: "md/BTC/node".into(),
                origin: "node".into(),
                data,
                ts: 1.0,
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
}
