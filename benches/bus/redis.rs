//! Anchor: Redis pub/sub over a Unix socket, spoken in RESP directly. The
//! publisher pipelines its PUBLISH commands (many per write); subscribers
//! count the `message` pushes.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::unix::Bounds;
use crate::util::{self, Proc, Throughput, Window};

/// A running redis-server on a Unix socket in a temp directory.
pub struct Redis {
    _proc: Proc,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// Finds `redis-server` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

/// Starts redis-server: no TCP port, a Unix socket, no persistence, no
/// output-buffer limit for pub/sub clients.
pub fn start() -> Result<Redis, String> {
    let exe = which("redis-server")
        .ok_or("redis-server not installed (apt-get install -y redis-server)")?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let socket = dir.path().join("r.sock");
    let mut cmd = Command::new(exe);
    cmd.arg("--port")
        .arg("0")
        .arg("--unixsocket")
        .arg(&socket)
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
        .arg("--dir")
        .arg(dir.path());
    let mut proc = Proc::spawn("redis-server", cmd, dir.path().join("redis.log"))
        .map_err(|e| e.to_string())?;
    proc.wait_socket(&socket, Duration::from_secs(5))?;
    Ok(Redis {
        _proc: proc,
        socket,
        _dir: dir,
    })
}

fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses `$N\r\n<data>\r\n` at `b`; returns (data range, consumed).
fn bulk(b: &[u8]) -> Option<(usize, usize, usize)> {
    if b.first()? != &b'$' {
        return None;
    }
    let nl = b.iter().position(|&c| c == b'\n')?;
    let n: usize = std::str::from_utf8(&b[1..nl - 1]).ok()?.parse().ok()?;
    let start = nl + 1;
    if b.len() < start + n + 2 {
        return None;
    }
    Some((start, start + n, start + n + 2))
}

/// Parses one `*3` push (`message`/`subscribe`, channel, payload) at the
/// front of `b`; returns (is_message, consumed), None when incomplete.
fn push(b: &[u8]) -> Option<(bool, usize)> {
    if b.first()? != &b'*' {
        return None;
    }
    let nl = b.iter().position(|&c| c == b'\n')?;
    let mut pos = nl + 1;
    let (ks, ke, c) = bulk(&b[pos..])?;
    let is_msg = &b[pos + ks..pos + ke] == b"message";
    pos += c;
    let (_, _, c) = bulk(&b[pos..])?;
    pos += c;
    // The third element is a bulk payload (message) or an integer (subscribe).
    match b.get(pos)? {
        b'$' => {
            let (_, _, c) = bulk(&b[pos..])?;
            pos += c;
        }
        _ => {
            let nl = b[pos..].iter().position(|&c| c == b'\n')?;
            pos += nl + 1;
        }
    }
    Some((is_msg, pos))
}

fn subscriber(socket: &PathBuf, channel: &str) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    let mut out = Vec::new();
    command(&mut out, &[b"SUBSCRIBE", channel.as_bytes()]);
    s.write_all(&out)?;
    let mut buf = [0u8; 256];
    let mut have = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while push(&have).is_none() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no subscribe confirmation",
            ));
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "redis closed"));
        }
        have.extend_from_slice(&buf[..n]);
    }
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// One pipelined publisher → `receivers` subscribers of one channel.
pub fn throughput(
    r: &Redis,
    receivers: usize,
    size: usize,
    b: Bounds,
) -> Result<Throughput, String> {
    static TAG: AtomicU64 = AtomicU64::new(0);
    let channel = format!("bench{}", TAG.fetch_add(1, Ordering::Relaxed));
    let window = Arc::new(Window::new(util::window_for(size), receivers));
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(receivers + 1));
    let last_rx = Arc::new(Mutex::new(Instant::now()));
    let mut rx = Vec::new();
    for i in 0..receivers {
        let mut s = subscriber(&r.socket, &channel).map_err(|e| format!("subscriber: {e}"))?;
        let (window, sent, done, barrier, last_rx) = (
            window.clone(),
            sent.clone(),
            done.clone(),
            barrier.clone(),
            last_rx.clone(),
        );
        let max_time = b.max_time;
        rx.push(thread::spawn(move || -> io::Result<u64> {
            let mut buf = vec![0u8; 256 * 1024];
            let (mut start, mut end) = (0usize, 0usize);
            barrier.wait();
            let t0 = Instant::now();
            let mut got = 0;
            loop {
                if end == buf.len() {
                    if start > 0 {
                        buf.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
                    } else {
                        let n = buf.len() * 2;
                        buf.resize(n, 0);
                    }
                }
                match s.read(&mut buf[end..]) {
                    Ok(0) => break,
                    Ok(n) => end += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e),
                }
                let mut n = 0;
                while let Some((is_msg, used)) = push(&buf[start..end]) {
                    start += used;
                    if is_msg {
                        n += 1;
                    }
                }
                if start == end {
                    start = 0;
                    end = 0;
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
                if t0.elapsed() > max_time + Duration::from_secs(5) {
                    break;
                }
            }
            Ok(got)
        }));
    }
    let mut p = UnixStream::connect(&r.socket).map_err(|e| e.to_string())?;
    // Drain the publisher's replies (`:N`) on another thread.
    let mut replies = p.try_clone().map_err(|e| e.to_string())?;
    replies
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let drain = thread::spawn(move || {
        let mut b = vec![0u8; 64 * 1024];
        while !stop2.load(Ordering::Acquire) {
            match replies.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    });
    let body = util::body(size);
    let mut msg = Vec::with_capacity(size + 256);
    let mut out = Vec::with_capacity(256 * 1024);
    barrier.wait();
    let t0 = Instant::now();
    let deadline = t0 + b.max_time;
    let mut seq = 0u64;
    let result = (|| -> io::Result<()> {
        while seq < b.max_msgs && Instant::now() < deadline {
            let room = window.room(seq, deadline);
            let k = room.min(b.max_msgs - seq);
            if k == 0 {
                continue;
            }
            sent.fetch_add(k, Ordering::AcqRel);
            out.clear();
            for _ in 0..k {
                msg.clear();
                util::put_message(&mut msg, "dst", "src", seq, &body);
                command(&mut out, &[b"PUBLISH", channel.as_bytes(), &msg[4..]]);
                seq += 1;
                if out.len() >= 128 * 1024 {
                    p.write_all(&out)?;
                    out.clear();
                }
            }
            if !out.is_empty() {
                p.write_all(&out)?;
            }
        }
        Ok(())
    })();
    done.store(true, Ordering::Release);
    let mut delivered = 0;
    for t in rx {
        delivered += t
            .join()
            .map_err(|_| "subscriber panicked")?
            .map_err(|e| e.to_string())?;
    }
    stop.store(true, Ordering::Release);
    let _ = drain.join();
    result.map_err(|e| format!("publisher: {e}"))?;
    let end = *last_rx.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Throughput {
        delivered,
        expected: seq * receivers as u64,
        elapsed: end.saturating_duration_since(t0),
    })
}

/// Like [`push`], with where the payload of a `message` push lies.
fn push_payload(b: &[u8]) -> Option<(Option<(usize, usize)>, usize)> {
    let (is_msg, used) = push(b)?;
    if !is_msg {
        return Some((None, used));
    }
    // `*3`, `$7 message`, `$N channel`, then the payload's bulk.
    let nl = b.iter().position(|&c| c == b'\n')?;
    let mut pos = nl + 1;
    let (_, _, c) = bulk(&b[pos..])?;
    pos += c;
    let (_, _, c) = bulk(&b[pos..])?;
    pos += c;
    let (s, e, _) = bulk(&b[pos..])?;
    Some((Some((pos + s, pos + e)), used))
}

/// Plain blast into Redis pub/sub (the anchor of the bus's plain blast):
/// one publisher writes big batches of pre-encoded PUBLISH commands (the
/// bus's message bytes as payload) as fast as its socket accepts, no
/// window; `receivers` subscribers check every message (count, order).
/// Redis keeps pub/sub output buffers unbounded here (see [`start`]).
pub fn blast(r: &Redis, receivers: usize, size: usize, b: Bounds) -> Result<util::Checked, String> {
    static TAG: AtomicU64 = AtomicU64::new(0);
    let channel = format!("blast{}", TAG.fetch_add(1, Ordering::Relaxed));
    let state = Arc::new(util::BlastState::new());
    let barrier = Arc::new(Barrier::new(receivers + 1));
    let cap = b.max_time + Duration::from_secs(20);
    let mut rx = Vec::new();
    for _ in 0..receivers {
        let mut s = subscriber(&r.socket, &channel).map_err(|e| format!("subscriber: {e}"))?;
        let (state, barrier) = (state.clone(), barrier.clone());
        rx.push(thread::spawn(
            move || -> (util::SeqCheck, Option<String>) {
                let mut check = util::SeqCheck::new(1);
                let mut buf = vec![0u8; 256 * 1024];
                let (mut start, mut end) = (0usize, 0usize);
                barrier.wait();
                let cap = Instant::now() + cap;
                let mut progress = Instant::now();
                loop {
                    if end == buf.len() {
                        if start > 0 {
                            buf.copy_within(start..end, 0);
                            end -= start;
                            start = 0;
                        } else {
                            let n = buf.len() * 2;
                            buf.resize(n, 0);
                        }
                    }
                    match s.read(&mut buf[end..]) {
                        Ok(0) => return (check, Some("subscriber: redis closed".into())),
                        Ok(n) => end += n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return (check, Some(format!("subscriber: {e}"))),
                    }
                    let before = check.got;
                    while let Some((payload, used)) = push_payload(&buf[start..end]) {
                        if let Some((ps, pe)) = payload {
                            check.see(&buf[start + ps..start + pe]);
                        }
                        start += used;
                    }
                    if start == end {
                        start = 0;
                        end = 0;
                    }
                    let now = Instant::now();
                    if check.got > before {
                        progress = now;
                        state.arrived();
                    }
                    if state.done.load(Ordering::Acquire)
                        && check.got >= state.sent.load(Ordering::Acquire)
                    {
                        return (check, None);
                    }
                    if now.duration_since(progress) > util::STALL {
                        return (
                            check,
                            Some(format!("subscriber got nothing for {:?}", util::STALL)),
                        );
                    }
                    if now > cap {
                        return (check, Some("run took too long".into()));
                    }
                }
            },
        ));
    }
    let mut p = UnixStream::connect(&r.socket).map_err(|e| e.to_string())?;
    p.set_write_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    // Drain the publisher's replies (`:N`) on another thread.
    let mut replies = p.try_clone().map_err(|e| e.to_string())?;
    replies
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let drain = thread::spawn(move || {
        let mut b = vec![0u8; 64 * 1024];
        while !stop2.load(Ordering::Acquire) {
            match replies.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    });
    let frame = crate::unix::blast_frame(0, size);
    let mut unit = Vec::with_capacity(frame.len() + 64);
    command(&mut unit, &[b"PUBLISH", channel.as_bytes(), &frame[4..]]);
    let mut batch = util::Batch::new(unit, 0, 256 * 1024);
    barrier.wait();
    let t0 = Instant::now();
    let deadline = t0 + b.max_time;
    let mut seq = 0u64;
    let mut problem = None;
    while seq < b.max_msgs && Instant::now() < deadline {
        let n = (b.max_msgs - seq).min(batch.len() as u64) as usize;
        if let Err(e) = util::write_all_stalling(&mut p, batch.fill(seq, n)) {
            problem = Some(format!("publisher: {e}"));
            break;
        }
        seq += n as u64;
        state.sent.fetch_add(n as u64, Ordering::AcqRel);
    }
    state.done.store(true, Ordering::Release);
    let mut out = util::Checked {
        expected: seq * receivers as u64,
        ..Default::default()
    };
    for t in rx {
        let (check, why) = t.join().map_err(|_| "subscriber panicked")?;
        out.delivered += check.got;
        out.disorder += check.disorder + check.unreadable;
        if let Some(w) = why {
            problem.get_or_insert(w);
        }
    }
    stop.store(true, Ordering::Release);
    let _ = drain.join();
    out.problem = problem;
    out.elapsed = state.last().saturating_duration_since(t0);
    Ok(out)
}
