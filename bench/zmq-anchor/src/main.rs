//! ZeroMQ bench: publisher → proxy → subscriber, through our proxy
//! (`hermes-bus proxy`) and through libzmq's own proxy (`zmq_proxy` with an
//! XSUB and an XPUB socket, in a process of its own like ours). Publisher
//! and subscriber are libzmq (native code) in both cases, so only the proxy
//! differs. Messages are hermes envelopes (4 JSON frames).
//!
//! Lossless: the publisher keeps at most a window of messages in flight
//! (below every high-water mark), and the received count is checked.
//!
//! Prints `ROW` lines for the main bench (benches/bus):
//! `ROW<TAB>case<TAB>unit<TAB>target<TAB>ours<TAB>anchor name<TAB>anchor`.
//!
//! `zmq-anchor --hermes-bus PATH [--runs N] [--quick]`;
//! `zmq-anchor --libzmq-proxy FRONT BACK` is the anchor proxy itself.
//!
//! Market-data latency (one run, called by benches/bus once per run so
//! that its runs alternate with ours):
//! `zmq-anchor --latency RATE COUNT SIZE [--hermes-bus PATH]`: a libzmq
//! PUB sends COUNT envelopes of SIZE bytes of data at RATE per second
//! (an absolute schedule), each carrying its send time; a libzmq SUB in
//! the same process (one monotonic clock) records the one-way latency.
//! Through libzmq's proxy, or with `--hermes-bus` through ours. Prints
//! `LAT<TAB>p50<TAB>p99<TAB>p99.9<TAB>max<TAB>sent<TAB>received<TAB>late`
//! (µs; `late`: the most the sender fell behind its schedule, µs).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const WINDOW: u64 = 500;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A proxy process, killed when dropped.
struct ProxyProc {
    child: Child,
    front: String,
    back: String,
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        // SAFETY: a pid we spawned and have not reaped.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn wait_port(addr: &str, child: &mut Child) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(5);
    let hostport = addr.trim_start_matches("tcp://");
    loop {
        if std::net::TcpStream::connect(hostport).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("proxy exited: {st}"));
        }
        if Instant::now() > end {
            return Err(format!("proxy not listening on {addr}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn start_proxy(ours: Option<&str>) -> Result<ProxyProc, String> {
    let front = format!("tcp://127.0.0.1:{}", free_port());
    let back = format!("tcp://127.0.0.1:{}", free_port());
    let mut cmd = match ours {
        Some(exe) => {
            let mut c = Command::new(exe);
            c.arg("proxy")
                .arg("--frontend")
                .arg(&front)
                .arg("--backend")
                .arg(&back);
            c.env_remove("RUST_LOG");
            c
        }
        None => {
            let me = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut c = Command::new(me);
            c.arg("--libzmq-proxy").arg(&front).arg(&back);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start proxy: {e}"))?;
    if let Err(e) = wait_port(&front, &mut child).and_then(|_| wait_port(&back, &mut child)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(ProxyProc { child, front, back })
}

/// The anchor proxy: libzmq's steerable-less `zmq_proxy(XSUB, XPUB)`.
fn libzmq_proxy(front: &str, back: &str) -> Result<(), zmq::Error> {
    let ctx = zmq::Context::new();
    let xsub = ctx.socket(zmq::XSUB)?;
    let xpub = ctx.socket(zmq::XPUB)?;
    // Queues sized so that nothing drops (the publisher paces itself too).
    xsub.set_rcvhwm(0)?;
    xsub.set_sndhwm(0)?;
    xpub.set_sndhwm(0)?;
    xpub.set_rcvhwm(0)?;
    xsub.bind(front)?;
    xpub.bind(back)?;
    zmq::proxy(&xsub, &xpub)
}

fn envelope(topic: &str, data: &[u8]) -> Vec<Vec<u8>> {
    vec![
        format!("\"{topic}\"").into_bytes(),
        b"\"bench\"".to_vec(),
        data.to_vec(),
        b"1700000000.25".to_vec(),
    ]
}

fn data(size: usize) -> Vec<u8> {
    let skeleton = r#"{"seq":0,"pad":""}"#.len();
    format!(
        r#"{{"seq":0,"pad":"{}"}}"#,
        "x".repeat(size.saturating_sub(skeleton))
    )
    .into_bytes()
}

/// Receives one whole multipart message into `m`; returns its first frame.
fn recv_msg(s: &zmq::Socket, m: &mut zmq::Message, first: &mut Vec<u8>) -> Result<(), zmq::Error> {
    s.recv(m, 0)?;
    first.clear();
    first.extend_from_slice(m);
    while s.get_rcvmore()? {
        s.recv(m, 0)?;
    }
    Ok(())
}

fn send_msg(s: &zmq::Socket, frames: &[Vec<u8>]) -> Result<(), zmq::Error> {
    let n = frames.len();
    for (i, f) in frames.iter().enumerate() {
        s.send(&f[..], if i + 1 < n { zmq::SNDMORE } else { 0 })?;
    }
    Ok(())
}

/// Publishes probes until the subscriber sees one (subscriptions travel
/// upstream asynchronously), then drains the probes.
fn warm_up(
    ctx: &zmq::Context,
    p: &ProxyProc,
    topic: &str,
) -> Result<(zmq::Socket, zmq::Socket), String> {
    let e = |e: zmq::Error| e.to_string();
    let publ = ctx.socket(zmq::PUB).map_err(e)?;
    publ.set_sndhwm(0).map_err(e)?;
    publ.connect(&p.front).map_err(e)?;
    let sub = ctx.socket(zmq::SUB).map_err(e)?;
    sub.set_rcvhwm(0).map_err(e)?;
    sub.set_subscribe(format!("\"{topic}").as_bytes())
        .map_err(e)?;
    sub.connect(&p.back).map_err(e)?;
    sub.set_rcvtimeo(20).map_err(e)?;
    let probe = envelope(&format!("{topic}/probe"), b"0");
    let end = Instant::now() + Duration::from_secs(5);
    let mut m = zmq::Message::new();
    let mut first = Vec::new();
    loop {
        send_msg(&publ, &probe).map_err(e)?;
        if recv_msg(&sub, &mut m, &mut first).is_ok() {
            break;
        }
        if Instant::now() > end {
            return Err("subscription did not reach the publisher within 5 s".into());
        }
    }
    // Drain whatever probes are still on the way.
    sub.set_rcvtimeo(100).map_err(e)?;
    while recv_msg(&sub, &mut m, &mut first).is_ok() {}
    sub.set_rcvtimeo(200).map_err(e)?;
    Ok((publ, sub))
}

/// The publisher's flow control: at most `WINDOW` messages in flight; it
/// sleeps on a condition variable (no spinning) while the window is full.
struct Window {
    received: AtomicU64,
    waiting: AtomicBool,
    lock: std::sync::Mutex<()>,
    cv: std::sync::Condvar,
}

impl Window {
    fn new() -> Self {
        Window {
            received: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            lock: std::sync::Mutex::new(()),
            cv: std::sync::Condvar::new(),
        }
    }

    fn add(&self) {
        self.received.fetch_add(1, Ordering::Release);
        if self.waiting.load(Ordering::Acquire) {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Waits until fewer than `WINDOW` of `sent` are in flight (or `deadline`).
    fn wait_room(&self, sent: u64, deadline: Instant) {
        while sent - self.received() >= WINDOW && Instant::now() < deadline {
            let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.waiting.store(true, Ordering::Release);
            if sent - self.received() >= WINDOW {
                let _ = self.cv.wait_timeout(g, Duration::from_millis(2));
            }
            self.waiting.store(false, Ordering::Release);
        }
    }
}

/// Delivered messages per second, lossless (count checked).
fn throughput(
    p: &ProxyProc,
    size: usize,
    max_msgs: u64,
    max_time: Duration,
) -> Result<(f64, Option<String>), String> {
    let ctx = zmq::Context::new();
    let (publ, sub) = warm_up(&ctx, p, "TP")?;
    let window = Arc::new(Window::new());
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (r2, d2, s2) = (window.clone(), done.clone(), sent.clone());
    let rx = thread::spawn(move || -> (u64, Instant) {
        let mut m = zmq::Message::new();
        let mut first = Vec::new();
        let mut last = Instant::now();
        let t0 = Instant::now();
        loop {
            if recv_msg(&sub, &mut m, &mut first).is_ok() {
                r2.add();
                last = Instant::now();
            }
            let got = r2.received();
            if d2.load(Ordering::Acquire) && got >= s2.load(Ordering::Acquire) {
                break;
            }
            if t0.elapsed() > max_time + Duration::from_secs(5) {
                break;
            }
        }
        (r2.received(), last)
    });
    let frames = envelope("TP/bench", &data(size));
    let t0 = Instant::now();
    let deadline = t0 + max_time;
    let mut n = 0u64;
    while n < max_msgs && Instant::now() < deadline {
        window.wait_room(n, deadline);
        if n - window.received() >= WINDOW {
            break;
        }
        send_msg(&publ, &frames).map_err(|e| e.to_string())?;
        n += 1;
        sent.store(n, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    let (got, last) = rx.join().map_err(|_| "subscriber panicked")?;
    let rate = got as f64 / last.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    let note = (got < n).then(|| format!("LOST {} of {n}", n - got));
    Ok((rate, note))
}

/// Round trips client → proxy → echo → proxy → client; (p50, p99) in µs.
fn round_trip(
    p: &ProxyProc,
    size: usize,
    iters: u64,
    max_time: Duration,
) -> Result<(f64, f64), String> {
    let ctx = zmq::Context::new();
    let (cpub, csub) = warm_up(&ctx, p, "RTC")?;
    let (epub, esub) = warm_up(&ctx, p, "RTE")?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = thread::spawn(move || {
        let mut m = zmq::Message::new();
        let mut first = Vec::new();
        let back = envelope("RTC/x", &data(size));
        while !stop2.load(Ordering::Acquire) {
            if recv_msg(&esub, &mut m, &mut first).is_ok() && send_msg(&epub, &back).is_err() {
                break;
            }
        }
    });
    let out = envelope("RTE/x", &data(size));
    let mut m = zmq::Message::new();
    let mut first = Vec::new();
    let mut samples = Vec::new();
    let end = Instant::now() + max_time;
    let mut i = 0;
    let result = (|| -> Result<(), String> {
        while i < iters + 200 && Instant::now() < end {
            let t = Instant::now();
            send_msg(&cpub, &out).map_err(|e| e.to_string())?;
            if let Err(e) = recv_msg(&csub, &mut m, &mut first) {
                if i < 200 {
                    // Subscriptions may still be on their way: resend.
                    continue;
                }
                return Err(format!("round trip {i}: {e}"));
            }
            if i >= 200 {
                samples.push(t.elapsed());
            }
            i += 1;
        }
        Ok(())
    })();
    stop.store(true, Ordering::Release);
    let _ = echo.join();
    result?;
    samples.sort();
    if samples.is_empty() {
        return Err("no samples".into());
    }
    let pct =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    Ok((pct(0.5), pct(0.99)))
}

struct Fig {
    values: Vec<f64>,
    notes: Vec<String>,
    err: Option<String>,
}

impl Fig {
    fn new() -> Self {
        Fig {
            values: Vec::new(),
            notes: Vec::new(),
            err: None,
        }
    }
    fn show(&self) -> String {
        if self.values.is_empty() {
            return format!(
                "missing: {}",
                self.err.clone().unwrap_or_else(|| "no run".into())
            );
        }
        let v: Vec<String> = self.values.iter().map(|x| format!("{x:.3}")).collect();
        let mut notes = self.notes.clone();
        notes.dedup();
        if notes.is_empty() {
            v.join(",")
        } else {
            format!("{}|{}", v.join(","), notes.join("; "))
        }
    }
}

fn row(case: &str, unit: &str, target: &str, ours: &Fig, theirs: &Fig) {
    println!(
        "ROW\t{case}\t{unit}\t{target}\t{}\tlibzmq proxy + libzmq peers\t{}",
        ours.show(),
        theirs.show()
    );
}

/// The data frame of a latency probe: exactly `size` bytes (at least the
/// skeleton), `{"t":"<16 digits>","pad":"x.."}` with `t` the send time in
/// ns since the run's base instant (a string: fixed width, so writing it
/// in place keeps the size; the same layout benches/bus uses for ours).
fn stamped(size: usize) -> Vec<u8> {
    let skeleton = r#"{"t":"0000000000000000","pad":""}"#.len();
    format!(
        r#"{{"t":"0000000000000000","pad":"{}"}}"#,
        "x".repeat(size.saturating_sub(skeleton))
    )
    .into_bytes()
}

/// Writes `ns` into the 16 digits of a `stamped` frame.
fn stamp(frame: &mut [u8], ns: u64) {
    let digits = &mut frame[6..22];
    let mut v = ns;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Reads the stamp back (None if the frame is not a probe).
fn read_stamp(frame: &[u8]) -> Option<u64> {
    let d = frame.get(6..22)?;
    d.iter().try_fold(0u64, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + (c - b'0') as u64)
    })
}

/// One paced run; (p50, p99, p99.9, max, sent, received, late) in µs.
fn latency(
    p: &ProxyProc,
    rate: u64,
    count: u64,
    size: usize,
) -> Result<(f64, f64, f64, f64, u64, u64, f64), String> {
    let ctx = zmq::Context::new();
    let (publ, sub) = warm_up(&ctx, p, "LAT")?;
    let base = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (s2, d2) = (sent.clone(), done.clone());
    // Time bound: the schedule plus 5 s to drain.
    let limit = Duration::from_secs_f64(count as f64 / rate as f64) + Duration::from_secs(5);
    let rx = thread::spawn(move || -> Vec<u64> {
        let mut lat = Vec::with_capacity(count as usize);
        let mut m = zmq::Message::new();
        let mut first = Vec::new();
        loop {
            if sub.recv(&mut m, 0).is_ok() {
                first.clear();
                first.extend_from_slice(&m);
                let mut k = 0;
                let mut t = None;
                while sub.get_rcvmore().unwrap_or(false) {
                    if sub.recv(&mut m, 0).is_err() {
                        break;
                    }
                    k += 1;
                    if k == 2 {
                        t = read_stamp(&m);
                    }
                }
                let now = base.elapsed().as_nanos() as u64;
                if first.starts_with(b"\"LAT/bench") {
                    if let Some(t) = t {
                        lat.push(now.saturating_sub(t));
                    }
                }
            }
            let got = lat.len() as u64;
            if got >= count
                || (d2.load(Ordering::Acquire) && got >= s2.load(Ordering::Acquire))
                || base.elapsed() > limit
            {
                break;
            }
        }
        lat
    });
    let mut frames = envelope("LAT/bench", &stamped(size));
    let period = 1e9 / rate as f64;
    let t0 = Instant::now();
    let mut late = 0u64;
    let mut n = 0u64;
    while n < count {
        let due = t0 + Duration::from_nanos((n as f64 * period) as u64);
        let now = Instant::now();
        if now < due {
            thread::sleep(due - now);
        } else {
            late = late.max((now - due).as_nanos() as u64);
        }
        if t0.elapsed() > limit {
            break;
        }
        stamp(&mut frames[2], base.elapsed().as_nanos() as u64);
        send_msg(&publ, &frames).map_err(|e| e.to_string())?;
        n += 1;
        sent.store(n, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    let mut lat = rx.join().map_err(|_| "subscriber panicked")?;
    lat.sort_unstable();
    if lat.is_empty() {
        return Err("nothing received".into());
    }
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    Ok((
        pct(0.5),
        pct(0.99),
        pct(0.999),
        *lat.last().unwrap_or(&0) as f64 / 1e3,
        n,
        lat.len() as u64,
        late as f64 / 1e3,
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--libzmq-proxy" {
        if let Err(e) = libzmq_proxy(&args[2], &args[3]) {
            eprintln!("libzmq proxy: {e}");
            std::process::exit(1);
        }
        return;
    }
    let mut hermes = None;
    let mut runs = 3usize;
    let mut quick = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--hermes-bus" => hermes = it.next().cloned(),
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(3).max(1),
            "--quick" => quick = true,
            _ => {}
        }
    }
    let max_time = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(1200)
    };
    if let Some(i) = args.iter().position(|a| a == "--latency") {
        let num = |k: usize| args.get(i + k).and_then(|v| v.parse::<u64>().ok());
        let (Some(rate), Some(count), Some(size)) = (num(1), num(2), num(3)) else {
            eprintln!("usage: zmq-anchor --latency RATE COUNT SIZE [--hermes-bus PATH]");
            std::process::exit(2);
        };
        let proxy = match hermes.as_deref() {
            Some(exe) => start_proxy(Some(exe)),
            None => start_proxy(None),
        };
        match proxy.and_then(|p| latency(&p, rate.max(1), count, size as usize)) {
            Ok((a, b, c, d, sent, got, late)) => {
                println!("LAT\t{a:.3}\t{b:.3}\t{c:.3}\t{d:.3}\t{sent}\t{got}\t{late:.3}");
                return;
            }
            Err(e) => {
                eprintln!("latency run: {e}");
                std::process::exit(1);
            }
        }
    }
    let (major, minor, patch) = zmq::version();
    eprintln!("  libzmq {major}.{minor}.{patch}");

    let start = |ours: bool| -> Result<ProxyProc, String> {
        match (ours, hermes.as_deref()) {
            (true, None) => Err("--hermes-bus not given".into()),
            (true, Some(exe)) => start_proxy(Some(exe)),
            (false, _) => start_proxy(None),
        }
    };
    for (size, max_msgs) in [(100usize, 300_000u64), (1024, 200_000)] {
        let case = format!(
            "zmq proxy pub→sub {} lossless",
            if size >= 1024 {
                "1 KB".to_string()
            } else {
                format!("{size} B")
            }
        );
        eprintln!("{case}");
        let (mut o, mut t) = (Fig::new(), Fig::new());
        for _ in 0..runs {
            for (fig, ours) in [(&mut o, true), (&mut t, false)] {
                match start(ours).and_then(|p| throughput(&p, size, max_msgs, max_time)) {
                    Ok((v, note)) => {
                        fig.values.push(v);
                        fig.notes.extend(note);
                    }
                    Err(e) => {
                        eprintln!("    run failed: {e}");
                        fig.err.get_or_insert(e);
                    }
                }
            }
        }
        row(&case, "rate", "1.0", &o, &t);
    }
    for size in [100usize] {
        let case = format!("zmq proxy round trip {size} B");
        eprintln!("{case}");
        let iters = if quick { 2000 } else { 10_000 };
        let (mut o50, mut o99, mut t50, mut t99) = (Fig::new(), Fig::new(), Fig::new(), Fig::new());
        for _ in 0..runs {
            for ((f50, f99), ours) in [((&mut o50, &mut o99), true), ((&mut t50, &mut t99), false)]
            {
                match start(ours).and_then(|p| round_trip(&p, size, iters, max_time)) {
                    Ok((a, b)) => {
                        f50.values.push(a);
                        f99.values.push(b);
                    }
                    Err(e) => {
                        eprintln!("    run failed: {e}");
                        f50.err.get_or_insert(e.clone());
                        f99.err.get_or_insert(e);
                    }
                }
            }
        }
        row(&format!("{case} p50"), "us", "1.0", &o50, &t50);
        row(&format!("{case} p99"), "us", "", &o99, &t99);
    }
}
