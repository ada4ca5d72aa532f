//! One connection of the Unix-socket transport.
//!
//! The reader decodes frames and asks the bus; the writer is the only
//! task that writes to the socket: it takes everything queued in the
//! session's outbox and writes it with vectored writes (many frames per
//! syscall, no copying). What the writer could not write when the peer
//! went away is handed back to the router, which holds it for the name.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Codec, MSGPACK_MARKER};
use crate::delivery::{encode_frame, Delivery};
use crate::error::{ErrorCode, ProtocolError};
use crate::hooks::HookEvent;
use crate::message::BusMessage;
use crate::outbox::{Outbox, OutboxReader};
use crate::router::{error_frame, unix_now, Blocked, SessionId};
use crate::transport::Bus;
use crate::TopicMessage;

use super::frame::{self, FrameError};

/// The transport name the Unix sessions report.
pub const TRANSPORT: &str = "unix";

/// Limits a session applies.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// How long the writer may take to drain after the session ends.
    pub drain_timeout: Duration,
    /// A registered session that was sent nothing for this long gets a
    /// `{"type":"pong","keepalive":true}` (zero: never). The reference
    /// clients drop every `pong`; 0.7.0's reads a silent second as a lost
    /// connection and reconnects, losing what it sends meanwhile.
    pub keepalive: Duration,
    /// A frame must be complete this long after its first byte arrived.
    pub frame_timeout: Duration,
    /// Deepest nesting accepted (`too_deep` past it).
    pub max_depth: usize,
    /// Bytes buffered for incomplete large frames, all sessions together
    /// (shared counter and its bound).
    pub partial: Arc<PartialBudget>,
}

/// The bound on bytes buffered for incomplete frames across all sessions:
/// 150 peers each announcing a 10 MiB frame and sending it slowly must
/// not cost 1.5 GB.
#[derive(Debug)]
pub struct PartialBudget {
    /// Bytes held now.
    used: std::sync::atomic::AtomicUsize,
    /// The bound.
    limit: usize,
}

impl PartialBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<PartialBudget> {
        Arc::new(PartialBudget {
            used: std::sync::atomic::AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl crate::transport::TransportStatus for PartialBudget {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "partial_frame_bytes": self.used(),
            "partial_frame_limit": self.limit,
        })
    }
}

/// One session's share of the [`PartialBudget`], given back on drop.
struct PartialCharge<'a> {
    /// The shared budget.
    budget: &'a PartialBudget,
    /// What this session holds of it.
    charged: usize,
}

impl PartialCharge<'_> {
    /// Sets this session's share to `held` bytes; false (nothing changed)
    /// when that would pass the bound.
    fn set(&mut self, held: usize) -> bool {
        if held > self.charged {
            let more = held - self.charged;
            let before = self.budget.used.fetch_add(more, Ordering::Relaxed);
            if before + more > self.budget.limit {
                self.budget.used.fetch_sub(more, Ordering::Relaxed);
                return false;
            }
        } else {
            self.budget
                .used
                .fetch_sub(self.charged - held, Ordering::Relaxed);
        }
        self.charged = held;
        true
    }
}

impl Drop for PartialCharge<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.charged, Ordering::Relaxed);
    }
}

/// The frame a quiet registered session gets every keepalive period.
pub const KEEPALIVE: &[u8] = br#"{"type":"pong","keepalive":true}"#;

/// Serves one connection until it ends.
pub async fn run(bus: Bus, stream: UnixStream, limits: Arc<SessionLimits>) {
    let (sid, outbox) = bus.connect(TRANSPORT);
    let own = outbox.outbox();
    let (rd, wr) = stream.into_split();
    let writer_stop = CancellationToken::new();
    let writer_done = CancellationToken::new();
    // Set once the session registered with `"codec": "msgpack"`.
    let msgpack = Arc::new(AtomicBool::new(false));
    // Set once the session registered (keepalives go only to those).
    let registered = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_loop(
        wr,
        outbox,
        Flags {
            msgpack: msgpack.clone(),
            registered: registered.clone(),
            keepalive: limits.keepalive,
        },
        writer_stop.clone(),
        writer_done.clone(),
    ));

    let ctx = Ctx {
        bus: &bus,
        sid,
        own: &own,
        writer_done: &writer_done,
        msgpack: &msgpack,
        registered: &registered,
    };
    let end = read_loop(&ctx, rd, &limits).await;
    tracing::debug!(sid, ?end, "session reader ended");

    // Anything still routed to this session's name now waits in the
    // router for the name to come back; replies already queued still go
    // out if the peer is listening (e.g. it only half-closed).
    let held_name = bus.router().disconnect(sid, Instant::now());
    if tokio::time::timeout(limits.drain_timeout, writer_done.cancelled())
        .await
        .is_err()
    {
        writer_stop.cancel();
    }
    if let Ok(rest) = writer.await {
        if !rest.is_empty() {
            let mut r = bus.router();
            match held_name {
                Some(name) => r.restore(&name, rest, Instant::now()),
                None => r.count_unsent(rest),
            }
        }
    }
}

/// Why the reader stopped (its fields are shown by the debug log).
#[derive(Debug)]
#[allow(dead_code)]
enum ReadEnd {
    /// The peer closed its end.
    Eof,
    /// The socket failed.
    Io(std::io::Error),
    /// The stream cannot stay in sync (oversized length header).
    Desync(FrameError),
    /// The writer ended (outbox closed: replaced, evicted, shutdown, or
    /// the peer stopped reading).
    WriterDone,
    /// A frame stayed incomplete past the frame deadline.
    FrameTimeout,
    /// The bound on bytes of incomplete frames was reached.
    Overloaded,
}

/// Read buffer sizes: a session starts small and grows while its reads
/// fill the buffer, up to the largest; an idle session keeps none.
const READ_MIN: usize = 1024;
const READ_MAX: usize = 64 * 1024;
/// Frames at least this large are read into (or copied into) a pooled
/// buffer of their own and kept there; smaller ones are copied out.
const LARGE_FRAME: usize = frame::POOLED_MIN;
/// After a frame at least this large, the next read goes straight into a
/// pooled buffer of its size (one read per frame, no copy).
const SPECULATE_MIN: usize = 32 * 1024;
/// How long a session must be quiet before its read buffer is released.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// What every step of one session's reader needs.
struct Ctx<'a> {
    /// The bus.
    bus: &'a Bus,
    /// This session.
    sid: SessionId,
    /// This session's own outbox: when it is over its bound (the peer
    /// does not read what it is sent, replies included) the reader stops
    /// reading requests until it drains.
    own: &'a Outbox,
    /// Fires when the writer ended (the session is closing): every wait
    /// ends with it.
    writer_done: &'a CancellationToken,
    /// Set once the session registered with `"codec": "msgpack"`.
    msgpack: &'a AtomicBool,
    /// Set once the session registered.
    registered: &'a AtomicBool,
}

/// The session is closing while the reader waited.
struct Closing;

async fn read_loop(ctx: &Ctx<'_>, rd: OwnedReadHalf, limits: &SessionLimits) -> ReadEnd {
    let mut buf = BytesMut::new();
    // Messages parsed and waiting to be routed together (one router lock
    // for many messages).
    let mut batch: Vec<BusMessage> = Vec::new();
    let mut want = READ_MIN;
    // Whether the last read took less than it could (the socket was
    // probably emptied by it).
    let mut drained = false;
    // When the incomplete frame at the front of `buf` began.
    let mut partial_since: Option<tokio::time::Instant> = None;
    // This session's share of the bytes held for incomplete frames.
    let mut charge = PartialCharge {
        budget: &limits.partial,
        charged: 0,
    };
    // A large frame being read straight into a pooled buffer of its own
    // (`buf` is empty meanwhile: this frame comes first).
    let mut large: Option<Large> = None;
    // The size of the last frame when it was large (the next read goes
    // straight into a pooled buffer of that size), else 0.
    let mut last_large = 0usize;
    loop {
        let mut handled = false;
        // A large frame read into its own buffer: complete, or found not
        // to be one for such a buffer (its bytes then go to `buf`).
        if let Some(l) = &mut large {
            match l.announced() {
                None => {}
                Some(len) if len < LARGE_FRAME || 4 + len > frame::POOLED_MAX => {
                    buf.extend_from_slice(&l.buf);
                    last_large = 0;
                    if let Some(l) = large.take() {
                        frame::pool_give(l.buf);
                    }
                }
                Some(len) if l.buf.len() >= 4 + len => {
                    if let Some(mut l) = large.take() {
                        buf.extend_from_slice(&l.buf[4 + len..]);
                        l.buf.truncate(4 + len);
                        let frame = frame::pooled_bytes(l.buf);
                        last_large = if 4 + len >= SPECULATE_MIN { 4 + len } else { 0 };
                        let parsed = parse_large(frame, limits.max_depth);
                        if handle_frame(ctx, parsed, &mut batch).await.is_err() {
                            return ReadEnd::WriterDone;
                        }
                        handled = true;
                    }
                }
                Some(len) if 4 + len > l.buf.capacity() => {
                    let mut b = frame::pool_take(4 + len);
                    b.extend_from_slice(&l.buf);
                    frame::pool_give(std::mem::replace(&mut l.buf, b));
                }
                Some(_) => {}
            }
        }
        // Every complete frame, parsed straight from the buffer: a small
        // one is copied out (so a kept message never pins the buffer), a
        // large one into a pooled buffer (the read buffer stays this
        // session's alone, never reallocated), a huge one is split off and
        // kept as it is. A frame whose target is full waits here, before
        // the next is parsed: nothing more is read from this sender
        // meanwhile.
        let mut used = 0;
        loop {
            match frame::peek(&buf[used..], limits.max_frame) {
                Ok(Some(len)) if len >= LARGE_FRAME => {
                    let frame = if 4 + len <= frame::POOLED_MAX {
                        let f = frame::pooled_copy(&buf[used..used + 4 + len]);
                        used += 4 + len;
                        f
                    } else {
                        buf.advance(used);
                        used = 0;
                        buf.split_to(4 + len).freeze()
                    };
                    last_large = if 4 + len >= SPECULATE_MIN { 4 + len } else { 0 };
                    let parsed = parse_large(frame, limits.max_depth);
                    if handle_frame(ctx, parsed, &mut batch).await.is_err() {
                        return ReadEnd::WriterDone;
                    }
                    handled = true;
                }
                Ok(Some(len)) => {
                    let payload = &buf[used + 4..used + 4 + len];
                    let parsed = if payload.first() == Some(&MSGPACK_MARKER) {
                        parse_msgpack(payload, limits.max_depth)
                    } else {
                        BusMessage::parse_limited(payload, limits.max_depth)
                    };
                    used += 4 + len;
                    last_large = 0;
                    if handle_frame(ctx, parsed, &mut batch).await.is_err() {
                        return ReadEnd::WriterDone;
                    }
                    handled = true;
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = flush(ctx, &mut batch).await;
                    farewell(
                        ctx,
                        ErrorCode::FrameTooLarge,
                        format!("{e}; closing the connection"),
                    );
                    return ReadEnd::Desync(e);
                }
            }
        }
        if flush(ctx, &mut batch).await.is_err() {
            return ReadEnd::WriterDone;
        }
        buf.advance(used);
        // An incomplete large frame is read on into a buffer of its own.
        if large.is_none() {
            if let Some(h) = buf.get(..4) {
                let total = 4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                if total - 4 >= LARGE_FRAME && total <= frame::POOLED_MAX {
                    let mut b = frame::pool_take(total);
                    b.extend_from_slice(&buf);
                    large = Some(Large { buf: b });
                    buf.clear();
                }
            }
        }
        // Bytes left now are an incomplete frame: it has a deadline,
        // counted from when it began (the last frame completed, or its
        // first byte), never across a wait of ours.
        let partial = !buf.is_empty() || large.as_ref().is_some_and(|l| !l.buf.is_empty());
        if !partial {
            partial_since = None;
        } else if handled || partial_since.is_none() {
            partial_since = Some(tokio::time::Instant::now());
        }
        // A peer that does not read what it is sent (its replies included)
        // is not read from either, until its outbox drains.
        if ctx.own.over_bound() && wait_own_room(ctx).await.is_err() {
            return ReadEnd::WriterDone;
        }

        if handled && drained {
            // The socket is most likely empty: let the writers just woken
            // (this worker runs them next) send what was routed before
            // this task spends a syscall finding the socket empty. Keeps
            // that syscall off the latency path of a request/reply.
            tokio::task::yield_now().await;
        }
        // Idle sessions hold no read buffer: a small one is given back as
        // soon as the socket is drained, a grown one (a busy session keeps
        // it from read to read) after a quiet second.
        if buf.is_empty() && drained && buf.capacity() <= 2 * READ_MIN {
            buf = BytesMut::new();
        }
        let may_release = buf.is_empty() && buf.capacity() > 0 && large.is_none();
        let quiet = async {
            if may_release {
                tokio::time::sleep(IDLE_RELEASE).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let frame_deadline = partial_since.map(|t| t + limits.frame_timeout);
        tokio::select! {
            r = rd.readable() => if let Err(e) = r { return ReadEnd::Io(e) },
            _ = ctx.writer_done.cancelled() => return ReadEnd::WriterDone,
            _ = until(frame_deadline) => {
                farewell(ctx, ErrorCode::FrameTimeout, format!(
                    "a frame stayed incomplete for {} s; closing the connection",
                    limits.frame_timeout.as_secs_f64()
                ));
                return ReadEnd::FrameTimeout;
            }
            _ = quiet, if may_release => {
                buf = BytesMut::new();
                want = READ_MIN;
                continue;
            }
        }
        // After a large frame, the next read goes straight into a pooled
        // buffer of its size: the next frame is most likely as large.
        if large.is_none() && buf.is_empty() && last_large > 0 {
            large = Some(Large {
                buf: frame::pool_take(last_large),
            });
        }
        if let Some(l) = &mut large {
            // Up to the end of the frame, never past it (or, before its
            // header is in, as much as the last large frame).
            let end = match l.announced() {
                Some(len) => 4 + len,
                None => last_large.max(4),
            }
            .min(l.buf.capacity());
            let asked = end - l.buf.len();
            let held = if asked > READ_MAX {
                l.buf.capacity()
            } else {
                0
            };
            if !charge.set(held) {
                farewell(ctx, ErrorCode::Overloaded, overloaded(limits));
                return ReadEnd::Overloaded;
            }
            match rd.try_read_buf(&mut (&mut l.buf).limit(asked)) {
                Ok(0) => return ReadEnd::Eof,
                Ok(n) => drained = n < asked,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if l.buf.is_empty() {
                        if let Some(l) = large.take() {
                            frame::pool_give(l.buf);
                        }
                    }
                }
                Err(e) => return ReadEnd::Io(e),
            }
            continue;
        }
        // Room for what is announced (a partial frame) or the usual read.
        let need = match buf.get(..4) {
            Some(h) => (4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
                .saturating_sub(buf.len()),
            None => 0,
        };
        // Toward the announced frame at most 1 MiB at a time, so a peer
        // announcing a big frame and sending it slowly costs memory only
        // as its bytes arrive.
        let room = need.min(1 << 20).max(want).min(limits.max_frame + 4).max(1);
        if buf.capacity() - buf.len() < room {
            buf.reserve(room);
        }
        // A buffer waiting for the rest of a frame larger than the usual
        // read holds a large frame in progress: it counts against the
        // shared bound (a busy sender's ordinary buffer does not).
        let held = if need > READ_MAX { buf.capacity() } else { 0 };
        if !charge.set(held) {
            farewell(ctx, ErrorCode::Overloaded, overloaded(limits));
            return ReadEnd::Overloaded;
        }
        let before = buf.capacity() - buf.len();
        match rd.try_read_buf(&mut buf) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) => {
                drained = n < before;
                if n == before {
                    want = (want * 2).min(READ_MAX);
                } else if n < want / 4 {
                    want = (want / 2).max(READ_MIN);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return ReadEnd::Io(e),
        }
    }
}

/// The farewell detail when the bound on incomplete frames is reached.
fn overloaded(limits: &SessionLimits) -> String {
    format!(
        "the bus holds {} bytes of incomplete frames, its bound; closing the connection",
        limits.partial.used()
    )
}

/// A large frame being read into a pooled buffer of its own.
struct Large {
    /// What was read of it (see [`frame::pool_take`]); its capacity is
    /// the room for the rest.
    buf: Vec<u8>,
}

impl Large {
    /// The announced payload length, once the header is in.
    fn announced(&self) -> Option<usize> {
        self.buf
            .get(..4)
            .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
    }
}

/// Parses a large frame kept as it is (a MessagePack one is transcoded).
fn parse_large(frame: bytes::Bytes, max_depth: usize) -> Result<BusMessage, ProtocolError> {
    if frame[4] == MSGPACK_MARKER {
        parse_msgpack(&frame[4..], max_depth)
    } else {
        BusMessage::parse_frame_limited(frame, max_depth)
    }
}

/// Tells the peer why its connection is closing (logged too).
fn farewell(ctx: &Ctx<'_>, code: ErrorCode, detail: String) {
    let err = ProtocolError::new(code, detail);
    tracing::warn!(sid = ctx.sid, "{err}");
    ctx.bus.reply(ctx.sid, error_frame(&err, None), true);
}

/// Waits until this session's own outbox drained below its low-water
/// mark (or the session closes).
async fn wait_own_room(ctx: &Ctx<'_>) -> Result<(), Closing> {
    let started = Instant::now();
    ctx.bus.router().begin_own_wait();
    let result = loop {
        if !ctx.own.over_bound() || ctx.own.has_room() {
            break Ok(());
        }
        if ctx.own.is_closed() {
            break Err(Closing);
        }
        tokio::select! {
            _ = ctx.own.room() => {}
            _ = ctx.writer_done.cancelled() => break Err(Closing),
        }
    };
    ctx.bus.router().end_wait(started.elapsed());
    result
}

/// Routes what the batch holds, waiting out every full target in order.
async fn flush(ctx: &Ctx<'_>, batch: &mut Vec<BusMessage>) -> Result<(), Closing> {
    while let Some(blocked) = route_batch(ctx.bus, ctx.sid, batch) {
        if !ctx.bus.settle(blocked, ctx.writer_done).await {
            return Err(Closing);
        }
    }
    Ok(())
}

/// Most messages routed under one router lock.
const ROUTE_BATCH: usize = 64;

/// Decodes a MessagePack payload (marker byte first; ours, opt-in) into
/// the same message model as JSON.
fn parse_msgpack(payload: &[u8], max_depth: usize) -> Result<BusMessage, ProtocolError> {
    let raw = codec::to_raw_json(payload).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadMsgpack,
            format!("payload is not valid MessagePack ({e})"),
        )
    })?;
    BusMessage::parse_limited(raw.get().as_bytes(), max_depth)
}

/// The codec a `register` asks for: `"codec": "json"` (the default) or
/// `"msgpack"` (ours: every frame the bus then sends to this session is
/// MessagePack, marker byte first).
fn register_codec(msg: &BusMessage) -> Result<Codec, ProtocolError> {
    match msg.str_field("codec")? {
        None => Ok(Codec::Json),
        Some(name) => Codec::from_name(&name).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadField,
                format!("unknown codec '{name}' (json or msgpack)"),
            )
        }),
    }
}

/// Handles one frame's payload: every outcome is a routing decision or a
/// reply queued to this session's outbox; nothing here awaits. A
/// `message` joins `batch`; anything else first routes what the batch
/// holds, so every frame takes effect in the order it came.
async fn handle_frame(
    ctx: &Ctx<'_>,
    parsed: Result<BusMessage, ProtocolError>,
    batch: &mut Vec<BusMessage>,
) -> Result<(), Closing> {
    let (bus, sid, msgpack) = (ctx.bus, ctx.sid, ctx.msgpack);
    let msg = match parsed {
        Ok(m) => m,
        Err(e) => {
            flush(ctx, batch).await?;
            bus.router().touch(sid, Instant::now());
            reply_error(bus, sid, &e, None);
            return own_room(ctx).await;
        }
    };
    let kind = match msg.kind() {
        Ok(k) if k == "message" => {
            batch.push(msg);
            if batch.len() >= ROUTE_BATCH {
                flush(ctx, batch).await?;
            }
            return Ok(());
        }
        Ok(k) => k.into_owned(),
        Err(e) => {
            flush(ctx, batch).await?;
            bus.router().touch(sid, Instant::now());
            reply_error(bus, sid, &e, msg.raw("id"));
            return own_room(ctx).await;
        }
    };
    flush(ctx, batch).await?;
    let mut msg = msg;
    let now = Instant::now();
    bus.router().touch(sid, now);
    let result = match kind.as_str() {
        "ping" => {
            bus.reply(
                sid,
                Delivery::reply(encode_frame(&serde_json::json!({"type": "pong"}))),
                false,
            );
            Ok(())
        }
        "register" => match (msg.str_field("endpoint"), register_codec(&msg)) {
            (_, Err(e)) => Err(e),
            (Ok(Some(name)), Ok(codec)) => {
                // Set before the router queues `registered`, so that reply
                // and everything after it reach the writer as MessagePack.
                let before = msgpack.load(Ordering::Acquire);
                if codec == Codec::MsgPack {
                    msgpack.store(true, Ordering::Release);
                }
                let r = bus.router().register(sid, &name, now).map(|_| ());
                if r.is_err() {
                    msgpack.store(before, Ordering::Release);
                } else {
                    ctx.registered.store(true, Ordering::Release);
                }
                r
            }
            (Ok(None), _) => Err(ProtocolError::new(
                ErrorCode::MissingField,
                "register needs a string field 'endpoint'",
            )),
            (Err(e), _) => Err(e),
        },
        "list_endpoints" => {
            // The names are copied under the lock; the (possibly large)
            // reply is written outside it.
            let endpoints = bus.router().endpoints();
            bus.reply(sid, Delivery::reply(endpoints_frame(&endpoints)), false);
            // A costly reply: let the worker serve others before the next.
            tokio::task::yield_now().await;
            Ok(())
        }
        "stats" => {
            let status = bus.status();
            let frame = encode_frame(&serde_json::json!({"type": "stats", "stats": status}));
            bus.reply(sid, Delivery::reply(frame), false);
            Ok(())
        }
        "subscribe" | "unsubscribe" => topic_op(bus, sid, &msg, kind == "subscribe"),
        "publish" => match publish(bus, sid, &mut msg) {
            Ok(Some(blocked)) => {
                if !bus.settle(blocked, ctx.writer_done).await {
                    return Err(Closing);
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!("unknown message type '{other}'"),
        )),
    };
    if let Err(e) = result {
        reply_error(bus, sid, &e, msg.raw("id"));
    }
    own_room(ctx).await
}

/// The `endpoints_list` reply, written straight into one frame.
fn endpoints_frame(endpoints: &[(String, String)]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(64 + endpoints.len() * 64);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(br#"{"type":"endpoints_list","endpoints":{"#);
    for (i, (name, session)) in endpoints.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut out, name);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, session);
    }
    out.extend_from_slice(b"}}");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    bytes::Bytes::from(out)
}

/// After a reply: a peer that does not read its replies is not read from
/// either, until its outbox drains. Requests also take a share of the
/// task budget, so a peer sending many costly ones yields its worker to
/// others between them.
async fn own_room(ctx: &Ctx<'_>) -> Result<(), Closing> {
    tokio::task::consume_budget().await;
    if ctx.own.over_bound() {
        wait_own_room(ctx).await
    } else {
        Ok(())
    }
}

/// Routes the batched messages under one router lock, in order: each is
/// noted as the sender's traffic, routed (a receipt asked for with
/// `"ack": true` is the router's to send, once written), and answered in
/// place when it fails (`error`). Stops after a message that found a
/// target full and returns that decision: the caller waits it out, then
/// routes the rest. Then offers the routed ones to the hooks (as
/// [`Bus::route`] does, outside the lock).
fn route_batch(bus: &Bus, sid: SessionId, batch: &mut Vec<BusMessage>) -> Option<Blocked> {
    if batch.is_empty() {
        return None;
    }
    let hooks = bus.hooks();
    let mut events: Vec<HookEvent> = Vec::new();
    let mut blocked = None;
    let mut done = 0;
    {
        let now = Instant::now();
        let mut r = bus.router();
        for msg in batch.iter_mut() {
            done += 1;
            match r.route(sid, msg, now) {
                Ok(mut routed) => {
                    events.extend(bus.message_hook_event(TRANSPORT, &routed));
                    if let Some(b) = routed.blocked.take() {
                        blocked = Some(b);
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(sid, code = %e.code, detail = %e.detail, "protocol error");
                    r.reply(sid, error_frame(&e, msg.raw("id")), true);
                }
            }
        }
    }
    if done == batch.len() {
        batch.clear();
    } else {
        batch.drain(..done);
    }
    for ev in events {
        hooks.offer(ev);
    }
    blocked
}

fn reply_error(
    bus: &Bus,
    sid: SessionId,
    e: &ProtocolError,
    id: Option<crate::message::RawJson<'_>>,
) {
    tracing::debug!(sid, code = %e.code, detail = %e.detail, "protocol error");
    bus.reply(sid, error_frame(e, id), true);
}

fn topic_op(
    bus: &Bus,
    sid: SessionId,
    msg: &BusMessage,
    subscribe: bool,
) -> Result<(), ProtocolError> {
    let topic = msg
        .str_field("topic")?
        .map(|t| t.into_owned())
        .unwrap_or_default();
    let kind = if subscribe {
        bus.subscribe(sid, &topic)?;
        "subscribed"
    } else {
        bus.unsubscribe(sid, &topic);
        "unsubscribed"
    };
    let frame = encode_frame(&serde_json::json!({"type": kind, "topic": topic}));
    bus.reply(sid, Delivery::reply(frame), false);
    Ok(())
}

fn publish(
    bus: &Bus,
    sid: SessionId,
    msg: &mut BusMessage,
) -> Result<Option<Blocked>, ProtocolError> {
    let topic = msg
        .str_field("topic")?
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::MissingField,
                "publish needs a string field 'topic'",
            )
        })?
        .into_owned();
    let registered = bus.router().name_of(sid).map(str::to_owned);
    let origin = match registered {
        Some(n) => n,
        None => msg
            .str_field("origin")?
            .map(|o| o.into_owned())
            .unwrap_or_else(|| "anonymous".to_owned()),
    };
    let data = msg.remove("data").unwrap_or_else(|| {
        serde_json::value::to_raw_value(&serde_json::Value::Null).unwrap_or_default()
    });
    let ts = match msg.raw("ts") {
        Some(raw) => serde_json::from_str::<f64>(raw.get())
            .map_err(|_| ProtocolError::new(ErrorCode::BadField, "field 'ts' must be a number"))?,
        None => unix_now(),
    };
    let (_, blocked) = bus.publish_waiting(
        TRANSPORT,
        sid,
        TopicMessage {
            topic,
            origin,
            data,
            ts,
        },
    );
    Ok(blocked)
}

/// The writer: drains the outbox with vectored writes until it is closed
/// and empty, the socket fails, or `stop` fires. Returns what it could not
/// write (to be held for the session's name).
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut outbox: OutboxReader,
    flags: Flags,
    stop: CancellationToken,
    done: CancellationToken,
) -> VecDeque<Delivery> {
    const MAX_IOV: usize = 256;
    let mut pending: VecDeque<Delivery> = VecDeque::new();
    // Bytes of `pending[0]` already written.
    let mut offset = 0usize;
    // Set once the outbox closed: the writer ends by then.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if pending.is_empty() {
            offset = 0;
            if pending.capacity() > 1024 {
                // A burst is over: an idle session keeps no big queue.
                pending = VecDeque::new();
            }
            let keepalive = async {
                if flags.keepalive.is_zero() {
                    std::future::pending::<()>().await;
                } else {
                    tokio::time::sleep(flags.keepalive).await;
                }
            };
            tokio::select! {
                more = outbox.recv_batch(&mut pending) => if !more { break; },
                _ = stop.cancelled() => break,
                _ = keepalive => {
                    if flags.registered.load(Ordering::Acquire) {
                        let frame = super::frame::encode(KEEPALIVE);
                        let _ = outbox.outbox().push_forced(Delivery::reply(frame));
                    }
                    continue;
                }
            }
            transcode_if_asked(&flags.msgpack, &mut pending);
        }
        let written = {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(pending.len().min(MAX_IOV));
            for (i, d) in pending.iter().take(MAX_IOV).enumerate() {
                let b = d.unix_frame();
                slices.push(IoSlice::new(if i == 0 { &b[offset..] } else { &b[..] }));
            }
            tokio::select! {
                r = wr.write_vectored(&slices) => r,
                _ = stop.cancelled() => break,
                // Closed (replaced, evicted, disconnected as slow): what
                // is left gets a short deadline, read or not.
                _ = outbox.closed(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
                    continue;
                }
                _ = until(deadline) => break,
            }
        };
        match written {
            Ok(0) | Err(_) => break,
            Ok(mut n) => {
                let (mut items, mut bytes) = (0, 0);
                while n > 0 {
                    let Some(first) = pending.front() else { break };
                    let left = first.unix_frame().len() - offset;
                    if n >= left {
                        n -= left;
                        offset = 0;
                        if let Some(d) = pending.pop_front() {
                            items += 1;
                            bytes += d.charge();
                            // Dropping the last copy of a delivery sends
                            // its sender's receipt, if it asked for one.
                            drop(d);
                        }
                    } else {
                        offset += n;
                        n = 0;
                    }
                }
                // Any write is progress (the slow-consumer clock).
                outbox.written(items, bytes);
                if pending.is_empty() {
                    outbox.try_recv_batch(&mut pending);
                    transcode_if_asked(&flags.msgpack, &mut pending);
                }
            }
        }
    }
    let _ = wr.shutdown().await;
    // Whatever is still queued was never written either.
    while outbox.try_recv_batch(&mut pending) > 0 {}
    let bytes = pending.iter().map(Delivery::charge).sum();
    outbox.forget(pending.len(), bytes);
    done.cancel();
    // Given back in their shared form, to be held for the name.
    pending.into_iter().map(Delivery::into_original).collect()
}

/// How long a closed session's writer may still take to write its last
/// frames (its farewell included) to a peer that does not read them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Waits until `deadline`, or for ever when there is none.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What the writer learns from the reader.
struct Flags {
    /// Set once the session registered with `"codec": "msgpack"`.
    msgpack: Arc<AtomicBool>,
    /// Set once the session registered.
    registered: Arc<AtomicBool>,
    /// The keepalive period (zero: none).
    keepalive: Duration,
}

/// Turns a batch into MessagePack frames when the session asked for them
/// at register (each delivery once per session; the JSON path is untouched).
fn transcode_if_asked(msgpack: &AtomicBool, pending: &mut VecDeque<Delivery>) {
    if msgpack.load(Ordering::Acquire) {
        for d in pending.iter_mut() {
            *d = std::mem::replace(d, Delivery::reply(bytes::Bytes::new())).to_msgpack();
        }
    }
}
