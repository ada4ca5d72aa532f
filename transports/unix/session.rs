//! One connection of the Unix-socket transport: its I/O (`conn`)
//! joined to the bus by its commands ([`super::command`]).
//!
//! Frames are decoded into messages and then into commands. Traffic
//! (`message`, `publish`) is batched and routed many items under one
//! router lock ([`Bus::submit`]); a target that is full makes this
//! session wait (nothing more is read from its peer) until it drains.
//! Requests are answered at once. Replies count against the session's
//! own outbox: a peer that does not read its replies is not read from
//! either, until it does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Codec, MSGPACK_MARKER};
use crate::delivery::Delivery;
use crate::error::{ErrorCode, ProtocolError};
use crate::message::BusMessage;
use crate::notice::Notice;
use crate::outbox::Outbox;
use crate::router::snapshot::{Snapshot, SnapshotStep};
use crate::router::{Full, SessionId};
use crate::transport::{Bus, Inbound};

use super::command::{Command, Refused};
use super::conn::{self, Closing, Frame, FrameHandler, Pace, ReadLimits, WriterEnd};

pub use super::conn::PartialBudget;

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

/// Serves one connection until it ends.
pub async fn run(bus: Bus, stream: UnixStream, limits: Arc<SessionLimits>) {
    let (sid, outbox) = bus.connect(TRANSPORT);
    let own = outbox.outbox();
    let (rd, wr) = stream.into_split();
    let writer_stop = CancellationToken::new();
    let writer_end = WriterEnd::default();
    let writer = tokio::spawn(conn::write_loop(
        wr,
        outbox,
        limits.keepalive,
        writer_stop.clone(),
        writer_end.clone(),
    ));

    let mut session = Session {
        bus: &bus,
        sid,
        own: &own,
        writer: &writer_end,
        codec: Codec::Json,
        batch: Vec::new(),
        max_depth: limits.max_depth,
        waited: false,
        had_turn: false,
    };
    let read_limits = ReadLimits {
        max_frame: limits.max_frame,
        frame_timeout: limits.frame_timeout,
        partial: limits.partial.clone(),
    };
    let end = conn::read_loop(rd, &read_limits, &mut session, &writer_end).await;
    tracing::debug!(sid, ?end, "session reader ended");

    if writer_end.peer_gone.is_cancelled() {
        // The writer failed and ended with what it could not write: it
        // goes back with the session's queue, in one step.
        let unsent = writer.await.unwrap_or_default();
        bus.detach_with(sid, unsent);
        return;
    }

    // Anything still routed to this session's name now waits in the
    // router for the name to come back; replies already queued still go
    // out if the peer is listening (e.g. it only half-closed).
    let held_name = bus.detach(sid);
    if tokio::time::timeout(limits.drain_timeout, writer_end.done.cancelled())
        .await
        .is_err()
    {
        writer_stop.cancel();
    }
    if let Ok(unsent) = writer.await {
        bus.give_back(held_name.as_deref(), unsent);
    }
}

/// Most items routed under one router lock.
const ROUTE_BATCH: usize = 64;

/// One session's side of the bus: what the reader's frames turn into.
struct Session<'a> {
    /// The bus.
    bus: &'a Bus,
    /// This session.
    sid: SessionId,
    /// This session's own outbox: when it is over its bound (the peer
    /// does not read what it is sent, replies included) the reader stops
    /// reading requests until it drains.
    own: &'a Outbox,
    /// How the writer ended, once it did: `closing` (the session is
    /// closing) ends every wait; `peer_gone` (the peer takes no more
    /// writes) ends only a wait for the session's own outbox to drain (its
    /// replies cannot go out), while what the peer sent before still
    /// routes.
    writer: &'a WriterEnd,
    /// The session's wire form, as its `register` asked (the writer learns
    /// it in order, through the outbox).
    codec: Codec,
    /// Traffic decoded and waiting to be routed together.
    batch: Vec<Inbound>,
    /// Deepest nesting accepted.
    max_depth: usize,
    /// Whether this session waited (on a full target, or on its own
    /// outbox) since the reader last caught up: the reader then reads in
    /// small steps, see [`Pace`].
    waited: bool,
    /// Whether it waited its turn on a full target since the reader last
    /// caught up: the rest of that read then goes past full targets
    /// (`Full::Force`). A wait for its own outbox earns no such turn.
    had_turn: bool,
}

impl FrameHandler for Session<'_> {
    async fn frame(&mut self, frame: Frame<'_>) -> Result<(), Closing> {
        let decoded = match frame {
            Frame::Owned(frame) if frame.get(4) == Some(&MSGPACK_MARKER) => {
                parse_msgpack(&frame[4..], self.max_depth)
            }
            Frame::Owned(frame) => BusMessage::parse_frame_limited(frame, self.max_depth),
            Frame::Borrowed(payload) if payload.first() == Some(&MSGPACK_MARKER) => {
                parse_msgpack(payload, self.max_depth)
            }
            Frame::Borrowed(payload) => BusMessage::parse_limited(payload, self.max_depth),
        };
        let command = decoded
            .map_err(|error| Refused { error, id: None })
            .and_then(Command::parse);
        match command {
            Ok(Command::Route(item)) => {
                self.batch.push(item);
                if self.batch.len() >= ROUTE_BATCH {
                    self.flush().await?;
                }
                Ok(())
            }
            Ok(Command::Request(request, id)) => {
                // Everything before it takes effect first.
                self.flush().await?;
                self.bus.touch(self.sid);
                let costly = request.is_costly();
                match request.apply(self.bus, self.sid, &mut self.codec) {
                    Ok(None) => {}
                    Ok(Some(snap)) => self.snapshot(snap).await?,
                    Err(error) => self.refuse(Refused { error, id }),
                }
                if costly {
                    // Let the worker serve others before the next one.
                    tokio::task::yield_now().await;
                }
                self.own_room().await
            }
            Err(refused) => {
                self.flush().await?;
                self.bus.touch(self.sid);
                self.refuse(refused);
                self.own_room().await
            }
        }
    }

    async fn caught_up(&mut self) -> Result<Pace, Closing> {
        self.flush().await?;
        // A peer that does not read what it is sent (its replies
        // included) is not read from either, until its outbox drains.
        if self.own.over_bound() {
            self.wait_own_room().await?;
        }
        self.had_turn = false;
        Ok(if std::mem::take(&mut self.waited) {
            Pace::Held
        } else {
            Pace::Free
        })
    }

    fn farewell(&mut self, code: ErrorCode, detail: String) {
        let err = ProtocolError::new(code, detail);
        tracing::warn!(sid = self.sid, "{err}");
        self.bus
            .reply(self.sid, Delivery::notice(Notice::error(err, None)), true);
    }
}

impl Session<'_> {
    /// Routes what the batch holds, waiting out every full target in order.
    async fn flush(&mut self) -> Result<(), Closing> {
        // Once this session waited its turn, the rest of what it read goes
        // through without waiting again (see `Full::Force`).
        loop {
            let full = if self.had_turn {
                Full::Force
            } else {
                Full::Wait
            };
            let Some(blocked) = self.bus.submit(TRANSPORT, self.sid, &mut self.batch, full) else {
                break;
            };
            self.waited = true;
            self.had_turn = true;
            if !self.bus.settle(blocked, &self.writer.closing).await {
                return Err(Closing);
            }
        }
        Ok(())
    }

    /// Sends a snapshot of kept values a chunk at a time (one router lock
    /// each, yielding between them, waiting while this session's outbox is
    /// full), then answers the subscribe with how many were sent.
    async fn snapshot(&mut self, mut snap: Snapshot) -> Result<(), Closing> {
        loop {
            match self.bus.snapshot_chunk(self.sid, &mut snap) {
                SnapshotStep::Done => break,
                SnapshotStep::More => tokio::task::yield_now().await,
                SnapshotStep::Full if self.own.over_bound() => self.wait_own_room().await?,
                // Full for the shared byte budget: look again shortly.
                SnapshotStep::Full => {
                    if self.writer.done.is_cancelled() {
                        return Err(Closing);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let notice = Notice::Subscription {
            topic: snap.prefix().to_owned(),
            subscribed: true,
            snapshot: Some(snap.sent),
        };
        self.bus.reply(self.sid, Delivery::notice(notice), false);
        Ok(())
    }

    /// Answers a refused frame with its error.
    fn refuse(&self, refused: Refused) {
        let Refused { error, id } = refused;
        tracing::debug!(sid = self.sid, code = %error.code, detail = %error.detail, "protocol error");
        self.bus
            .reply(self.sid, Delivery::notice(Notice::error(error, id)), true);
    }

    /// After a reply: a peer that does not read its replies is not read
    /// from either, until its outbox drains. Requests also take a share of
    /// the task budget, so a peer sending many costly ones yields its
    /// worker to others between them.
    async fn own_room(&mut self) -> Result<(), Closing> {
        tokio::task::consume_budget().await;
        if self.own.over_bound() {
            self.wait_own_room().await
        } else {
            Ok(())
        }
    }

    /// Waits until this session's own outbox drained below its low-water
    /// mark (or the session closes).
    async fn wait_own_room(&mut self) -> Result<(), Closing> {
        self.waited = true;
        let started = Instant::now();
        self.bus.begin_own_wait();
        let result = loop {
            if !self.own.over_bound() || self.own.has_room() {
                break Ok(());
            }
            if self.own.is_closed() {
                break Err(Closing);
            }
            tokio::select! {
                _ = self.own.room() => {}
                _ = self.writer.done.cancelled() => break Err(Closing),
            }
        };
        self.bus.end_wait(started.elapsed());
        result
    }
}

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
