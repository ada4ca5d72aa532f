//! `Receiver`: a SUB socket that connects to the proxy's XPUB side in the
//! background (reconnecting and re-subscribing whenever the connection
//! drops), subscribes to topic prefixes (quoted, so they match the JSON
//! topic frame), filters by origin ("exchanges"), detects slow consumption
//! (the reference's "suicidal snail", with a configurable action), and
//! queues decoded envelopes for `recv`. A full queue stops it reading
//! from the proxy until `recv` makes room, as a libzmq SUB does (see
//! [`ReceiverConfig::drop_when_full`]): what the application cannot take
//! yet waits in the sockets and the proxy, never dropped here.
//!
//! Sequence numbers (opt-in, [`ReceiverConfig::seq`]): the receiver says in
//! READY that it wants numbered envelopes (see `sequence.rs`), gets each
//! numbered one with its fifth frame ([`Envelope::seq`]), and checks every
//! (origin, topic) stream with a [`GapTracker`] (bounded in bytes,
//! [`ReceiverConfig::seq_bytes`]): each gap is counted per origin
//! ([`Receiver::gaps_by_origin`], [`ReceiverStats::gaps`] and `missing`)
//! and reported to [`ReceiverConfig::on_gap`] with its origin, topic,
//! expected and received numbers. The tracker outlives reconnects, so what
//! a reconnect loses shows as a gap. Envelopes from publishers that do not
//! number (reference, libzmq) arrive unnumbered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::client_task::{ClientTask, Control, Link};
use super::dial::{self, Dialed};
use super::endpoint::{Endpoint, WriteHalf};
use super::heartbeat::HeartbeatConfig;
use super::heartbeat_task::{beat_counters_of, Beat};
use super::queue::WireQueue;
use super::sequence::parse_seq_frame;
use super::zmtp::{self, Inbound, PeerInfo, RawMessage, SocketType, ZmtpError};
use super::{ZmqError, RECONNECT_MAX, RECONNECT_MIN};
use crate::bounded::{Bounded, Pushed, Weigh};
use crate::codec::{Codec, CodecError};
use crate::seq::{Gap, GapTracker, Observed, OriginGaps, Seq, DEFAULT_SEQ_BYTES};
use crate::transports::client::{Backoff, Disconnect};
use crate::transports::zmq::envelope::{self, unix_now, Envelope, EnvelopeError, Registry};

/// What a receiver does with an envelope older than its lag threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowPolicy {
    /// Log a warning (rate-limited) and deliver it.
    Warn,
    /// Drop it (counted).
    Drop,
    /// Stop the receiver, as the reference does ("suicidal snail").
    #[default]
    Stop,
}

impl std::str::FromStr for SlowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<SlowPolicy, String> {
        match s {
            "warn" => Ok(SlowPolicy::Warn),
            "drop" => Ok(SlowPolicy::Drop),
            "stop" => Ok(SlowPolicy::Stop),
            other => Err(format!("unknown slow policy {other:?} (warn, drop, stop)")),
        }
    }
}

/// What a receiver calls for every gap it sees (on its connection task:
/// it must return quickly).
#[derive(Clone)]
pub struct OnGap(pub Arc<dyn Fn(&Gap) + Send + Sync>);

impl OnGap {
    /// Wraps a callback.
    pub fn new(f: impl Fn(&Gap) + Send + Sync + 'static) -> OnGap {
        OnGap(Arc::new(f))
    }
}

impl std::fmt::Debug for OnGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnGap(..)")
    }
}

/// Settings of a [`Receiver`].
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The proxy's XPUB address.
    pub addr: String,
    /// The receiver's name (logs).
    pub name: String,
    /// Topic prefixes; empty means everything.
    pub topics: Vec<String>,
    /// Accepted origins; empty means all.
    pub exchanges: Vec<String>,
    /// What to do with lagging envelopes.
    pub slow_policy: SlowPolicy,
    /// Lag (receive time − envelope ts) above which an envelope lags.
    pub lag_threshold: Duration,
    /// Queue limit (envelopes) between the socket and `recv`.
    pub queue: usize,
    /// Queue limit in bytes (each envelope weighs the bytes it arrived
    /// as), beside `queue`. 64 MiB by default.
    pub queue_bytes: usize,
    /// What a full queue (past `queue` or `queue_bytes`) does with an
    /// arriving envelope. false (the default): the receiver stops reading
    /// from the proxy until `recv` makes room (below 3/4 of each bound),
    /// as a libzmq SUB does, so the envelope waits and nothing is lost
    /// here: the pushback reaches the proxy, which drops for this
    /// subscriber at its own bound (counted there, and a gap with `seq`)
    /// or, with `--lossless`, pauses the publishers (and applies its
    /// slow-consumer timeout to an application that stopped reading).
    /// Counted in `paused`. true: the envelope is dropped and counted in
    /// `dropped`, and the receiver reads on.
    pub drop_when_full: bool,
    /// Conflate the queue: while the application lags, at most one
    /// envelope per topic waits; a newer one takes the place of the queued
    /// one (counted as `conflated`), so `recv` catches up with the latest
    /// value of every topic instead of a stale backlog.
    pub conflate: bool,
    /// Data codec we accept besides JSON: with `MsgPack` we tell the proxy
    /// so in the handshake and it may send us MessagePack data frames.
    pub codec: Codec,
    /// Decoders for message structs by dtype.
    pub registry: Arc<Registry>,
    /// Largest message accepted; larger ones are skipped and counted.
    pub max_msg_size: usize,
    /// Reconnect delays (default: 100 ms doubling up to 2 s, like libzmq's
    /// `ZMQ_RECONNECT_IVL`).
    pub reconnect: Backoff,
    /// Ask the proxy for numbered envelopes and report gaps (off by
    /// default; see the module docs).
    pub seq: bool,
    /// Bound of the gap tracker in bytes (origin and topic bytes + 64 per
    /// entry); past it the least recently used streams are forgotten
    /// (counted in `seq_forgotten`).
    pub seq_bytes: usize,
    /// Called for each gap (with `seq`).
    pub on_gap: Option<OnGap>,
    /// ZMTP heartbeats with the proxy: a proxy silent past the timeout is
    /// dropped and dialled again, and the receiver re-subscribes (default
    /// [`HeartbeatConfig::CLIENT_DEFAULT`], which says why;
    /// [`HeartbeatConfig::OFF`] for none).
    pub heartbeat: HeartbeatConfig,
    /// The last values of a proxy that keeps them (`--last-value`): when
    /// it subscribes, such a proxy first sends it the newest envelope of
    /// every matching topic, then live traffic. `Some(true)` asks for
    /// that, `Some(false)` declines it, None (the default) leaves it to
    /// the proxy, which replays. Told in READY (`X-Hermes-Last-Value`), on
    /// every (re)connection; a proxy without a cache ignores it.
    pub last_value: Option<bool>,
}

impl ReceiverConfig {
    /// Defaults for `addr` and `name` (all topics, all origins, reference
    /// lag handling: stop past 1 s).
    pub fn new(addr: impl Into<String>, name: impl Into<String>) -> ReceiverConfig {
        ReceiverConfig {
            addr: addr.into(),
            name: name.into(),
            topics: Vec::new(),
            exchanges: Vec::new(),
            slow_policy: SlowPolicy::Stop,
            lag_threshold: Duration::from_secs(1),
            queue: 100_000,
            queue_bytes: 64 << 20,
            drop_when_full: false,
            conflate: false,
            codec: Codec::Json,
            registry: Registry::shared(),
            max_msg_size: 16 << 20,
            reconnect: Backoff::new(RECONNECT_MIN, 2.0, RECONNECT_MAX),
            seq: false,
            seq_bytes: DEFAULT_SEQ_BYTES,
            on_gap: None,
            heartbeat: HeartbeatConfig::CLIENT_DEFAULT,
            last_value: None,
        }
    }
}

crate::counters::counters! {
    /// Live counters.
    struct Counters;

    /// Counters of a [`Receiver`].
    #[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
    pub struct ReceiverStats {
        /// Messages read from the socket.
        received,
        /// Envelopes queued for `recv`.
        delivered,
        /// Messages that were not envelopes (frame count, JSON).
        malformed,
        /// Data frames in a codec we did not opt in to, or invalid in theirs.
        codec_errors,
        /// Envelopes dropped by the origin filter.
        filtered,
        /// Envelopes past the lag threshold (whatever the policy did).
        lagging,
        /// Envelopes dropped: queue full (`drop_when_full`), or lagging
        /// under `Drop`.
        dropped,
        /// Times the receiver stopped reading from the proxy because its
        /// queue was full (until `recv` made room; not `drop_when_full`).
        paused,
        /// Envelopes replaced in the queue by a newer one of the same
        /// topic (`conflate`).
        conflated,
        /// Oversized messages skipped.
        oversized,
        /// Connections made after the first one.
        reconnects,
        /// Heartbeat PINGs sent to the proxy.
        pings_sent,
        /// PINGs received from the proxy (each answered with a PONG).
        pings_received,
        /// PONGs received from the proxy.
        pongs_received,
        /// Connections dropped because the proxy went silent (then
        /// dialled again).
        heartbeat_timeouts,
        /// PONG answers dropped: the proxy pinged faster than we wrote.
        pongs_dropped;
        /// Numbered envelopes checked for gaps.
        numbered: u64,
        /// Gaps seen (each reported to `on_gap`).
        gaps: u64,
        /// Envelopes missing in those gaps.
        missing: u64,
        /// Streams that started again at 1 (the publisher forgot its
        /// counter for that topic).
        seq_restarts: u64,
        /// Numbers at or below the last one seen (duplicates), skipped by
        /// the check (the envelope is still delivered).
        seq_stale: u64,
        /// Streams the tracker forgot for its byte bound.
        seq_forgotten: u64,
        /// Bytes the tracker holds now (bounded by `seq_bytes`).
        seq_bytes: u64,
        /// Bytes of the envelopes waiting for `recv` now (bounded by
        /// `queue_bytes`).
        queued_bytes: u64,
        /// Bytes of the conflation index of the queue (`conflate`; 0
        /// otherwise): counted against `queue_bytes` with `queued_bytes`.
        index_bytes: u64,
    }
}

/// An envelope in the receiver's queue, with the bytes it arrived as:
/// the queue is bounded in envelopes ([`ReceiverConfig::queue`]) and in
/// those bytes ([`ReceiverConfig::queue_bytes`]).
#[derive(Debug)]
struct Queued {
    /// The envelope, as `recv` returns it.
    env: Envelope,
    /// Its frames' bytes on the wire.
    wire: usize,
}

impl Weigh for Queued {
    fn weigh(&self) -> usize {
        self.wire
    }
}

/// State shared by the caller and the connection task, and what the task
/// does with a connection.
#[derive(Debug)]
struct Shared {
    /// Settings.
    cfg: ReceiverConfig,
    /// The subscription messages sent after each handshake.
    subscriptions: BytesMut,
    /// Decoded envelopes waiting for `recv` (closed when the receiver
    /// stopped: `recv` returns None once it is empty).
    queue: Bounded<Queued>,
    /// Lagging envelopes warned about (the warning is rate-limited).
    lag_warned: AtomicU64,
    /// Gap tracking (with `seq`).
    seq: Mutex<SeqState>,
    /// Counters.
    counters: Counters,
}

/// The receiver's gap tracking.
#[derive(Debug)]
struct SeqState {
    /// Last number per (origin, topic), gap counts per origin.
    tracker: GapTracker,
    /// The last origin id seen, shared by the envelopes it numbered (one
    /// allocation per origin change, not per envelope).
    last_origin: Option<Arc<str>>,
}

impl Shared {
    fn close(&self) {
        self.queue.close(false);
    }

    fn seq_state(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A hermes receiver (ZeroMQ SUB connected to the proxy's XPUB side).
#[derive(Debug)]
pub struct Receiver {
    /// The connection task and the state it shares.
    task: ClientTask<Shared>,
}

impl Receiver {
    /// A receiver for `addr` subscribing to `topics` (prefixes; empty =
    /// all) and keeping only envelopes from `exchanges` (empty = all).
    /// Other settings are the defaults of [`ReceiverConfig::new`].
    pub fn new(
        addr: &str,
        name: &str,
        topics: &[&str],
        exchanges: &[&str],
    ) -> Result<Receiver, ZmqError> {
        let mut cfg = ReceiverConfig::new(addr, name);
        cfg.topics = topics.iter().map(|s| s.to_string()).collect();
        cfg.exchanges = exchanges.iter().map(|s| s.to_string()).collect();
        Receiver::with_config(cfg)
    }

    /// A receiver with explicit settings.
    pub fn with_config(cfg: ReceiverConfig) -> Result<Receiver, ZmqError> {
        let endpoint = cfg.addr.parse()?;
        let queue = if cfg.conflate {
            Bounded::conflating_by(cfg.queue, cfg.queue_bytes, |q: &Queued| {
                q.env.topic.as_bytes()
            })
        } else {
            Bounded::new(cfg.queue, cfg.queue_bytes)
        };
        let seq_bytes = cfg.seq_bytes;
        let mut subscriptions = BytesMut::new();
        if cfg.topics.is_empty() {
            zmtp::put_subscription(&mut subscriptions, true, b"");
        }
        for t in &cfg.topics {
            zmtp::put_subscription(&mut subscriptions, true, &envelope::subscription_for(t));
        }
        Ok(Receiver {
            task: ClientTask::new(
                endpoint,
                cfg.reconnect.clone(),
                Shared {
                    cfg,
                    subscriptions,
                    queue,
                    lag_warned: AtomicU64::new(0),
                    seq: Mutex::new(SeqState {
                        tracker: GapTracker::new(seq_bytes),
                        last_origin: None,
                    }),
                    counters: Counters::default(),
                },
            ),
        })
    }

    /// The shared state.
    fn shared(&self) -> &Shared {
        self.task.link()
    }

    /// The receiver's name.
    pub fn name(&self) -> &str {
        &self.shared().cfg.name
    }

    /// Starts connecting in the background (needs a tokio runtime).
    pub fn start(&mut self) -> Result<(), ZmqError> {
        if !self.task.is_started() {
            self.shared().queue.reopen();
        }
        self.task.start()
    }

    /// Stops receiving; what is queued can still be read.
    pub async fn stop(&mut self) {
        self.task.stop(Duration::from_secs(1)).await;
        self.shared().close();
    }

    /// Whether it is receiving (false after `stop` or a `Stop` policy hit).
    pub fn is_running(&self) -> bool {
        self.task.is_running()
    }

    /// Whether connected and subscribed right now.
    pub fn is_connected(&self) -> bool {
        self.task.is_connected()
    }

    /// Waits until connected and subscribed.
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), ZmqError> {
        self.task.wait_until(limit, |_, up| up).await
    }

    /// The next envelope if one is queued (never waits).
    pub fn try_recv(&self) -> Option<Envelope> {
        self.shared().queue.pop().map(|q| q.env)
    }

    /// Waits for the next envelope; None once stopped and drained (or,
    /// when never started, whenever nothing is queued).
    pub async fn recv(&self) -> Option<Envelope> {
        if !self.task.is_started() {
            return self.try_recv();
        }
        self.shared().queue.recv().await.map(|q| q.env)
    }

    /// Waits up to `limit` for the next envelope.
    pub async fn recv_timeout(&self, limit: Duration) -> Option<Envelope> {
        tokio::time::timeout(limit, self.recv())
            .await
            .ok()
            .flatten()
    }

    /// The reference's `recv(block=False, timeout=None)`, blocking the
    /// calling thread (do not call it on an async runtime thread):
    /// `block` false returns at once; true waits up to `timeout` (None:
    /// until an envelope arrives or the receiver stops).
    pub fn recv_blocking(&self, block: bool, timeout: Option<Duration>) -> Option<Envelope> {
        let queue = &self.shared().queue;
        if !block {
            return queue.pop().map(|q| q.env);
        }
        queue.recv_blocking(timeout).map(|q| q.env)
    }

    /// Number of envelopes waiting.
    pub fn pending(&self) -> usize {
        self.shared().queue.len()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> ReceiverStats {
        let sh = self.shared();
        let mut st = sh.counters.snapshot();
        let t = sh.seq_state().tracker.totals();
        st.numbered = t.numbered;
        st.gaps = t.gaps;
        st.missing = t.missing;
        st.seq_restarts = t.restarts;
        st.seq_stale = t.stale;
        st.seq_forgotten = t.forgotten;
        st.seq_bytes = t.bytes;
        st.queued_bytes = sh.queue.bytes() as u64;
        st.index_bytes = sh.queue.index_bytes() as u64;
        st
    }

    /// Gap counts per origin (with `seq`), for the origins tracked now.
    pub fn gaps_by_origin(&self) -> Vec<OriginGaps> {
        self.shared().seq_state().tracker.origins()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared().close();
    }
}

/// Writes the heartbeats (our PINGs, our PONGs) of one connection, the
/// only thing a receiver sends after its subscriptions; ends on a write
/// error, or never.
async fn write_control(mut w: WriteHalf, control: &WireQueue) -> std::io::Result<()> {
    let mut batch = std::collections::VecDeque::new();
    while control.wait().await {
        control.take_all(&mut batch);
        for item in batch.drain(..) {
            w.write_all(&item).await?;
        }
        w.flush().await?;
    }
    std::future::pending().await
}

/// What to do after handling one message.
enum Verdict {
    /// Keep reading.
    Continue,
    /// The queue is full: wait for room, queue this, then read on.
    Full(Queued),
    /// The `Stop` policy fired: end the receiver.
    Stop,
}

impl Link for Shared {
    const KIND: &'static str = "receiver";
    const DRAINS_ON_STOP: bool = false;

    async fn dial(&self, ep: &Endpoint) -> Result<Dialed, ZmtpError> {
        let lv: &[(&str, &[u8])] = match self.cfg.last_value {
            Some(true) => &[(zmtp::LAST_VALUE_PROPERTY, b"1")],
            Some(false) => &[(zmtp::LAST_VALUE_PROPERTY, b"0")],
            None => &[],
        };
        let mut conn = dial::dial_with(
            ep,
            SocketType::Sub,
            self.cfg.codec,
            self.cfg.seq,
            self.cfg.max_msg_size,
            lv,
        )
        .await?;
        conn.w.write_all(&self.subscriptions).await?;
        conn.w.flush().await?;
        Ok(conn)
    }

    fn on_connect(&self, _: &PeerInfo, reconnect: bool) {
        if reconnect {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn serve(&self, conn: Dialed, _: &Control) -> Disconnect {
        let (mut r, w, mut reader, control, beat) = conn.serve_parts(&self.cfg.heartbeat);
        let res = tokio::select! {
            r = self.read_loop(&mut r, &mut reader, &beat) => r,
            r = write_control(w, &control) => r.map_err(ZmtpError::from),
            why = beat.run(beat_counters_of!(&self.counters)) => Err(ZmtpError::HeartbeatExpired(why)),
        };
        match res {
            Ok(()) => Disconnect::GaveUp("lagging behind the publisher"),
            Err(e) => e.into(),
        }
    }

    fn on_end(&self) {
        self.close();
    }
}

impl Shared {
    /// Reads until the connection fails (Err), or the `Stop` policy fires
    /// (Ok).
    async fn read_loop(
        &self,
        r: &mut super::endpoint::ReadHalf,
        reader: &mut zmtp::FrameReader,
        beat: &Beat,
    ) -> Result<(), ZmtpError> {
        loop {
            while let Some(item) = reader.next_item()? {
                match item {
                    Inbound::Message(m) => {
                        self.counters.received.fetch_add(1, Ordering::Relaxed);
                        match self.handle(&m) {
                            Verdict::Continue => {}
                            Verdict::Full(q) => self.wait_to_queue(q, beat).await,
                            Verdict::Stop => return Ok(()),
                        }
                    }
                    Inbound::Ping(p) => beat.on_ping(&p, beat_counters_of!(&self.counters)),
                    Inbound::Pong(_) => beat.on_pong(beat_counters_of!(&self.counters)),
                    Inbound::Command(..) => {}
                    Inbound::Oversized(_) => {
                        self.counters.oversized.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if !reader.fill(r).await? {
                return Err(ZmtpError::Closed);
            }
            beat.received();
        }
    }

    /// Queues `q` once `recv` has made room (the queue was full): nothing
    /// more is read from the proxy meanwhile, and the proxy's silence does
    /// not count against it (we are the ones not reading; our own PINGs
    /// still tell it we live). Ends without queueing when the receiver is
    /// stopped (the queue closed).
    async fn wait_to_queue(&self, mut q: Queued, beat: &Beat) {
        self.counters.paused.fetch_add(1, Ordering::Relaxed);
        beat.hold();
        loop {
            self.queue.wait_room(q.wire).await;
            // Queued, or refused as closed (stopped meanwhile: counted as
            // any envelope arriving at a stopped receiver), or full again.
            match self.offer(q, false) {
                Some(back) => q = back,
                None => break,
            }
        }
        beat.release();
    }

    /// Decodes, filters and queues one message.
    fn handle(&self, m: &RawMessage) -> Verdict {
        let c = &self.counters;
        // A fifth frame only when we asked for numbers: the sequence frame.
        let (frames, seq) = match (m.frames, self.cfg.seq) {
            (5, true) => match m.frames_n::<5>() {
                Some([t, o, d, ts, seq]) => match parse_seq_frame(seq) {
                    Some(seq) => ([t, o, d, ts], Some(seq)),
                    None => {
                        c.malformed.fetch_add(1, Ordering::Relaxed);
                        return Verdict::Continue;
                    }
                },
                None => {
                    c.malformed.fetch_add(1, Ordering::Relaxed);
                    return Verdict::Continue;
                }
            },
            _ => match m.frames_n::<4>() {
                Some(f) => (f, None),
                None => {
                    c.malformed.fetch_add(1, Ordering::Relaxed);
                    return Verdict::Continue;
                }
            },
        };
        if Codec::detect(frames[2]) == Codec::MsgPack && self.cfg.codec != Codec::MsgPack {
            c.codec_errors.fetch_add(1, Ordering::Relaxed);
            return Verdict::Continue;
        }
        let mut env = match Envelope::from_frames(&frames, &self.cfg.registry) {
            Ok(e) => e,
            Err(EnvelopeError::Data(CodecError::MsgPackDecode(_))) => {
                c.codec_errors.fetch_add(1, Ordering::Relaxed);
                return Verdict::Continue;
            }
            Err(_) => {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                return Verdict::Continue;
            }
        };
        // Checked before any local decision (origin filter, lag policy,
        // full queue): only what never arrived is a gap.
        if let Some((origin, n)) = seq {
            self.check_seq(&mut env, &origin, n);
        }
        if !self.cfg.exchanges.is_empty() && !self.cfg.exchanges.contains(&env.origin) {
            c.filtered.fetch_add(1, Ordering::Relaxed);
            return Verdict::Continue;
        }
        let lag = unix_now() - env.ts;
        if lag > self.cfg.lag_threshold.as_secs_f64() {
            c.lagging.fetch_add(1, Ordering::Relaxed);
            match self.cfg.slow_policy {
                SlowPolicy::Warn => {
                    if self.lag_warned.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                        tracing::warn!(receiver = %self.cfg.name, lag_s = lag, "receiver cannot keep up with the publisher");
                    }
                }
                SlowPolicy::Drop => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    return Verdict::Continue;
                }
                SlowPolicy::Stop => {
                    tracing::error!(receiver = %self.cfg.name, lag_s = lag, "receiver cannot keep up with the publisher: stopping");
                    return Verdict::Stop;
                }
            }
        }
        // The push wakes a waiting `recv` (async or blocking).
        // (Numbered envelopes were checked above.)
        let wire = frames.iter().map(|f| f.len()).sum();
        match self.offer(Queued { env, wire }, self.cfg.drop_when_full) {
            Some(back) => Verdict::Full(back),
            None => Verdict::Continue,
        }
    }

    /// Queues `q` and counts what became of it (delivered, and conflated
    /// when it replaced a queued one; dropped when refused). A queue full
    /// and `drop_full` false: gives it back, to wait for room. A
    /// conflating queue keys by topic, read from the envelope (nothing
    /// copied).
    fn offer(&self, q: Queued, drop_full: bool) -> Option<Queued> {
        let c = &self.counters;
        match self.queue.offer(q, self.cfg.conflate) {
            Ok(old) => {
                if old.is_some() {
                    c.conflated.fetch_add(1, Ordering::Relaxed);
                }
                c.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((Pushed::Full, back)) if !drop_full => return Some(back),
            Err(_) => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }
}

impl Shared {
    /// Records number `n` of `origin` for the envelope's topic, sets the
    /// envelope's [`Envelope::seq`], and reports a gap.
    fn check_seq(&self, env: &mut Envelope, origin: &str, n: u64) {
        let gap = {
            let mut st = self.seq_state();
            let origin_arc = match &st.last_origin {
                Some(o) if &**o == origin => o.clone(),
                _ => {
                    let o: Arc<str> = Arc::from(origin);
                    st.last_origin = Some(o.clone());
                    o
                }
            };
            env.seq = Some(Seq {
                origin: origin_arc,
                n,
            });
            match st.tracker.observe(origin, &env.topic, n) {
                Observed::Gap(g) => Some(g),
                _ => None,
            }
        };
        if let Some(g) = gap {
            tracing::debug!(receiver = %self.cfg.name, origin = %g.origin, topic = %g.topic, expected = g.expected, got = g.got, "sequence gap");
            if let Some(cb) = &self.cfg.on_gap {
                (cb.0)(&g);
            }
        }
    }
}
