//! `Publisher`: a PUB socket that connects to the proxy's XSUB side in the
//! background, reconnects whenever the connection drops, filters at the
//! source by the subscriptions the proxy forwards (as a ZeroMQ PUB does),
//! and sends queued envelopes in batches.
//!
//! `publish` never waits: like a ZeroMQ PUB it drops what no subscriber
//! wants, what arrives while disconnected, and what overflows its queue,
//! and unlike one it counts each of these.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::endpoint::{self, Endpoint, ReadHalf, WriteHalf};
use super::queue::{Pushed, WireQueue};
use super::zmtp::{self, FrameReader, Inbound, SocketType, SubChange};
use super::{ZmqError, CONNECT_TIMEOUT, RECONNECT_MAX, RECONNECT_MIN};
use crate::codec::Codec;
use crate::envelope::{self, unix_now, Data, Envelope};

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
        }
    }
}

/// Counters of a [`Publisher`].
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct PublisherStats {
    /// Envelopes queued for sending.
    pub queued: u64,
    /// Envelopes written to the socket.
    pub sent: u64,
    /// Dropped: no subscriber wants the topic (ZeroMQ PUB semantics).
    pub filtered: u64,
    /// Dropped: not connected at the time.
    pub disconnected: u64,
    /// Dropped: queue full.
    pub dropped: u64,
    /// Connections made after the first one.
    pub reconnects: u64,
}

/// Live counters.
#[derive(Debug, Default)]
struct Counters {
    /// See [`PublisherStats::queued`].
    queued: AtomicU64,
    /// See [`PublisherStats::sent`].
    sent: AtomicU64,
    /// See [`PublisherStats::filtered`].
    filtered: AtomicU64,
    /// See [`PublisherStats::disconnected`].
    disconnected: AtomicU64,
    /// See [`PublisherStats::dropped`].
    dropped: AtomicU64,
    /// See [`PublisherStats::reconnects`].
    reconnects: AtomicU64,
}

/// State shared by the caller and the connection task.
#[derive(Debug)]
struct Shared {
    /// Encoded messages waiting for the connection task.
    queue: WireQueue,
    /// Subscription prefixes the proxy forwarded (a multiset); cleared on
    /// disconnect because the proxy resends them on reconnect.
    subs: RwLock<Vec<Bytes>>,
    /// Whether the handshake with the proxy is done.
    connected: AtomicBool,
    /// Whether the proxy accepts MessagePack (from its READY).
    msgpack_ok: AtomicBool,
    /// Wakes waiters on connection and subscription changes.
    changed: Notify,
    /// Counters.
    counters: Counters,
}

impl Shared {
    fn wants(&self, topic_frame: &[u8]) -> bool {
        self.subs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|p| topic_frame.starts_with(p))
    }
}

/// A hermes publisher (ZeroMQ PUB connected to the proxy's XSUB side).
#[derive(Debug)]
pub struct Publisher {
    /// Settings.
    cfg: PublisherConfig,
    /// Parsed `cfg.addr`.
    endpoint: Endpoint,
    /// Shared with the connection task.
    shared: Arc<Shared>,
    /// The connection task while started.
    task: Option<JoinHandle<()>>,
    /// Asks the task to flush and stop.
    stopping: CancellationToken,
    /// Stops the task at once.
    kill: CancellationToken,
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
        Ok(Publisher {
            shared: Arc::new(Shared {
                queue: WireQueue::new(cfg.queue, cfg.queue_bytes),
                subs: RwLock::new(Vec::new()),
                connected: AtomicBool::new(false),
                msgpack_ok: AtomicBool::new(false),
                changed: Notify::new(),
                counters: Counters::default(),
            }),
            cfg,
            endpoint,
            task: None,
            stopping: CancellationToken::new(),
            kill: CancellationToken::new(),
        })
    }

    /// The publisher's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Starts connecting in the background (needs a tokio runtime). Never
    /// waits for the proxy: it may come up later.
    pub fn start(&mut self) -> Result<(), ZmqError> {
        if self.task.is_some() {
            return Ok(());
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| ZmqError::NotRunning("tokio runtime"))?;
        self.stopping = CancellationToken::new();
        self.kill = CancellationToken::new();
        let conn = Connection {
            endpoint: self.endpoint.clone(),
            codec: self.cfg.codec,
            shared: self.shared.clone(),
            stopping: self.stopping.clone(),
            kill: self.kill.clone(),
        };
        self.task = Some(rt.spawn(conn.run()));
        Ok(())
    }

    /// Sends what is queued (up to the linger time), then stops.
    pub async fn stop(&mut self) {
        let Some(task) = self.task.take() else { return };
        self.stopping.cancel();
        let abort = task.abort_handle();
        if tokio::time::timeout(self.cfg.linger, task).await.is_err() {
            self.kill.cancel();
            abort.abort();
        }
        self.shared.connected.store(false, Ordering::Relaxed);
    }

    /// Whether the publisher is started.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether it is connected to the proxy right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Queues `envelope`, stamped with the current time as the reference
    /// does. Ok(false) when it was dropped (no subscriber for the topic,
    /// not connected, queue full; each counted).
    pub fn publish(&self, envelope: &Envelope) -> Result<bool, ZmqError> {
        self.publish_parts(&envelope.topic, &envelope.origin, &envelope.data)
    }

    /// Like [`Publisher::publish`] without building an `Envelope`.
    pub fn publish_parts(&self, topic: &str, origin: &str, data: &Data) -> Result<bool, ZmqError> {
        if self.task.is_none() {
            return Err(ZmqError::NotRunning("publisher"));
        }
        let s = &self.shared;
        if !s.connected.load(Ordering::Relaxed) {
            s.counters.disconnected.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let topic_frame = envelope::topic_frame(topic);
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
            topic_frame.len() + origin_frame.len() + data.len() + ts.len() + 16,
        );
        zmtp::put_message(&mut wire, &[&topic_frame[..], &origin_frame, &data, &ts]);
        match s.queue.push(wire.freeze()) {
            Pushed::Ok => {
                s.counters.queued.fetch_add(1, Ordering::Relaxed);
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
        self.wait_until(limit, |s| s.connected.load(Ordering::Relaxed))
            .await
    }

    /// Waits until some subscriber wants `topic` (its subscription has
    /// reached this publisher through the proxy), so a first message is
    /// not dropped by source filtering.
    pub async fn wait_for_subscriber(&self, topic: &str, limit: Duration) -> Result<(), ZmqError> {
        let frame = envelope::topic_frame(topic);
        self.wait_until(limit, |s| {
            s.connected.load(Ordering::Relaxed) && s.wants(&frame)
        })
        .await
    }

    async fn wait_until(
        &self,
        limit: Duration,
        f: impl Fn(&Shared) -> bool,
    ) -> Result<(), ZmqError> {
        let fut = async {
            loop {
                let changed = self.shared.changed.notified();
                if f(&self.shared) {
                    return;
                }
                // Also poll now and then: a notification can race.
                let _ = tokio::time::timeout(Duration::from_millis(50), changed).await;
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| ZmqError::Timeout(limit))
    }

    /// Waits until everything queued has been written (or `limit`).
    pub async fn flush(&self, limit: Duration) -> Result<(), ZmqError> {
        self.wait_until(limit, |s| s.queue.is_empty()).await
    }

    /// A copy of the counters.
    pub fn stats(&self) -> PublisherStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PublisherStats {
            queued: l(&c.queued),
            sent: l(&c.sent),
            filtered: l(&c.filtered),
            disconnected: l(&c.disconnected),
            dropped: l(&c.dropped),
            reconnects: l(&c.reconnects),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.kill.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The background connection of a publisher.
struct Connection {
    /// Where to connect.
    endpoint: Endpoint,
    /// The codec the user asked for.
    codec: Codec,
    /// Shared with the `Publisher`.
    shared: Arc<Shared>,
    /// Flush, then stop.
    stopping: CancellationToken,
    /// Stop now.
    kill: CancellationToken,
}

impl Connection {
    async fn run(self) {
        let mut delay = RECONNECT_MIN;
        let mut first = true;
        let props: Vec<(&str, &[u8])> = if self.codec == Codec::MsgPack {
            vec![(zmtp::CODEC_PROPERTY, b"msgpack")]
        } else {
            Vec::new()
        };
        loop {
            if self.kill.is_cancelled()
                || (self.stopping.is_cancelled() && self.shared.queue.is_empty())
            {
                return;
            }
            let attempt = async {
                let stream =
                    tokio::time::timeout(CONNECT_TIMEOUT, endpoint::connect(&self.endpoint))
                        .await
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
                        .map_err(zmtp::ZmtpError::Io)?;
                let (mut r, mut w) = stream.into_split();
                let mut reader = FrameReader::new(1 << 20);
                let info = zmtp::handshake(
                    &mut r,
                    &mut w,
                    &mut reader,
                    SocketType::Pub,
                    &props,
                    CONNECT_TIMEOUT,
                )
                .await?;
                Ok::<_, zmtp::ZmtpError>((r, w, reader, info))
            };
            let conn = tokio::select! {
                _ = self.kill.cancelled() => return,
                c = attempt => c,
            };
            match conn {
                Ok((r, w, reader, info)) => {
                    delay = RECONNECT_MIN;
                    if !first {
                        self.shared
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    self.shared
                        .msgpack_ok
                        .store(info.wants_msgpack(), Ordering::Relaxed);
                    self.shared.connected.store(true, Ordering::Relaxed);
                    self.shared.changed.notify_waiters();
                    let ended = self.serve(r, w, reader).await;
                    self.shared.connected.store(false, Ordering::Relaxed);
                    self.shared
                        .subs
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    self.shared.changed.notify_waiters();
                    if ended {
                        return;
                    }
                    tracing::debug!(endpoint = %self.endpoint, "publisher: connection lost, reconnecting");
                }
                Err(e) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "publisher: connect failed");
                }
            }
            if self.stopping.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = self.kill.cancelled() => return,
                _ = self.stopping.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    /// Runs one connection; true when the publisher is stopping (done),
    /// false when the connection was lost.
    async fn serve(&self, mut r: ReadHalf, w: WriteHalf, mut reader: FrameReader) -> bool {
        let shared = &self.shared;
        let read = async {
            loop {
                while let Some(item) = reader.next_item()? {
                    if let Some(change) = SubChange::from_inbound(&item) {
                        let mut subs = shared.subs.write().unwrap_or_else(|p| p.into_inner());
                        match change {
                            SubChange::Subscribe(p) => subs.push(p),
                            SubChange::Cancel(p) => {
                                if let Some(i) = subs.iter().position(|x| *x == p) {
                                    subs.swap_remove(i);
                                }
                            }
                        }
                        drop(subs);
                        shared.changed.notify_waiters();
                    } else if let Inbound::Command(name, data) = item {
                        let mut pong = BytesMut::new();
                        if zmtp::answer_ping(&name, &data, &mut pong) {
                            shared.queue.push(pong.freeze());
                        }
                    }
                }
                if !reader.fill(&mut r).await? {
                    return Err(zmtp::ZmtpError::Closed);
                }
            }
        };
        let write = async {
            let mut w = BufWriter::with_capacity(64 * 1024, w);
            let mut batch = VecDeque::new();
            loop {
                if shared.queue.is_empty() {
                    w.flush().await?;
                    shared.changed.notify_waiters();
                    tokio::select! {
                        _ = self.stopping.cancelled() => {
                            if shared.queue.is_empty() {
                                let _ = w.shutdown().await;
                                return Ok::<bool, std::io::Error>(true);
                            }
                        }
                        _ = shared.queue.wait() => {}
                    }
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
            _ = self.kill.cancelled() => true,
            r = read => {
                let _: Result<(), zmtp::ZmtpError> = r;
                false
            }
            w = write => w.unwrap_or(false),
        }
    }
}
