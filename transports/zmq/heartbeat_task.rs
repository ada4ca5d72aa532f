//! Heartbeats on a live connection, for the proxy's connection loops and
//! the clients alike: the [`Heartbeat`] state behind a lock, the
//! connection's control queue (our PINGs and PONGs, which its writer sends
//! ahead of queued data, as libzmq does), and [`Beat::run`], the timer that
//! sends PINGs and ends the connection when the peer went silent.
//!
//! The read loop calls [`Beat::received`] once per socket read (not per
//! message), and [`Beat::on_ping`] / [`Beat::on_pong`] for the commands.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::Notify;

use super::heartbeat::{Expired, Heartbeat, HeartbeatConfig};
use super::queue::{Pushed, WireQueue};
use super::zmtp::{self, Ping};

/// Most control items (PINGs, PONGs) queued for one connection: a peer
/// that pings faster than it reads gets its later PONGs dropped (counted).
pub(crate) const CONTROL_QUEUE_ITEMS: usize = 64;
/// Most bytes of them.
pub(crate) const CONTROL_QUEUE_BYTES: usize = 64 * 1024;

/// A fresh control queue for one connection.
pub(crate) fn control_queue() -> Arc<WireQueue> {
    Arc::new(WireQueue::new(CONTROL_QUEUE_ITEMS, CONTROL_QUEUE_BYTES))
}

/// Where a connection counts its heartbeats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BeatCounters<'a> {
    /// PINGs we sent.
    pub(crate) pings_sent: &'a AtomicU64,
    /// PINGs we received (and answered).
    pub(crate) pings_received: &'a AtomicU64,
    /// PONGs we received.
    pub(crate) pongs_received: &'a AtomicU64,
    /// Connections ended by the heartbeat (timeout or the peer's TTL).
    pub(crate) timeouts: &'a AtomicU64,
    /// PONG answers dropped because the control queue was full.
    pub(crate) pongs_dropped: &'a AtomicU64,
}

/// The [`BeatCounters`] of a counters struct declaring the five heartbeat
/// fields (`pings_sent`, `pings_received`, `pongs_received`,
/// `heartbeat_timeouts`, `pongs_dropped`): the publisher's, the
/// receiver's, and each proxy side's.
macro_rules! beat_counters_of {
    ($c:expr) => {{
        let c = $c;
        $crate::transports::zmq::heartbeat_task::BeatCounters {
            pings_sent: &c.pings_sent,
            pings_received: &c.pings_received,
            pongs_received: &c.pongs_received,
            timeouts: &c.heartbeat_timeouts,
            pongs_dropped: &c.pongs_dropped,
        }
    }};
}
pub(crate) use beat_counters_of;

/// The heartbeat of one connection.
#[derive(Debug)]
pub(crate) struct Beat {
    /// The plain state (never locked across an await).
    state: Mutex<Heartbeat>,
    /// Whether received traffic needs recording (heartbeats on, or the
    /// peer asked for a TTL): when false, [`Beat::received`] costs one
    /// relaxed load.
    armed: AtomicBool,
    /// Wakes [`Beat::run`] when the deadlines changed (a peer's TTL, the
    /// end of a hold).
    changed: Notify,
    /// The connection's control queue, drained by its writer first.
    control: Arc<WireQueue>,
    /// The TTL our PINGs carry, in deciseconds.
    ttl_ds: u16,
}

impl Beat {
    /// The heartbeat of a connection whose handshake just finished;
    /// PINGs go out only when `cfg` enables them and `pinging` (the peer
    /// takes them).
    pub(crate) fn new(cfg: &HeartbeatConfig, pinging: bool, control: Arc<WireQueue>) -> Beat {
        let hb = Heartbeat::new(cfg, pinging, Instant::now());
        Beat {
            armed: AtomicBool::new(hb.active()),
            state: Mutex::new(hb),
            changed: Notify::new(),
            control,
            ttl_ds: cfg.ttl_deciseconds(),
        }
    }

    fn state(&self) -> MutexGuard<'_, Heartbeat> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a socket read brought bytes.
    pub(crate) fn received(&self) {
        if self.armed.load(Ordering::Relaxed) {
            self.state().received(Instant::now());
        }
    }

    /// The peer sent a PING: queue the PONG, honour its TTL.
    pub(crate) fn on_ping(&self, ping: &Ping, c: BeatCounters<'_>) {
        c.pings_received.fetch_add(1, Ordering::Relaxed);
        let mut out = BytesMut::with_capacity(8 + ping.context.len());
        zmtp::put_pong(&mut out, ping);
        if self.control.push(out.freeze()) != Pushed::Ok {
            c.pongs_dropped.fetch_add(1, Ordering::Relaxed);
        }
        let changed = {
            let mut st = self.state();
            // The PING is traffic too (and the TTL runs from it, even if
            // the read that brought it was not recorded: not armed yet).
            st.received(Instant::now());
            let changed = st.peer_ttl(ping.ttl());
            self.armed.store(st.active(), Ordering::Relaxed);
            changed
        };
        if changed {
            self.changed.notify_one();
        }
    }

    /// The peer sent a PONG (its liveness came with the read).
    pub(crate) fn on_pong(&self, c: BeatCounters<'_>) {
        c.pongs_received.fetch_add(1, Ordering::Relaxed);
    }

    /// We stop reading the peer for a while (lossless pushback): nothing
    /// expires until [`Beat::release`].
    pub(crate) fn hold(&self) {
        self.state().hold();
    }

    /// We read the peer again.
    pub(crate) fn release(&self) {
        self.state().release(Instant::now());
        self.changed.notify_one();
    }

    /// Sends PINGs when due and returns when the peer has been silent too
    /// long (counted); pends forever when nothing can expire. Run it
    /// beside the connection's read loop and end the connection when it
    /// returns.
    pub(crate) async fn run(&self, c: BeatCounters<'_>) -> Expired {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next = self.state().next_deadline();
            match next {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = &mut changed => continue,
                },
                None => {
                    changed.await;
                    continue;
                }
            }
            let now = Instant::now();
            let mut st = self.state();
            if let Some(why) = st.expired(now) {
                c.timeouts.fetch_add(1, Ordering::Relaxed);
                return why;
            }
            if st.ping_due(now) {
                st.ping_sent(now);
                drop(st);
                let mut out = BytesMut::with_capacity(16);
                zmtp::put_ping(&mut out, self.ttl_ds, b"");
                // A full control queue already holds PINGs or PONGs that
                // will tell the peer we live; this one is not needed.
                if self.control.push(out.freeze()) == Pushed::Ok {
                    c.pings_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transports::zmq::zmtp::{FrameReader, Inbound};

    #[derive(Default)]
    struct Tally {
        pings: AtomicU64,
        pings_in: AtomicU64,
        pongs: AtomicU64,
        timeouts: AtomicU64,
        dropped: AtomicU64,
    }

    impl Tally {
        fn counters(&self) -> BeatCounters<'_> {
            BeatCounters {
                pings_sent: &self.pings,
                pings_received: &self.pings_in,
                pongs_received: &self.pongs,
                timeouts: &self.timeouts,
                pongs_dropped: &self.dropped,
            }
        }
    }

    fn items(q: &WireQueue) -> Vec<Inbound> {
        let mut r = FrameReader::new(1024);
        while let Some(b) = q.pop() {
            r.buf.extend_from_slice(&b);
        }
        std::iter::from_fn(|| r.next_item().expect("valid")).collect()
    }

    /// A beat that sends no PINGs of its own (heartbeats off here), its
    /// control queue and its counters.
    fn idle_beat() -> (Arc<WireQueue>, Beat, Tally) {
        let q = control_queue();
        let beat = Beat::new(&HeartbeatConfig::OFF, true, q.clone());
        (q, beat, Tally::default())
    }

    fn ping(ttl_ds: u16, context: &'static [u8]) -> Ping {
        Ping {
            ttl_ds,
            context: bytes::Bytes::from_static(context),
        }
    }

    #[tokio::test]
    async fn pings_go_to_the_control_queue_then_silence_ends_it() {
        let q = control_queue();
        let cfg = HeartbeatConfig {
            interval: Duration::from_millis(20),
            timeout: Some(Duration::from_millis(100)),
            ttl: Duration::from_millis(1500),
        };
        let beat = Beat::new(&cfg, true, q.clone());
        let t = Tally::default();
        let why = tokio::time::timeout(Duration::from_secs(30), beat.run(t.counters()))
            .await
            .expect("expires");
        assert_eq!(why, Expired::Timeout);
        assert_eq!(t.timeouts.load(Ordering::Relaxed), 1);
        let sent = t.pings.load(Ordering::Relaxed);
        assert!(sent >= 1);
        let got = items(&q);
        assert_eq!(got.len() as u64, sent);
        for i in got {
            assert!(matches!(i, Inbound::Ping(p) if p.ttl_ds == 15 && p.context.is_empty()));
        }
    }

    #[tokio::test]
    async fn a_pong_echoes_the_context_and_a_peer_ttl_arms_an_idle_beat() {
        let (q, beat, t) = idle_beat();
        let ping = ping(1, b"abc");
        let run = beat.run(t.counters());
        tokio::pin!(run);
        // Nothing can expire yet: the run pends.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut run)
            .await
            .is_err());
        beat.on_ping(&ping, t.counters());
        match items(&q).as_slice() {
            [Inbound::Pong(p)] => assert_eq!(&p.context[..], b"abc"),
            other => panic!("{other:?}"),
        }
        // The peer asked for 100 ms of TTL and says nothing more.
        let why = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("expires");
        assert_eq!(why, Expired::PeerTtl);
        assert_eq!(t.pings.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn pongs_past_the_control_bound_are_counted() {
        let (q, beat, t) = idle_beat();
        let ping = ping(0, b"");
        for _ in 0..CONTROL_QUEUE_ITEMS + 5 {
            beat.on_ping(&ping, t.counters());
        }
        assert_eq!(t.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(
            t.pings_in.load(Ordering::Relaxed),
            CONTROL_QUEUE_ITEMS as u64 + 5
        );
        assert_eq!(q.len(), CONTROL_QUEUE_ITEMS);
    }
}
