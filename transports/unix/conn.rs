//! One connection's I/O: the read loop, which turns bytes into frames,
//! and the write loop, the only task that writes to the socket.
//!
//! The reader hands each complete frame to the session
//! ([`FrameHandler`]) and waits while the session waits (that is how a
//! full receiver pushes back on this sender: nothing more is read). It
//! bounds what it buffers for incomplete frames, in bytes across all
//! connections ([`PartialBudget`]) and in time per frame.
//!
//! The writer drains the session's outbox with vectored writes (many
//! frames per syscall, no copying), in the session's wire form: a codec
//! switch arrives in order through the outbox, so everything queued
//! before it keeps its form. It sends a keepalive to a quiet registered
//! session. What it could not write when the peer went away it returns.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::error::ErrorCode;
use crate::notice::Notice;
use crate::outbox::OutboxReader;

use super::frame::{self, FrameError};

/// The bound on bytes buffered for incomplete frames across all sessions:
/// 150 peers each announcing a 10 MiB frame and sending it slowly must
/// not cost 1.5 GB.
#[derive(Debug)]
pub struct PartialBudget {
    /// Bytes held now.
    used: AtomicUsize,
    /// The bound.
    limit: usize,
}

impl PartialBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<PartialBudget> {
        Arc::new(PartialBudget {
            used: AtomicUsize::new(0),
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
        let (pool_idle, pool_limit) = frame::pool_idle();
        serde_json::json!({
            "partial_frame_bytes": self.used(),
            "partial_frame_limit": self.limit,
            "frame_pool_idle_bytes": pool_idle,
            "frame_pool_idle_limit": pool_limit,
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

/// What the reader is bounded by.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// A frame must be complete this long after its first byte arrived.
    pub frame_timeout: Duration,
    /// Bytes buffered for incomplete large frames, all sessions together.
    pub partial: Arc<PartialBudget>,
}

/// One complete frame, as the reader found it.
pub enum Frame<'a> {
    /// A large frame (header included), split off the read buffer and
    /// kept as it is: no copy.
    Owned(Bytes),
    /// A small frame's payload, borrowed from the read buffer (whoever
    /// keeps it copies it, so a kept message never pins the buffer).
    Borrowed(&'a [u8]),
}

/// The session is closing while the reader waited.
#[derive(Debug)]
pub struct Closing;

/// How the reader reads on after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Nothing waited: read as much as the socket has (up to the grown
    /// read size).
    Free,
    /// The session waited for room somewhere (a full receiver, or its
    /// own outbox): the sender outpaces what it sends to, and its
    /// process is blocked in a write. The reader reads in steps of
    /// [`HELD_READ`] meanwhile: after each wait the session routes the
    /// rest of its read past the bound (so every waiting sender gets
    /// through each time room comes, see `Full::Force`) and reads again,
    /// so the sender's socket gets room at every turn (a client that
    /// gives up a write held for a second loses that message) and the
    /// overrun stays within one step per waiting sender.
    Held,
}

/// What the reader hands frames to. Every method may wait (the session
/// waits out a full receiver there); meanwhile nothing more is read.
pub trait FrameHandler {
    /// One complete frame, in arrival order.
    async fn frame(&mut self, frame: Frame<'_>) -> Result<(), Closing>;
    /// Every complete frame read so far was handed over: finish what was
    /// batched, and wait if the session must not read more yet.
    async fn caught_up(&mut self) -> Result<Pace, Closing>;
    /// The connection is closing for `code`: tell the peer why.
    fn farewell(&mut self, code: ErrorCode, detail: String);
}

/// Why the reader stopped (its fields are shown by the debug log).
#[derive(Debug)]
#[allow(dead_code)]
pub enum ReadEnd {
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
    /// The peer takes no more writes and everything it had sent was read.
    PeerGone,
}

/// Read buffer sizes: a session starts small and grows while its reads
/// fill the buffer, up to the largest; an idle session keeps none.
const READ_MIN: usize = 1024;
const READ_MAX: usize = 64 * 1024;
/// The read size after a wait (see [`Pace::Held`]): what a held sender
/// may route past a full receiver's bound each time room comes.
const HELD_READ: usize = 16 * 1024;
/// Frames at least this large are read into (or copied into) a pooled
/// buffer of their own and kept there (see [`frame::pool_take`]);
/// smaller ones are borrowed from the read buffer.
const LARGE_FRAME: usize = frame::POOLED_MIN;
/// After a frame at least this large, the next read goes straight into a
/// pooled buffer of its size (one read per frame, no copy).
const SPECULATE_MIN: usize = 32 * 1024;
/// How long a session must be quiet before its read buffer is released.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// Reads frames until the peer closes, the stream fails, or the writer
/// ended `closing`, handing each to `handler`. Once it ended `peer_gone` (the peer
/// takes no more writes) it reads on only while the socket holds what
/// the peer sent before: a peer that wrote and closed at once (a burst
/// then `close()`, while the bus held it back) still has all of it
/// routed.
pub async fn read_loop(
    rd: OwnedReadHalf,
    limits: &ReadLimits,
    handler: &mut impl FrameHandler,
    writer: &WriterEnd,
) -> ReadEnd {
    let WriterEnd {
        closing, peer_gone, ..
    } = writer;
    let mut buf = BytesMut::new();
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
    let mut large: Option<Vec<u8>> = None;
    // The size of the last frame when it was large (the next read goes
    // straight into a pooled buffer of that size), else 0.
    let mut last_large = 0usize;
    loop {
        let mut handled = false;
        // A large frame read into its own buffer: complete, or found not
        // to be one for such a buffer (its bytes then go to `buf`).
        if let Some(l) = &mut large {
            match frame::announced(l) {
                None => {}
                Some(total) if !(4 + LARGE_FRAME..=frame::POOLED_MAX).contains(&total) => {
                    buf.extend_from_slice(l);
                    last_large = 0;
                    if let Some(l) = large.take() {
                        frame::pool_give(l);
                    }
                }
                Some(total) if l.len() >= total => {
                    if let Some(mut l) = large.take() {
                        buf.extend_from_slice(&l[total..]);
                        l.truncate(total);
                        last_large = if total >= SPECULATE_MIN { total } else { 0 };
                        let frame = frame::pooled_bytes(l);
                        if handler.frame(Frame::Owned(frame)).await.is_err() {
                            return ReadEnd::WriterDone;
                        }
                        handled = true;
                    }
                }
                Some(total) if total > l.capacity() => {
                    let mut b = frame::pool_take(total);
                    b.extend_from_slice(l);
                    frame::pool_give(std::mem::replace(l, b));
                }
                Some(_) => {}
            }
        }
        // Every complete frame, straight from the buffer: a large one is
        // copied into a pooled buffer (the read buffer stays this
        // session's alone, never reallocated), a huge one split off. A
        // frame the session waits on is waited out here, before the next
        // is handed over: nothing more is read from this sender meanwhile.
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
                    if handler.frame(Frame::Owned(frame)).await.is_err() {
                        return ReadEnd::WriterDone;
                    }
                    handled = true;
                }
                Ok(Some(len)) => {
                    let payload = &buf[used + 4..used + 4 + len];
                    used += 4 + len;
                    last_large = 0;
                    if handler.frame(Frame::Borrowed(payload)).await.is_err() {
                        return ReadEnd::WriterDone;
                    }
                    handled = true;
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = handler.caught_up().await;
                    handler.farewell(
                        ErrorCode::FrameTooLarge,
                        format!("{e}; closing the connection"),
                    );
                    return ReadEnd::Desync(e);
                }
            }
        }
        buf.advance(used);
        match handler.caught_up().await {
            Err(Closing) => return ReadEnd::WriterDone,
            Ok(Pace::Held) => want = HELD_READ,
            Ok(Pace::Free) => {}
        }
        // An incomplete large frame is read on into a buffer of its own.
        if large.is_none() {
            if let Some(total) = frame::announced(&buf) {
                if (4 + LARGE_FRAME..=frame::POOLED_MAX).contains(&total) {
                    let mut b = frame::pool_take(total);
                    b.extend_from_slice(&buf);
                    large = Some(b);
                    buf.clear();
                }
            }
        }
        // Bytes left now are an incomplete frame: it has a deadline,
        // counted from when it began (the last frame completed, or its
        // first byte), never across a wait of ours.
        let partial = !buf.is_empty() || large.as_ref().is_some_and(|l| !l.is_empty());
        if !partial {
            partial_since = None;
        } else if handled || partial_since.is_none() {
            partial_since = Some(tokio::time::Instant::now());
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
        let gone = peer_gone.is_cancelled();
        tokio::select! {
            r = rd.readable() => if let Err(e) = r { return ReadEnd::Io(e) },
            _ = closing.cancelled() => return ReadEnd::WriterDone,
            // The peer went: read what is left (below), then end.
            _ = peer_gone.cancelled(), if !gone => {}
            _ = until(frame_deadline) => {
                handler.farewell(ErrorCode::FrameTimeout, format!(
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
            large = Some(frame::pool_take(last_large));
        }
        if let Some(l) = &mut large {
            // Up to the end of the frame, never past it (or, before its
            // header is in, as much as the last large frame).
            let end = frame::announced(l)
                .unwrap_or(last_large.max(4))
                .min(l.capacity());
            let asked = end - l.len();
            let held = if asked > READ_MAX { l.capacity() } else { 0 };
            if !charge.set(held) {
                handler.farewell(ErrorCode::Overloaded, overloaded(limits));
                return ReadEnd::Overloaded;
            }
            match rd.try_read_buf(&mut (&mut *l).limit(asked)) {
                Ok(0) => return ReadEnd::Eof,
                Ok(n) => drained = n < asked,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if peer_gone.is_cancelled() {
                        return ReadEnd::PeerGone;
                    }
                    if l.is_empty() {
                        if let Some(l) = large.take() {
                            frame::pool_give(l);
                        }
                    }
                }
                Err(e) => return ReadEnd::Io(e),
            }
            continue;
        }
        // Room for what is announced (a partial frame) or the usual read.
        let need = frame::announced(&buf).map_or(0, |total| total.saturating_sub(buf.len()));
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
            handler.farewell(ErrorCode::Overloaded, overloaded(limits));
            return ReadEnd::Overloaded;
        }
        // At most `room`: a grown buffer keeps its capacity, and a held
        // session reads small steps (see [`Pace::Held`]).
        let before = (buf.capacity() - buf.len()).min(room);
        match rd.try_read_buf(&mut (&mut buf).limit(before)) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) => {
                drained = n < before;
                if n == before {
                    want = (want * 2).min(READ_MAX);
                } else if n < want / 4 {
                    want = (want / 2).max(READ_MIN);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if peer_gone.is_cancelled() {
                    return ReadEnd::PeerGone;
                }
            }
            Err(e) => return ReadEnd::Io(e),
        }
    }
}

/// The farewell detail when the bound on incomplete frames is reached.
fn overloaded(limits: &ReadLimits) -> String {
    format!(
        "the bus holds {} bytes of incomplete frames, its bound; closing the connection",
        limits.partial.used()
    )
}

/// How long a closed session's writer may still take to write its last
/// frames (its farewell included) to a peer that does not read them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Most frames per vectored write.
const MAX_IOV: usize = 256;

/// The writer's view of its session: what it learns in order from the
/// outbox.
struct WireState {
    /// The session's wire form (switched by a codec delivery).
    codec: Codec,
    /// Whether topic messages go with their number (switched by a
    /// numbering delivery: a `subscribe` with `"seq"`).
    seq: bool,
    /// Set once the `registered` reply went by: keepalives go only to
    /// registered sessions.
    registered: bool,
}

impl WireState {
    /// Takes a batch fresh from the outbox: applies the codec and
    /// numbering switches in order (taking them out: they write as
    /// nothing) and puts each delivery in the wire form then in force. Returns the items and
    /// bytes of the switches taken (done, for the outbox's count).
    fn prepare(&mut self, pending: &mut VecDeque<Delivery>) -> (usize, usize) {
        let mut switches = (0, 0);
        pending.retain_mut(|d| {
            if let Some(codec) = d.codec_switch() {
                self.codec = codec;
                switches.0 += 1;
                switches.1 += d.charge();
                return false;
            }
            if let Some(on) = d.numbering_switch() {
                self.seq = on;
                switches.0 += 1;
                switches.1 += d.charge();
                return false;
            }
            if matches!(d.as_notice(), Some(Notice::Registered { .. })) {
                self.registered = true;
            }
            if self.seq {
                *d = std::mem::replace(d, Delivery::codec(Codec::Json)).to_numbered(self.codec);
            } else if self.codec == Codec::MsgPack {
                *d = std::mem::replace(d, Delivery::codec(Codec::Json)).to_msgpack();
            }
            true
        });
        switches
    }
}

/// How a session's writer tells the rest of the session that it ended.
#[derive(Debug, Clone, Default)]
pub struct WriterEnd {
    /// Fires when the writer ended, however it ended.
    pub done: CancellationToken,
    /// Fires when it ended because its outbox closed (replaced, evicted,
    /// disconnected as slow, shutdown) or it was told to stop: the reader
    /// stops too, and every wait of the session ends.
    pub closing: CancellationToken,
    /// Fires when it ended because the socket failed (the peer closed, or
    /// stopped reading for good): the reader still routes what the peer
    /// sent before it went (see [`read_loop`]), waits included.
    pub peer_gone: CancellationToken,
}

/// The writer: drains the outbox with vectored writes until it is closed
/// and empty, the socket fails, or `stop` fires; says which through `end`.
/// Returns what it could not write (in its shared form, to be held for
/// the session's name).
pub async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut outbox: OutboxReader,
    keepalive: Duration,
    stop: CancellationToken,
    end: WriterEnd,
) -> VecDeque<Delivery> {
    let mut state = WireState {
        codec: Codec::Json,
        seq: false,
        registered: false,
    };
    let mut pending: VecDeque<Delivery> = VecDeque::new();
    // Bytes of `pending[0]` already written.
    let mut offset = 0usize;
    // Set once the outbox closed: the writer ends by then.
    let mut deadline: Option<tokio::time::Instant> = None;
    // Whether the socket failed.
    let mut failed = false;
    loop {
        if pending.is_empty() {
            offset = 0;
            if pending.capacity() > 1024 {
                // A burst is over: an idle session keeps no big queue.
                pending = VecDeque::new();
            }
            let quiet = async {
                if keepalive.is_zero() {
                    std::future::pending::<()>().await;
                } else {
                    tokio::time::sleep(keepalive).await;
                }
            };
            tokio::select! {
                more = outbox.recv_batch(&mut pending) => if !more { break; },
                _ = stop.cancelled() => break,
                _ = quiet => {
                    if state.registered {
                        let _ = outbox
                            .outbox()
                            .push_forced(Delivery::notice(Notice::Pong { keepalive: true }));
                    }
                    continue;
                }
            }
            let (items, bytes) = state.prepare(&mut pending);
            if items > 0 {
                outbox.written(items, bytes);
            }
            if pending.is_empty() {
                continue;
            }
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
            Ok(0) | Err(_) => {
                failed = true;
                break;
            }
            Ok(mut n) => {
                let (mut items, mut bytes) = (0, 0);
                // Pops what was written whole.
                while let Some(first) = pending.front() {
                    let left = first.unix_frame().len() - offset;
                    if n < left {
                        offset += n;
                        break;
                    }
                    n -= left;
                    offset = 0;
                    if let Some(d) = pending.pop_front() {
                        items += 1;
                        bytes += d.charge();
                        // Dropping the last copy of a delivery sends its
                        // sender's receipt, if it asked for one.
                        drop(d);
                    }
                }
                // Any write is progress (the slow-consumer clock).
                outbox.written(items, bytes);
                if pending.is_empty() {
                    outbox.try_recv_batch(&mut pending);
                    let (switched, switch_bytes) = state.prepare(&mut pending);
                    if switched > 0 {
                        outbox.written(switched, switch_bytes);
                    }
                }
            }
        }
    }
    let _ = wr.shutdown().await;
    // Whatever is still queued was never written either.
    while outbox.try_recv_batch(&mut pending) > 0 {}
    let bytes = pending.iter().map(Delivery::charge).sum();
    outbox.forget(pending.len(), bytes);
    if failed {
        end.peer_gone.cancel();
    } else {
        end.closing.cancel();
    }
    end.done.cancel();
    // Given back in their shared form, to be held for the name.
    pending.into_iter().map(Delivery::into_original).collect()
}

/// Waits until `deadline`, or for ever when there is none.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
