//! Soak test: the real `hermes-bus server --zmq` for minutes under mixed
//! honest traffic, counted exactly, while attacks repeat in cycles.
//!
//! Run it through `bench/soak [--minutes N]`, which builds release and
//! passes the server binary. By hand:
//!
//! ```text
//! cargo build --release --bin hermes-bus --example soak
//! target/release/examples/soak --server-bin target/release/hermes-bus --minutes 2
//! ```
//!
//! Honest traffic, each stream numbered and checked complete and in order
//! by every receiver, paced (a few thousand messages per second):
//! - `p2p`: Unix point-to-point pairs;
//! - `bc`: a Unix broadcast stream (every honest registered session gets
//!   every broadcast and checks it);
//! - `topic`: Unix topic publish / subscribe;
//! - `zmq`: our `Publisher` → the proxy → our `Receiver` (PUB semantics: a
//!   loss is acceptable only where a drop counter accounts for it);
//! - `unix→zmq`: the `topic` stream as that `Receiver` gets it through the
//!   bus's bridge (same rule);
//! - `ping`: a Unix `ping` → `pong` round trip on its own OS thread (so
//!   the soak's own load does not count as bus latency).
//!
//! Attacks (`--attacks`, default all), each in its own loop, bounded in
//! count and time: `wrap` (a ZMTP LONG frame length near 2^64 / 2^63),
//! `storm` (subscription storms), `partial` (10 MiB partial Unix frames
//! that stall), `deep` (1,500-deep bodies), `name1m` (a 1 MiB endpoint
//! name), `lists` (unread `list_endpoints` replies), `deaf` (a receiver
//! that never reads while others blast it), `ghost` (a name re-registered
//! without reading), `idle` (ZeroMQ peers that handshake and do nothing).
//!
//! Every `--report-secs` it prints one line: server RSS / peak and CPU;
//! per stream `sent→received` copies, gaps, out-of-order, the largest
//! latency in the interval, copies later than 100 ms and how far the
//! sender fell behind its schedule; ping p50/p99/max; the attack counters;
//! the server's own counters (`stats`). At the end a summary. Exit code 0
//! only if the Unix streams lost nothing, the server is alive and answers,
//! and its RSS at the end is within `--memory-budget-mib` +
//! `--rss-slack-mib`; everything else worth a look is printed as a
//! `FINDING` line.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use hermes_bus::envelope::Data;
use hermes_bus::transports::unix::frame;
use hermes_bus::transports::zmq::endpoint::{self, ReadHalf, WriteHalf};
use hermes_bus::transports::zmq::zmtp::{self, FrameReader, SocketType};
use hermes_bus::transports::zmq::{
    Publisher, PublisherConfig, Receiver, ReceiverConfig, SlowPolicy,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Soak test of hermes-bus server --zmq (see bench/soak)")]
struct Args {
    /// The `hermes-bus` binary to run (release build).
    #[arg(long)]
    server_bin: PathBuf,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds between report lines.
    #[arg(long, default_value_t = 30)]
    report_secs: u64,
    /// The server's `--memory-budget`, in MiB.
    #[arg(long, default_value_t = 512)]
    memory_budget_mib: u64,
    /// RSS at the end may be at most the budget plus this, in MiB.
    #[arg(long, default_value_t = 256)]
    rss_slack_mib: u64,
    /// Unix point-to-point pairs.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Messages per second per pair.
    #[arg(long, default_value_t = 2000)]
    pair_rate: u64,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 1000)]
    broadcast_rate: u64,
    /// Topic publications per second.
    #[arg(long, default_value_t = 2000)]
    topic_rate: u64,
    /// Unix topic subscribers.
    #[arg(long, default_value_t = 2)]
    topic_subscribers: usize,
    /// ZeroMQ envelopes per second.
    #[arg(long, default_value_t = 2000)]
    zmq_rate: u64,
    /// Pings per second.
    #[arg(long, default_value_t = 10)]
    ping_hz: u64,
    /// Subscriptions per storm subscriber (two per storm).
    #[arg(long, default_value_t = 25_000)]
    storm_subs: usize,
    /// Idle ZeroMQ peers opened every 10 s, per side.
    #[arg(long, default_value_t = 200)]
    idle_per_side: usize,
    /// How long each idle ZeroMQ peer stays, in seconds.
    #[arg(long, default_value_t = 60)]
    idle_hold_secs: u64,
    /// The attacks to run, comma-separated: wrap, storm, partial, deep,
    /// name1m, lists, deaf, ghost, idle; `all` or `none`.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    attacks: Vec<String>,
    /// Keep the server's temp dir (socket, log) after the run.
    #[arg(long)]
    keep_dir: bool,
}

// ---------------------------------------------------------------- clock

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the soak started (one monotonic clock for senders
/// and receivers, which share this process).
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

// ---------------------------------------------------------------- counters

/// One honest stream's counters. `sent` counts messages; `recv`, `gaps`
/// and `disorder` count copies (a broadcast to six sessions is six).
#[derive(Default)]
struct Flow {
    /// Messages fully written (Unix) or queued by the publisher (zmq).
    sent: AtomicU64,
    /// Receivers per message.
    receivers: AtomicU64,
    /// Copies received, each checked.
    recv: AtomicU64,
    /// Copies skipped (a receiver saw n+k after n-1).
    gaps: AtomicU64,
    /// Copies that went backwards (duplicates or reordering).
    disorder: AtomicU64,
    /// Largest send → receive latency since the last report, µs.
    lat_max_us: AtomicU64,
    /// Largest latency over the run, µs.
    lat_max_all_us: AtomicU64,
    /// Copies that took over 100 ms.
    slow: AtomicU64,
    /// How far the sender fell behind its schedule since the last report, µs.
    behind_us: AtomicU64,
    /// Writes that failed or timed out (the sender then stops).
    write_failures: AtomicU64,
}

impl Flow {
    fn with_receivers(n: usize) -> Flow {
        let f = Flow::default();
        f.receivers.store(n as u64, Relaxed);
        f
    }

    /// Checks copy `n` (sent at `t` µs) against the receiver's `next`.
    fn check(&self, next: &mut u64, n: u64, t: u64) {
        if n < *next {
            self.disorder.fetch_add(1, Relaxed);
            return;
        }
        if n > *next {
            self.gaps.fetch_add(n - *next, Relaxed);
        }
        *next = n + 1;
        self.recv.fetch_add(1, Relaxed);
        let lat = now_us().saturating_sub(t);
        self.lat_max_us.fetch_max(lat, Relaxed);
        self.lat_max_all_us.fetch_max(lat, Relaxed);
        if lat > 100_000 {
            self.slow.fetch_add(1, Relaxed);
        }
    }

    fn expected(&self) -> u64 {
        self.sent.load(Relaxed) * self.receivers.load(Relaxed)
    }

    fn missing(&self) -> u64 {
        self.expected().saturating_sub(self.recv.load(Relaxed))
    }

    /// One report field; resets the per-interval maxima.
    fn line(&self, name: &str) -> String {
        let lat = self.lat_max_us.swap(0, Relaxed);
        let behind = self.behind_us.swap(0, Relaxed);
        let r = self.receivers.load(Relaxed);
        let copies = if r == 1 {
            String::new()
        } else {
            format!("x{r}")
        };
        format!(
            "{name} {}{copies}→{} gap {} ooo {} lat≤{} late {} sched-lag≤{}",
            self.sent.load(Relaxed),
            self.recv.load(Relaxed),
            self.gaps.load(Relaxed),
            self.disorder.load(Relaxed),
            fmt_us(lat),
            self.slow.load(Relaxed),
            fmt_us(behind),
        )
    }
}

/// Everything the honest side counts.
#[derive(Default)]
struct Honest {
    p2p: Flow,
    bc: Flow,
    topic: Flow,
    zmq: Flow,
    /// The Unix topic stream as a ZeroMQ subscriber gets it through the
    /// bus's bridge (`sent` mirrors `topic.sent`).
    u2z: Flow,
    /// ZeroMQ envelopes `publish` did not queue (counted by the publisher).
    zmq_unqueued: AtomicU64,
    /// Frames an honest session got that belong to no honest stream (an
    /// attack's payload reaching a bystander).
    foreign: AtomicU64,
    /// Frames an honest session could not parse.
    corrupt: AtomicU64,
    /// Honest connections the bus closed.
    links_lost: AtomicU64,
    /// Error replies to honest sessions, by code.
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Honest {
    fn unix_flows(&self) -> [(&'static str, &Flow); 3] {
        [("p2p", &self.p2p), ("bc", &self.bc), ("topic", &self.topic)]
    }
}

/// Ping round trips, in µs.
#[derive(Default)]
struct Pings {
    interval: Mutex<Vec<u64>>,
    all: Mutex<Vec<u64>>,
    timeouts: AtomicU64,
    reconnects: AtomicU64,
}

/// Counters of the attacks.
#[derive(Default)]
struct Attacks {
    wrap_sent: AtomicU64,
    wrap_cut: AtomicU64,
    wrap_failed: AtomicU64,
    storm_cycles: AtomicU64,
    storm_subs: AtomicU64,
    storm_stalled: AtomicU64,
    partial_sent: AtomicU64,
    partial_overloaded: AtomicU64,
    partial_timed_out: AtomicU64,
    partial_other: AtomicU64,
    partial_skipped: AtomicU64,
    partial_max_open: AtomicU64,
    deep_sent: AtomicU64,
    deep_refused: AtomicU64,
    bigname_sent: AtomicU64,
    bigname_refused: AtomicU64,
    bigname_overloaded: AtomicU64,
    list_cycles: AtomicU64,
    list_requests: AtomicU64,
    deaf_cycles: AtomicU64,
    deaf_blasted: AtomicU64,
    ghost_registers: AtomicU64,
    ghost_sent: AtomicU64,
    idle_opened: AtomicU64,
    idle_failed: AtomicU64,
    /// Attack steps that failed in a way the attack did not expect
    /// (connect refused, handshake failed, no answer), by name.
    anomalies: Mutex<BTreeMap<String, u64>>,
}

impl Attacks {
    fn anomaly(&self, what: &str) {
        *self
            .anomalies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what.to_owned())
            .or_default() += 1;
    }

    fn line(&self) -> String {
        let g = |a: &AtomicU64| a.load(Relaxed);
        format!(
            "wrap {}(cut {}) storm {}x{}k partial {}(ovl {} tmo {} skip {}) deep {}/{} name1M {}+{}/{} lists {}x{} deaf {}({} blasted) ghost {} idle {}",
            g(&self.wrap_sent),
            g(&self.wrap_cut),
            g(&self.storm_cycles),
            g(&self.storm_subs) / 1000,
            g(&self.partial_sent),
            g(&self.partial_overloaded),
            g(&self.partial_timed_out),
            g(&self.partial_skipped),
            g(&self.deep_refused),
            g(&self.deep_sent),
            g(&self.bigname_refused),
            g(&self.bigname_overloaded),
            g(&self.bigname_sent),
            g(&self.list_cycles),
            g(&self.list_requests),
            g(&self.deaf_cycles),
            g(&self.deaf_blasted),
            g(&self.ghost_registers),
            g(&self.idle_opened),
        )
    }
}

/// What every task shares.
struct Ctx {
    socket: PathBuf,
    zmq_in: String,
    zmq_out: String,
    /// Honest senders and attack cycles stop here.
    deadline: tokio::time::Instant,
    /// Cancelled when the attacks must let go of everything they hold.
    attacks_stop: CancellationToken,
    /// Cancelled when the honest readers stop.
    readers_stop: CancellationToken,
    /// Cancelled once every stream is set up: the senders start.
    go: CancellationToken,
    /// Honest senders still in their loop.
    senders_running: AtomicU64,
    honest: Honest,
    attacks: Attacks,
}

impl Ctx {
    fn running(&self) -> bool {
        tokio::time::Instant::now() < self.deadline && !self.attacks_stop.is_cancelled()
    }

    /// Sleeps `d` or until the attacks stop; false when they stopped.
    async fn pause(&self, d: Duration) -> bool {
        let until = (tokio::time::Instant::now() + d).min(self.deadline);
        tokio::select! {
            _ = self.attacks_stop.cancelled() => false,
            _ = tokio::time::sleep_until(until) => self.running(),
        }
    }
}

// ---------------------------------------------------------------- formatting

fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// (p50, p99, max, count) of `v`.
fn summary(mut v: Vec<u64>) -> (u64, u64, u64, usize) {
    v.sort_unstable();
    let max = v.last().copied().unwrap_or(0);
    (percentile(&v, 0.5), percentile(&v, 0.99), max, v.len())
}

fn mib(kib: u64) -> String {
    format!("{:.1}MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------- server

/// (VmRSS, VmHWM) of `pid` in KiB.
fn proc_mem(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds (user + system) used so far by `pid` ("self" for us).
fn proc_cpu(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A free loopback port (bound, then released).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Raises the open-files limit to its hard limit (the attacks hold a few
/// hundred connections; the server inherits it).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Starts the server; it gets SIGKILL if this process dies first.
fn start_server(args: &Args, dir: &Path, zin: &str, zout: &str) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("server.log"))?;
    let mut cmd = Command::new(&args.server_bin);
    cmd.arg("--socket")
        .arg(dir.join("bus.sock"))
        .arg("--root")
        .arg(dir)
        .arg("server")
        .args(["--zmq", "--zmq-in", zin, "--zmq-out", zout])
        .arg("--memory-budget")
        .arg(format!("{}M", args.memory_budget_mib))
        .env("HERMES_BUS_ROOT", dir)
        .env("HERMES_HOME", dir)
        .env("HERMES_BUS_HOOKS", "none")
        .env("HERMES_BUS_LOG", "warn")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; it only sets this child's
    // parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

/// Waits until the Unix socket and both ZeroMQ ports accept.
async fn wait_listening(socket: &Path, ports: [u16; 2], child: &mut Child) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("server exited at start: {status}");
        }
        let unix = UnixStream::connect(socket).await.is_ok();
        let mut tcp = true;
        for p in ports {
            tcp &= tokio::net::TcpStream::connect(("127.0.0.1", p))
                .await
                .is_ok();
        }
        if unix && tcp {
            return Ok(());
        }
        if Instant::now() > end {
            anyhow::bail!("server not listening after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- Unix wire

fn frame_of(v: &Value) -> Bytes {
    frame::encode(&serde_json::to_vec(v).unwrap_or_default())
}

/// Reads the next frame within `limit`, skipping keepalive pongs.
async fn read_json<R: AsyncReadExt + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    limit: Duration,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match frame::decode(buf, frame::MAX_FRAME) {
            Ok(Some(p)) => {
                let v: Value = serde_json::from_slice(&p).ok()?;
                if v["type"] == "pong" && v["keepalive"] == true {
                    continue;
                }
                return Some(v);
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        match tokio::time::timeout_at(deadline, r.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Connects and (with a name) registers; returns the stream and what was
/// read past the reply.
async fn unix_session(socket: &Path, name: Option<&str>) -> anyhow::Result<(UnixStream, BytesMut)> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    let mut buf = BytesMut::with_capacity(64 << 10);
    if let Some(name) = name {
        s.write_all(&frame_of(&json!({"type": "register", "endpoint": name})))
            .await?;
        let v = read_json(&mut s, &mut buf, Duration::from_secs(10))
            .await
            .ok_or_else(|| anyhow::anyhow!("no reply to register {name}"))?;
        anyhow::ensure!(v["type"] == "registered", "register {name}: {v}");
    }
    Ok((s, buf))
}

/// What an honest reader checks.
#[derive(Clone, Copy)]
struct Role {
    /// The p2p pair whose messages it receives.
    pair: Option<usize>,
    /// Registered: gets every broadcast.
    registered: bool,
}

/// Reads an honest session until the readers stop, checking every frame.
async fn honest_reader(ctx: Arc<Ctx>, mut rd: OwnedReadHalf, mut buf: BytesMut, role: Role) {
    let h = &ctx.honest;
    let (mut next_p2p, mut next_bc, mut next_topic) = (0u64, 0u64, 0u64);
    loop {
        loop {
            let p = match frame::decode(&mut buf, frame::MAX_FRAME) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => {
                    h.corrupt.fetch_add(1, Relaxed);
                    return;
                }
            };
            let Ok(v) = serde_json::from_slice::<Value>(&p) else {
                h.corrupt.fetch_add(1, Relaxed);
                continue;
            };
            let num = |d: &Value| (d["n"].as_u64(), d["t"].as_u64());
            match v["type"].as_str() {
                Some("message") => {
                    let b = &v["body"];
                    match (b["k"].as_str(), num(b)) {
                        (Some("p"), (Some(n), Some(t)))
                            if role.pair.is_some()
                                && b["s"].as_u64() == role.pair.map(|p| p as u64) =>
                        {
                            h.p2p.check(&mut next_p2p, n, t)
                        }
                        (Some("b"), (Some(n), Some(t))) if role.registered => {
                            h.bc.check(&mut next_bc, n, t)
                        }
                        _ => {
                            h.foreign.fetch_add(1, Relaxed);
                        }
                    }
                }
                Some("publish") => match (v["data"]["k"].as_str(), num(&v["data"])) {
                    (Some("t"), (Some(n), Some(t))) => h.topic.check(&mut next_topic, n, t),
                    _ => {
                        h.foreign.fetch_add(1, Relaxed);
                    }
                },
                Some("error") => {
                    let code = v["code"].as_str().unwrap_or("?").to_owned();
                    *h.errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(code)
                        .or_default() += 1;
                }
                Some("pong" | "registered" | "subscribed") => {}
                _ => {
                    h.foreign.fetch_add(1, Relaxed);
                }
            }
        }
        tokio::select! {
            _ = ctx.readers_stop.cancelled() => return,
            r = rd.read_buf(&mut buf) => match r {
                Ok(n) if n > 0 => {}
                _ => {
                    if !ctx.readers_stop.is_cancelled() {
                        h.links_lost.fetch_add(1, Relaxed);
                    }
                    return;
                }
            },
        }
    }
}

/// Sends `rate` messages per second built by `mk(n, t, out)` until the
/// deadline, in batches every 10 ms (at most 100 ms worth at once).
async fn paced_sender(
    ctx: Arc<Ctx>,
    mut wr: OwnedWriteHalf,
    rate: u64,
    flow: &Flow,
    mk: impl Fn(u64, u64, &mut Vec<u8>),
) -> OwnedWriteHalf {
    let _running = Running::new(&ctx.senders_running);
    ctx.go.cancelled().await;
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    let mut out = Vec::with_capacity(256 << 10);
    while tokio::time::Instant::now() < ctx.deadline {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        let behind = due.saturating_sub(n) * 1_000_000 / rate.max(1);
        flow.behind_us.fetch_max(behind, Relaxed);
        let upto = due.min(n + rate / 10 + 1);
        let first = n;
        out.clear();
        while n < upto {
            mk(n, now_us(), &mut out);
            n += 1;
        }
        if out.is_empty() {
            continue;
        }
        // A bus that stops reading holds the sender here (backpressure);
        // past the deadline plus a minute that counts as a failure.
        let limit = ctx.deadline + Duration::from_secs(60);
        match tokio::time::timeout_at(limit, wr.write_all(&out)).await {
            Ok(Ok(())) => {
                flow.sent.fetch_add(n - first, Relaxed);
            }
            _ => {
                flow.write_failures.fetch_add(1, Relaxed);
                break;
            }
        }
    }
    wr
}

/// Counts a sender as running while it lives.
struct Running<'a>(&'a AtomicU64);

impl<'a> Running<'a> {
    fn new(n: &'a AtomicU64) -> Running<'a> {
        n.fetch_add(1, Relaxed);
        Running(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Keeps a sender's write half open (closing it would end its session)
/// until the readers stop.
async fn hold_open(ctx: Arc<Ctx>, wr: OwnedWriteHalf) {
    ctx.readers_stop.cancelled().await;
    drop(wr);
}

/// Appends one frame holding `json`.
fn put_frame(out: &mut Vec<u8>, json: &str) {
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json.as_bytes());
}

/// Sends a heartbeat `ping` every 20 s (so the bus never takes a reading
/// session for a silent one) until the readers stop.
async fn heartbeat(ctx: Arc<Ctx>, mut wr: OwnedWriteHalf) {
    let ping = frame_of(&json!({"type": "ping"}));
    loop {
        tokio::select! {
            _ = ctx.readers_stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(20)) => {}
        }
        if wr.write_all(&ping).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- ping thread

/// Pings the bus `hz` times a second from a plain thread (not the tokio
/// runtime, so the soak's own load does not show as bus latency).
fn ping_thread(socket: PathBuf, hz: u64, pings: Arc<Pings>, stop: Arc<AtomicBool>) {
    use std::io::{Read, Write};
    let period = Duration::from_micros(1_000_000 / hz.max(1));
    let req = frame_of(&json!({"type": "ping"}));
    let mut conn: Option<std::os::unix::net::UnixStream> = None;
    let mut buf = BytesMut::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while !stop.load(Relaxed) {
        let next = Instant::now() + period;
        if conn.is_none() {
            buf.clear();
            conn = std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .filter(|s| s.set_read_timeout(Some(Duration::from_secs(10))).is_ok());
            if conn.is_none() {
                pings.timeouts.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            pings.reconnects.fetch_add(1, Relaxed);
        }
        let Some(s) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        let mut ok = s.write_all(&req).is_ok();
        'wait: while ok {
            while let Ok(Some(p)) = frame::decode(&mut buf, frame::MAX_FRAME) {
                let v: Value = serde_json::from_slice(&p).unwrap_or(Value::Null);
                if v["type"] == "pong" && v["keepalive"] != true {
                    break 'wait;
                }
            }
            match s.read(&mut chunk) {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => ok = false,
            }
        }
        if ok {
            let rtt = t0.elapsed().as_micros() as u64;
            for v in [&pings.interval, &pings.all] {
                v.lock().unwrap_or_else(|p| p.into_inner()).push(rtt);
            }
        } else {
            pings.timeouts.fetch_add(1, Relaxed);
            conn = None;
        }
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
}

// ---------------------------------------------------------------- honest streams

/// Starts the Unix streams; returns their tasks.
async fn start_unix_streams(
    ctx: &Arc<Ctx>,
    args: &Args,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let registered = args.pairs + args.topic_subscribers;
    ctx.honest.bc.receivers.store(registered as u64, Relaxed);
    ctx.honest
        .topic
        .receivers
        .store(args.topic_subscribers as u64, Relaxed);
    // Receivers first (registered), so nothing is sent before they exist.
    for i in 0..args.pairs {
        let (s, buf) = unix_session(&ctx.socket, Some(&format!("soak-p2p-{i}"))).await?;
        let (rd, wr) = s.into_split();
        let role = Role {
            pair: Some(i),
            registered: true,
        };
        tasks.push(tokio::spawn(honest_reader(ctx.clone(), rd, buf, role)));
        tasks.push(tokio::spawn(heartbeat(ctx.clone(), wr)));
    }
    for i in 0..args.topic_subscribers {
        let (mut s, mut buf) = unix_session(&ctx.socket, Some(&format!("soak-topic-{i}"))).await?;
        s.write_all(&frame_of(
            &json!({"type": "subscribe", "topic": "soak/unix/"}),
        ))
        .await?;
        let v = read_json(&mut s, &mut buf, Duration::from_secs(10))
            .await
            .ok_or_else(|| anyhow::anyhow!("no reply to subscribe"))?;
        anyhow::ensure!(v["type"] == "subscribed", "subscribe: {v}");
        let (rd, wr) = s.into_split();
        let role = Role {
            pair: None,
            registered: true,
        };
        tasks.push(tokio::spawn(honest_reader(ctx.clone(), rd, buf, role)));
        tasks.push(tokio::spawn(heartbeat(ctx.clone(), wr)));
    }
    let unregistered = Role {
        pair: None,
        registered: false,
    };
    // Senders: unregistered connections (no broadcasts to them), each with
    // a reader for whatever the bus answers.
    let pad = "p".repeat(64);
    for i in 0..args.pairs {
        let (s, buf) = unix_session(&ctx.socket, None).await?;
        let (rd, wr) = s.into_split();
        tasks.push(tokio::spawn(honest_reader(
            ctx.clone(),
            rd,
            buf,
            unregistered,
        )));
        let (c, pad, rate) = (ctx.clone(), pad.clone(), args.pair_rate);
        tasks.push(tokio::spawn(async move {
            let c2 = c.clone();
            let wr = paced_sender(c, wr, rate, &c2.honest.p2p, move |n, t, out| {
                put_frame(
                    out,
                    &format!(
                        r#"{{"type":"message","to":"soak-p2p-{i}","body":{{"k":"p","s":{i},"n":{n},"t":{t},"pad":"{pad}"}}}}"#
                    ),
                )
            })
            .await;
            hold_open(c2, wr).await;
        }));
    }
    {
        let (s, buf) = unix_session(&ctx.socket, None).await?;
        let (rd, wr) = s.into_split();
        tasks.push(tokio::spawn(honest_reader(
            ctx.clone(),
            rd,
            buf,
            unregistered,
        )));
        let (c, rate) = (ctx.clone(), args.broadcast_rate);
        tasks.push(tokio::spawn(async move {
            let c2 = c.clone();
            let wr = paced_sender(c, wr, rate, &c2.honest.bc, |n, t, out| {
                put_frame(
                    out,
                    &format!(r#"{{"type":"message","body":{{"k":"b","n":{n},"t":{t}}}}}"#),
                )
            })
            .await;
            hold_open(c2, wr).await;
        }));
    }
    {
        let (s, buf) = unix_session(&ctx.socket, None).await?;
        let (rd, wr) = s.into_split();
        tasks.push(tokio::spawn(honest_reader(
            ctx.clone(),
            rd,
            buf,
            unregistered,
        )));
        let (c, rate) = (ctx.clone(), args.topic_rate);
        tasks.push(tokio::spawn(async move {
            let c2 = c.clone();
            let wr = paced_sender(c, wr, rate, &c2.honest.topic, |n, t, out| {
                put_frame(
                    out,
                    &format!(
                        r#"{{"type":"publish","topic":"soak/unix/{}","data":{{"k":"t","n":{n},"t":{t}}}}}"#,
                        n % 8
                    ),
                )
            })
            .await;
            hold_open(c2, wr).await;
        }));
    }
    Ok(tasks)
}

/// The ZeroMQ stream: our Publisher → proxy → our Receiver.
struct ZmqStream {
    publisher: Publisher,
    receiver: Arc<Receiver>,
}

async fn start_zmq_stream(
    ctx: &Arc<Ctx>,
) -> anyhow::Result<(ZmqStream, Vec<tokio::task::JoinHandle<()>>)> {
    let mut rc = ReceiverConfig::new(ctx.zmq_out.clone(), "soak-zmq-rx");
    rc.topics = vec!["soak/zmq/".into(), "soak/unix/".into()];
    rc.slow_policy = SlowPolicy::Warn;
    let mut rx = Receiver::with_config(rc)?;
    rx.start()?;
    rx.wait_connected(Duration::from_secs(10)).await?;
    let mut tx = Publisher::with_config(PublisherConfig::new(ctx.zmq_in.clone(), "soak-zmq-tx"))?;
    tx.start()?;
    tx.wait_connected(Duration::from_secs(10)).await?;
    // Warm up: the receiver's subscription must have reached the proxy
    // before numbering starts.
    let warm = Data::json(&json!({"k": "w"}))?;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        tx.publish_parts("soak/zmq/warm", "soak", &warm)?;
        if let Some(env) = rx.recv_timeout(Duration::from_millis(50)).await {
            if env.topic == "soak/zmq/warm" {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < end, "zmq warm-up: nothing arrived in 20 s");
    }
    ctx.honest.zmq.receivers.store(1, Relaxed);
    ctx.honest.u2z.receivers.store(1, Relaxed);
    let rx = Arc::new(rx);
    let mut tasks = Vec::new();
    let (c, r) = (ctx.clone(), rx.clone());
    tasks.push(tokio::spawn(async move {
        let (mut next, mut next_u2z) = (0u64, 0u64);
        loop {
            let env = tokio::select! {
                _ = c.readers_stop.cancelled() => return,
                e = r.recv() => e,
            };
            let Some(env) = env else { return };
            let v: Value = match &env.data {
                Data::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
                Data::Typed(_) => Value::Null,
            };
            match (v["k"].as_str(), v["n"].as_u64(), v["t"].as_u64()) {
                (Some("z"), Some(n), Some(t)) => c.honest.zmq.check(&mut next, n, t),
                (Some("t"), Some(n), Some(t)) if env.topic.starts_with("soak/unix/") => {
                    c.honest.u2z.check(&mut next_u2z, n, t)
                }
                (Some("w"), _, _) => {}
                _ => {
                    c.honest.foreign.fetch_add(1, Relaxed);
                }
            }
        }
    }));
    Ok((
        ZmqStream {
            publisher: tx,
            receiver: rx,
        },
        tasks,
    ))
}

/// Publishes `rate` numbered envelopes per second until the deadline.
async fn zmq_sender(ctx: Arc<Ctx>, publisher: &Publisher, rate: u64) {
    let flow = &ctx.honest.zmq;
    let _running = Running::new(&ctx.senders_running);
    ctx.go.cancelled().await;
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    while tokio::time::Instant::now() < ctx.deadline {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        flow.behind_us
            .fetch_max(due.saturating_sub(n) * 1_000_000 / rate.max(1), Relaxed);
        let upto = due.min(n + rate / 10 + 1);
        while n < upto {
            let queued = Data::json(&json!({"k": "z", "n": n, "t": now_us()}))
                .ok()
                .and_then(|d| publisher.publish_parts("soak/zmq/0", "soak", &d).ok())
                .unwrap_or(false);
            if queued {
                flow.sent.fetch_add(1, Relaxed);
            } else {
                ctx.honest.zmq_unqueued.fetch_add(1, Relaxed);
            }
            n += 1;
        }
    }
}

// ---------------------------------------------------------------- raw ZMTP

struct RawZmq {
    r: ReadHalf,
    w: WriteHalf,
    reader: FrameReader,
}

async fn raw_zmq(addr: &str, ty: SocketType) -> anyhow::Result<RawZmq> {
    let ep = addr.parse()?;
    let s = tokio::time::timeout(Duration::from_secs(5), endpoint::connect(&ep))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    let (mut r, mut w) = s.into_split();
    let mut reader = FrameReader::new(64 << 20);
    zmtp::handshake(&mut r, &mut w, &mut reader, ty, &[], Duration::from_secs(5)).await?;
    Ok(RawZmq { r, w, reader })
}

/// A topic frame with MORE, then a LONG frame of length `len`, then 95
/// bytes (tests/zmq_hostile.rs).
fn length_attack(len: u64) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(0x01);
    b.put_u8(5);
    b.put_slice(b"\"T/x/");
    b.put_u8(0x03);
    b.put_u64(len);
    b.put_slice(&[b'A'; 95]);
    b
}

// ---------------------------------------------------------------- attacks

/// Every 5 s: a raw publisher sends a LONG frame whose length is near
/// 2^64 or 2^63; the proxy must cut it off (EOF) and nobody else notices.
async fn attack_wrap(ctx: Arc<Ctx>) {
    let lens = [u64::MAX - 7, u64::MAX - 90, 1u64 << 63, (1u64 << 63) + 1];
    let mut i = 0;
    while ctx.pause(Duration::from_secs(5)).await {
        let a = &ctx.attacks;
        let mut p = match raw_zmq(&ctx.zmq_in, SocketType::Pub).await {
            Ok(p) => p,
            Err(_) => {
                a.wrap_failed.fetch_add(1, Relaxed);
                a.anomaly("wrap: connect/handshake failed");
                continue;
            }
        };
        let attack = length_attack(lens[i % lens.len()]);
        i += 1;
        if p.w.write_all(&attack).await.is_err() || p.w.flush().await.is_err() {
            a.wrap_failed.fetch_add(1, Relaxed);
            continue;
        }
        a.wrap_sent.fetch_add(1, Relaxed);
        // The proxy sends this "publisher" the current subscriptions, then
        // must close it; read (and drop) until EOF.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match p.reader.fill(&mut p.r).await {
                    Ok(true) => p.reader.buf.clear(),
                    _ => return,
                }
            }
        })
        .await
        .is_ok();
        if closed {
            a.wrap_cut.fetch_add(1, Relaxed);
        } else {
            a.anomaly("wrap: attacker not cut off in 10 s");
        }
    }
}

/// Every 10 s: two raw subscribers each send `n` distinct subscriptions in
/// one go, stay 1 s, and leave (their cancels flow upstream).
async fn attack_storm(ctx: Arc<Ctx>, n: usize) {
    let mut cycle = 0u64;
    while ctx.pause(Duration::from_secs(10)).await {
        cycle += 1;
        let mut set = tokio::task::JoinSet::new();
        for s in 0..2 {
            let c = ctx.clone();
            set.spawn(async move {
                let a = &c.attacks;
                let Ok(mut p) = raw_zmq(&c.zmq_out, SocketType::Sub).await else {
                    a.anomaly("storm: connect/handshake failed");
                    return;
                };
                let mut b = BytesMut::with_capacity(n * 32);
                for j in 0..n {
                    zmtp::put_subscription(
                        &mut b,
                        true,
                        format!("\"storm/{cycle}/{s}/{j:06}").as_bytes(),
                    );
                }
                match tokio::time::timeout(Duration::from_secs(10), p.w.write_all(&b)).await {
                    Ok(Ok(())) => {
                        let _ = p.w.flush().await;
                        a.storm_subs.fetch_add(n as u64, Relaxed);
                    }
                    _ => {
                        a.storm_stalled.fetch_add(1, Relaxed);
                        a.anomaly("storm: proxy took >10 s to read the subscriptions");
                    }
                }
                tokio::select! {
                    _ = c.attacks_stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            });
        }
        while set.join_next().await.is_some() {}
        ctx.attacks.storm_cycles.fetch_add(1, Relaxed);
    }
}

/// Every 5 s: eight Unix connections each announce a frame of 10 MiB - 1,
/// send all of it but the last byte, and stall. The bus must close each
/// (`overloaded` past the partial-bytes bound, or `frame_timeout`).
async fn attack_partial(ctx: Arc<Ctx>) {
    let len = (10u32 << 20) - 1;
    let mut data = BytesMut::with_capacity(len as usize + 4);
    data.put_u32(len);
    data.put_slice(br#"{"type":"message","to":"soak-p2p-0","body":{"pad":""#);
    data.resize(len as usize + 4 - 1, b'x');
    let data = data.freeze();
    let open = Arc::new(Semaphore::new(64));
    let max_open = 64u64;
    while ctx.pause(Duration::from_secs(5)).await {
        for _ in 0..8 {
            let Ok(permit) = open.clone().try_acquire_owned() else {
                ctx.attacks.partial_skipped.fetch_add(1, Relaxed);
                continue;
            };
            ctx.attacks
                .partial_max_open
                .fetch_max(max_open - open.available_permits() as u64, Relaxed);
            let (c, data) = (ctx.clone(), data.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let a = &c.attacks;
                let Ok(mut s) = UnixStream::connect(&c.socket).await else {
                    a.anomaly("partial: connect failed");
                    return;
                };
                a.partial_sent.fetch_add(1, Relaxed);
                // The bus may close it before it took everything.
                let _ = tokio::time::timeout(Duration::from_secs(20), s.write_all(&data)).await;
                // Then wait for the bus to close it, with its reason.
                let mut buf = BytesMut::new();
                let closed = tokio::select! {
                    _ = c.attacks_stop.cancelled() => return,
                    r = tokio::time::timeout(Duration::from_secs(60), async {
                        loop {
                            match s.read_buf(&mut buf).await {
                                Ok(n) if n > 0 => {}
                                _ => return,
                            }
                        }
                    }) => r.is_ok(),
                };
                let code = frame::decode(&mut buf, 1 << 20)
                    .ok()
                    .flatten()
                    .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
                    .and_then(|v| v["code"].as_str().map(str::to_owned));
                match (closed, code.as_deref()) {
                    (true, Some("overloaded")) => a.partial_overloaded.fetch_add(1, Relaxed),
                    (true, Some("frame_timeout")) => a.partial_timed_out.fetch_add(1, Relaxed),
                    (false, _) => {
                        a.anomaly("partial: not closed within 60 s");
                        a.partial_other.fetch_add(1, Relaxed)
                    }
                    (true, _) => a.partial_other.fetch_add(1, Relaxed),
                };
            });
        }
    }
}

/// Every 3 s: five messages nested 1,500 deep to an honest receiver; each
/// must be refused with `too_deep` and never delivered.
async fn attack_deep(ctx: Arc<Ctx>) {
    let depth = 1500;
    let deep = format!(
        r#"{{"type":"message","to":"soak-p2p-1","body":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let one = frame::encode(deep.as_bytes());
    while ctx.pause(Duration::from_secs(3)).await {
        let a = &ctx.attacks;
        let Ok((mut s, mut buf)) = unix_session(&ctx.socket, None).await else {
            a.anomaly("deep: connect failed");
            continue;
        };
        let mut ok = true;
        for _ in 0..5 {
            ok &= s.write_all(&one).await.is_ok();
        }
        if !ok {
            a.anomaly("deep: write failed");
            continue;
        }
        a.deep_sent.fetch_add(5, Relaxed);
        for _ in 0..5 {
            match read_json(&mut s, &mut buf, Duration::from_secs(10)).await {
                Some(v) if v["code"] == "too_deep" => {
                    a.deep_refused.fetch_add(1, Relaxed);
                }
                Some(_) => a.anomaly("deep: unexpected reply"),
                None => {
                    a.anomaly("deep: no reply in 10 s");
                    break;
                }
            }
        }
    }
}

/// Every 5 s: a `register` with a 1 MiB name, which must be refused.
async fn attack_bigname(ctx: Arc<Ctx>) {
    let req = frame_of(&json!({"type": "register", "endpoint": "n".repeat(1 << 20)}));
    while ctx.pause(Duration::from_secs(5)).await {
        let a = &ctx.attacks;
        let Ok((mut s, mut buf)) = unix_session(&ctx.socket, None).await else {
            a.anomaly("name1M: connect failed");
            continue;
        };
        // The bus may refuse (and close) before it read the whole frame.
        let _ = s.write_all(&req).await;
        a.bigname_sent.fetch_add(1, Relaxed);
        match read_json(&mut s, &mut buf, Duration::from_secs(10)).await {
            Some(v) if v["code"] == "name_too_long" => {
                a.bigname_refused.fetch_add(1, Relaxed);
            }
            // The partial-frame bound was full (the partial attack).
            Some(v) if v["code"] == "overloaded" => {
                a.bigname_overloaded.fetch_add(1, Relaxed);
            }
            Some(_) => a.anomaly("name1M: unexpected reply"),
            None => a.anomaly("name1M: no reply in 10 s"),
        }
    }
}

/// Drains a connection (reads and drops) until the attacks stop or `s` closes.
async fn drain(ctx: Arc<Ctx>, mut rd: OwnedReadHalf) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            _ = ctx.attacks_stop.cancelled() => return,
            r = rd.read(&mut buf) => match r {
                Ok(n) if n > 0 => {}
                _ => return,
            },
        }
    }
}

/// Every 15 s: 100 names of 255 bytes (reading what they get) make each
/// `endpoints_list` reply about 30 KB; one connection sends 1,500
/// `list_endpoints` and never reads. Everything is closed after 10 s.
async fn attack_lists(ctx: Arc<Ctx>) {
    let mut req = Vec::new();
    for _ in 0..1500 {
        req.extend_from_slice(&frame::encode(br#"{"type":"list_endpoints"}"#));
    }
    let mut cycle = 0u64;
    while ctx.pause(Duration::from_secs(15)).await {
        cycle += 1;
        let a = &ctx.attacks;
        let mut pool = Vec::new();
        for i in 0..100 {
            let name = format!("soak-pool-{cycle}-{i:03}-");
            let name = format!("{name}{}", "n".repeat(255 - name.len()));
            match unix_session(&ctx.socket, Some(&name)).await {
                Ok((s, _)) => {
                    let (rd, wr) = s.into_split();
                    pool.push((tokio::spawn(drain(ctx.clone(), rd)), wr));
                }
                Err(_) => {
                    a.anomaly("lists: pool register failed");
                    break;
                }
            }
        }
        let Ok((mut deaf, _)) = unix_session(&ctx.socket, None).await else {
            a.anomaly("lists: connect failed");
            continue;
        };
        // The bus stops reading this peer once its replies fill its own
        // outbox: the write does not finish, and that is the point.
        let _ = tokio::time::timeout(Duration::from_secs(5), deaf.write_all(&req)).await;
        a.list_requests.fetch_add(1500, Relaxed);
        a.list_cycles.fetch_add(1, Relaxed);
        ctx.pause(Duration::from_secs(5)).await;
        drop(deaf);
        for (t, wr) in pool {
            t.abort();
            drop(wr);
        }
    }
}

/// Every 30 s: a registered receiver that never reads, blasted for 15 s
/// by two senders (64 KiB messages, 100/s each); closed after 20 s.
async fn attack_deaf(ctx: Arc<Ctx>) {
    let pad = "d".repeat(64 << 10);
    let mut cycle = 0u64;
    while ctx.pause(Duration::from_secs(30)).await {
        cycle += 1;
        let a = &ctx.attacks;
        let name = format!("soak-deaf-{cycle}");
        let Ok((deaf, _)) = unix_session(&ctx.socket, Some(&name)).await else {
            a.anomaly("deaf: register failed");
            continue;
        };
        a.deaf_cycles.fetch_add(1, Relaxed);
        let one = frame::encode(
            format!(r#"{{"type":"message","to":"{name}","body":{{"pad":"{pad}"}}}}"#).as_bytes(),
        );
        let until = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..2 {
            let (c, one) = (ctx.clone(), one.clone());
            set.spawn(async move {
                let Ok((s, _)) = unix_session(&c.socket, None).await else {
                    c.attacks.anomaly("deaf: blaster connect failed");
                    return;
                };
                let (rd, mut wr) = s.into_split();
                let reader = tokio::spawn(drain(c.clone(), rd));
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut sent = 0;
                while tokio::time::Instant::now() < until
                    && sent < 1500
                    && !c.attacks_stop.is_cancelled()
                {
                    tick.tick().await;
                    match tokio::time::timeout_at(until, wr.write_all(&one)).await {
                        Ok(Ok(())) => {
                            sent += 1;
                            c.attacks.deaf_blasted.fetch_add(1, Relaxed);
                        }
                        _ => break,
                    }
                }
                reader.abort();
            });
        }
        while set.join_next().await.is_some() {}
        ctx.pause(Duration::from_secs(5)).await;
        drop(deaf);
    }
}

/// Every 3 s: `soak-ghost` registered again on a new connection that
/// reads nothing after `registered`, and sent three 1 MiB messages.
async fn attack_ghost(ctx: Arc<Ctx>) {
    let pad = "g".repeat(1 << 20);
    let Ok((sender, _)) = unix_session(&ctx.socket, None).await else {
        ctx.attacks.anomaly("ghost: sender connect failed");
        return;
    };
    let (rd, mut wr) = sender.into_split();
    let reader = tokio::spawn(drain(ctx.clone(), rd));
    let mut current = None;
    let mut n = 0u64;
    while ctx.running() {
        let a = &ctx.attacks;
        match unix_session(&ctx.socket, Some("soak-ghost")).await {
            Ok((s, _)) => {
                a.ghost_registers.fetch_add(1, Relaxed);
                current = Some(s);
            }
            Err(_) => a.anomaly("ghost: register failed"),
        }
        for _ in 0..3 {
            n += 1;
            let m = frame::encode(
                format!(
                    r#"{{"type":"message","to":"soak-ghost","body":{{"n":{n},"pad":"{pad}"}}}}"#
                )
                .as_bytes(),
            );
            match tokio::time::timeout(Duration::from_secs(15), wr.write_all(&m)).await {
                Ok(Ok(())) => {
                    a.ghost_sent.fetch_add(1, Relaxed);
                }
                _ => a.anomaly("ghost: sender blocked >15 s"),
            }
        }
        if !ctx.pause(Duration::from_secs(3)).await {
            break;
        }
    }
    drop(current);
    reader.abort();
}

/// Every 10 s: `per_side` ZeroMQ publishers and as many subscribers
/// handshake and do nothing (not even read) for `hold`.
async fn attack_idle(ctx: Arc<Ctx>, per_side: usize, hold: Duration) {
    let cycles = (hold.as_secs() / 10 + 1) as usize;
    let open = Arc::new(Semaphore::new(per_side * 2 * cycles));
    while ctx.pause(Duration::from_secs(10)).await {
        for i in 0..per_side * 2 {
            let Ok(permit) = open.clone().try_acquire_owned() else {
                break;
            };
            let c = ctx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (addr, ty) = if i % 2 == 0 {
                    (&c.zmq_in, SocketType::Pub)
                } else {
                    (&c.zmq_out, SocketType::Sub)
                };
                match raw_zmq(addr, ty).await {
                    Ok(p) => {
                        c.attacks.idle_opened.fetch_add(1, Relaxed);
                        tokio::select! {
                            _ = c.attacks_stop.cancelled() => {}
                            _ = tokio::time::sleep(hold) => {}
                        }
                        drop(p);
                    }
                    Err(_) => {
                        c.attacks.idle_failed.fetch_add(1, Relaxed);
                        c.attacks.anomaly("idle: connect/handshake failed");
                    }
                }
            });
        }
    }
}

// ---------------------------------------------------------------- server stats

/// Asks the bus for its stats on `conn` (reconnecting when needed).
async fn server_stats(socket: &Path, conn: &mut Option<(UnixStream, BytesMut)>) -> Option<Value> {
    if conn.is_none() {
        *conn = unix_session(socket, None).await.ok();
    }
    let (s, buf) = conn.as_mut()?;
    let req = frame_of(&json!({"type": "stats"}));
    let ok = tokio::time::timeout(Duration::from_secs(10), s.write_all(&req))
        .await
        .is_ok_and(|r| r.is_ok());
    let v = if ok {
        read_json(s, buf, Duration::from_secs(10)).await
    } else {
        None
    };
    if v.is_none() {
        *conn = None;
    }
    v.map(|v| v["stats"].clone())
}

/// The server-side figures of one report line.
fn server_line(st: &Value) -> String {
    let t = &st["router"]["totals"];
    let z = &st["transports"]["zmq"];
    let u = &st["transports"]["unix"];
    let g = |v: &Value| v.as_u64().unwrap_or(0);
    format!(
        "dropped_slow {} dropped_held {} blocked {} budget {} partial {} | zmq subs {} open pub/sub {}/{} drops pub/sub {}/{} proto_err {} idle_closed {} subs_refused {} to_bus_dropped {}",
        g(&t["dropped_slow"]),
        g(&t["dropped_held"]),
        g(&t["blocked"]),
        mib(g(&st["router"]["flow"]["budget_used"]) / 1024),
        mib(g(&u["partial_frame_bytes"]) / 1024),
        g(&z["subscriptions"]),
        g(&z["publishers"]["open"]),
        g(&z["subscribers"]["open"]),
        g(&z["publishers"]["drops"]),
        g(&z["subscribers"]["drops"]),
        g(&z["publishers"]["protocol_errors"]),
        g(&z["idle_closed"]),
        g(&z["subs_over_count"]) + g(&z["subs_over_bytes"]) + g(&z["subs_too_long"]),
        g(&z["to_bus_dropped"]),
    )
}

// ---------------------------------------------------------------- main

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let code = run(args).await?;
    std::process::exit(code);
}

/// The attacks by name, as `--attacks` takes them.
const ATTACKS: &[&str] = &[
    "wrap", "storm", "partial", "deep", "name1m", "lists", "deaf", "ghost", "idle",
];

/// The server process under test and where it lives.
struct Server {
    child: Child,
    pid: u32,
    /// Socket and log; removed at the end unless kept.
    dir: tempfile::TempDir,
    socket: PathBuf,
    zmq_in: String,
    zmq_out: String,
}

impl Server {
    /// Starts the server and waits until it listens.
    async fn start(args: &Args) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new().prefix("hermes-soak-").tempdir()?;
        let socket = dir.path().join("bus.sock");
        let (pin, pout) = (free_port()?, free_port()?);
        let zmq_in = format!("tcp://127.0.0.1:{pin}");
        let zmq_out = format!("tcp://127.0.0.1:{pout}");
        let mut child = start_server(args, dir.path(), &zmq_in, &zmq_out)?;
        if let Err(e) = wait_listening(&socket, [pin, pout], &mut child).await {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Server {
            pid: child.id(),
            child,
            dir,
            socket,
            zmq_in,
            zmq_out,
        })
    }

    /// (VmRSS, VmHWM) in KiB.
    fn mem(&self) -> (u64, u64) {
        proc_mem(self.pid).unwrap_or((0, 0))
    }

    /// CPU seconds used by the server and by this process.
    fn cpu(&self) -> (f64, f64) {
        (proc_cpu(&self.pid.to_string()), proc_cpu("self"))
    }

    /// Whether it is still running (None) or how it ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after 5 s.
    async fn stop(&mut self) -> std::io::Result<std::process::ExitStatus> {
        if self.exited().is_none() {
            // SAFETY: signals our own child by its pid.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGTERM);
            }
            let end = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        self.child.wait()
    }

    /// Whether a fresh connection gets a `pong` within 5 s, and how long
    /// it took.
    async fn answers_ping(&self) -> (bool, Duration) {
        let t0 = Instant::now();
        let ok = async {
            let (mut s, mut buf) = unix_session(&self.socket, None).await.ok()?;
            s.write_all(&frame_of(&json!({"type": "ping"})))
                .await
                .ok()?;
            read_json(&mut s, &mut buf, Duration::from_secs(5))
                .await
                .filter(|v| v["type"] == "pong")
        }
        .await
        .is_some();
        (ok, t0.elapsed())
    }
}

/// What the periodic reports saw.
#[derive(Default)]
struct Reported {
    /// The server ended by itself.
    died: Option<std::process::ExitStatus>,
    /// Worst per-interval ping p99, µs.
    worst_ping_p99: u64,
    /// Stats requests not answered within 5 s.
    stats_misses: u64,
}

/// Prints a line every `--report-secs` until the deadline (or until the
/// server dies).
async fn report_loop(ctx: &Ctx, server: &mut Server, pings: &Pings, every: Duration) -> Reported {
    let mut rep = Reported::default();
    let started = Instant::now();
    let mut stats_conn = None;
    let mut last = (Instant::now(), server.cpu());
    let mut next = tokio::time::Instant::now() + every;
    loop {
        let at = next.min(ctx.deadline);
        tokio::time::sleep_until(at).await;
        if let Some(status) = server.exited() {
            rep.died = Some(status);
            return rep;
        }
        let st = tokio::time::timeout(
            Duration::from_secs(5),
            server_stats(&server.socket, &mut stats_conn),
        )
        .await
        .ok()
        .flatten();
        if st.is_none() {
            stats_conn = None;
            rep.stats_misses += 1;
        }
        let (rss, hwm) = server.mem();
        let cpu_now = server.cpu();
        let secs = last.0.elapsed().as_secs_f64().max(0.001);
        let cpu = format!(
            "cpu srv {:.0}% soak {:.0}%",
            (cpu_now.0 - last.1 .0) * 100.0 / secs,
            (cpu_now.1 - last.1 .1) * 100.0 / secs
        );
        last = (Instant::now(), cpu_now);
        let iv = std::mem::take(&mut *pings.interval.lock().unwrap_or_else(|p| p.into_inner()));
        let (p50, p99, pmax, pn) = summary(iv);
        rep.worst_ping_p99 = rep.worst_ping_p99.max(p99);
        let h = &ctx.honest;
        h.u2z.sent.store(h.topic.sent.load(Relaxed), Relaxed);
        println!(
            "[{:>4}s] rss {} hwm {} {cpu} | {} | {} | {} | {} unq {} | {} | ping p50 {} p99 {} max {} n {} tmo {} | atk {} | srv {}",
            started.elapsed().as_secs(),
            mib(rss),
            mib(hwm),
            h.p2p.line("p2p"),
            h.bc.line("bc"),
            h.topic.line("topic"),
            h.zmq.line("zmq"),
            h.zmq_unqueued.load(Relaxed),
            h.u2z.line("unix→zmq"),
            fmt_us(p50),
            fmt_us(p99),
            fmt_us(pmax),
            pn,
            pings.timeouts.load(Relaxed),
            ctx.attacks.line(),
            st.as_ref().map(server_line).unwrap_or_else(|| "NO ANSWER to stats in 5 s".into()),
        );
        if at >= ctx.deadline {
            return rep;
        }
        next += every;
    }
}

/// Waits for the honest senders to finish and the receivers to catch up
/// (bounded); returns how long that took.
async fn catch_up(ctx: &Ctx, zmq: &ZmqStream, server: &mut Server) -> Duration {
    let start = Instant::now();
    let h = &ctx.honest;
    // Senders finish their last write first (bounded: deadline + 60 s).
    while ctx.senders_running.load(Relaxed) > 0 && start.elapsed() < Duration::from_secs(70) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = zmq.publisher.flush(Duration::from_secs(5)).await;
    let receivers = Instant::now();
    while receivers.elapsed() < Duration::from_secs(30) && server.exited().is_none() {
        let behind: u64 =
            h.unix_flows().iter().map(|(_, f)| f.missing()).sum::<u64>() + h.zmq.missing();
        if behind == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.u2z.sent.store(h.topic.sent.load(Relaxed), Relaxed);
    start.elapsed()
}

/// The state at the end, before the server is stopped.
struct Final {
    alive: bool,
    answers_ping: bool,
    ping_time: Duration,
    stats: Option<Value>,
    rss: u64,
    hwm: u64,
    cpu: (f64, f64),
    publisher: hermes_bus::transports::zmq::publisher::PublisherStats,
    receiver: hermes_bus::transports::zmq::receiver::ReceiverStats,
    drain: Duration,
}

async fn run(args: Args) -> anyhow::Result<i32> {
    for a in &args.attacks {
        anyhow::ensure!(
            a == "all" || a == "none" || ATTACKS.contains(&a.as_str()),
            "unknown attack {a:?} (one of {ATTACKS:?}, all, none)"
        );
    }
    EPOCH.get_or_init(Instant::now);
    raise_nofile();
    let mut server = Server::start(&args).await?;
    let bound_kib = (args.memory_budget_mib + args.rss_slack_mib) * 1024;
    println!(
        "soak: server pid {}, socket {}, zmq in {} out {}; {} min, report every {} s; RSS bound {}",
        server.pid,
        server.socket.display(),
        server.zmq_in,
        server.zmq_out,
        args.minutes,
        args.report_secs,
        mib(bound_kib)
    );
    let base = server.mem();
    let cpu_start = server.cpu();
    let total = Duration::from_secs_f64(args.minutes.max(0.0) * 60.0);
    let ctx = Arc::new(Ctx {
        socket: server.socket.clone(),
        zmq_in: server.zmq_in.clone(),
        zmq_out: server.zmq_out.clone(),
        deadline: tokio::time::Instant::now() + total,
        attacks_stop: CancellationToken::new(),
        readers_stop: CancellationToken::new(),
        go: CancellationToken::new(),
        senders_running: AtomicU64::new(0),
        honest: Honest {
            p2p: Flow::with_receivers(1),
            ..Honest::default()
        },
        attacks: Attacks::default(),
    });

    // Honest traffic, then the attacks.
    let mut tasks = start_unix_streams(&ctx, &args).await?;
    let (zmq, ztasks) = start_zmq_stream(&ctx).await?;
    tasks.extend(ztasks);
    let zmq = Arc::new(zmq);
    {
        let (c, z, rate) = (ctx.clone(), zmq.clone(), args.zmq_rate);
        tasks.push(tokio::spawn(async move {
            zmq_sender(c, &z.publisher, rate).await;
        }));
    }
    ctx.go.cancel();
    let started = Instant::now();
    let pings = Arc::new(Pings::default());
    let ping_stop = Arc::new(AtomicBool::new(false));
    let ping = {
        let (s, p, st, hz) = (
            server.socket.clone(),
            pings.clone(),
            ping_stop.clone(),
            args.ping_hz,
        );
        std::thread::spawn(move || ping_thread(s, hz, p, st))
    };
    let attacks = start_attacks(&ctx, &args);

    let rep = report_loop(
        &ctx,
        &mut server,
        &pings,
        Duration::from_secs(args.report_secs),
    )
    .await;

    // Wind down: the attacks let go, the honest receivers catch up.
    ctx.attacks_stop.cancel();
    for a in attacks {
        let _ = tokio::time::timeout(Duration::from_secs(15), a).await;
    }
    let drain = catch_up(&ctx, &zmq, &mut server).await;
    // Give the bus a moment to release what the attacks held.
    if server.exited().is_none() {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    ping_stop.store(true, Relaxed);
    let _ = ping.join();

    // Final checks: alive, answering, memory; then stop everything.
    let alive = server.exited().is_none();
    let (answers_ping, ping_time) = if alive {
        server.answers_ping().await
    } else {
        (false, Duration::ZERO)
    };
    let stats = if alive {
        server_stats(&server.socket, &mut None).await
    } else {
        None
    };
    let (rss, hwm) = server.mem();
    let end = Final {
        alive,
        answers_ping,
        ping_time,
        stats,
        rss,
        hwm,
        cpu: server.cpu(),
        publisher: zmq.publisher.stats(),
        receiver: zmq.receiver.stats(),
        drain,
    };
    ctx.readers_stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let exit = server.stop().await?;

    println!();
    println!(
        "==== soak summary: {:.1} min wall, bench/soak {} ====",
        started.elapsed().as_secs_f64() / 60.0,
        flags_of_this_run().join(" ")
    );
    let unix_ok = print_streams(&ctx);
    let mut findings = print_zmq(&ctx, &end);
    let all = std::mem::take(&mut *pings.all.lock().unwrap_or_else(|p| p.into_inner()));
    let (p50, p99, pmax, pn) = summary(all);
    println!(
        "  ping: {pn} round trips, p50 {} p99 {} max {}, timeouts {}, worst per-report p99 {}",
        fmt_us(p50),
        fmt_us(p99),
        fmt_us(pmax),
        pings.timeouts.load(Relaxed),
        fmt_us(rep.worst_ping_p99)
    );
    findings.extend(print_attacks(&ctx.attacks));
    if let Some(st) = &end.stats {
        println!("server: {}", server_line(st));
        println!("server totals: {}", st["router"]["totals"]);
    }
    let log = std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default();
    let count = |lvl: &str| log.lines().filter(|l| l.contains(lvl)).count();
    println!(
        "server log: {} lines ({} ERROR, {} WARN); drain after the deadline {:.1}s",
        log.lines().count(),
        count("ERROR"),
        count("WARN"),
        end.drain.as_secs_f64()
    );
    println!(
        "cpu: server {:.0} s, soak {:.0} s over {:.0} s",
        end.cpu.0 - cpu_start.0,
        end.cpu.1 - cpu_start.1,
        started.elapsed().as_secs_f64()
    );
    let rss_ok = end.alive && end.rss <= bound_kib;
    println!(
        "memory: RSS at start {} end {} (bound {}), peak {}",
        mib(base.0),
        mib(end.rss),
        mib(bound_kib),
        mib(end.hwm)
    );
    let answering = end.alive && end.answers_ping && end.stats.is_some();
    println!(
        "server: {} before shutdown, answered ping at the end: {} ({}), stats at the end: {}, stats misses during the run {}, exit {}",
        if end.alive { "alive" } else { "DEAD" },
        end.answers_ping,
        fmt_us(end.ping_time.as_micros() as u64),
        end.stats.is_some(),
        rep.stats_misses,
        exit
    );
    if let Some(status) = rep.died {
        println!("server died during the run: {status}");
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        for l in tail.into_iter().rev() {
            println!("  log: {l}");
        }
    }
    if rep.worst_ping_p99 > 100_000 {
        findings.push(format!(
            "ping p99 reached {} in a report interval",
            fmt_us(rep.worst_ping_p99)
        ));
    }
    if end.hwm > bound_kib {
        findings.push(format!(
            "peak RSS {} passed the bound {} during the run",
            mib(end.hwm),
            mib(bound_kib)
        ));
    }
    if rep.stats_misses > 0 {
        findings.push(format!(
            "{} stats requests unanswered in 5 s",
            rep.stats_misses
        ));
    }
    for f in &findings {
        println!("FINDING: {f}");
    }
    let pass = unix_ok && answering && rss_ok;
    println!(
        "RESULT: {} (unix streams lossless: {unix_ok}; server alive and answering: {answering}; RSS within bound: {rss_ok})",
        if pass { "PASS" } else { "FAIL" },
    );
    if args.keep_dir || !pass {
        let kept = server.dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(if pass { 0 } else { 1 })
}

/// This run's flags, without `--server-bin`.
fn flags_of_this_run() -> Vec<String> {
    let mut flags = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(a) = argv.next() {
        if a == "--server-bin" {
            argv.next();
        } else if !a.starts_with("--server-bin=") {
            flags.push(a);
        }
    }
    flags
}

/// Starts the attacks `--attacks` names.
fn start_attacks(ctx: &Arc<Ctx>, args: &Args) -> Vec<tokio::task::JoinHandle<()>> {
    let mut attacks = Vec::new();
    for name in ATTACKS {
        if !args.attacks.iter().any(|a| a == name || a == "all") {
            continue;
        }
        let c = ctx.clone();
        attacks.push(match *name {
            "wrap" => tokio::spawn(attack_wrap(c)),
            "storm" => tokio::spawn(attack_storm(c, args.storm_subs)),
            "partial" => tokio::spawn(attack_partial(c)),
            "deep" => tokio::spawn(attack_deep(c)),
            "name1m" => tokio::spawn(attack_bigname(c)),
            "lists" => tokio::spawn(attack_lists(c)),
            "deaf" => tokio::spawn(attack_deaf(c)),
            "ghost" => tokio::spawn(attack_ghost(c)),
            _ => tokio::spawn(attack_idle(
                c,
                args.idle_per_side,
                Duration::from_secs(args.idle_hold_secs),
            )),
        });
    }
    attacks
}

/// Prints the Unix streams; true when none lost, skipped, reordered or
/// failed anything.
fn print_streams(ctx: &Ctx) -> bool {
    let h = &ctx.honest;
    let mut ok = true;
    for (name, f) in h.unix_flows() {
        let lost = f.missing();
        let bad =
            lost + f.gaps.load(Relaxed) + f.disorder.load(Relaxed) + f.write_failures.load(Relaxed);
        ok &= bad == 0;
        println!(
            "{name:>6}: sent {} x{} receivers = {} copies, received {}, lost {}, gaps {}, out-of-order {}, write failures {}, latency max {}, copies >100ms {}",
            f.sent.load(Relaxed),
            f.receivers.load(Relaxed),
            f.expected(),
            f.recv.load(Relaxed),
            lost,
            f.gaps.load(Relaxed),
            f.disorder.load(Relaxed),
            f.write_failures.load(Relaxed),
            fmt_us(f.lat_max_all_us.load(Relaxed)),
            f.slow.load(Relaxed),
        );
    }
    let foreign = h.foreign.load(Relaxed);
    let corrupt = h.corrupt.load(Relaxed);
    let links = h.links_lost.load(Relaxed);
    ok &= foreign == 0 && corrupt == 0 && links == 0;
    let errors = h.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!(
        "honest sessions: foreign frames {foreign}, unparsable {corrupt}, connections lost {links}, error replies {errors:?}"
    );
    ok
}

/// Prints the ZeroMQ stream and the Unix→ZeroMQ stream with the drop
/// counters that may account for a loss; returns findings.
fn print_zmq(ctx: &Ctx, end: &Final) -> Vec<String> {
    let h = &ctx.honest;
    let (p, r) = (&end.publisher, &end.receiver);
    let mut findings = Vec::new();
    let stats = end.stats.clone().unwrap_or(Value::Null);
    let zs = &stats["transports"]["zmq"];
    let proxy_sub_drops = zs["subscribers"]["drops"].as_u64().unwrap_or(0);
    let proxy_pub_drops = zs["publishers"]["drops"].as_u64().unwrap_or(0);
    let z = &h.zmq;
    let zlost = z.missing();
    let counted = proxy_sub_drops + proxy_pub_drops + r.dropped;
    println!(
        "   zmq: queued {}, written {}, received {}, lost {zlost}, gaps {}, out-of-order {}, latency max {}, copies >100ms {}; not queued {} (publisher: filtered {}, disconnected {}, full {}); drop counters: proxy subscriber-side {} publisher-side {} (all peers), receiver {} (lagging {}); reconnects publisher {} receiver {}",
        z.sent.load(Relaxed),
        p.sent,
        z.recv.load(Relaxed),
        z.gaps.load(Relaxed),
        z.disorder.load(Relaxed),
        fmt_us(z.lat_max_all_us.load(Relaxed)),
        z.slow.load(Relaxed),
        h.zmq_unqueued.load(Relaxed),
        p.filtered,
        p.disconnected,
        p.dropped,
        proxy_sub_drops,
        proxy_pub_drops,
        r.dropped,
        r.lagging,
        p.reconnects,
        r.reconnects,
    );
    let verdict = |lost: u64, counted: u64| {
        if lost == 0 {
            "no loss".to_owned()
        } else if lost <= counted {
            format!("loss {lost} within the drop counters ({counted})")
        } else {
            format!("UNEXPLAINED loss: {lost} lost, drop counters {counted}")
        }
    };
    let zverdict = verdict(zlost, counted);
    println!("   zmq verdict: {zverdict}");
    if zlost > counted {
        findings.push(format!("zmq: {zverdict}"));
    }
    let u = &h.u2z;
    let ulost = u.missing();
    let dropped_slow = stats["router"]["totals"]["dropped_slow"]
        .as_u64()
        .unwrap_or(0);
    let ucounted = dropped_slow + proxy_sub_drops + r.dropped;
    println!(
        "unix→zmq (the topic stream at the ZeroMQ receiver, through the bridge): published {}, received {}, lost {ulost}, gaps {}, out-of-order {}, latency max {}; drop counters: router dropped_slow {dropped_slow} (all sessions), proxy subscriber-side {proxy_sub_drops}, receiver {}",
        u.sent.load(Relaxed),
        u.recv.load(Relaxed),
        u.gaps.load(Relaxed),
        u.disorder.load(Relaxed),
        fmt_us(u.lat_max_all_us.load(Relaxed)),
        r.dropped,
    );
    let uverdict = verdict(ulost, ucounted);
    println!("unix→zmq verdict: {uverdict}");
    if ulost > 0 {
        findings.push(format!("unix→zmq: {uverdict}"));
    }
    findings
}

/// Prints the attack counters; returns findings.
fn print_attacks(a: &Attacks) -> Vec<String> {
    println!("attacks: {}", a.line());
    println!(
        "         wrap failed {}; storm writes stalled {}; partial closed other {}, max open {}; idle failed {}; ghost messages {}",
        a.wrap_failed.load(Relaxed),
        a.storm_stalled.load(Relaxed),
        a.partial_other.load(Relaxed),
        a.partial_max_open.load(Relaxed),
        a.idle_failed.load(Relaxed),
        a.ghost_sent.load(Relaxed),
    );
    let anomalies = a
        .anomalies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    println!("         anomalies: {anomalies:?}");
    if anomalies.is_empty() {
        Vec::new()
    } else {
        vec![format!("attack anomalies: {anomalies:?}")]
    }
}
