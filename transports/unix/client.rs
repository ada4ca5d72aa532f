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

use crate::error::{ErrorCode, ProtocolError};

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
    /// Start the daemon (`hermes-busd start`) when no bus answers.
    pub autostart: bool,
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
}

impl ClientConfig {
    /// Defaults for a socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ClientConfig {
            socket: socket.into(),
            heartbeat: Duration::from_secs(60),
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            autostart: true,
            codec: crate::codec::Codec::Json,
            busd: crate::daemon::sibling_exe("hermes-busd"),
            inbox_capacity: 65536,
        }
    }
}

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or failed.
    #[error("bus connection failed: {0}")]
    Io(#[from] std::io::Error),
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
    /// The connection was lost; the client will retry.
    Disconnected {
        /// Why.
        reason: String,
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
    out: mpsc::Sender<Bytes>,
    /// Messages received (pong is not passed up).
    inbox: mpsc::Receiver<Value>,
    /// Connection events.
    events: broadcast::Sender<ClientEvent>,
    /// The current session id, None while disconnected.
    session: watch::Receiver<Option<String>>,
    /// The connection task.
    task: JoinHandle<()>,
    /// Message ids.
    ids: IdGen,
}

/// One frame of any serializable value, encoded in place (no second copy).
fn frame_of<T: serde::Serialize + ?Sized>(v: &T) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&[0; 4]);
    if serde_json::to_writer(&mut out, v).is_err() {
        out.truncate(4);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(out)
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

async fn read_frame(
    stream: &mut UnixStream,
    buf: &mut BytesMut,
) -> Result<Option<Value>, ClientError> {
    loop {
        match frame::decode(buf, MAX_FRAME) {
            Ok(Some(p)) => {
                return crate::codec::decode::<Value>(&p)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("undecodable frame from bus: {e}")))
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

fn as_error(v: &Value) -> Option<ProtocolError> {
    if v.get("type")?.as_str()? != "error" {
        return None;
    }
    let code = v
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let detail = v
        .get("detail")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let code = match code.as_str() {
        "endpoint_not_found" => ErrorCode::EndpointNotFound,
        "already_registered" => ErrorCode::AlreadyRegistered,
        "replaced" => ErrorCode::Replaced,
        "permission_denied" => ErrorCode::PermissionDenied,
        "too_many_connections" => ErrorCode::TooManyConnections,
        "bad_field" => ErrorCode::BadField,
        "missing_field" => ErrorCode::MissingField,
        "slow_consumer" => ErrorCode::SlowConsumer,
        "not_delivered" => ErrorCode::NotDelivered,
        "shutting_down" => ErrorCode::ShuttingDown,
        "heartbeat_timeout" => ErrorCode::HeartbeatTimeout,
        "frame_too_large" => ErrorCode::FrameTooLarge,
        "bad_json" => ErrorCode::BadJson,
        "bad_utf8" => ErrorCode::BadUtf8,
        "bad_msgpack" => ErrorCode::BadMsgpack,
        "not_object" => ErrorCode::NotObject,
        _ => ErrorCode::UnknownType,
    };
    Some(ProtocolError::new(
        code,
        if detail.is_empty() {
            code_text(v)
        } else {
            detail
        },
    ))
}

fn code_text(v: &Value) -> String {
    v.get("code").map(|c| c.to_string()).unwrap_or_default()
}

/// Connects, starting the daemon once if nobody answers and `autostart`.
async fn dial(cfg: &ClientConfig) -> Result<UnixStream, ClientError> {
    match UnixStream::connect(&cfg.socket).await {
        Ok(s) => Ok(s),
        Err(e)
            if cfg.autostart
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
        {
            start_daemon(&cfg.busd, &cfg.socket).await;
            Ok(UnixStream::connect(&cfg.socket).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `BUSD --root DIR --socket PATH start` and waits up to 3 s for the
/// socket to answer. The root is the socket's directory, so the daemon's
/// pid file and log sit beside its socket (for the default socket that is
/// the bus root itself) and never touch another bus's.
pub async fn start_daemon(busd: &Path, socket: &Path) {
    let mut cmd = tokio::process::Command::new(busd);
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.arg("--root").arg(dir);
    }
    let status = cmd
        .arg("--socket")
        .arg(socket)
        .arg("start")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match tokio::time::timeout(Duration::from_secs(5), status).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("cannot run {}: {e}", busd.display()),
        Err(_) => tracing::warn!("{} start did not finish in 5 s", busd.display()),
    }
    for _ in 0..30 {
        if UnixStream::connect(socket).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects and registers; returns the stream and the session id.
async fn connect_register(
    cfg: &ClientConfig,
    endpoint: &str,
) -> Result<(UnixStream, String, BytesMut), ClientError> {
    let mut s = dial(cfg).await?;
    s.write_all(&frame_of(&match cfg.codec {
        crate::codec::Codec::Json => serde_json::json!({"type": "register", "endpoint": endpoint}),
        c => serde_json::json!({"type": "register", "endpoint": endpoint, "codec": c.name()}),
    }))
    .await?;
    let mut buf = BytesMut::with_capacity(8192);
    let reply = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut s, &mut buf))
        .await
        .map_err(|_| ClientError::Timeout)??;
    match reply {
        Some(v) if v.get("type").and_then(Value::as_str) == Some("registered") => {
            let sid = v
                .get("session_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            Ok((s, sid, buf))
        }
        Some(v) => match as_error(&v) {
            Some(e) => Err(ClientError::Rejected(e)),
            None => Err(ClientError::Protocol(format!(
                "expected 'registered', got {v}"
            ))),
        },
        None => Err(ClientError::Protocol(
            "bus closed the connection during register".into(),
        )),
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
        let (stream, sid, buf) = connect_register(&cfg, endpoint).await?;
        let (out_tx, out_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(cfg.inbox_capacity.max(1));
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
        let frame = message_frame(to, &self.endpoint, &id, crate::router::unix_now(), &body);
        self.out.send(frame).await.map_err(|_| ClientError::Closed)
    }

    /// Sends any protocol object as is (e.g. `subscribe`, `publish`).
    pub async fn send_raw(&self, msg: &Value) -> Result<(), ClientError> {
        self.out
            .send(frame_of(msg))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Waits for the next received message (None once closed).
    pub async fn recv(&mut self) -> Option<Value> {
        self.inbox.recv().await
    }

    /// Drains what has arrived, without waiting.
    pub fn poll(&mut self) -> Vec<Value> {
        let mut v = Vec::new();
        while let Ok(m) = self.inbox.try_recv() {
            v.push(m);
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
    mut out: mpsc::Receiver<Bytes>,
    inbox: mpsc::Sender<Value>,
    events: broadcast::Sender<ClientEvent>,
    session: watch::Sender<Option<String>>,
) {
    let mut conn = Some((stream, buf));
    let mut delay = cfg.reconnect_initial;
    loop {
        if let Some((stream, buf)) = conn.take() {
            let reason = serve_connection(&cfg, stream, buf, &mut out, &inbox).await;
            let _ = session.send(None);
            let _ = events.send(ClientEvent::Disconnected {
                reason: reason.clone(),
            });
            if reason == "closed" {
                return;
            }
        }
        let _ = events.send(ClientEvent::Reconnecting { delay });
        tokio::time::sleep(delay).await;
        match connect_register(&cfg, &endpoint).await {
            Ok((s, sid, buf)) => {
                delay = cfg.reconnect_initial;
                let _ = session.send(Some(sid.clone()));
                let _ = events.send(ClientEvent::Connected { session_id: sid });
                conn = Some((s, buf));
            }
            Err(e) => {
                tracing::debug!("reconnect failed: {e}");
                delay = delay.mul_f64(1.5).min(cfg.reconnect_max);
            }
        }
    }
}

/// Serves one live connection; returns why it ended ("closed" when the
/// client itself went away). Reading runs in its own task, so the client
/// keeps reading what the bus sends while a write waits (the bus holds a
/// sender back by not reading it: a client that stopped reading then
/// could wait on itself).
async fn serve_connection(
    cfg: &ClientConfig,
    stream: UnixStream,
    buf: BytesMut,
    out: &mut mpsc::Receiver<Bytes>,
    inbox: &mpsc::Sender<Value>,
) -> String {
    let (rd, mut wr) = stream.into_split();
    let mut reader = tokio::spawn(read_loop(rd, buf, inbox.clone()));
    let reason = write_loop(cfg, &mut wr, out, &mut reader).await;
    reader.abort();
    reason
}

/// Writes queued frames and pings until the connection or the client
/// ends (or the reader ends, with its reason).
async fn write_loop(
    cfg: &ClientConfig,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    out: &mut mpsc::Receiver<Bytes>,
    reader: &mut JoinHandle<String>,
) -> String {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + cfg.heartbeat, cfg.heartbeat);
    let ping_frame = frame_of(&serde_json::json!({"type": "ping"}));
    let mut batch: Vec<Bytes> = Vec::with_capacity(256);
    let mut wbuf: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            r = &mut *reader => {
                return r.unwrap_or_else(|e| format!("reader failed: {e}"));
            }
            n = out.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return "closed".into();
                }
                // Everything queued goes out in as few writes as possible:
                // small frames are gathered into one buffer, a large one
                // is written as it is. A write that waits (the bus pushes
                // back) makes `send` wait once the channel is full.
                for f in batch.drain(..) {
                    if f.len() >= 16 * 1024 {
                        if !wbuf.is_empty() {
                            if let Err(e) = wr.write_all(&wbuf).await {
                                return e.to_string();
                            }
                            wbuf.clear();
                        }
                        if let Err(e) = wr.write_all(&f).await {
                            return e.to_string();
                        }
                    } else {
                        wbuf.extend_from_slice(&f);
                    }
                }
                if !wbuf.is_empty() {
                    if let Err(e) = wr.write_all(&wbuf).await {
                        return e.to_string();
                    }
                    wbuf.clear();
                }
                if wbuf.capacity() > 256 * 1024 {
                    wbuf = Vec::new();
                }
            }
            _ = ping.tick() => {
                if let Err(e) = wr.write_all(&ping_frame).await {
                    return e.to_string();
                }
            }
        }
    }
}

/// Reads frames and passes messages up (pong is not) until the
/// connection ends; returns why ("closed" when the client went away).
async fn read_loop(
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut buf: BytesMut,
    inbox: mpsc::Sender<Value>,
) -> String {
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
                    // A full inbox (the application does not call `recv`)
                    // stops reading: the bus then holds back the senders.
                    if inbox.send(v).await.is_err() {
                        return "closed".into();
                    }
                }
                Ok(None) => break,
                Err(e) => return e.to_string(),
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return "bus closed the connection".into(),
            Ok(_) => {}
            Err(e) => return e.to_string(),
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
    let cfg = ClientConfig::new(socket);
    let mut s = dial(&cfg).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let msg = serde_json::json!({
        "type": "message", "to": to, "from": from.unwrap_or("anonymous"),
        "id": id, "ts": crate::router::unix_now(), "body": body, "ack": true,
    });
    s.write_all(&frame_of(&msg)).await?;
    let mut buf = BytesMut::new();
    match tokio::time::timeout(Duration::from_secs(1), read_frame(&mut s, &mut buf)).await {
        Ok(Ok(Some(v))) => match as_error(&v) {
            Some(e) => Err(ClientError::Rejected(e)),
            None => Ok(()),
        },
        Ok(Ok(None)) => Ok(()),
        Ok(Err(e)) => Err(e),
        // No reply within 1 s: the reference reads that as success.
        Err(_) => Ok(()),
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
