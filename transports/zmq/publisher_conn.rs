//! One publisher connection of the proxy (its XSUB side): the read loop
//! that hands every message to the hub (and, for envelopes, to the router
//! sink), the lossless-mode pushback (the read loop stops until full
//! subscribers took the message or were found stuck), and the writer that
//! sends the publisher its upstream subscriptions from the shared log, and
//! pongs.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::conn::{accept, beat_counters, note_end, read_more, Shared};
use super::dial::Dialed;
use super::endpoint::{ReadHalf, Stream, WriteHalf};
use super::heartbeat_task::{control_queue, Beat};
use super::hub::{SubPeer, Waiting};
use super::queue::{Pushed, WireQueue};
use super::sequence;
use super::upstream::UPSTREAM_BATCH_BYTES;
use super::zmtp::{FrameReader, Inbound, RawMessage, SocketType, ZmtpError};
use crate::transports::zmq::envelope;

/// Outcome of waiting for room at one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// Queued, or dropped and counted (stuck or gone).
    Done,
    /// The connection is shutting down.
    Cancelled,
}

/// Serves one publisher connection until it ends or `shutdown`.
pub(super) async fn publisher_conn(sh: Arc<Shared>, stream: Stream, shutdown: CancellationToken) {
    let hub = &sh.hub;
    let c = &hub.stats.publishers;
    let max_msg = hub.cfg.max_msg_size;
    let Some(Dialed {
        mut r,
        w,
        mut reader,
        info,
    }) = accept(hub, c, stream, SocketType::XSub, max_msg).await
    else {
        return;
    };
    // Only a publisher that announced sequence frames has its fifth
    // frames read as numbers; anyone else's messages go out as they came.
    let numbered = info.wants_seq();
    // Only heartbeats (our PINGs, our answers to its PINGs: a few, small)
    // are queued for it; its subscriptions come from the shared upstream
    // log.
    let control = control_queue();
    // Every peer is pinged when the operator turned heartbeats on
    // (libzmq does the same); ours and libzmq's answer.
    let beat = Beat::new(&hub.cfg.heartbeat, true, control.clone());
    let id = hub.join_publisher();
    let conn_done = shutdown.child_token();
    let writer = tokio::spawn(publisher_writer(
        sh.clone(),
        id,
        w,
        control.clone(),
        conn_done.clone(),
    ));
    let res = tokio::select! {
        r = publisher_read_loop(&sh, &mut r, &mut reader, &beat, &conn_done, numbered) => r,
        why = beat.run(beat_counters(c)) => Err(ZmtpError::HeartbeatExpired(why)),
    };
    if let Err(e) = res {
        note_end(c, &e);
    }
    hub.leave_publisher(id);
    control.close(true);
    conn_done.cancel();
    let _ = writer.await;
}

/// Writes to one publisher: the upstream subscription changes it has not
/// been sent (encoded from the shared log in batches of at most
/// `UPSTREAM_BATCH_BYTES`, the only bytes held for it) and heartbeats
/// (PINGs and PONGs, ahead of subscriptions). While
/// the publisher does not read, its cursor stays and nothing is queued
/// for it; the log's tombstones are bounded across all publishers.
async fn publisher_writer(
    sh: Arc<Shared>,
    id: u64,
    mut w: WriteHalf,
    pongs: Arc<WireQueue>,
    done: CancellationToken,
) {
    let mut out = BytesMut::new();
    let mut batch = VecDeque::new();
    loop {
        let changed = sh.upstream_changed.notified();
        tokio::pin!(changed);
        // Registered before looking, so a change after the look wakes us.
        changed.as_mut().enable();
        out.clear();
        pongs.take_all(&mut batch);
        for b in batch.drain(..) {
            out.extend_from_slice(&b);
        }
        sh.hub.take_upstream(id, &mut out, UPSTREAM_BATCH_BYTES);
        if out.is_empty() {
            if out.capacity() > 2 * UPSTREAM_BATCH_BYTES {
                out = BytesMut::new();
            }
            let go = tokio::select! {
                _ = done.cancelled() => false,
                _ = &mut changed => true,
                r = pongs.wait() => r,
            };
            if !go {
                break;
            }
            continue;
        }
        let ok = tokio::select! {
            _ = done.cancelled() => false,
            r = w.write_all(&out) => r.is_ok(),
        };
        if !ok {
            break;
        }
    }
    pongs.close(true);
    let _ = tokio::time::timeout(Duration::from_millis(200), w.shutdown()).await;
}

async fn publisher_read_loop(
    sh: &Shared,
    r: &mut ReadHalf,
    reader: &mut FrameReader,
    beat: &Beat,
    done: &CancellationToken,
    numbered: bool,
) -> Result<(), ZmtpError> {
    let hub = &sh.hub;
    let c = &hub.stats.publishers;
    // Lossless mode: messages full subscribers could not take yet. Empty
    // (no allocation) unless a queue was full.
    let mut waiting: Vec<Waiting> = Vec::new();
    let lossless = hub.cfg.lossless;
    let idle_at = tokio::time::Instant::now() + hub.cfg.idle_timeout;
    let mut active = false;
    loop {
        let (mut n, mut bytes, mut bad, mut big) = (0u64, 0u64, 0u64, 0u64);
        let mut result = Ok(());
        // One clock read per buffer read, for the hub's progress stamps.
        let mut now = Instant::now();
        loop {
            match reader.next_item() {
                Ok(Some(Inbound::Message(m))) => {
                    n += 1;
                    bytes += m.wire.len() as u64;
                    hub.dispatch(&m, now, lossless.then_some(&mut waiting), numbered);
                    if is_envelope(&m, numbered) {
                        if let Some(sink) = &sh.sink {
                            sink.offer(&m);
                        }
                    } else {
                        bad += 1;
                    }
                    // Stop reading this publisher until every full
                    // subscriber took the message (or was found stuck),
                    // so its later messages stay behind it.
                    if !waiting.is_empty() {
                        // Its silence while we do not read it is ours.
                        beat.hold();
                        let waited = deliver_waiting(sh, &mut waiting, done).await;
                        beat.release();
                        if waited == Waited::Cancelled {
                            break;
                        }
                        now = Instant::now();
                    }
                }
                Ok(Some(Inbound::Ping(p))) => beat.on_ping(&p, beat_counters(c)),
                Ok(Some(Inbound::Pong(_))) => beat.on_pong(beat_counters(c)),
                Ok(Some(Inbound::Command(..))) => {}
                Ok(Some(Inbound::Oversized(_))) => big += 1,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if n > 0 || big > 0 {
            active = true;
        }
        if n > 0 {
            c.messages.fetch_add(n, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if bad > 0 {
            c.malformed.fetch_add(bad, Ordering::Relaxed);
        }
        if big > 0 {
            c.drops.fetch_add(big, Ordering::Relaxed);
        }
        result?;
        let deadline = (!active).then_some(idle_at);
        if !read_more(sh, reader, r, done, deadline).await? {
            return Ok(());
        }
        beat.received();
    }
}

/// Whether a message from a publisher is an envelope worth routing: four
/// frames, or five with a sequence frame from a numbering publisher.
fn is_envelope(m: &RawMessage, numbered: bool) -> bool {
    match m.frames {
        4 => m
            .frames_n::<4>()
            .is_some_and(|f| envelope::looks_like_envelope(&f)),
        5 if numbered => m.frames_n::<5>().is_some_and(|[t, o, d, ts, seq]| {
            envelope::looks_like_envelope(&[t, o, d, ts]) && sequence::looks_like_seq_frame(seq)
        }),
        _ => false,
    }
}

/// Lossless mode: delivers each waiting message in order, waiting for
/// room at its subscriber (below the queue's low-water mark) for as long
/// as that subscriber makes progress; drops and counts for a stuck or
/// closed one. Counts the time spent as publisher pushback.
async fn deliver_waiting(
    sh: &Shared,
    waiting: &mut Vec<Waiting>,
    done: &CancellationToken,
) -> Waited {
    let st = &sh.hub.stats;
    let start = Instant::now();
    st.publisher_blocks.fetch_add(1, Ordering::Relaxed);
    let mut res = Waited::Done;
    for (peer, wire) in waiting.drain(..) {
        if res == Waited::Cancelled {
            continue;
        }
        res = wait_and_push(sh, &peer, wire, done).await;
    }
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    st.publisher_blocked_ms.fetch_add(ms, Ordering::Relaxed);
    res
}

/// Pushes `wire` to `peer`, waiting for room while it makes progress.
async fn wait_and_push(
    sh: &Shared,
    peer: &SubPeer,
    wire: Bytes,
    done: &CancellationToken,
) -> Waited {
    let hub = &sh.hub;
    loop {
        match peer.queue.push(wire.clone()) {
            Pushed::Ok => return Waited::Done,
            Pushed::Closed => {
                hub.count_drop(peer);
                return Waited::Done;
            }
            Pushed::Full => {}
        }
        let now = Instant::now();
        let Some(left) = hub.patience_left(peer, now) else {
            hub.stats.stuck_subscribers.fetch_add(1, Ordering::Relaxed);
            hub.count_drop(peer);
            tracing::warn!(
                stalled_ms = peer.queue.stalled_at(now).as_millis() as u64,
                "zmq proxy: subscriber made no progress, dropping for it until it does"
            );
            return Waited::Done;
        };
        tokio::select! {
            _ = done.cancelled() => return Waited::Cancelled,
            // On timeout the loop re-checks progress: a peer that wrote
            // meanwhile gets a fresh timeout.
            _ = tokio::time::timeout(left, peer.queue.wait_room(wire.len())) => {}
        }
    }
}
