//! `Receiver`: a SUB socket that connects to the proxy's XPUB side in the
//! background (reconnecting and re-subscribing whenever the connection
//! drops), subscribes to topic prefixes (quoted, so they match the JSON
//! topic frame), filters by origin ("exchanges"), detects slow consumption
//! (the reference's "suicidal snail", with a configurable action), and
//! queues decoded envelopes for `recv`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::endpoint::{self, Endpoint};
use super::zmtp::{self, FrameReader, Inbound, RawMessage, SocketType};
use super::{ZmqError, CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN};
use crate::codec::{Codec, CodecError};
use crate::envelope::{self, unix_now, Envelope, EnvelopeError, Registry};

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
    /// Data codec we accept besides JSON: with `MsgPack` we tell the proxy
    /// so in the handshake and it may send us MessagePack data frames.
    pub codec: Codec,
    /// Decoders for message structs by dtype.
    pub registry: Arc<Registry>,
    /// Largest message accepted; larger ones are skipped and counted.
    pub max_msg_size: usize,
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
            codec: Codec::Json,
            registry: Registry::shared(),
            max_msg_size: 16 << 20,
        }
    }
}

/// Counters of a [`Receiver`].
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Messages read from the socket.
    pub received: u64,
    /// Envelopes queued for `recv`.
    pub delivered: u64,
    /// Messages that were not envelopes (frame count, JSON).
    pub malformed: u64,
    /// Data frames in a codec we did not opt in to, or invalid in theirs.
    pub codec_errors: u64,
    /// Envelopes dropped by the origin filter.
    pub filtered: u64,
    /// Envelopes past the lag threshold (whatever the policy did).
    pub lagging: u64,
    /// Envelopes dropped: queue full, or lagging under `Drop`.
    pub dropped: u64,
    /// Oversized messages skipped.
    pub oversized: u64,
    /// Connections made after the first one.
    pub reconnects: u64,
}

/// Live counters.
#[derive(Debug, Default)]
struct Counters {
    /// See [`ReceiverStats::received`].
    received: AtomicU64,
    /// See [`ReceiverStats::delivered`].
    delivered: AtomicU64,
    /// See [`ReceiverStats::malformed`].
    malformed: AtomicU64,
    /// See [`ReceiverStats::codec_errors`].
    codec_errors: AtomicU64,
    /// See [`ReceiverStats::filtered`].
    filtered: AtomicU64,
    /// See [`ReceiverStats::lagging`].
    lagging: AtomicU64,
    /// See [`ReceiverStats::dropped`].
    dropped: AtomicU64,
    /// See [`ReceiverStats::oversized`].
    oversized: AtomicU64,
    /// See [`ReceiverStats::reconnects`].
    reconnects: AtomicU64,
}

/// The envelope queue and its state.
#[derive(Debug, Default)]
struct Queue {
    /// Decoded envelopes waiting for `recv`.
    items: VecDeque<Envelope>,
    /// Set when the receiver stopped: `recv` returns None once empty.
    closed: bool,
}

/// State shared by the caller and the connection task.
#[derive(Debug)]
struct Shared {
    /// The envelope queue.
    queue: Mutex<Queue>,
    /// Wakes blocking `recv` callers.
    cond: Condvar,
    /// Wakes async `recv` callers.
    notify: Notify,
    /// Whether the handshake and subscriptions are done.
    connected: AtomicBool,
    /// Counters.
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cond.notify_all();
        self.notify.notify_waiters();
    }
}

/// A hermes receiver (ZeroMQ SUB connected to the proxy's XPUB side).
#[derive(Debug)]
pub struct Receiver {
    /// Settings.
    cfg: ReceiverConfig,
    /// Parsed `cfg.addr`.
    endpoint: Endpoint,
    /// Shared with the connection task.
    shared: Arc<Shared>,
    /// The connection task while started.
    task: Option<JoinHandle<()>>,
    /// Stops the task.
    cancel: CancellationToken,
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
        Ok(Receiver {
            cfg,
            endpoint,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                cond: Condvar::new(),
                notify: Notify::new(),
                connected: AtomicBool::new(false),
                counters: Counters::default(),
            }),
            task: None,
            cancel: CancellationToken::new(),
        })
    }

    /// The receiver's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Starts connecting in the background (needs a tokio runtime).
    pub fn start(&mut self) -> Result<(), ZmqError> {
        if self.task.is_some() {
            return Ok(());
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| ZmqError::NotRunning("tokio runtime"))?;
        self.cancel = CancellationToken::new();
        self.shared.lock().closed = false;
        let conn = Connection {
            cfg: self.cfg.clone(),
            endpoint: self.endpoint.clone(),
            shared: self.shared.clone(),
            cancel: self.cancel.clone(),
        };
        self.task = Some(rt.spawn(conn.run()));
        Ok(())
    }

    /// Stops receiving; what is queued can still be read.
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.shared.connected.store(false, Ordering::Relaxed);
        self.shared.close();
    }

    /// Whether it is receiving (false after `stop` or a `Stop` policy hit).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether connected and subscribed right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Waits until connected and subscribed.
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), ZmqError> {
        let fut = async {
            while !self.is_connected() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| ZmqError::Timeout(limit))
    }

    /// The next envelope if one is queued (never waits).
    pub fn try_recv(&self) -> Option<Envelope> {
        self.shared.lock().items.pop_front()
    }

    /// Waits for the next envelope; None once stopped and drained (or,
    /// when never started, whenever nothing is queued).
    pub async fn recv(&self) -> Option<Envelope> {
        if self.task.is_none() {
            return self.try_recv();
        }
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = self.shared.lock();
                if let Some(e) = q.items.pop_front() {
                    return Some(e);
                }
                if q.closed {
                    return None;
                }
            }
            notified.await;
        }
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
        let mut q = self.shared.lock();
        if !block {
            return q.items.pop_front();
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(e) = q.items.pop_front() {
                return Some(e);
            }
            if q.closed {
                return None;
            }
            q = match deadline {
                None => self.shared.cond.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.shared
                        .cond
                        .wait_timeout(q, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Number of envelopes waiting.
    pub fn pending(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> ReceiverStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReceiverStats {
            received: l(&c.received),
            delivered: l(&c.delivered),
            malformed: l(&c.malformed),
            codec_errors: l(&c.codec_errors),
            filtered: l(&c.filtered),
            lagging: l(&c.lagging),
            dropped: l(&c.dropped),
            oversized: l(&c.oversized),
            reconnects: l(&c.reconnects),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.shared.close();
    }
}

/// What to do after handling one message.
enum Verdict {
    /// Keep reading.
    Continue,
    /// The `Stop` policy fired: end the receiver.
    Stop,
}

/// The background connection of a receiver.
struct Connection {
    /// Settings.
    cfg: ReceiverConfig,
    /// Where to connect.
    endpoint: Endpoint,
    /// Shared with the `Receiver`.
    shared: Arc<Shared>,
    /// Stops the task.
    cancel: CancellationToken,
}

impl Connection {
    async fn run(self) {
        let mut delay = RECONNECT_MIN;
        let mut first = true;
        let props: Vec<(&str, &[u8])> = if self.cfg.codec == Codec::MsgPack {
            vec![(zmtp::CODEC_PROPERTY, b"msgpack")]
        } else {
            Vec::new()
        };
        let mut subs = BytesMut::new();
        if self.cfg.topics.is_empty() {
            zmtp::put_subscription(&mut subs, true, b"");
        }
        for t in &self.cfg.topics {
            zmtp::put_subscription(&mut subs, true, &envelope::subscription_for(t));
        }
        let mut lag_warned = 0u64;
        loop {
            let attempt = async {
                let stream =
                    tokio::time::timeout(CONNECT_TIMEOUT, endpoint::connect(&self.endpoint))
                        .await
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
                        .map_err(zmtp::ZmtpError::Io)?;
                let (mut r, mut w) = stream.into_split();
                let mut reader = FrameReader::new(self.cfg.max_msg_size);
                zmtp::handshake(
                    &mut r,
                    &mut w,
                    &mut reader,
                    SocketType::Sub,
                    &props,
                    CONNECT_TIMEOUT,
                )
                .await?;
                w.write_all(&subs).await?;
                w.flush().await?;
                Ok::<_, zmtp::ZmtpError>((r, w, reader))
            };
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => break,
                c = attempt => c,
            };
            match conn {
                Ok((mut r, mut w, mut reader)) => {
                    delay = RECONNECT_MIN;
                    if !first {
                        self.shared
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    self.shared.connected.store(true, Ordering::Relaxed);
                    let res = tokio::select! {
                        _ = self.cancel.cancelled() => Ok(true),
                        r = self.read_loop(&mut r, &mut w, &mut reader, &mut lag_warned) => r,
                    };
                    self.shared.connected.store(false, Ordering::Relaxed);
                    match res {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(endpoint = %self.endpoint, error = %e, "receiver: connection lost")
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "receiver: connect failed")
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
        self.shared.close();
    }

    /// Reads until the connection fails (Err), or the `Stop` policy fires
    /// (Ok(true)).
    async fn read_loop(
        &self,
        r: &mut super::endpoint::ReadHalf,
        w: &mut super::endpoint::WriteHalf,
        reader: &mut FrameReader,
        lag_warned: &mut u64,
    ) -> Result<bool, zmtp::ZmtpError> {
        loop {
            let mut woke = false;
            while let Some(item) = reader.next_item()? {
                match item {
                    Inbound::Message(m) => {
                        self.shared
                            .counters
                            .received
                            .fetch_add(1, Ordering::Relaxed);
                        let (verdict, delivered) = self.handle(&m, lag_warned);
                        woke |= delivered;
                        if let Verdict::Stop = verdict {
                            return Ok(true);
                        }
                    }
                    Inbound::Command(name, data) => {
                        let mut pong = BytesMut::new();
                        if zmtp::answer_ping(&name, &data, &mut pong) {
                            w.write_all(&pong).await?;
                        }
                    }
                    Inbound::Oversized(_) => {
                        self.shared
                            .counters
                            .oversized
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if woke {
                self.shared.cond.notify_all();
                self.shared.notify.notify_waiters();
            }
            if !reader.fill(r).await? {
                return Err(zmtp::ZmtpError::Closed);
            }
        }
    }

    /// Decodes, filters and queues one message.
    fn handle(&self, m: &RawMessage, lag_warned: &mut u64) -> (Verdict, bool) {
        let c = &self.shared.counters;
        let Some(frames) = m.frames_n::<4>() else {
            c.malformed.fetch_add(1, Ordering::Relaxed);
            return (Verdict::Continue, false);
        };
        if Codec::detect(frames[2]) == Codec::MsgPack && self.cfg.codec != Codec::MsgPack {
            c.codec_errors.fetch_add(1, Ordering::Relaxed);
            return (Verdict::Continue, false);
        }
        let env = match Envelope::from_frames(&frames, &self.cfg.registry) {
            Ok(e) => e,
            Err(EnvelopeError::Data(CodecError::MsgPackDecode(_))) => {
                c.codec_errors.fetch_add(1, Ordering::Relaxed);
                return (Verdict::Continue, false);
            }
            Err(_) => {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                return (Verdict::Continue, false);
            }
        };
        if !self.cfg.exchanges.is_empty() && !self.cfg.exchanges.contains(&env.origin) {
            c.filtered.fetch_add(1, Ordering::Relaxed);
            return (Verdict::Continue, false);
        }
        let lag = unix_now() - env.ts;
        if lag > self.cfg.lag_threshold.as_secs_f64() {
            c.lagging.fetch_add(1, Ordering::Relaxed);
            match self.cfg.slow_policy {
                SlowPolicy::Warn => {
                    if *lag_warned % 1000 == 0 {
                        tracing::warn!(receiver = %self.cfg.name, lag_s = lag, "receiver cannot keep up with the publisher");
                    }
                    *lag_warned += 1;
                }
                SlowPolicy::Drop => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    return (Verdict::Continue, false);
                }
                SlowPolicy::Stop => {
                    tracing::error!(receiver = %self.cfg.name, lag_s = lag, "receiver cannot keep up with the publisher: stopping");
                    return (Verdict::Stop, false);
                }
            }
        }
        let mut q = self.shared.lock();
        if q.items.len() >= self.cfg.queue {
            drop(q);
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return (Verdict::Continue, false);
        }
        q.items.push_back(env);
        drop(q);
        c.delivered.fetch_add(1, Ordering::Relaxed);
        (Verdict::Continue, true)
    }
}
