//! Shared pieces of the bench: message frames, a frame reader, a window
//! that keeps the sender from outrunning the receivers, statistics, and
//! child processes that are killed when dropped.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Raises this process's open-files soft limit to the hard limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        let _ = libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// A JSON body of exactly `size` bytes (at least the bare skeleton):
/// `{"seq":0,"pad":"xxxx"}`.
pub fn body(size: usize) -> String {
    let skeleton = r#"{"seq":0,"pad":""}"#.len();
    let pad = size.saturating_sub(skeleton);
    format!(r#"{{"seq":0,"pad":"{}"}}"#, "x".repeat(pad))
}

/// Appends one Unix-protocol message frame in the reference client's
/// shape: `{"type","to","from","id","ts","body"}` with a `size`-byte body.
pub fn put_message(out: &mut Vec<u8>, to: &str, from: &str, seq: u64, body: &str) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    let _ = write!(
        out,
        r#"{{"type":"message","to":"{to}","from":"{from}","id":"{from}-{seq}","ts":1700000000.5,"body":{body}}}"#
    );
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// One frame around a JSON text.
pub fn frame(json: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + json.len());
    v.extend_from_slice(&(json.len() as u32).to_be_bytes());
    v.extend_from_slice(json.as_bytes());
    v
}

/// Reads length-prefixed frames from a blocking stream with one big
/// buffer; hands each complete payload to a callback.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub fn new(cap: usize) -> Self {
        FrameReader {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    /// One `read` call, then every complete frame. Returns the number of
    /// frames seen; `Ok(None)` on EOF; a read timeout is `Ok(Some(0))`.
    pub fn read_some(
        &mut self,
        s: &mut UnixStream,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<Option<usize>> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = match s.read(&mut self.buf[self.end..]) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(0))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Some(0)),
            Err(e) => return Err(e),
        };
        self.end += n;
        let mut count = 0;
        loop {
            let avail = self.end - self.start;
            if avail < 4 {
                break;
            }
            let b = &self.buf[self.start..];
            let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if avail < 4 + len {
                if 4 + len > self.buf.len() {
                    // Make room for a large frame.
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    self.buf.resize((4 + len).next_power_of_two(), 0);
                }
                break;
            }
            f(&self.buf[self.start + 4..self.start + 4 + len]);
            self.start += 4 + len;
            count += 1;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(count))
    }

    /// Reads until one frame satisfies `want` or the deadline passes.
    pub fn wait_for(
        &mut self,
        s: &mut UnixStream,
        deadline: Instant,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<()> {
        let mut found = false;
        while !found {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no expected reply in time",
                ));
            }
            if self.read_some(s, |p| found |= want(p))?.is_none() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
            }
        }
        Ok(())
    }
}

/// Connects to a bus socket and registers `name` (waits for `registered`).
pub fn connect_registered(path: &Path, name: &str) -> io::Result<(UnixStream, FrameReader)> {
    let mut s = UnixStream::connect(path)?;
    s.write_all(&frame(&format!(
        r#"{{"type":"register","endpoint":"{name}"}}"#
    )))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut r = FrameReader::new(256 * 1024);
    r.wait_for(&mut s, Instant::now() + Duration::from_secs(5), |p| {
        contains(p, b"\"registered\"")
    })?;
    Ok((s, r))
}

/// True when `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Flow control of a bench run: the sender keeps at most `limit`
/// messages in flight (sent, not yet received by the slowest receiver),
/// so nothing is dropped by a bounded queue anywhere and the count can be
/// checked exactly. Same window for our bus and every anchor.
pub struct Window {
    limit: u64,
    received: Vec<AtomicU64>,
    waiting: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Window {
    pub fn new(limit: u64, receivers: usize) -> Self {
        Window {
            limit,
            received: (0..receivers).map(|_| AtomicU64::new(0)).collect(),
            waiting: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Messages allowed in flight.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Receiver `i` got `n` more.
    pub fn add(&self, i: usize, n: u64) {
        self.received[i].fetch_add(n, Ordering::Relaxed);
        if self.waiting.load(Ordering::Acquire) {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    fn slowest(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Room to send now (waits until there is some, or `deadline`).
    pub fn room(&self, sent: u64, deadline: Instant) -> u64 {
        loop {
            let inflight = sent.saturating_sub(self.slowest());
            if inflight < self.limit {
                return self.limit - inflight;
            }
            if Instant::now() >= deadline {
                return 0;
            }
            let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.waiting.store(true, Ordering::Release);
            if sent.saturating_sub(self.slowest()) >= self.limit {
                let _ = self.cv.wait_timeout(g, Duration::from_millis(2));
            }
            self.waiting.store(false, Ordering::Release);
        }
    }
}

/// Messages in flight for a body size: about 4 MiB, at most 4096.
pub fn window_for(size: usize) -> u64 {
    ((4 << 20) / (size + 128)).clamp(16, 4096) as u64
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Throughput {
    /// Messages delivered (summed over receivers).
    pub delivered: u64,
    /// Messages that should have been delivered.
    pub expected: u64,
    /// From the first send to the last delivery.
    pub elapsed: Duration,
}

impl Throughput {
    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
}

/// Latency samples of one run, sorted.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// median, min, max of run figures.
pub fn summary(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let med = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    Some((med, s[0], s[s.len() - 1]))
}

/// A child process killed (TERM, then KILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> io::Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn()?;
        Ok(Proc {
            child,
            name: name.to_owned(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `path` accepts connections (or the process died).
    pub fn wait_socket(&mut self, path: &Path, limit: Duration) -> Result<(), String> {
        let end = Instant::now() + limit;
        loop {
            if UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("{} exited ({st}): {}", self.name, self.log_tail()));
            }
            if Instant::now() > end {
                return Err(format!(
                    "{} did not listen on {} within {limit:?}: {}",
                    self.name,
                    path.display(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Resident memory in bytes (VmRSS).
    pub fn rss(&self) -> Option<u64> {
        rss_of(self.pid())
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a plain-blast sender may be refused by its socket, or a
/// receiver get nothing, before the run ends as failed (instead of
/// hanging).
pub const STALL: Duration = Duration::from_secs(5);

/// Pre-encoded frames for a plain-blast sender: `n` copies of one unit (a
/// Unix frame, or a Redis PUBLISH command around one) whose message id
/// `b<sender>-<seq>` has a fixed width, so a batch is renumbered in place
/// (ten digits per message) and written as it is.
pub struct Batch {
    buf: Vec<u8>,
    unit: usize,
    /// Where each unit's ten sequence digits start.
    seq_at: Vec<usize>,
}

/// The message id of a plain-blast message.
pub fn blast_id(sender: usize, seq: u64) -> String {
    format!("b{sender:03}-{seq:010}")
}

impl Batch {
    /// `unit` is one encoded message whose id is `blast_id(sender, 0)`;
    /// the batch holds as many as fit in `bytes` (at least one).
    pub fn new(unit: Vec<u8>, sender: usize, bytes: usize) -> Batch {
        let id = blast_id(sender, 0);
        let at = find(&unit, id.as_bytes()).expect("the unit carries its id") + id.len() - 10;
        let n = (bytes / unit.len()).max(1);
        let mut buf = Vec::with_capacity(n * unit.len());
        for _ in 0..n {
            buf.extend_from_slice(&unit);
        }
        let seq_at = (0..n).map(|k| k * unit.len() + at).collect();
        Batch {
            buf,
            unit: unit.len(),
            seq_at,
        }
    }

    /// Units per batch.
    pub fn len(&self) -> usize {
        self.seq_at.len()
    }

    /// The first `n` units numbered `first..first + n`.
    pub fn fill(&mut self, first: u64, n: usize) -> &[u8] {
        let n = n.min(self.seq_at.len());
        for (k, &at) in self.seq_at[..n].iter().enumerate() {
            let mut v = first + k as u64;
            for d in self.buf[at..at + 10].iter_mut().rev() {
                *d = b'0' + (v % 10) as u8;
                v /= 10;
            }
        }
        &self.buf[..n * self.unit]
    }
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes all of `buf`, waiting while the socket is full, for at most
/// [`STALL`] without progress (the socket needs a write timeout).
pub fn write_all_stalling(s: &mut UnixStream, mut buf: &[u8]) -> Result<(), String> {
    let mut progress = Instant::now();
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err("socket closed".into()),
            Ok(n) => {
                buf = &buf[n..];
                progress = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if progress.elapsed() > STALL {
                    return Err(format!("sender blocked for {STALL:?} (nothing accepted)"));
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Checks what one receiver got of plain-blast messages: per sender, a
/// count and the order (each sender's sequence must come 0, 1, 2, ...).
#[derive(Debug, Clone, Default)]
pub struct SeqCheck {
    /// Per sender, the next sequence number expected.
    next: Vec<u64>,
    /// Messages seen (all senders).
    pub got: u64,
    /// Messages that came out of order (a gap, a repeat or a step back).
    pub disorder: u64,
    /// Messages without a readable id.
    pub unreadable: u64,
}

impl SeqCheck {
    pub fn new(senders: usize) -> Self {
        SeqCheck {
            next: vec![0; senders],
            ..Default::default()
        }
    }

    /// One message payload.
    pub fn see(&mut self, p: &[u8]) {
        self.got += 1;
        let head = &p[..p.len().min(256)];
        let Some(at) = find(head, b"\"id\":\"b").or_else(|| find(p, b"\"id\":\"b")) else {
            self.unreadable += 1;
            return;
        };
        let id = &p[at + 7..];
        let num = |b: &[u8]| -> Option<u64> {
            b.iter().try_fold(0u64, |v, d| {
                d.is_ascii_digit().then(|| v * 10 + u64::from(d - b'0'))
            })
        };
        let (Some(j), Some(seq)) = (id.get(..3).and_then(num), id.get(4..14).and_then(num)) else {
            self.unreadable += 1;
            return;
        };
        match self.next.get_mut(j as usize) {
            Some(next) if *next == seq => *next += 1,
            Some(next) => {
                self.disorder += 1;
                *next = (*next).max(seq + 1);
            }
            None => self.unreadable += 1,
        }
    }
}

/// What one plain-blast run measured and checked.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Messages delivered (summed over receivers).
    pub delivered: u64,
    /// Messages that should have been delivered.
    pub expected: u64,
    /// Delivered out of order, or without a readable id.
    pub disorder: u64,
    /// From the first send to the last delivery.
    pub elapsed: Duration,
    /// Why the run ended early (a stalled sender or receiver), if it did.
    pub problem: Option<String>,
}

impl Checked {
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    pub fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nothing lost, nothing out of order, no stall.
    pub fn ok(&self) -> bool {
        self.lost() == 0
            && self.delivered == self.expected
            && self.disorder == 0
            && self.problem.is_none()
    }

    /// One line: sent, delivered, lost, out of order, problem.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "expected {}, delivered {}, lost {}",
            self.expected,
            self.delivered,
            self.lost()
        );
        if self.delivered > self.expected {
            s.push_str(&format!(", {} extra", self.delivered - self.expected));
        }
        if self.disorder > 0 {
            s.push_str(&format!(", {} out of order", self.disorder));
        }
        if let Some(p) = &self.problem {
            s.push_str(&format!(", {p}"));
        }
        s
    }
}

/// The state a plain-blast run's threads share: how much was sent (final
/// once `done`), and when the last message arrived.
pub struct BlastState {
    pub sent: AtomicU64,
    pub done: AtomicBool,
    pub last_rx: Mutex<Instant>,
}

impl BlastState {
    pub fn new() -> Self {
        BlastState {
            sent: AtomicU64::new(0),
            done: AtomicBool::new(false),
            last_rx: Mutex::new(Instant::now()),
        }
    }

    pub fn arrived(&self) {
        let mut l = self.last_rx.lock().unwrap_or_else(|p| p.into_inner());
        *l = (*l).max(Instant::now());
    }

    pub fn last(&self) -> Instant {
        *self.last_rx.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A plain-blast receiver: reads frames (the socket has a short read
/// timeout) and checks every message until it got all that was sent, or
/// got nothing for [`STALL`], or `cap` passed. Returns the check and why
/// it stopped early, if it did.
pub fn receive_checked(
    s: &mut UnixStream,
    r: &mut FrameReader,
    senders: usize,
    state: &BlastState,
    cap: Instant,
    mut is_message: impl FnMut(&[u8]) -> bool,
) -> (SeqCheck, Option<String>) {
    let mut check = SeqCheck::new(senders);
    let mut progress = Instant::now();
    loop {
        let before = check.got;
        match r.read_some(s, |p| {
            if is_message(p) {
                check.see(p)
            }
        }) {
            Ok(Some(_)) => {}
            Ok(None) => return (check, Some("receiver: connection closed".into())),
            Err(e) => return (check, Some(format!("receiver: {e}"))),
        }
        let now = Instant::now();
        if check.got > before {
            progress = now;
            state.arrived();
        }
        if state.done.load(Ordering::Acquire) && check.got >= state.sent.load(Ordering::Acquire) {
            return (check, None);
        }
        if now.duration_since(progress) > STALL {
            return (check, Some(format!("receiver got nothing for {STALL:?}")));
        }
        if now > cap {
            return (check, Some("run took too long".into()));
        }
    }
}
