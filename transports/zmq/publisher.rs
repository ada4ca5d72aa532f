//! `Publisher`: a PUB socket that connects to the proxy's XSUB side in the
//! background, reconnects whenever the connection drops, filters at the
//! source by the subscriptions the proxy forwards (as a ZeroMQ PUB does),
//! and sends queued envelopes in batches.
//!
//! `publish` never waits: like a ZeroMQ PUB it drops what no subscriber
//! wants, what arrives while disconnected, and what overflows its queue,
//! and unlike one it counts each of these.
//!
//! Numbering (on by default, [`PublisherConfig::seq`]): the publisher is one
//! origin, its name plus a random epoch chosen when it is made
//! ([`Publisher::origin_id`]), and numbers every envelope it is asked to
//! publish per topic, from 1, dropped ones included (each is a loss for
//! whoever wanted the topic). The counters outlive reconnects, so what a
//! reconnect loses shows as a gap at the receivers. The number travels as a
//! fifth frame only to a proxy that said in READY it takes one (see
//! `sequence.rs`); a libzmq proxy gets four frames. The per-topic counters
//! are bounded in bytes ([`PublisherConfig::seq_bytes`]); looking up a
//! known topic does not allocate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::{AsyncWriteExt, BufWriter};

use super::client_task::{ClientTask, Control, Link};
use super::dial::{self, Dialed};
use super::endpoint::Endpoint;
use super::heartbeat::HeartbeatConfig;
use super::heartbeat_task::beat_counters_of;
use super::prefix_set::PrefixSet;
use super::queue::{Pushed, WireQueue};
use super::sequence::SeqFramer;
use super::zmtp::{self, Inbound, PeerInfo, SocketType, SubChange, ZmtpError};
use super::{ZmqError, RECONNECT_MAX, RECONNECT_MIN};
use crate::codec::Codec;
use crate::seq::{SeqCounters, DEFAULT_SEQ_BYTES};
use crate::transports::client::{Backoff, Disconnect};
use crate::transports::zmq::envelope::{self, unix_now, Data, Envelope};

/// Settings of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The proxy's XSUB address.
    pub addr: String,
    /// The publisher's name (for logs; `Node` uses it as origin).
    pub name: String,
    /// Data codec; MessagePack is used only when the proxy said it accepts
    /// it in its handshake (ours does, libzmq does not), JSON otherwise.
    pub codec: Codec,
    /// Queue limit in messages (libzmq's default SNDHWM is 1000).
    pub queue: usize,
    /// Queue limit in bytes.
    pub queue_bytes: usize,
    /// How long `stop` waits to send what is queued.
    pub linger: Duration,
    /// Reconnect delays (default: 100 ms doubling up to 2 s, like libzmq's
    /// `ZMQ_RECONNECT_IVL`).
    pub reconnect: Backoff,
    /// Number envelopes per topic and send the number (a fifth frame) to a
    /// proxy that takes it (default on; see the module docs).
    pub seq: bool,
    /// Bound of the per-topic counters in bytes (topic frame + 64 per
    /// topic); past it the least recently used are forgotten (counted in
    /// `seq_forgotten`) and start again at 1.
    pub seq_bytes: usize,
    /// ZMTP heartbeats with the proxy: a proxy silent past the timeout is
    /// dropped and dialled again (default
    /// [`HeartbeatConfig::CLIENT_DEFAULT`], which says why;
    /// [`HeartbeatConfig::OFF`] for none).
    pub heartbeat: HeartbeatConfig,
}

impl PublisherConfig {
    /// Defaults for `addr` and `name`.
    pub fn new(addr: impl Into<String>, name: impl Into<String>) -> PublisherConfig {
        PublisherConfig {
            addr: addr.into(),
            name: name.into(),
            codec: Codec::Json,
            queue: 100_000,
            queue_bytes: 64 << 20,
            linger: Duration::from_secs(1),
            reconnect: Backoff::new(RECONNECT_MIN, 2.0, RECONNECT_MAX),
            seq: true,
            seq_bytes: DEFAULT_SEQ_BYTES,
            heartbeat: HeartbeatConfig::CLIENT_DEFAULT,
        }
    }
}

crate::counters::counters! {
    /// Live counters.
    struct Counters;

    /// Counters of a [`Publisher`].
    #[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
    pub struct PublisherStats {
        /// Envelopes queued for sending.
        queued,
        /// Envelopes written to the socket.
        sent,
        /// Dropped: no subscriber wants the topic (ZeroMQ PUB semantics).
        filtered,
        /// Dropped: not connected at the time.
        disconnected,
        /// Dropped: queue full.
        dropped,
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
        pongs_dropped,
        /// Envelopes sent with a sequence frame (to a proxy that takes it).
        numbered;
        /// Topics numbered now (a gauge).
        seq_topics: u64,
        /// Bytes of the per-topic counters now (bounded by `seq_bytes`).
        seq_bytes: u64,
        /// Per-topic counters forgotten for that bound (such a topic
        /// starts again at 1: a restart at the receivers).
        seq_forgotten: u64,
    }
}

/// State shared by the caller and the connection task, and what the task
/// does with a connection.
#[derive(Debug)]
struct Shared {
    /// The codec the user asked for.
    codec: Codec,
    /// Encoded messages waiting for the connection task.
    queue: WireQueue,
    /// Subscription prefixes the proxy forwarded (a multiset); cleared on
    /// disconnect because the proxy resends them on reconnect.
    subs: RwLock<PrefixSet>,
    /// Whether the proxy accepts MessagePack (from its READY).
    msgpack_ok: AtomicBool,
    /// Whether we number envelopes (the config's `seq`).
    seq: bool,
    /// Whether the proxy takes sequence frames (from its READY).
    seq_ok: AtomicBool,
    /// The next number per topic (topic frame → counter).
    numbers: Mutex<SeqCounters>,
    /// Writes our sequence frames (our origin id, encoded once).
    framer: SeqFramer,
    /// Heartbeat settings of each connection.
    heartbeat: HeartbeatConfig,
    /// Counters.
    counters: Counters,
}

impl Shared {
    fn wants(&self, topic_frame: &[u8]) -> bool {
        self.subs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .matches(topic_frame)
    }

    fn subs_mut(&self) -> std::sync::RwLockWriteGuard<'_, PrefixSet> {
        self.subs.write().unwrap_or_else(|p| p.into_inner())
    }

    fn numbers(&self) -> std::sync::MutexGuard<'_, SeqCounters> {
        self.numbers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A hermes publisher (ZeroMQ PUB connected to the proxy's XSUB side).
#[derive(Debug)]
pub struct Publisher {
    /// Settings.
    cfg: PublisherConfig,
    /// Our numbering origin: the name and a random epoch.
    origin_id: String,
    /// The connection task and the state it shares.
    task: ClientTask<Shared>,
}

impl Publisher {
    /// A publisher for `addr` (`tcp://host:port` or `ipc://path`) named
    /// `name`, with default settings. Call [`Publisher::start`] next.
    pub fn new(addr: &str, name: &str) -> Result<Publisher, ZmqError> {
        Publisher::with_config(PublisherConfig::new(addr, name))
    }

    /// A publisher with explicit settings.
    pub fn with_config(cfg: PublisherConfig) -> Result<Publisher, ZmqError> {
        let endpoint = cfg.addr.parse()?;
        let origin_id = crate::seq::new_origin(&cfg.name);
        let task = ClientTask::new(
            endpoint,
            cfg.reconnect.clone(),
            Shared {
                codec: cfg.codec,
                queue: WireQueue::new(cfg.queue, cfg.queue_bytes),
                subs: RwLock::new(PrefixSet::default()),
                msgpack_ok: AtomicBool::new(false),
                seq: cfg.seq,
                seq_ok: AtomicBool::new(false),
                numbers: Mutex::new(SeqCounters::new(cfg.seq_bytes)),
                framer: SeqFramer::new(&origin_id),
                heartbeat: cfg.heartbeat,
                counters: Counters::default(),
            },
        );
        Ok(Publisher {
            cfg,
            origin_id,
            task,
        })
    }

    /// Our numbering origin, `name#epoch` (the epoch is random, chosen
    /// when the publisher is made): what receivers report gaps under.
    pub fn origin_id(&self) -> &str {
        &self.origin_id
    }

    /// The publisher's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Starts connecting in the background (needs a tokio runtime). Never
    /// waits for the proxy: it may come up later.
    pub fn start(&mut self) -> Result<(), ZmqError> {
        self.task.start()
    }

    /// Sends what is queued (up to the linger time), then stops.
    pub async fn stop(&mut self) {
        self.task.stop(self.cfg.linger).await;
    }

    /// Whether the publisher is started.
    pub fn is_running(&self) -> bool {
        self.task.is_running()
    }

    /// Whether it is connected to the proxy right now.
    pub fn is_connected(&self) -> bool {
        self.task.is_connected()
    }

    /// Queues `envelope`, stamped with the current time as the reference
    /// does. Ok(false) when it was dropped (no subscriber for the topic,
    /// not connected, queue full; each counted).
    pub fn publish(&self, envelope: &Envelope) -> Result<bool, ZmqError> {
        self.publish_parts(&envelope.topic, &envelope.origin, &envelope.data)
    }

    /// Like [`Publisher::publish`] without building an `Envelope`.
    pub fn publish_parts(&self, topic: &str, origin: &str, data: &Data) -> Result<bool, ZmqError> {
        if !self.task.is_started() {
            return Err(ZmqError::NotRunning("publisher"));
        }
        let s = self.task.link();
        let topic_frame = envelope::topic_frame(topic);
        // Every envelope asked for takes a number, dropped ones too: each
        // is a loss for whoever wanted its topic.
        let n = s.seq.then(|| s.numbers().next(&topic_frame));
        if !self.task.is_connected() {
            s.counters.disconnected.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        if !s.wants(&topic_frame) {
            s.counters.filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let codec = if self.cfg.codec == Codec::MsgPack && s.msgpack_ok.load(Ordering::Relaxed) {
            Codec::MsgPack
        } else {
            Codec::Json
        };
        let data = data
            .encode(codec)
            .map_err(|e| ZmqError::Envelope(e.into()))?;
        let mut origin_frame = Vec::with_capacity(origin.len() + 2);
        envelope::write_ascii_json_str(origin, true, &mut origin_frame);
        let ts = serde_json::to_vec(&unix_now())
            .map_err(|e| ZmqError::Envelope(crate::codec::CodecError::from(e).into()))?;
        let mut wire = BytesMut::with_capacity(
            topic_frame.len() + origin_frame.len() + data.len() + ts.len() + 64,
        );
        let frames = [&topic_frame[..], &origin_frame, &data, &ts];
        let numbered = match n {
            Some(n) if s.seq_ok.load(Ordering::Relaxed) => {
                for f in frames {
                    zmtp::put_frame(&mut wire, true, f);
                }
                s.framer.put(&mut wire, n);
                true
            }
            _ => {
                zmtp::put_message(&mut wire, &frames);
                false
            }
        };
        match s.queue.push(wire.freeze()) {
            Pushed::Ok => {
                s.counters.queued.fetch_add(1, Ordering::Relaxed);
                if numbered {
                    s.counters.numbered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(true)
            }
            Pushed::Full | Pushed::Closed => {
                s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// Waits until connected to the proxy.
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), ZmqError> {
        self.task.wait_until(limit, |_, up| up).await
    }

    /// Waits until some subscriber wants `topic` (its subscription has
    /// reached this publisher through the proxy), so a first message is
    /// not dropped by source filtering.
    pub async fn wait_for_subscriber(&self, topic: &str, limit: Duration) -> Result<(), ZmqError> {
        let frame = envelope::topic_frame(topic);
        self.task
            .wait_until(limit, |s, up| up && s.wants(&frame))
            .await
    }

    /// Waits until everything queued has been written (or `limit`).
    pub async fn flush(&self, limit: Duration) -> Result<(), ZmqError> {
        self.task.wait_until(limit, |s, _| s.queue.is_empty()).await
    }

    /// A copy of the counters.
    pub fn stats(&self) -> PublisherStats {
        let s = self.task.link();
        let mut st = s.counters.snapshot();
        let numbers = s.numbers();
        st.seq_topics = numbers.len() as u64;
        st.seq_bytes = numbers.bytes() as u64;
        st.seq_forgotten = numbers.forgotten();
        st
    }
}

impl Link for Shared {
    const KIND: &'static str = "publisher";
    const DRAINS_ON_STOP: bool = true;

    async fn dial(&self, ep: &Endpoint) -> Result<Dialed, ZmtpError> {
        dial::dial(ep, SocketType::Pub, self.codec, self.seq, 1 << 20).await
    }

    fn on_connect(&self, info: &PeerInfo, reconnect: bool) {
        if reconnect {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.msgpack_ok
            .store(info.wants_msgpack(), Ordering::Relaxed);
        self.seq_ok.store(info.wants_seq(), Ordering::Relaxed);
    }

    fn on_disconnect(&self) {
        self.subs_mut().clear();
    }

    fn idle(&self) -> bool {
        self.queue.is_empty()
    }

    async fn serve(&self, conn: Dialed, ctl: &Control) -> Disconnect {
        serve(self, conn, ctl).await
    }
}

/// Serves one connection: applies the subscriptions the proxy forwards,
/// exchanges heartbeats with it, and writes the queue in batches. Ends
/// with [`Disconnect::Closed`] once stopping and everything queued is
/// written, otherwise with why the connection was lost (a proxy silent
/// past the heartbeat timeout included).
async fn serve(shared: &Shared, conn: Dialed, ctl: &Control) -> Disconnect {
    let (mut r, w, mut reader, control, beat) = conn.serve_parts(&shared.heartbeat);
    let read = async {
        loop {
            while let Some(item) = reader.next_item()? {
                if let Some(change) = SubChange::from_inbound(&item) {
                    tracing::trace!(?change, "publisher: subscription from the proxy");
                    match change {
                        SubChange::Subscribe(p) => shared.subs_mut().subscribe(p),
                        SubChange::Cancel(p) => shared.subs_mut().cancel(&p),
                    }
                    ctl.status.notify();
                } else if let Inbound::Ping(p) = &item {
                    beat.on_ping(p, beat_counters_of!(&shared.counters));
                } else if let Inbound::Pong(_) = item {
                    beat.on_pong(beat_counters_of!(&shared.counters));
                }
            }
            if !reader.fill(&mut r).await? {
                return Err::<(), _>(ZmtpError::Closed);
            }
            beat.received();
        }
    };
    let write = async {
        let mut w = BufWriter::with_capacity(64 * 1024, w);
        let mut batch = VecDeque::new();
        loop {
            if shared.queue.is_empty() && control.is_empty() {
                w.flush().await?;
                ctl.status.notify();
                tokio::select! {
                    _ = ctl.stopping.cancelled() => {
                        if shared.queue.is_empty() {
                            let _ = w.shutdown().await;
                            return Ok::<(), std::io::Error>(());
                        }
                    }
                    _ = shared.queue.wait() => {}
                    _ = control.wait() => {}
                }
            }
            // Heartbeats first, outside the counts.
            if !control.is_empty() {
                control.take_all(&mut batch);
                for item in batch.drain(..) {
                    w.write_all(&item).await?;
                }
                w.flush().await?;
            }
            shared.queue.take_all(&mut batch);
            let n = batch.len() as u64;
            for item in batch.drain(..) {
                w.write_all(&item).await?;
            }
            shared.counters.sent.fetch_add(n, Ordering::Relaxed);
        }
    };
    tokio::select! {
        r = read => r.err().map_or(Disconnect::PeerClosed, Disconnect::from),
        w = write => w.err().map_or(Disconnect::Closed, Disconnect::from),
        why = beat.run(beat_counters_of!(&shared.counters)) => ZmtpError::HeartbeatExpired(why).into(),
    }
}
