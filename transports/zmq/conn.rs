//! What the proxy's connection tasks share: the hub and the router sink
//! behind one handle, the wake-up of publisher writers, and the helpers
//! both connection kinds use.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::dial::Dialed;
use super::endpoint::{ReadHalf, Stream};

use super::heartbeat_task::{beat_counters_of, BeatCounters};
use super::hub::Hub;
use super::proxy::EnvelopeSink;
use super::stats::SideCounters;
use super::zmtp::{self, FrameReader, SocketType, ZmtpError};

/// State shared by all connection tasks of one proxy.
pub(super) struct Shared {
    /// Subscriptions, upstream log, fan-out, limits and counters.
    pub(super) hub: Hub,
    /// The router bridge, when the proxy runs inside the bus.
    pub(super) sink: Option<Arc<dyn EnvelopeSink>>,
    /// Wakes idle publisher writers when the upstream log grew.
    pub(super) upstream_changed: Notify,
}

impl Shared {
    /// Wakes the publishers' writers when the hub said the upstream
    /// changed.
    pub(super) fn upstream(&self, changed: bool) {
        if changed {
            self.upstream_changed.notify_waiters();
        }
    }
}

/// Properties our proxy sides announce in READY: we accept MessagePack,
/// and we take and pass numbered envelopes (`sequence.rs`).
const PROXY_PROPS: &[(&str, &[u8])] = &[
    (zmtp::CODEC_PROPERTY, b"msgpack"),
    (zmtp::SEQ_PROPERTY, b"1"),
];

/// The proxy's side of the ZMTP handshake of an accepted `stream`, as
/// `ours`, with our READY properties and the handshake time limit, reading
/// messages up to `max_msg` bytes. A failure is counted ([`note_end`]) and
/// ends the connection (None).
pub(super) async fn accept(
    hub: &Hub,
    counters: &SideCounters,
    stream: Stream,
    ours: SocketType,
    max_msg: usize,
) -> Option<Dialed> {
    let (mut r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(max_msg);
    let limit = hub.cfg.handshake_timeout;
    match zmtp::handshake(&mut r, &mut w, &mut reader, ours, PROXY_PROPS, limit).await {
        Ok(info) => Some(Dialed { r, w, reader, info }),
        Err(e) => {
            note_end(counters, &e);
            None
        }
    }
}

/// Counts a connection's end by its cause.
pub(super) fn note_end(counters: &SideCounters, err: &ZmtpError) {
    match err {
        // Counted as `heartbeat_timeouts` where they fire.
        ZmtpError::Io(_) | ZmtpError::Closed | ZmtpError::HeartbeatExpired(_) => {}
        _ => {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    tracing::debug!(error = %err, "zmq proxy: connection ended");
}

/// Where a connection of a side counts its heartbeats.
pub(super) fn beat_counters(c: &SideCounters) -> BeatCounters<'_> {
    beat_counters_of!(c)
}

/// Waits until `deadline`, or forever without one.
async fn idle_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Reads more of a peer's stream into `reader`. `Ok(false)`: stop
/// quietly (shutdown, or a peer that neither subscribed nor published
/// passed its idle deadline: counted as `idle_closed`). The peer closing
/// its end is [`ZmtpError::Closed`].
pub(super) async fn read_more(
    shared: &Shared,
    reader: &mut FrameReader,
    r: &mut ReadHalf,
    done: &CancellationToken,
    idle_at: Option<tokio::time::Instant>,
) -> Result<bool, ZmtpError> {
    let more = tokio::select! {
        _ = done.cancelled() => return Ok(false),
        _ = idle_deadline(idle_at) => {
            shared.hub.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        r = reader.fill(r) => r?,
    };
    if more {
        Ok(true)
    } else {
        Err(ZmtpError::Closed)
    }
}
