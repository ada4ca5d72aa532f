//! ZMTP 3.1 heartbeats (RFC 37, libzmq's `ZMQ_HEARTBEAT_IVL`, `_TIMEOUT`
//! and `_TTL`) as plain state: when a PING is due, when the peer has been
//! silent too long. No I/O and no clock: every call takes the time, so the
//! tests below need no socket. `heartbeat_task.rs` drives it on a
//! connection.
//!
//! libzmq's semantics, which we follow: a PING goes out every interval;
//! if nothing at all (data, PONG, anything) arrives within the timeout
//! after a PING, the connection is closed; the TTL in our PINGs asks the
//! peer to close us when it hears nothing from us that long, and a TTL in
//! the peer's PINGs asks the same of us.

use std::time::{Duration, Instant};

/// The longest TTL a PING can carry: 65535 deciseconds.
pub const MAX_TTL: Duration = Duration::from_millis(u16::MAX as u64 * 100);

/// Heartbeat settings of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeartbeatConfig {
    /// Send a PING this often (libzmq's `ZMQ_HEARTBEAT_IVL`); zero: never,
    /// and then no timeout either.
    pub interval: Duration,
    /// Close the connection when nothing was received this long after a
    /// PING (`ZMQ_HEARTBEAT_TIMEOUT`); None: the interval, as in libzmq.
    pub timeout: Option<Duration>,
    /// Sent in our PINGs (`ZMQ_HEARTBEAT_TTL`): the peer should close the
    /// connection when it hears nothing from us this long. Zero: no limit.
    /// Carried in whole deciseconds, at most [`MAX_TTL`].
    pub ttl: Duration,
}

impl HeartbeatConfig {
    /// No heartbeats (libzmq's default, and the proxy's). A peer's TTL is
    /// still honoured.
    pub const OFF: HeartbeatConfig = HeartbeatConfig {
        interval: Duration::ZERO,
        timeout: None,
        ttl: Duration::ZERO,
    };

    /// The clients' default ([`PublisherConfig`](super::PublisherConfig),
    /// [`ReceiverConfig`](super::ReceiverConfig)): a PING every 5 s, give
    /// up 15 s after a PING that got nothing back, and ask the proxy to
    /// drop us after 30 s of silence. Why: a proxy host that dies (or a
    /// cut link) leaves a half-open TCP connection that TCP alone notices
    /// only after minutes (keepalive) or a quarter of an hour
    /// (retransmissions); this notices it within about 20 s and
    /// reconnects. 15 s stays above the proxy's default lossless
    /// slow-consumer timeout (10 s), during which a proxy pushing back on
    /// a publisher reads nothing from it (so our PING waits behind our
    /// data). The TTL lets a proxy without heartbeats of its own drop us
    /// when we vanish. A PING is 9 bytes: the cost is nil. Pings go only
    /// to peers that answer them (ZMTP 3.1 peers and our proxy, see
    /// [`PeerInfo::takes_pings`](super::zmtp::PeerInfo::takes_pings)).
    pub const CLIENT_DEFAULT: HeartbeatConfig = HeartbeatConfig {
        interval: Duration::from_secs(5),
        timeout: Some(Duration::from_secs(15)),
        ttl: Duration::from_secs(30),
    };

    /// Whether PINGs are sent.
    pub fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    /// The timeout in effect (the interval when unset).
    pub fn effective_timeout(&self) -> Duration {
        self.timeout.unwrap_or(self.interval)
    }

    /// The TTL as sent: whole deciseconds (rounded up, so a small TTL is
    /// never sent as "none"), at most 65535.
    pub fn ttl_deciseconds(&self) -> u16 {
        let ds = self.ttl.as_millis().div_ceil(100);
        u16::try_from(ds).unwrap_or(u16::MAX)
    }
}

/// Why a connection's heartbeat ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Nothing arrived within the timeout after our PING.
    Timeout,
    /// Nothing arrived within the TTL the peer's own PING asked for.
    PeerTtl,
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expired::Timeout => "peer silent past the heartbeat timeout",
            Expired::PeerTtl => "peer silent past the TTL of its PING",
        })
    }
}

/// The heartbeat state of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// PING period; None: we send none (off, or the peer cannot take them).
    interval: Option<Duration>,
    /// Silence allowed after a PING.
    timeout: Duration,
    /// When we last received anything.
    last_rx: Instant,
    /// When the next PING is due (None: never).
    next_ping: Option<Instant>,
    /// When the first PING since the last received traffic went out (the
    /// timeout runs from there); None when nothing is awaited.
    waiting_since: Option<Instant>,
    /// The TTL of the peer's latest PING (None: none asked).
    peer_ttl: Option<Duration>,
    /// Set while we deliberately do not read the peer (lossless
    /// pushback): its silence is ours, so nothing expires.
    held: bool,
}

impl Heartbeat {
    /// A connection's state as of `now` (its handshake); PINGs only if
    /// `cfg` enables them and `pinging` (the peer takes them).
    pub fn new(cfg: &HeartbeatConfig, pinging: bool, now: Instant) -> Heartbeat {
        let interval = (cfg.enabled() && pinging).then_some(cfg.interval);
        Heartbeat {
            interval,
            timeout: cfg.effective_timeout(),
            last_rx: now,
            next_ping: interval.map(|i| now + i),
            waiting_since: None,
            peer_ttl: None,
            held: false,
        }
    }

    /// Whether anything can expire or fall due (so received traffic needs
    /// recording at all).
    pub fn active(&self) -> bool {
        self.interval.is_some() || self.peer_ttl.is_some()
    }

    /// Something arrived at `now` (any traffic counts).
    pub fn received(&mut self, now: Instant) {
        self.last_rx = now;
        self.waiting_since = None;
    }

    /// The peer's PING asked for `ttl` (None: no limit); true when that
    /// changed the deadlines.
    pub fn peer_ttl(&mut self, ttl: Option<Duration>) -> bool {
        let changed = self.peer_ttl != ttl;
        self.peer_ttl = ttl;
        changed
    }

    /// We stop reading the peer for a while: nothing expires meanwhile.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// We read the peer again from `now`: its silence while held was ours.
    pub fn release(&mut self, now: Instant) {
        self.held = false;
        self.received(now);
    }

    /// Whether a PING should go out at `now`.
    pub fn ping_due(&self, now: Instant) -> bool {
        self.next_ping.is_some_and(|t| now >= t)
    }

    /// A PING went out at `now`: the next is due an interval later, and
    /// the timeout runs from the first PING not followed by traffic.
    pub fn ping_sent(&mut self, now: Instant) {
        self.next_ping = self.interval.map(|i| now + i);
        self.waiting_since.get_or_insert(now);
    }

    /// Whether the connection should close at `now`, and why.
    pub fn expired(&self, now: Instant) -> Option<Expired> {
        if self.held {
            return None;
        }
        if self.waiting_since.is_some_and(|t| now >= t + self.timeout) {
            return Some(Expired::Timeout);
        }
        if self.peer_ttl.is_some_and(|ttl| now >= self.last_rx + ttl) {
            return Some(Expired::PeerTtl);
        }
        None
    }

    /// The next instant at which a PING falls due or the connection may
    /// expire; None: nothing will happen until the state changes.
    pub fn next_deadline(&self) -> Option<Instant> {
        let expiries = if self.held {
            [None, None]
        } else {
            [
                self.waiting_since.map(|t| t + self.timeout),
                self.peer_ttl.map(|ttl| self.last_rx + ttl),
            ]
        };
        [self.next_ping].into_iter().chain(expiries).flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg(ivl: u64, timeout: Option<u64>) -> HeartbeatConfig {
        HeartbeatConfig {
            interval: ms(ivl),
            timeout: timeout.map(ms),
            ttl: Duration::ZERO,
        }
    }

    /// Asserts that `hb` expires for `why` at `at`, not a millisecond
    /// before.
    fn expires_at(hb: &Heartbeat, at: Instant, why: Expired) {
        assert_eq!(hb.expired(at - ms(1)), None);
        assert_eq!(hb.expired(at), Some(why));
    }

    #[test]
    fn pings_fall_due_every_interval_and_traffic_answers_them() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(&cfg(100, Some(300)), true, t0);
        assert!(hb.active());
        assert!(!hb.ping_due(t0 + ms(99)));
        assert!(hb.ping_due(t0 + ms(100)));
        assert_eq!(hb.next_deadline(), Some(t0 + ms(100)));
        hb.ping_sent(t0 + ms(100));
        // Next PING at 200, timeout at 400.
        assert_eq!(hb.next_deadline(), Some(t0 + ms(200)));
        hb.ping_sent(t0 + ms(200));
        // The timeout still runs from the first unanswered PING.
        assert_eq!(hb.expired(t0 + ms(399)), None);
        // Any traffic answers.
        hb.received(t0 + ms(250));
        assert_eq!(hb.expired(t0 + ms(1000)), None);
        hb.ping_sent(t0 + ms(300));
        expires_at(&hb, t0 + ms(600), Expired::Timeout);
    }

    #[test]
    fn the_timeout_defaults_to_the_interval() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(&cfg(100, None), true, t0);
        hb.ping_sent(t0 + ms(100));
        expires_at(&hb, t0 + ms(200), Expired::Timeout);
    }

    #[test]
    fn off_or_a_peer_without_pings_sends_none_and_never_times_out() {
        let t0 = Instant::now();
        for hb in [
            Heartbeat::new(&HeartbeatConfig::OFF, true, t0),
            Heartbeat::new(&cfg(100, None), false, t0),
        ] {
            assert!(!hb.active());
            assert!(!hb.ping_due(t0 + Duration::from_secs(3600)));
            assert_eq!(hb.expired(t0 + Duration::from_secs(3600)), None);
            assert_eq!(hb.next_deadline(), None);
        }
    }

    #[test]
    fn the_peers_ttl_is_honoured_even_with_our_heartbeats_off() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(&HeartbeatConfig::OFF, true, t0);
        assert!(hb.peer_ttl(Some(ms(500))));
        assert!(!hb.peer_ttl(Some(ms(500))), "unchanged");
        assert!(hb.active());
        hb.received(t0 + ms(100));
        assert_eq!(hb.next_deadline(), Some(t0 + ms(600)));
        expires_at(&hb, t0 + ms(600), Expired::PeerTtl);
        // A later PING without TTL lifts it.
        assert!(hb.peer_ttl(None));
        assert_eq!(hb.expired(t0 + ms(5000)), None);
    }

    #[test]
    fn nothing_expires_while_held() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(&cfg(100, Some(100)), true, t0);
        hb.peer_ttl(Some(ms(200)));
        hb.ping_sent(t0 + ms(100));
        hb.hold();
        assert_eq!(hb.expired(t0 + ms(10_000)), None);
        // Pings still fall due; no expiry deadline while held.
        assert_eq!(hb.next_deadline(), Some(t0 + ms(200)));
        hb.release(t0 + ms(10_000));
        assert_eq!(hb.expired(t0 + ms(10_100)), None);
        assert_eq!(hb.expired(t0 + ms(10_200)), Some(Expired::PeerTtl));
    }

    #[test]
    fn the_ttl_goes_out_in_deciseconds() {
        let ttl = |d: Duration| {
            HeartbeatConfig {
                ttl: d,
                ..HeartbeatConfig::OFF
            }
            .ttl_deciseconds()
        };
        assert_eq!(ttl(Duration::ZERO), 0);
        assert_eq!(ttl(ms(1)), 1);
        assert_eq!(ttl(ms(1000)), 10);
        assert_eq!(ttl(ms(1050)), 11);
        assert_eq!(ttl(MAX_TTL), u16::MAX);
        assert_eq!(ttl(Duration::from_secs(100_000)), u16::MAX);
    }
}
