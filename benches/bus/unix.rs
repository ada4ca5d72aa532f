//! Drivers for the Unix-socket protocol (our bus and the Python reference
//! speak the same wire), and the raw-socket anchor.
//!
//! The drivers are lean blocking threads that speak the wire directly, so
//! the figures measure the bus, not a client library: a sender batches its
//! frames (many per write, as our `BusClient` does), a receiver reads with
//! one big buffer and counts frames.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{self, connect_registered, put_message, FrameReader, Proc, Throughput, Window};

/// A running bus (ours or the reference) in its own temp directory.
pub struct BusServer {
    pub proc: Proc,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts our `hermes-bus-server`, optionally with a `hooks.yaml` (our
/// mapping form) in its `HERMES_HOME`.
pub fn start_ours(exe: &Path, hooks_yaml: Option<&str>) -> Result<BusServer, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("hermes-bus")).map_err(|e| e.to_string())?;
    if let Some(y) = hooks_yaml {
        std::fs::write(home.join("hermes-bus/hooks.yaml"), y).map_err(|e| e.to_string())?;
    }
    let socket = dir.path().join("bus.sock");
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(dir.path())
        .arg("--socket")
        .arg(&socket);
    cmd.env("HERMES_HOME", &home)
        .env_remove("HERMES_BUS_HOOKS")
        .env_remove("RUST_LOG");
    let mut proc = Proc::spawn("hermes-bus-server", cmd, dir.path().join("bus.log"))
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    proc.wait_socket(&socket, Duration::from_secs(5))?;
    Ok(BusServer {
        proc,
        socket,
        _dir: dir,
    })
}

/// Starts the reference `hermes-bus` 0.3.0 server (socket at
/// `$HERMES_HOME/hermes-bus.sock`, hooks disabled).
pub fn start_py03(python: &Path) -> Result<BusServer, String> {
    if !python.exists() {
        return Err(format!(
            "{} not found (run .ci/setup-python)",
            python.display()
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let socket = dir.path().join("hermes-bus.sock");
    let mut cmd = Command::new(python);
    cmd.args(["-m", "hermes_bus.server"])
        .env("HERMES_HOME", dir.path())
        .env("HERMES_BUS_HOOKS", "none");
    let mut proc = Proc::spawn("hermes-bus 0.3.0", cmd, dir.path().join("py.log"))
        .map_err(|e| e.to_string())?;
    proc.wait_socket(&socket, Duration::from_secs(10))?;
    Ok(BusServer {
        proc,
        socket,
        _dir: dir,
    })
}

/// Bounds of one run.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Messages to send at most (over all senders).
    pub max_msgs: u64,
    /// Stop sending after this long.
    pub max_time: Duration,
}

/// Unique endpoint names per run, so a name held from an earlier run
/// never interferes.
fn run_tag() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn is_message(p: &[u8]) -> bool {
    util::contains(&p[..p.len().min(24)], b"message")
}

/// `senders` → bus → `receivers`. With one receiver every sender sends to
/// it by name; with several, a single anonymous sender broadcasts (`to`
/// empty) and each receiver must get every message. Counts are checked.
pub fn bus_throughput(
    socket: &Path,
    senders: usize,
    receivers: usize,
    size: usize,
    b: Bounds,
) -> Result<Throughput, String> {
    let tag = run_tag();
    let broadcast = receivers > 1;
    let body = Arc::new(util::body(size));
    let window = Arc::new(Window::new(util::window_for(size), receivers));
    let sent = Arc::new(AtomicU64::new(0));
    let done_sending = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(senders + receivers + 1));
    let last_rx = Arc::new(std::sync::Mutex::new(Instant::now()));

    let mut rx_threads = Vec::new();
    for i in 0..receivers {
        let (mut s, mut r) = connect_registered(socket, &format!("dst{tag}-{i}"))
            .map_err(|e| format!("receiver: {e}"))?;
        let (window, sent, done, barrier, last_rx) = (
            window.clone(),
            sent.clone(),
            done_sending.clone(),
            barrier.clone(),
            last_rx.clone(),
        );
        let drain_until = b.max_time + Duration::from_secs(5);
        rx_threads.push(thread::spawn(move || -> io::Result<u64> {
            barrier.wait();
            let t0 = Instant::now();
            let mut got = 0u64;
            loop {
                let mut n = 0u64;
                let seen = r.read_some(&mut s, |p| {
                    if is_message(p) {
                        n += 1
                    }
                })?;
                if seen.is_none() {
                    break;
                }
                if n > 0 {
                    got += n;
                    window.add(i, n);
                    let mut l = last_rx.lock().unwrap_or_else(|p| p.into_inner());
                    *l = (*l).max(Instant::now());
                }
                if done.load(Ordering::Acquire) && got >= sent.load(Ordering::Acquire) {
                    break;
                }
                if t0.elapsed() > drain_until {
                    break;
                }
            }
            Ok(got)
        }));
    }
    let mut tx_threads = Vec::new();
    let per_sender = b.max_msgs / senders as u64;
    for j in 0..senders {
        let (mut s, _reader) = if broadcast {
            (
                UnixStream::connect(socket).map_err(|e| format!("sender: {e}"))?,
                None,
            )
        } else {
            let (s, r) = connect_registered(socket, &format!("src{tag}-{j}"))
                .map_err(|e| format!("sender: {e}"))?;
            (s, Some(r))
        };
        let to = if broadcast {
            String::new()
        } else {
            format!("dst{tag}-0")
        };
        let from = format!("src{tag}-{j}");
        let (window, sent, barrier, body) =
            (window.clone(), sent.clone(), barrier.clone(), body.clone());
        let batch_max = (window.limit_per(senders)).max(1);
        let max_time = b.max_time;
        tx_threads.push(thread::spawn(move || -> io::Result<u64> {
            let mut buf = Vec::with_capacity(256 * 1024);
            barrier.wait();
            let deadline = Instant::now() + max_time;
            let mut seq = 0u64;
            while seq < per_sender && Instant::now() < deadline {
                let room = window.room(sent.load(Ordering::Acquire), deadline);
                let k = room.min(batch_max).min(per_sender - seq);
                if k == 0 {
                    continue;
                }
                sent.fetch_add(k, Ordering::AcqRel);
                buf.clear();
                for _ in 0..k {
                    put_message(&mut buf, &to, &from, seq, &body);
                    seq += 1;
                    if buf.len() >= 128 * 1024 {
                        s.write_all(&buf)?;
                        buf.clear();
                    }
                }
                if !buf.is_empty() {
                    s.write_all(&buf)?;
                }
            }
            // Keep the connection open until the receivers are done, so
            // nothing is cut short by a close.
            Ok(seq)
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    let mut total_sent = 0;
    for t in tx_threads {
        total_sent += t
            .join()
            .map_err(|_| "sender panicked")?
            .map_err(|e| format!("sender: {e}"))?;
    }
    done_sending.store(true, Ordering::Release);
    let mut delivered = 0;
    for t in rx_threads {
        delivered += t
            .join()
            .map_err(|_| "receiver panicked")?
            .map_err(|e| format!("receiver: {e}"))?;
    }
    let end = *last_rx.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Throughput {
        delivered,
        expected: total_sent * receivers as u64,
        elapsed: end.saturating_duration_since(t0),
    })
}

impl Window {
    /// What one of `senders` may send per batch.
    pub fn limit_per(&self, senders: usize) -> u64 {
        self.limit() / senders as u64
    }
}

/// Anchor: a raw Unix stream socket with the same 4-byte framing and the
/// same message bytes, no routing, one `write` per message.
pub fn raw_throughput(size: usize, b: Bounds) -> Result<Throughput, String> {
    let (mut a, mut z) = UnixStream::pair().map_err(|e| e.to_string())?;
    z.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let body = util::body(size);
    let window = Arc::new(Window::new(util::window_for(size), 1));
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(2));
    let (w2, s2, d2, b2) = (window.clone(), sent.clone(), done.clone(), barrier.clone());
    let max_time = b.max_time;
    let rx = thread::spawn(move || -> io::Result<(u64, Instant)> {
        let mut r = FrameReader::new(256 * 1024);
        b2.wait();
        let t0 = Instant::now();
        let (mut got, mut last) = (0u64, Instant::now());
        loop {
            let mut n = 0;
            if r.read_some(&mut z, |_| n += 1)?.is_none() {
                break;
            }
            if n > 0 {
                got += n;
                w2.add(0, n);
                last = Instant::now();
            }
            if d2.load(Ordering::Acquire) && got >= s2.load(Ordering::Acquire) {
                break;
            }
            if t0.elapsed() > max_time + Duration::from_secs(5) {
                break;
            }
        }
        Ok((got, last))
    });
    barrier.wait();
    let t0 = Instant::now();
    let deadline = t0 + b.max_time;
    let mut frame = Vec::with_capacity(size + 256);
    let mut seq = 0;
    while seq < b.max_msgs && Instant::now() < deadline {
        let room = window.room(seq, deadline);
        for _ in 0..room.min(b.max_msgs - seq) {
            frame.clear();
            put_message(&mut frame, "dst", "src", seq, &body);
            a.write_all(&frame).map_err(|e| e.to_string())?;
            seq += 1;
            sent.store(seq, Ordering::Release);
        }
    }
    done.store(true, Ordering::Release);
    let (got, last) = rx
        .join()
        .map_err(|_| "receiver panicked")?
        .map_err(|e| e.to_string())?;
    Ok(Throughput {
        delivered: got,
        expected: seq,
        elapsed: last.saturating_duration_since(t0),
    })
}

/// Builds the echo's reply from a received message without parsing it:
/// the body is the last field (both buses keep the sender's field order).
fn echo_reply(out: &mut Vec<u8>, p: &[u8], to: &str, n: u64) -> bool {
    let key = b"\"body\":";
    let Some(pos) = p.windows(key.len()).rposition(|w| w == key) else {
        return false;
    };
    let rest = &p[pos + key.len()..];
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    let _ = write!(
        out,
        r#"{{"type":"message","to":"{to}","from":"echo","id":"e{n}","body":"#
    );
    out.extend_from_slice(rest);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    true
}

/// Round trips client → bus → echo endpoint → bus → client; returns the
/// sorted samples.
pub fn bus_round_trip(
    socket: &Path,
    size: usize,
    max_iters: u64,
    max_time: Duration,
) -> Result<Vec<Duration>, String> {
    let tag = run_tag();
    let client = format!("rt{tag}");
    let echo = format!("echo{tag}");
    let (mut es, mut er) = connect_registered(socket, &echo).map_err(|e| format!("echo: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let client2 = client.clone();
    let echo_t = thread::spawn(move || -> io::Result<()> {
        let mut out = Vec::with_capacity(size + 256);
        let mut n = 0;
        while !stop2.load(Ordering::Acquire) {
            out.clear();
            if er
                .read_some(&mut es, |p| {
                    if is_message(p) && echo_reply(&mut out, p, &client2, n) {
                        n += 1;
                    }
                })?
                .is_none()
            {
                break;
            }
            if !out.is_empty() {
                es.write_all(&out)?;
            }
        }
        Ok(())
    });
    let r = (|| -> Result<Vec<Duration>, String> {
        let (mut s, mut r) =
            connect_registered(socket, &client).map_err(|e| format!("client: {e}"))?;
        ping_pong(&mut s, &mut r, &echo, &client, size, max_iters, max_time)
    })();
    stop.store(true, Ordering::Release);
    let _ = echo_t.join();
    r
}

fn ping_pong(
    s: &mut UnixStream,
    r: &mut FrameReader,
    to: &str,
    from: &str,
    size: usize,
    max_iters: u64,
    max_time: Duration,
) -> Result<Vec<Duration>, String> {
    let body = util::body(size);
    let mut frame = Vec::with_capacity(size + 256);
    let mut samples = Vec::with_capacity(max_iters as usize);
    let warmup = 200;
    let t_end = Instant::now() + max_time;
    let mut i = 0u64;
    while i < max_iters + warmup && Instant::now() < t_end {
        frame.clear();
        put_message(&mut frame, to, from, i, &body);
        let t = Instant::now();
        s.write_all(&frame).map_err(|e| e.to_string())?;
        r.wait_for(s, t + Duration::from_secs(3), is_message)
            .map_err(|e| format!("round trip {i}: {e}"))?;
        if i >= warmup {
            samples.push(t.elapsed());
        }
        i += 1;
    }
    samples.sort();
    Ok(samples)
}

/// Anchor: raw ping-pong over a Unix stream socket pair (the echo writes
/// the frame back as it came).
pub fn raw_round_trip(
    size: usize,
    max_iters: u64,
    max_time: Duration,
) -> Result<Vec<Duration>, String> {
    let (mut a, mut z) = UnixStream::pair().map_err(|e| e.to_string())?;
    a.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    z.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = thread::spawn(move || -> io::Result<()> {
        let mut r = FrameReader::new(256 * 1024);
        let mut out = Vec::new();
        while !stop2.load(Ordering::Acquire) {
            out.clear();
            if r.read_some(&mut z, |p| {
                out.extend_from_slice(&(p.len() as u32).to_be_bytes());
                out.extend_from_slice(p);
            })?
            .is_none()
            {
                break;
            }
            if !out.is_empty() {
                z.write_all(&out)?;
            }
        }
        Ok(())
    });
    let mut r = FrameReader::new(256 * 1024);
    let res = ping_pong(&mut a, &mut r, "echo", "rt", size, max_iters, max_time);
    stop.store(true, Ordering::Release);
    drop(a);
    let _ = echo.join();
    res
}

/// Opens `n` registered idle sessions; returns them (keep them open).
pub fn idle_sessions(socket: &Path, n: usize) -> Result<Vec<UnixStream>, String> {
    let tag = run_tag();
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = UnixStream::connect(socket).map_err(|e| format!("session {i}: {e}"))?;
        s.write_all(&util::frame(&format!(
            r#"{{"type":"register","endpoint":"idle{tag}-{i}"}}"#
        )))
        .map_err(|e| format!("session {i}: {e}"))?;
        v.push(s);
    }
    // Read every `registered` reply, so every session is really there.
    for (i, s) in v.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        FrameReader::new(256)
            .wait_for(s, Instant::now() + Duration::from_secs(10), |p| {
                util::contains(p, b"registered")
            })
            .map_err(|e| format!("session {i} register: {e}"))?;
    }
    Ok(v)
}

/// Our client library end to end: `BusClient::send` → bus →
/// `BusClient::recv` (JSON values built and parsed on both ends, as a
/// program using the library does). The same window as the lean drivers.
pub fn client_throughput(socket: &Path, size: usize, b: Bounds) -> Result<Throughput, String> {
    use hermes_bus::transports::unix::{BusClient, ClientConfig};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let tag = run_tag();
        let mut cfg = ClientConfig::new(socket);
        cfg.autostart = false;
        let dst = format!("cdst{tag}");
        let mut rx = BusClient::connect_with(&dst, cfg.clone())
            .await
            .map_err(|e| format!("receiver: {e}"))?;
        let tx = BusClient::connect_with(&format!("csrc{tag}"), cfg)
            .await
            .map_err(|e| format!("sender: {e}"))?;
        let body: serde_json::Value =
            serde_json::from_str(&util::body(size)).map_err(|e| e.to_string())?;
        let window = Arc::new(tokio::sync::Semaphore::new(util::window_for(size) as usize));
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (w2, s2, d2) = (window.clone(), sent.clone(), done.clone());
        let drain_until = b.max_time + Duration::from_secs(5);
        let receiver = tokio::spawn(async move {
            let t0 = Instant::now();
            let (mut got, mut last) = (0u64, Instant::now());
            loop {
                match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    Ok(Some(_)) => {
                        got += 1;
                        last = Instant::now();
                        w2.add_permits(1);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                if (d2.load(Ordering::Acquire) && got >= s2.load(Ordering::Acquire))
                    || t0.elapsed() > drain_until
                {
                    break;
                }
            }
            (got, last)
        });
        let t0 = Instant::now();
        let deadline = t0 + b.max_time;
        let mut n = 0u64;
        while n < b.max_msgs && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), window.acquire()).await {
                Ok(Ok(p)) => p.forget(),
                _ => break,
            }
            tx.send(&dst, body.clone())
                .await
                .map_err(|e| format!("send: {e}"))?;
            n += 1;
            sent.store(n, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        let (got, last) = receiver.await.map_err(|e| e.to_string())?;
        Ok(Throughput {
            delivered: got,
            expected: n,
            elapsed: last.saturating_duration_since(t0),
        })
    })
}

/// Bytes a plain-blast sender hands to one write (pre-encoded frames).
const BLAST_BATCH: usize = 256 * 1024;

/// Plain blast: `senders` → bus → `receivers`, as real clients send: no
/// window, no pacing; each sender writes big batches of pre-encoded frames
/// as fast as its socket accepts them, the receivers read and check every
/// message (count per sender, in order per sender). With one receiver
/// every sender sends to it by name; with several, a single anonymous
/// sender broadcasts. Bounded in count and time; a sender refused, or a
/// receiver starved, for [`util::STALL`] ends the run with the reason.
/// With `close_after`, each sender closes its connection right after its
/// last write (as a one-shot client does); else it stays open until the
/// receivers are done.
pub fn bus_blast(
    socket: &Path,
    senders: usize,
    receivers: usize,
    size: usize,
    b: Bounds,
    close_after: bool,
) -> Result<util::Checked, String> {
    let tag = run_tag();
    let broadcast = receivers > 1;
    let body = util::body(size);
    let state = Arc::new(util::BlastState::new());
    let barrier = Arc::new(Barrier::new(senders + receivers + 1));
    let cap = b.max_time + Duration::from_secs(20);

    let mut rx_threads = Vec::new();
    for i in 0..receivers {
        let (mut s, mut r) = connect_registered(socket, &format!("dst{tag}-{i}"))
            .map_err(|e| format!("receiver: {e}"))?;
        let (state, barrier) = (state.clone(), barrier.clone());
        rx_threads.push(thread::spawn(move || {
            barrier.wait();
            let cap = Instant::now() + cap;
            util::receive_checked(&mut s, &mut r, senders, &state, cap, is_message)
        }));
    }
    let mut tx_threads = Vec::new();
    let per_sender = b.max_msgs / senders as u64;
    for j in 0..senders {
        let from = format!("src{tag}-{j}");
        let (mut s, reader) = if broadcast {
            (
                UnixStream::connect(socket).map_err(|e| format!("sender: {e}"))?,
                None,
            )
        } else {
            let (s, r) = connect_registered(socket, &from).map_err(|e| format!("sender: {e}"))?;
            (s, Some(r))
        };
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let to = if broadcast {
            String::new()
        } else {
            format!("dst{tag}-0")
        };
        let mut unit = Vec::with_capacity(size + 256);
        put_blast_message(&mut unit, &to, &from, j, &body);
        let mut batch = util::Batch::new(unit, j, BLAST_BATCH);
        let (state, barrier) = (state.clone(), barrier.clone());
        let max_time = b.max_time;
        tx_threads.push(thread::spawn(move || {
            barrier.wait();
            let deadline = Instant::now() + max_time;
            let mut seq = 0u64;
            let mut result = Ok(());
            while seq < per_sender && Instant::now() < deadline {
                let n = (per_sender - seq).min(batch.len() as u64) as usize;
                if let Err(e) = util::write_all_stalling(&mut s, batch.fill(seq, n)) {
                    result = Err(format!("sender {j}: {e}"));
                    break;
                }
                seq += n as u64;
                state.sent.fetch_add(n as u64, Ordering::AcqRel);
            }
            if close_after {
                drop(s);
                drop(reader);
                return (result, None);
            }
            // The connection stays open until the receivers are done.
            (result, Some((s, reader)))
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    let mut problem = None;
    let mut keep = Vec::new();
    for t in tx_threads {
        let (r, open) = t.join().map_err(|_| "sender panicked")?;
        if let Err(e) = r {
            problem.get_or_insert(e);
        }
        keep.extend(open);
    }
    state.done.store(true, Ordering::Release);
    let mut out = util::Checked {
        expected: state.sent.load(Ordering::Acquire) * receivers as u64,
        ..Default::default()
    };
    for t in rx_threads {
        let (check, why) = t.join().map_err(|_| "receiver panicked")?;
        out.delivered += check.got;
        out.disorder += check.disorder + check.unreadable;
        if let Some(w) = why {
            problem.get_or_insert(w);
        }
    }
    drop(keep);
    out.problem = problem;
    out.elapsed = state.last().saturating_duration_since(t0);
    Ok(out)
}

/// A message frame in the reference client's shape whose id is
/// `util::blast_id(sender, 0)` (renumbered in place by [`util::Batch`]).
fn put_blast_message(out: &mut Vec<u8>, to: &str, from: &str, sender: usize, body: &str) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    let id = util::blast_id(sender, 0);
    let _ = write!(
        out,
        r#"{{"type":"message","to":"{to}","from":"{from}","id":"{id}","ts":1700000000.5,"body":{body}}}"#
    );
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// One plain-blast message frame (for the anchors).
pub fn blast_frame(sender: usize, size: usize) -> Vec<u8> {
    let mut unit = Vec::new();
    put_blast_message(&mut unit, "dst", "src", sender, &util::body(size));
    unit
}

/// Anchor of the plain blast: a raw Unix stream socket, the same frames,
/// one `write` per message, no window (the kernel's socket buffer is the
/// only flow control), the reader checks every message as for the bus.
pub fn raw_blast(size: usize, b: Bounds) -> Result<util::Checked, String> {
    let (mut a, mut z) = UnixStream::pair().map_err(|e| e.to_string())?;
    z.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    a.set_write_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let state = Arc::new(util::BlastState::new());
    let barrier = Arc::new(Barrier::new(2));
    let (s2, b2) = (state.clone(), barrier.clone());
    let cap = b.max_time + Duration::from_secs(20);
    let rx = thread::spawn(move || {
        let mut r = FrameReader::new(256 * 1024);
        b2.wait();
        let cap = Instant::now() + cap;
        util::receive_checked(&mut z, &mut r, 1, &s2, cap, |_| true)
    });
    let mut one = util::Batch::new(blast_frame(0, size), 0, 0);
    barrier.wait();
    let t0 = Instant::now();
    let deadline = t0 + b.max_time;
    let mut seq = 0;
    let mut problem = None;
    while seq < b.max_msgs && Instant::now() < deadline {
        if let Err(e) = util::write_all_stalling(&mut a, one.fill(seq, 1)) {
            problem = Some(format!("sender: {e}"));
            break;
        }
        seq += 1;
        state.sent.store(seq, Ordering::Release);
    }
    state.done.store(true, Ordering::Release);
    let (check, why) = rx.join().map_err(|_| "receiver panicked")?;
    Ok(util::Checked {
        delivered: check.got,
        expected: seq,
        disorder: check.disorder + check.unreadable,
        elapsed: state.last().saturating_duration_since(t0),
        problem: problem.or(why),
    })
}
