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
    let mut r = FrameReader::new(64 * 1024);
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
