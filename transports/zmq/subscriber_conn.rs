//! One subscriber connection of the proxy (its XPUB side, or the capture
//! PUB side): the read loop that applies its subscription changes to the
//! hub, and the writer that drains its queue to the socket in batches,
//! recording progress (what tells a slow subscriber from a stuck one).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio_util::sync::CancellationToken;

use super::conn::{accept, beat_counters, note_end, read_more, Shared};
use super::dial::Dialed;
use super::endpoint::{ReadHalf, Stream, WriteHalf};
use super::heartbeat_task::{control_queue, Beat};
use super::hub::{PeerSubs, Side, SubPeer};
use super::proxy::LastValueReplay;
use super::queue::WireQueue;
use super::replay::Step;
use super::stats::ProxyStats;
use super::zmtp::{FrameReader, Inbound, SocketType, SubChange, ZmtpError};

/// Most items a subscriber's writer takes per batch (the batch counts as
/// outstanding until written, so it must be small next to the queue).
const WRITE_BATCH_ITEMS: usize = 256;
/// Most bytes a writer takes per batch (at least one item).
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// Prefixes a disconnecting subscriber's cleanup removes per lock taken
/// (it yields between chunks, so a peer with many prefixes never holds
/// the index or the runtime for long).
const CLEANUP_CHUNK: usize = 256;
/// Unsent bytes a lossless-mode subscriber's TCP socket holds at most
/// before it stops accepting writes (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: usize = 128 * 1024;

/// Serves one subscriber-like connection until it ends or `shutdown`.
pub(super) async fn subscriber_conn(
    sh: Arc<Shared>,
    stream: Stream,
    side: Side,
    shutdown: CancellationToken,
) {
    let hub = &sh.hub;
    let c = hub.counters(side);
    if hub.cfg.lossless && side == Side::Backend {
        limit_unsent(&stream);
    }
    let ours = match side {
        Side::Backend => SocketType::XPub,
        Side::Capture => SocketType::Pub,
    };
    // Subscribers send only subscriptions: a small limit is plenty.
    let max_msg = hub.cfg.max_msg_size.min(1 << 20);
    let Some(Dialed {
        mut r,
        w,
        mut reader,
        info,
    }) = accept(hub, c, stream, ours, max_msg).await
    else {
        return;
    };
    let peer = SubPeer::new(
        hub.cfg.sub_queue,
        hub.cfg.sub_queue_bytes,
        info.wants_msgpack(),
        info.wants_seq(),
        side,
    );
    // Conflation is for the XPUB side; the capture copy keeps every one.
    let peer = Arc::new(
        if side == Side::Backend && hub.cfg.slow_policy == crate::router::SlowPolicy::Conflate {
            peer.conflating()
        } else {
            peer
        },
    );
    // Heartbeats go ahead of the queued messages (as libzmq's do), so a
    // backlog never delays a PONG or our PING.
    let control = control_queue();
    let beat = Beat::new(&hub.cfg.heartbeat, true, control.clone());
    // Last values go to XPUB subscribers (the capture side is a copy of
    // the traffic, not of its state) that asked, or did not decline them
    // when the proxy replays to all.
    let replay = side == Side::Backend
        && hub.cfg.last_value.is_some()
        && info
            .last_value()
            .unwrap_or(hub.cfg.last_value_replay == LastValueReplay::All);
    let conn_done = shutdown.child_token();
    let writer = tokio::spawn(writer_task(
        w,
        peer.clone(),
        control.clone(),
        hub.stats.clone(),
        conn_done.clone(),
    ));
    let mut subs = PeerSubs::default();
    let res = tokio::select! {
        r = subscriber_read_loop(&sh, &mut subs, &mut r, &mut reader, &peer, &beat, replay, &conn_done) => r,
        why = beat.run(beat_counters(c)) => Err(ZmtpError::HeartbeatExpired(why)),
    };
    if let Err(e) = res {
        note_end(c, &e);
    }
    drop_subs(&sh, &peer, subs).await;
    peer.queue.close(true);
    conn_done.cancel();
    let _ = writer.await;
}

/// Removes every subscription of a leaving peer, a chunk per lock taken,
/// yielding between chunks.
async fn drop_subs(sh: &Shared, peer: &Arc<SubPeer>, subs: PeerSubs) {
    let all = sh.hub.peer_left(subs);
    for chunk in all.chunks(CLEANUP_CHUNK) {
        sh.upstream(sh.hub.remove_prefixes(peer, chunk));
        if all.len() > CLEANUP_CHUNK {
            tokio::task::yield_now().await;
        }
    }
}

// The connection's parts, each borrowed as the loop needs it.
#[allow(clippy::too_many_arguments)]
async fn subscriber_read_loop(
    sh: &Shared,
    subs: &mut PeerSubs,
    r: &mut ReadHalf,
    reader: &mut FrameReader,
    peer: &Arc<SubPeer>,
    beat: &Beat,
    replay: bool,
    done: &CancellationToken,
) -> Result<(), ZmtpError> {
    let hub = &sh.hub;
    let c = hub.counters(peer.side);
    let idle_at = tokio::time::Instant::now() + hub.cfg.idle_timeout;
    loop {
        while let Some(item) = reader.next_item()? {
            if let Some(change) = SubChange::from_inbound(&item) {
                let applied = hub.apply_sub_change(peer, subs, change);
                sh.upstream(applied.upstream);
                if let (true, Some(prefix)) = (replay, applied.added) {
                    replay_last_values(sh, peer, subs, prefix, done).await;
                }
                // A storm of changes shares the runtime with everyone.
                tokio::task::consume_budget().await;
                continue;
            }
            match item {
                Inbound::Ping(p) => beat.on_ping(&p, beat_counters(c)),
                Inbound::Pong(_) => beat.on_pong(beat_counters(c)),
                Inbound::Command(..) => {}
                _ => {
                    c.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let deadline = (!subs.active).then_some(idle_at);
        if !read_more(sh, reader, r, done, deadline).await? {
            return Ok(());
        }
        beat.received();
    }
}

/// Replays the cached last values matching `prefix` (newly held by
/// `peer`) to `peer`, a chunk per cache lock, yielding between chunks;
/// waits for room while its queue is full and it makes progress (drops
/// and counts once it is stuck). Ends early when the connection does.
async fn replay_last_values(
    sh: &Shared,
    peer: &Arc<SubPeer>,
    subs: &PeerSubs,
    prefix: bytes::Bytes,
    done: &CancellationToken,
) {
    let hub = &sh.hub;
    let Some(mut r) = hub.replay_start(prefix) else {
        return;
    };
    loop {
        match hub.replay_chunk(peer, subs, &mut r, Instant::now()) {
            Step::Done => return,
            Step::More => tokio::task::yield_now().await,
            Step::Full => match hub.patience_left(peer, Instant::now()) {
                None => r.drop_when_full = true,
                Some(left) => {
                    tokio::select! {
                        _ = done.cancelled() => return,
                        _ = tokio::time::timeout(left, peer.queue.wait_room(1)) => {}
                    }
                }
            },
        }
    }
}

/// Makes a TCP socket accept writes only while its unsent data is small,
/// so that "the socket accepted bytes" (the writer's progress) follows the
/// subscriber's reading closely instead of the kernel's buffers, which
/// can hold megabytes and wake the writer only after a large part of them
/// drained (a slow but healthy reader would then look stuck). A failure
/// only makes the progress signal coarser, so it is logged, not fatal.
fn limit_unsent(stream: &Stream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Stream::Tcp(s) = stream {
        use std::os::fd::AsRawFd;
        let v = libc::c_int::try_from(NOTSENT_LOWAT).unwrap_or(libc::c_int::MAX);
        // SAFETY: the fd is a TCP socket owned by `s`, open for the whole
        // call; the option value is a c_int living across the call and its
        // exact size is passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                std::ptr::addr_of!(v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "zmq proxy: TCP_NOTSENT_LOWAT not set");
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// A socket that records on its peer's queue every time it accepts bytes:
/// the writer's progress, which tells a slow subscriber from a stuck one.
struct ProgressWriter {
    /// The socket.
    inner: WriteHalf,
    /// Whose progress it is.
    peer: Arc<SubPeer>,
}

impl AsyncWrite for ProgressWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.peer.queue.note_progress();
            }
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.peer.queue.note_progress();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes a subscriber's queued wire bytes in bounded batches (one lock
/// to take a batch and one to report it written, many messages per write
/// syscall, flush when the queue is empty), counting messages and wire
/// bytes per batch on its side's counters. A batch stays outstanding in
/// the queue until written, and every write the socket accepts is
/// recorded as progress. Heartbeats in `control` go out first, outside
/// the counts. Ends on write error, on `done`, or when the queue closes.
async fn writer_task(
    w: WriteHalf,
    peer: Arc<SubPeer>,
    control: Arc<WireQueue>,
    stats: Arc<ProxyStats>,
    done: CancellationToken,
) {
    let c = match peer.side {
        Side::Backend => &stats.subscribers,
        Side::Capture => &stats.capture,
    };
    let mut w = BufWriter::with_capacity(
        64 * 1024,
        ProgressWriter {
            inner: w,
            peer: peer.clone(),
        },
    );
    let q = &peer.queue;
    let mut batch = VecDeque::new();
    let mut beats = VecDeque::new();
    loop {
        let (mut msgs, mut bytes) = (0u64, 0u64);
        if q.is_empty() && control.is_empty() {
            if w.flush().await.is_err() {
                break;
            }
            let ready = tokio::select! {
                _ = done.cancelled() => false,
                r = q.wait() => r,
                r = control.wait() => r,
            };
            if !ready {
                break;
            }
        }
        if !control.is_empty() {
            control.take_all(&mut beats);
            let mut failed = false;
            for item in beats.drain(..) {
                if write_item(&mut w, &item).await.is_err() {
                    failed = true;
                    break;
                }
            }
            // Sent now, not after the next batch of messages.
            if failed || w.flush().await.is_err() {
                break;
            }
        }
        let (taken, taken_bytes) = q.take_batch(&mut batch, WRITE_BATCH_ITEMS, WRITE_BATCH_BYTES);
        let mut failed = false;
        for item in batch.drain(..) {
            if write_item(&mut w, &item).await.is_err() {
                failed = true;
                break;
            }
            msgs += 1;
            bytes += item.len() as u64;
        }
        // All of it leaves the outstanding count, written or (on failure)
        // about to be discarded with the queue.
        q.written(taken, taken_bytes);
        c.messages.fetch_add(msgs, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        if failed {
            break;
        }
    }
    q.close(true);
    control.close(true);
    let _ = tokio::time::timeout(Duration::from_millis(200), w.shutdown()).await;
}

async fn write_item<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    item: &Bytes,
) -> std::io::Result<()> {
    w.write_all(item).await
}
