//! The client library: `BusClient` (long-lived, registered) and
//! `send_message` (short-lived, one message), async on tokio.
//!
//! `BusClient` behaves like the reference client where users can see it:
//! it starts the daemon when no bus answers, registers, pings every 60 s,
//! and reconnects with a delay starting at 1 s, ×1.5 per failure, capped at
//! 30 s, registering again each time. Unlike the reference it never treats
//! an idle second as a lost connection, queues sends made while
//! reconnecting, and reports its connection state as events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::ProtocolError;
use crate::transports::client::{Backoff, ByteBudget, Charged, Disconnect};

use super::dial::{as_error, dial, frame_of, read_frame, register};
pub use super::dial::{may_autostart, start_daemon, start_daemon_auto};
use super::frame::{self, MAX_FRAME};

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The bus socket.
    pub socket: PathBuf,
    /// Ping interval (reference: 60 s).
    pub heartbeat: Duration,
    /// First reconnect delay (reference: 1 s).
    pub reconnect_initial: Duration,
    /// Reconnect delay cap (reference: 30 s).
    pub reconnect_max: Duration,
    /// What each reconnect delay is multiplied by after a failed attempt
    /// (reference: 1.5).
    pub reconnect_factor: f64,
    /// Start the daemon (`hermes-busd start --auto`) when no bus answers.
    /// Default on, off when `HERMES_BUS_AUTOSTART` is `0`, `false`, `no`
    /// or `off`. Even on, a client does not start the daemon for a while
    /// after an explicit `stop`, nor for a socket whose directory does not
    /// exist unless it is the default socket (see [`may_autostart`]).
    pub autostart: bool,
    /// Called just before the client starts the daemon (a CLI announces it
    /// on stderr); None: silent.
    pub on_autostart: Option<fn(&Path)>,
    /// How the bus should encode what it sends this client: JSON (the
    /// default, what the reference speaks) or MessagePack (ours, asked for
    /// at register). What the client sends stays JSON either way.
    pub codec: crate::codec::Codec,
    /// The daemon manager to run for that: by default `hermes-busd` next
    /// to this executable, else on `PATH`.
    pub busd: PathBuf,
    /// Messages buffered for `recv` before the client stops reading (the
    /// bus then holds back whoever sends to it).
    pub inbox_capacity: usize,
    /// Bytes (of their frames) of the messages buffered for `recv`: past
    /// it, too, the client stops reading. 32 MiB by default.
    pub inbox_bytes: usize,
    /// Bytes of the frames `send` has queued and the connection has not
    /// written yet: past it `send` waits (the bus pushing back on this
    /// client fills it). 8 MiB by default.
    pub out_bytes: usize,
}

impl ClientConfig {
    /// The reconnect delays these settings describe.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            self.reconnect_initial,
            self.reconnect_factor,
            self.reconnect_max,
        )
    }

    /// Defaults for a socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ClientConfig {
            socket: socket.into(),
            heartbeat: Duration::from_secs(60),
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            reconnect_factor: 1.5,
            autostart: autostart_from_env(),
            on_autostart: None,
            codec: crate::codec::Codec::Json,
            busd: crate::daemon::sibling_exe("hermes-busd"),
            inbox_capacity: 65536,
            inbox_bytes: 32 << 20,
            out_bytes: 8 << 20,
        }
    }
}

/// `HERMES_BUS_AUTOSTART`: `0`, `false`, `no` or `off` turn client
/// autostart off; anything else (or unset) leaves it on.
pub fn autostart_from_env() -> bool {
    std::env::var("HERMES_BUS_AUTOSTART")
        .map(|v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "no" | "off"
            )
        })
        .unwrap_or(true)
}

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or failed.
    #[error("bus connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// Nobody answers on the socket, and the client did not (or could
    /// not) start the daemon; `reason` says why and what to do.
    #[error("no bus is running on {}: {reason}", socket.display())]
    NotRunning {
        /// The socket dialled.
        socket: PathBuf,
        /// Why no bus was started, and the fix.
        reason: String,
    },
    /// The bus answered with an error.
    #[error("bus refused: {0}")]
    Rejected(ProtocolError),
    /// The bus answered something that is not the protocol.
    #[error("unexpected reply from the bus: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out waiting for the bus")]
    Timeout,
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// A change of the client's connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Registered; the bus gave this session id.
    Connected {
        /// The bus's session id (a UUID).
        session_id: String,
    },
    /// The connection ended; the client will retry unless the reason is
    /// final ([`Disconnect::is_final`]: the client itself went away).
    Disconnected {
        /// Why.
        reason: Disconnect,
    },
    /// The next attempt comes after this delay.
    Reconnecting {
        /// The delay before the attempt.
        delay: Duration,
    },
}

/// A long-lived, registered client.
pub struct BusClient {
    /// The registered name.
    endpoint: String,
    /// Frames to send; the connection task writes them.
    out: mpsc::Sender<Charged<Bytes>>,
    /// The byte bound of `out` (`ClientConfig::out_bytes`).
    out_budget: ByteBudget,
    /// Messages received (pong is not passed up), each holding its
    /// frame's bytes of `ClientConfig::inbox_bytes`.
    inbox: mpsc::Receiver<Charged<Value>>,
    /// Connection events.
    events: broadcast::Sender<ClientEvent>,
    /// The current session id, None while disconnected.
    session: watch::Receiver<Option<String>>,
    /// The connection task.
    task: JoinHandle<()>,
    /// Message ids.
    ids: IdGen,
}

/// The frame of a routed message in the reference client's shape
/// `{"type","to","from","id","ts","body"}`, written field by field (no
/// intermediate JSON map).
fn message_frame(to: &str, from: &str, id: &str, ts: f64, body: &Value) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(br#"{"type":"message","to":"#);
    let _ = serde_json::to_writer(&mut out, to);
    out.extend_from_slice(br#","from":"#);
    let _ = serde_json::to_writer(&mut out, from);
    out.extend_from_slice(br#","id":"#);
    let _ = serde_json::to_writer(&mut out, id);
    out.extend_from_slice(br#","ts":"#);
    let _ = serde_json::to_writer(&mut out, &ts);
    out.extend_from_slice(br#","body":"#);
    let _ = serde_json::to_writer(&mut out, body);
    out.push(b'}');
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(out)
}

/// Message ids: random (version 4) UUIDs from a generator seeded once
/// from the OS, so a send costs no system call. Ids label messages; they
/// are not secrets.
struct IdGen(std::sync::atomic::AtomicU64);

impl IdGen {
    fn new() -> Self {
        let seed = uuid::Uuid::new_v4().as_u64_pair();
        IdGen(std::sync::atomic::AtomicU64::new(
            seed.0 ^ seed.1.rotate_left(17),
        ))
    }

    /// The next id (splitmix64 steps; 122 random bits per id).
    fn next(&self) -> String {
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let g = 0x9e37_79b9_7f4a_7c15u64;
        let s = self
            .0
            .fetch_add(g.wrapping_mul(2), std::sync::atomic::Ordering::Relaxed);
        let (a, b) = (
            mix(s.wrapping_add(g)),
            mix(s.wrapping_add(g.wrapping_mul(2))),
        );
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&a.to_le_bytes());
        bytes[8..].copy_from_slice(&b.to_le_bytes());
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }
}

impl BusClient {
    /// Connects to the bus at `socket` and registers `endpoint` (defaults
    /// otherwise); see [`BusClient::connect_with`].
    pub async fn connect(
        endpoint: &str,
        socket: impl Into<PathBuf>,
    ) -> Result<BusClient, ClientError> {
        BusClient::connect_with(endpoint, ClientConfig::new(socket)).await
    }

    /// Connects and registers, starting the daemon if needed. Fails if the
    /// first attempt fails; later losses are retried in the background.
    pub async fn connect_with(endpoint: &str, cfg: ClientConfig) -> Result<BusClient, ClientError> {
        let (stream, sid, buf) = register(&cfg, endpoint).await?;
        let (out_tx, out_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(cfg.inbox_capacity.max(1));
        let out_budget = ByteBudget::new(cfg.out_bytes);
        let (ev_tx, _) = broadcast::channel(64);
        let (sess_tx, sess_rx) = watch::channel(Some(sid.clone()));
        let _ = ev_tx.send(ClientEvent::Connected { session_id: sid });
        let task = tokio::spawn(connection_task(
            cfg,
            endpoint.to_owned(),
            stream,
            buf,
            out_rx,
            in_tx,
            ev_tx.clone(),
            sess_tx,
        ));
        Ok(BusClient {
            endpoint: endpoint.to_owned(),
            out: out_tx,
            out_budget,
            inbox: in_rx,
            events: ev_tx,
            session: sess_rx,
            task,
            ids: IdGen::new(),
        })
    }

    /// The registered endpoint name.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bus's session id, None while reconnecting.
    pub fn session_id(&self) -> Option<String> {
        self.session.borrow().clone()
    }

    /// True while connected and registered.
    pub fn is_connected(&self) -> bool {
        self.session.borrow().is_some()
    }

    /// Waits until connected (e.g. after a bus restart), up to `limit`.
    pub async fn wait_connected(&mut self, limit: Duration) -> bool {
        let mut rx = self.session.clone();
        tokio::time::timeout(limit, rx.wait_for(|s| s.is_some()))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Connection events (connected, disconnected, reconnecting).
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// Sends `body` to `to` (empty `to`: broadcast). Builds the reference
    /// shape `{"type","to","from","id","ts","body"}`. Waits while the bus
    /// pushes back (a full receiver): nothing is queued without bound or
    /// dropped on this side.
    pub async fn send(&self, to: &str, body: Value) -> Result<(), ClientError> {
        let id = self.ids.next();
        let frame = message_frame(to, &self.endpoint, &id, crate::clock::unix_now(), &body);
        self.queue(frame).await
    }

    /// Sends any protocol object as is (e.g. `subscribe`, `publish`).
    pub async fn send_raw(&self, msg: &Value) -> Result<(), ClientError> {
        self.queue(frame_of(msg)).await
    }

    /// Queues a frame for the connection to write, waiting for its bytes
    /// of the budget first.
    async fn queue(&self, frame: Bytes) -> Result<(), ClientError> {
        let len = frame.len();
        let charged = self
            .out_budget
            .charge(frame, len)
            .await
            .ok_or(ClientError::Closed)?;
        self.out
            .send(charged)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Bytes of frames queued by `send` and not yet written (bounded by
    /// `ClientConfig::out_bytes`).
    pub fn unsent_bytes(&self) -> usize {
        self.out_budget.used()
    }

    /// Waits for the next received message (None once closed).
    pub async fn recv(&mut self) -> Option<Value> {
        self.inbox.recv().await.map(|c| c.item)
    }

    /// Drains what has arrived, without waiting.
    pub fn poll(&mut self) -> Vec<Value> {
        let mut v = Vec::new();
        while let Ok(m) = self.inbox.try_recv() {
            v.push(m.item);
        }
        v
    }

    /// Disconnects and stops reconnecting.
    pub async fn close(self) {
        self.task.abort();
        drop(self);
        tokio::task::yield_now().await;
    }
}

impl Drop for BusClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs one connection after another until the client is dropped.
#[allow(clippy::too_many_arguments)]
async fn connection_task(
    cfg: ClientConfig,
    endpoint: String,
    stream: UnixStream,
    buf: BytesMut,
    mut out: mpsc::Receiver<Charged<Bytes>>,
    inbox: mpsc::Sender<Charged<Value>>,
    events: broadcast::Sender<ClientEvent>,
    session: watch::Sender<Option<String>>,
) {
    // One budget for the inbox across connections (what a lost one left
    // there still counts).
    let inbox_budget = ByteBudget::new(cfg.inbox_bytes);
    // Frames taken from `out` that no socket took whole yet: a lost
    // connection leaves them here, and the next one sends them first.
    let mut unsent: Vec<Charged<Bytes>> = Vec::with_capacity(256);
    let mut conn = Some((stream, buf));
    let mut backoff = cfg.backoff();
    loop {
        if let Some((stream, buf)) = conn.take() {
            let reason = serve_connection(
                &cfg,
                stream,
                buf,
                (&mut out, &mut unsent),
                &inbox,
                &inbox_budget,
            )
            .await;
            let _ = session.send(None);
            let last = reason.is_final();
            let _ = events.send(ClientEvent::Disconnected { reason });
            if last {
                return;
            }
        }
        let delay = backoff.next();
        let _ = events.send(ClientEvent::Reconnecting { delay });
        tokio::time::sleep(delay).await;
        match register(&cfg, &endpoint).await {
            Ok((s, sid, buf)) => {
                backoff.reset();
                let _ = session.send(Some(sid.clone()));
                let _ = events.send(ClientEvent::Connected { session_id: sid });
                conn = Some((s, buf));
            }
            Err(e) => tracing::debug!("reconnect failed: {e}"),
        }
    }
}

/// Serves one live connection; returns why it ended. Reading runs in its own task, so the client
/// keeps reading what the bus sends while a write waits (the bus holds a
/// sender back by not reading it: a client that stopped reading then
/// could wait on itself).
async fn serve_connection(
    cfg: &ClientConfig,
    stream: UnixStream,
    buf: BytesMut,
    (out, unsent): (
        &mut mpsc::Receiver<Charged<Bytes>>,
        &mut Vec<Charged<Bytes>>,
    ),
    inbox: &mpsc::Sender<Charged<Value>>,
    inbox_budget: &ByteBudget,
) -> Disconnect {
    let (rd, mut wr) = stream.into_split();
    let mut reader = tokio::spawn(read_loop(rd, buf, inbox.clone(), inbox_budget.clone()));
    let reason = write_loop(cfg, &mut wr, out, unsent, &mut reader).await;
    reader.abort();
    reason
}

/// Writes queued frames and pings until the connection or the client
/// ends (or the reader ends, with its reason). Frames a lost connection
/// did not take stay in `unsent` (sent first by the next one).
async fn write_loop(
    cfg: &ClientConfig,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    out: &mut mpsc::Receiver<Charged<Bytes>>,
    unsent: &mut Vec<Charged<Bytes>>,
    reader: &mut JoinHandle<Disconnect>,
) -> Disconnect {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + cfg.heartbeat, cfg.heartbeat);
    let ping_frame = frame_of(&serde_json::json!({"type": "ping"}));
    let mut wbuf: Vec<u8> = Vec::new();
    // What the last connection left.
    if let Err(e) = write_batch(wr, unsent, &mut wbuf).await {
        return e.into();
    }
    loop {
        tokio::select! {
            r = &mut *reader => {
                return r.unwrap_or_else(|e| Disconnect::TaskFailed(e.to_string()));
            }
            n = out.recv_many(unsent, 256) => {
                if n == 0 {
                    return Disconnect::Closed;
                }
                if let Err(e) = write_batch(wr, unsent, &mut wbuf).await {
                    return e.into();
                }
                if wbuf.capacity() > 256 * 1024 {
                    wbuf = Vec::new();
                }
            }
            _ = ping.tick() => {
                if let Err(e) = wr.write_all(&ping_frame).await {
                    return e.into();
                }
            }
        }
    }
}

/// Writes `batch` in as few writes as possible: small frames gathered in
/// `wbuf`, a large one as it is. A write that waits (the bus pushes back)
/// makes `send` wait once the byte budget is spent: each frame holds its
/// bytes of it until written. Written, the batch is emptied; on a failed
/// write it keeps the frames the socket did not take whole (a frame cut
/// by a lost connection is one the bus never routed), so the next
/// connection sends them: `send` said ok, so nothing is dropped here.
async fn write_batch(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    batch: &mut Vec<Charged<Bytes>>,
    wbuf: &mut Vec<u8>,
) -> std::io::Result<()> {
    const LARGE: usize = 16 * 1024;
    let mut next = 0;
    while next < batch.len() {
        // One large frame alone, or a run of small ones.
        let first = next;
        wbuf.clear();
        if batch[next].item.len() >= LARGE {
            next += 1;
        } else {
            while next < batch.len() && batch[next].item.len() < LARGE {
                wbuf.extend_from_slice(&batch[next].item);
                next += 1;
            }
        }
        let data: &[u8] = if wbuf.is_empty() {
            &batch[first].item
        } else {
            wbuf
        };
        let mut off = 0;
        while off < data.len() {
            let failed = match wr.write(&data[off..]).await {
                Ok(0) => std::io::Error::from(std::io::ErrorKind::WriteZero),
                Ok(n) => {
                    off += n;
                    continue;
                }
                Err(e) => e,
            };
            // The frames of this run the socket took whole are gone;
            // the rest stay.
            let mut taken = 0;
            let mut end = 0;
            for f in &batch[first..next] {
                end += f.item.len();
                if end > off {
                    break;
                }
                taken += 1;
            }
            batch.drain(..first + taken);
            return Err(failed);
        }
    }
    // Written: their bytes of the budget go back.
    batch.clear();
    Ok(())
}

/// Reads frames and passes messages up (pong is not) until the
/// connection ends; returns why.
async fn read_loop(
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut buf: BytesMut,
    inbox: mpsc::Sender<Charged<Value>>,
    budget: ByteBudget,
) -> Disconnect {
    loop {
        // Deliver whatever complete frames are buffered.
        loop {
            match frame::decode(&mut buf, MAX_FRAME) {
                Ok(Some(p)) => {
                    // The frame boundary is intact, so one frame we cannot
                    // represent (e.g. nested deeper than serde_json's
                    // limit) is skipped, not a reason to drop the link.
                    // JSON, or MessagePack (marker byte first) when asked for.
                    let v = match crate::codec::decode::<Value>(&p) {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!("skipped a frame the client cannot decode: {e}");
                            continue;
                        }
                    };
                    if v.get("type").and_then(Value::as_str) == Some("pong") {
                        continue;
                    }
                    // A full inbox (the application does not call `recv`),
                    // in messages or in bytes, stops reading: the bus then
                    // holds back the senders.
                    let Some(v) = budget.charge(v, p.len()).await else {
                        return Disconnect::Closed;
                    };
                    if inbox.send(v).await.is_err() {
                        return Disconnect::Closed;
                    }
                }
                Ok(None) => break,
                Err(e) => return Disconnect::Protocol(e.to_string()),
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return Disconnect::PeerClosed,
            Ok(_) => {}
            Err(e) => return e.into(),
        }
    }
}

/// Sends one message over a short-lived, unregistered connection (the
/// reference `send_message`): starts the daemon if needed, waits up to 1 s
/// for an error reply. `from` defaults to "anonymous".
pub async fn send_message(
    socket: &Path,
    to: &str,
    body: Value,
    from: Option<&str>,
) -> Result<(), ClientError> {
    send_message_with(&ClientConfig::new(socket), to, body, from)
        .await
        .map(|_| ())
}

/// [`send_message`] with the client settings given (autostart and its
/// announcement); returns the message id it sent.
pub async fn send_message_with(
    cfg: &ClientConfig,
    to: &str,
    body: Value,
    from: Option<&str>,
) -> Result<String, ClientError> {
    let mut s = dial(cfg).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let msg = serde_json::json!({
        "type": "message", "to": to, "from": from.unwrap_or("anonymous"),
        "id": id, "ts": crate::clock::unix_now(), "body": body, "ack": true,
    });
    s.write_all(&frame_of(&msg)).await?;
    let mut buf = BytesMut::new();
    match tokio::time::timeout(Duration::from_secs(1), read_frame(&mut s, &mut buf)).await {
        Ok(Ok(Some(v))) => match as_error(&v) {
            Some(e) => Err(ClientError::Rejected(e)),
            None => Ok(id),
        },
        Ok(Ok(None)) => Ok(id),
        Ok(Err(e)) => Err(e),
        // No reply within 1 s: the reference reads that as success.
        Err(_) => Ok(id),
    }
}

/// Asks the bus for its registered endpoints (name → session id).
pub async fn list_endpoints(socket: &Path) -> Result<serde_json::Map<String, Value>, ClientError> {
    let v = request(socket, &serde_json::json!({"type": "list_endpoints"})).await?;
    Ok(v.get("endpoints")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default())
}

/// Asks the bus for its counters (the `stats` request, ours).
pub async fn stats(socket: &Path) -> Result<Value, ClientError> {
    let v = request(socket, &serde_json::json!({"type": "stats"})).await?;
    Ok(v.get("stats").cloned().unwrap_or(Value::Null))
}

/// One request, one reply, on a short-lived connection (no autostart).
pub async fn request(socket: &Path, msg: &Value) -> Result<Value, ClientError> {
    let mut s = UnixStream::connect(socket).await?;
    s.write_all(&frame_of(msg)).await?;
    let mut buf = BytesMut::new();
    match tokio::time::timeout(Duration::from_secs(3), read_frame(&mut s, &mut buf)).await {
        Ok(Ok(Some(v))) => match as_error(&v) {
            Some(e) => Err(ClientError::Rejected(e)),
            None => Ok(v),
        },
        Ok(Ok(None)) => Err(ClientError::Protocol("bus closed the connection".into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ClientError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three frames (two small, one large) each holding its bytes of `b`.
    async fn frames(b: &ByteBudget) -> Vec<Charged<Bytes>> {
        let mut v = Vec::new();
        for f in [
            frame_of(&serde_json::json!({"n": 1})),
            frame_of(&serde_json::json!({"n": "x".repeat(20_000)})),
            frame_of(&serde_json::json!({"n": 3})),
        ] {
            let len = f.len();
            v.push(b.charge(f, len).await.expect("open"));
        }
        v
    }

    #[tokio::test]
    async fn a_written_batch_gives_its_bytes_back_and_a_failed_one_keeps_its_frames() {
        tokio::time::timeout(Duration::from_secs(20), async {
            let b = ByteBudget::new(1 << 20);
            let mut wbuf = Vec::new();
            // A live peer takes everything, in order.
            let (a, mut peer) = UnixStream::pair().expect("pair");
            let (_rd, mut wr) = a.into_split();
            let mut batch = frames(&b).await;
            let want: Vec<u8> = batch.iter().flat_map(|c| c.item.to_vec()).collect();
            write_batch(&mut wr, &mut batch, &mut wbuf)
                .await
                .expect("written");
            assert!(batch.is_empty());
            assert_eq!(b.used(), 0, "written frames give their bytes back");
            let mut got = vec![0; want.len()];
            peer.read_exact(&mut got).await.expect("read");
            assert_eq!(got, want);
            // A peer gone before the write: nothing was taken, so every
            // frame stays for the next connection (still charged).
            let (a, peer) = UnixStream::pair().expect("pair");
            drop(peer);
            let (_rd, mut wr) = a.into_split();
            let mut batch = frames(&b).await;
            assert!(write_batch(&mut wr, &mut batch, &mut wbuf).await.is_err());
            assert_eq!(batch.len(), 3, "nothing the socket did not take is dropped");
            assert_eq!(b.used(), batch.iter().map(|c| c.item.len()).sum::<usize>());
        })
        .await
        .expect("test timed out");
    }
}
