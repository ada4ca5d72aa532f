//! Market-data cases of the ZeroMQ side with our clients: paced one-way
//! latency (our `Publisher` → `hermes-bus proxy` → our `Receiver`, both
//! clients in this process so one monotonic clock stamps and reads), and
//! the throughput cost of the market-data features (conflation, sequence
//! numbers, the last-value cache) against plain forwarding. The libzmq
//! side of the latency case is `bench/zmq-anchor --latency`, which sends
//! the same frames on the same schedule.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hermes_bus::envelope::Data;
use hermes_bus::transports::zmq::proxy::{ProxyConfig, ZmqProxy};
use hermes_bus::transports::zmq::{
    Publisher, PublisherConfig, Receiver, ReceiverConfig, SlowPolicy,
};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::util::Proc;

/// One latency run's figures in µs, and its counts.
pub struct Latency {
    /// Median one-way latency (µs).
    pub p50: f64,
    /// 99th percentile (µs).
    pub p99: f64,
    /// 99.9th percentile (µs).
    pub p999: f64,
    /// Largest sample (µs).
    pub max: f64,
    /// Envelopes sent: the loss check compares it with `received`.
    pub sent: u64,
    /// Probes received (each gave one sample).
    pub received: u64,
    /// The most the sender fell behind its schedule (µs).
    pub late: f64,
}

impl Latency {
    /// As a RunFn result: the three percentiles and max; a loss fails the
    /// run. The check is printed.
    pub fn checked(self, label: &str) -> Result<(Vec<f64>, Option<String>), String> {
        let lost = self.sent.saturating_sub(self.received);
        eprintln!(
            "    {label}: sent {} received {} loss {lost}; p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} µs; sender late ≤ {:.1} ms",
            self.sent,
            self.received,
            self.p50,
            self.p99,
            self.p999,
            self.max,
            self.late / 1e3
        );
        if lost > 0 || self.sent == 0 {
            return Err(format!("FAILED: lost {lost} of {}", self.sent));
        }
        Ok((
            vec![self.p50, self.p99, self.p999, self.max],
            Some("loss 0".into()),
        ))
    }
}

/// The libzmq side (or libzmq peers through our proxy, with `hermes`):
/// one run of `zmq-anchor --latency`.
pub fn anchor_latency(
    anchor: &Path,
    hermes: Option<&Path>,
    rate: u64,
    count: u64,
    size: usize,
) -> Result<Latency, String> {
    let mut cmd = Command::new(anchor);
    cmd.arg("--latency")
        .arg(rate.to_string())
        .arg(count.to_string())
        .arg(size.to_string());
    if let Some(h) = hermes {
        cmd.arg("--hermes-bus").arg(h);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", anchor.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("LAT\t"))
        .ok_or_else(|| format!("zmq-anchor --latency printed no figures ({})", out.status))?;
    let f: Vec<f64> = line
        .split('\t')
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() != 7 {
        return Err(format!("unreadable line {line:?}"));
    }
    Ok(Latency {
        p50: f[0],
        p99: f[1],
        p999: f[2],
        max: f[3],
        sent: f[4] as u64,
        received: f[5] as u64,
        late: f[6],
    })
}

/// Free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_port(port: u16, proc: &mut Proc) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = proc.child.try_wait() {
            return Err(format!("proxy exited ({st}): {}", proc.log_tail()));
        }
        if Instant::now() > end {
            return Err(format!("proxy not listening on {port}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Same layout as zmq-anchor's: `{"t":"<16 digits>","pad":"x.."}`,
/// exactly `size` bytes, `t` in ns since `base`.
fn stamped(size: usize, ns: u64) -> String {
    let skeleton = r#"{"t":"0000000000000000","pad":""}"#.len();
    format!(
        r#"{{"t":"{ns:016}","pad":"{}"}}"#,
        "x".repeat(size.saturating_sub(skeleton))
    )
}

fn read_stamp(data: &Data) -> Option<u64> {
    match data {
        Data::Json(raw) => raw.get().get(6..22)?.parse().ok(),
        _ => None,
    }
}

/// Our side: `hermes-bus proxy` in its own process (like libzmq's proxy
/// in the anchor), our Publisher and Receiver here. The Publisher sends
/// on an absolute schedule from a plain thread (`publish_parts` only
/// queues; its connection task writes), the Receiver is read with
/// `recv_blocking` from another thread, as an application reads a
/// libzmq SUB.
pub fn ours_latency(hermes: &Path, rate: u64, count: u64, size: usize) -> Result<Latency, String> {
    let (fp, bp) = (free_port(), free_port());
    let mut cmd = Command::new(hermes);
    cmd.arg("proxy")
        .arg("--frontend")
        .arg(format!("tcp://127.0.0.1:{fp}"))
        .arg("--backend")
        .arg(format!("tcp://127.0.0.1:{bp}"))
        .env_remove("RUST_LOG");
    let log = std::env::temp_dir().join(format!("hermes-bench-proxy-{fp}.log"));
    let mut proxy = Proc::spawn("hermes-bus proxy", cmd, log.clone()).map_err(|e| e.to_string())?;
    let r = (|| {
        wait_port(fp, &mut proxy)?;
        wait_port(bp, &mut proxy)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let _g = rt.enter();
        let mut rc = ReceiverConfig::new(format!("tcp://127.0.0.1:{bp}"), "lat-sub");
        rc.topics = vec!["LAT".into()];
        rc.slow_policy = SlowPolicy::Warn;
        rc.lag_threshold = Duration::from_secs(3600);
        let mut rx = Receiver::with_config(rc).map_err(|e| e.to_string())?;
        rx.start().map_err(|e| e.to_string())?;
        let mut pc = PublisherConfig::new(format!("tcp://127.0.0.1:{fp}"), "lat-pub");
        pc.seq = false;
        pc.queue = count as usize + 1000;
        pc.queue_bytes = 1 << 30;
        let mut publ = Publisher::with_config(pc).map_err(|e| e.to_string())?;
        publ.start().map_err(|e| e.to_string())?;
        rt.block_on(async {
            rx.wait_connected(Duration::from_secs(5)).await?;
            publ.wait_connected(Duration::from_secs(5)).await?;
            publ.wait_for_subscriber("LAT/bench", Duration::from_secs(5))
                .await
        })
        .map_err(|e| e.to_string())?;
        // A probe through, then drain (as the anchor's warm-up).
        let probe = Data::json(&"probe").map_err(|e| e.to_string())?;
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            publ.publish_parts("LAT/probe", "bench", &probe)
                .map_err(|e| e.to_string())?;
            if rx
                .recv_blocking(true, Some(Duration::from_millis(20)))
                .is_some()
            {
                break;
            }
            if Instant::now() > end {
                return Err("no probe came through within 5 s".into());
            }
        }
        while rx
            .recv_blocking(true, Some(Duration::from_millis(100)))
            .is_some()
        {}
        let rx = Arc::new(rx);
        let base = Instant::now();
        let limit = Duration::from_secs_f64(count as f64 / rate as f64) + Duration::from_secs(5);
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (r2, s2, d2) = (rx.clone(), sent.clone(), done.clone());
        let reader = thread::spawn(move || -> Vec<u64> {
            let mut lat = Vec::with_capacity(count as usize);
            loop {
                if let Some(env) = r2.recv_blocking(true, Some(Duration::from_millis(200))) {
                    let now = base.elapsed().as_nanos() as u64;
                    if env.topic == "LAT/bench" {
                        if let Some(t) = read_stamp(&env.data) {
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
        let period = 1e9 / rate as f64;
        let t0 = Instant::now();
        let mut late = 0u64;
        let mut n = 0u64;
        let mut dropped = 0u64;
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
            let raw = RawValue::from_string(stamped(size, base.elapsed().as_nanos() as u64))
                .map_err(|e| e.to_string())?;
            if !publ
                .publish_parts("LAT/bench", "bench", &Data::Json(raw))
                .map_err(|e| e.to_string())?
            {
                dropped += 1;
            }
            n += 1;
            sent.store(n, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        let mut lat = reader.join().map_err(|_| "reader panicked")?;
        rt.block_on(publ.stop());
        if dropped > 0 {
            eprintln!("    ours: the publisher dropped {dropped} (see its stats)");
        }
        lat.sort_unstable();
        if lat.is_empty() {
            return Err("nothing received".into());
        }
        let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Ok(Latency {
            p50: pct(0.5),
            p99: pct(0.99),
            p999: pct(0.999),
            max: *lat.last().unwrap_or(&0) as f64 / 1e3,
            sent: n,
            received: lat.len() as u64,
            late: late as f64 / 1e3,
        })
    })();
    drop(proxy);
    let _ = std::fs::remove_file(&log);
    r
}

/// CPU time (user and system) this process used so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass, nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A market-data feature switched on for the cost case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feature {
    /// Plain forwarding (the baseline).
    Plain,
    /// Proxy `slow_policy: Conflate` and the Receiver's `conflate`.
    Conflate,
    /// Publisher and Receiver opted in to sequence numbers.
    Seq,
    /// The proxy's last-value cache (`--last-value`, default bounds).
    LastValue,
}

/// Throughput of our Publisher → our proxy (in this process, on its own
/// runtime thread, so its counters can be read) → our Receiver with
/// `feature`: the publisher blasts `count` envelopes of `size` bytes (no
/// window, no pacing: as fast as `publish_parts` queues, the queue sized
/// for the run), the proxy in lossless mode (a full subscriber queue
/// pushes back instead of dropping), the receiver read as fast as it
/// delivers. Topics `quotes/S<n>` cycle through `topics` symbols: with
/// 1,000 (a market) a blasting publisher outruns the receiver, so
/// conflation would replace envelopes; with a topic per envelope
/// (`topics` = `count`) conflation never finds an older envelope to
/// replace: the subscriber "keeps up" as far as conflation can tell, and
/// every push still pays the keyed bookkeeping (compare it with plain
/// forwarding of the same topics). The sequence counters and trackers get
/// room for every topic. Rate: envelopes delivered per second, from the
/// first send to the last delivery; a loss, a gap or a replaced envelope
/// fails the run.
pub fn cost_throughput(
    feature: Feature,
    count: u64,
    topics: u64,
    size: usize,
    max_time: Duration,
) -> Result<(Vec<f64>, Option<String>), String> {
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let cfg = ProxyConfig {
        frontend: "tcp://127.0.0.1:0".into(),
        backend: "tcp://127.0.0.1:0".into(),
        lossless: true,
        last_value: (feature == Feature::LastValue)
            .then(hermes_bus::last_value::LastValueLimits::default),
        slow_policy: if feature == Feature::Conflate {
            hermes_bus::router::SlowPolicy::Conflate
        } else {
            hermes_bus::router::SlowPolicy::Queue
        },
        ..ProxyConfig::default()
    };
    let proxy = proxy_rt
        .block_on(ZmqProxy::bind(cfg))
        .map_err(|e| e.to_string())?;
    let ep = proxy.endpoints().ok_or("proxy not bound")?;
    let pstats = proxy.stats();
    let stop = CancellationToken::new();
    let task = proxy_rt.spawn(proxy.run(stop.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _g = rt.enter();
    let r = (|| {
        let mut rc = ReceiverConfig::new(ep.backend.to_string(), "cost-sub");
        rc.topics = vec!["quotes/".into()];
        rc.slow_policy = SlowPolicy::Warn;
        rc.lag_threshold = Duration::from_secs(3600);
        rc.queue = count as usize + 1000;
        rc.conflate = feature == Feature::Conflate;
        rc.seq = feature == Feature::Seq;
        rc.seq_bytes = 256 << 20;
        let mut rx = Receiver::with_config(rc).map_err(|e| e.to_string())?;
        rx.start().map_err(|e| e.to_string())?;
        let mut pc = PublisherConfig::new(ep.frontend.to_string(), "cost-pub");
        pc.seq = feature == Feature::Seq;
        pc.seq_bytes = 256 << 20;
        pc.queue = count as usize + 1000;
        pc.queue_bytes = 1 << 30;
        let mut publ = Publisher::with_config(pc).map_err(|e| e.to_string())?;
        publ.start().map_err(|e| e.to_string())?;
        rt.block_on(async {
            rx.wait_connected(Duration::from_secs(5)).await?;
            publ.wait_connected(Duration::from_secs(5)).await?;
            publ.wait_for_subscriber("quotes/S0000000", Duration::from_secs(5))
                .await
        })
        .map_err(|e| e.to_string())?;
        let topics: Vec<String> = (0..topics.clamp(1, count.max(1)))
            .map(|i| format!("quotes/S{i:07}"))
            .collect();
        let body = stamped(size, 0);
        let datas: Vec<Data> = (0..16)
            .map(|_| Data::Json(RawValue::from_string(body.clone()).expect("valid JSON")))
            .collect();
        let before = rx.stats();
        let p_before = pstats.snapshot();
        let cpu0 = process_cpu();
        let t0 = Instant::now();
        let mut n = 0u64;
        let mut dropped = 0u64;
        while n < count && t0.elapsed() < max_time {
            let i = n as usize;
            if !publ
                .publish_parts(&topics[i % topics.len()], "bench", &datas[i % datas.len()])
                .map_err(|e| e.to_string())?
            {
                dropped += 1;
            }
            n += 1;
        }
        // Read until everything sent is accounted for, or 5 s of quiet.
        let mut got = 0u64;
        let mut last = t0;
        loop {
            match rx.recv_blocking(true, Some(Duration::from_millis(100))) {
                Some(_) => {
                    got += 1;
                    last = Instant::now();
                }
                None => {
                    let conflated = rx.stats().conflated - before.conflated
                        + pstats.snapshot().conflated
                        - p_before.conflated;
                    if got + conflated >= n || last.elapsed() > Duration::from_secs(5) {
                        break;
                    }
                }
            }
            if t0.elapsed() > max_time + Duration::from_secs(10) {
                break;
            }
        }
        let cpu = process_cpu().saturating_sub(cpu0);
        let st = rx.stats();
        let ps = pstats.snapshot();
        let conflated = st.conflated - before.conflated + ps.conflated - p_before.conflated;
        let lost = n.saturating_sub(got + conflated);
        let gaps = st.gaps - before.gaps;
        let note = if feature == Feature::Seq {
            "loss 0, gaps 0"
        } else {
            "loss 0"
        };
        eprintln!(
            "    {feature:?}: sent {n} (publisher dropped {dropped}) delivered {got} conflated {conflated} lost {lost} gaps {gaps}; {:.0} k/s, cpu {:.2} µs per envelope (this process: clients and proxy)",
            got as f64 / last.saturating_duration_since(t0).as_secs_f64().max(1e-9) / 1e3,
            cpu.as_secs_f64() * 1e6 / n.max(1) as f64
        );
        rt.block_on(publ.stop());
        rt.block_on(rx.stop());
        if lost > 0 || dropped > 0 || gaps > 0 || conflated > 0 || n == 0 {
            return Err(format!(
                "FAILED: sent {n}, publisher dropped {dropped}, delivered {got}, conflated {conflated}, lost {lost}, gaps {gaps}"
            ));
        }
        let secs = last.saturating_duration_since(t0).as_secs_f64().max(1e-9);
        let cpu_per = cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
        Ok((vec![got as f64 / secs, cpu_per], Some(note.into())))
    })();
    stop.cancel();
    let _ = proxy_rt.block_on(task);
    r
}
