//! The bench: our bus side by side with its anchors, in one run.
//!
//! Starts what it measures itself (our `hermes-bus-server`, the reference
//! Python `hermes-bus` 0.3.0 server, `redis-server`, the raw-socket
//! anchors; the ZeroMQ comparison comes from `bench/zmq-anchor`, a
//! separate package linking libzmq), runs each case a few times,
//! alternating subject and anchor, each run bounded in count and in time,
//! and prints one table: our figure (median, min–max), the anchor's
//! figure from the same run, their ratio and the target.
//!
//! `bench/run` builds and runs all of it. By hand:
//! `cargo bench --bench bus -- [--runs N] [--quick] [--only TEXT] [--out FILE]`
//! Environment: `HERMES_BENCH_PY03` (python of the 0.3.0 venv),
//! `HERMES_BENCH_ZMQ_ANCHOR` (the built zmq-anchor binary),
//! `HERMES_BENCH_SERVER` (another `hermes-bus-server` build to measure).

mod parse;
mod redis;
mod unix;
mod util;
mod zmq;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use unix::Bounds;

/// How a figure reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    /// Messages per second (higher is better).
    Rate,
    /// Microseconds (lower is better).
    Micros,
    /// Bytes (lower is better).
    Bytes,
    /// Bytes per second (higher is better).
    ByteRate,
}

impl Unit {
    fn higher_is_better(self) -> bool {
        matches!(self, Unit::Rate | Unit::ByteRate)
    }

    fn show(self, v: f64) -> String {
        match self {
            Unit::Rate if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
            Unit::Rate if v >= 1e3 => format!("{:.0} k/s", v / 1e3),
            Unit::Rate => format!("{v:.0} /s"),
            Unit::Micros => format!("{v:.1} µs"),
            Unit::Bytes if v >= (1u64 << 20) as f64 => format!("{:.1} MiB", v / (1 << 20) as f64),
            Unit::Bytes => format!("{:.2} KiB", v / 1024.0),
            Unit::ByteRate if v >= 1e9 => format!("{:.2} GB/s", v / 1e9),
            Unit::ByteRate => format!("{:.0} MB/s", v / 1e6),
        }
    }
}

/// Per-run figures of one subject in one case, or why there are none.
#[derive(Debug, Clone)]
enum Outcome {
    Figures {
        values: Vec<f64>,
        notes: Vec<String>,
    },
    Missing(String),
    /// A run lost messages, delivered them out of order, or stalled: no
    /// speed is shown for it.
    Failed(String),
}

impl Outcome {
    fn median(&self) -> Option<f64> {
        match self {
            Outcome::Figures { values, .. } => util::summary(values).map(|s| s.0),
            Outcome::Missing(_) | Outcome::Failed(_) => None,
        }
    }

    fn show(&self, unit: Unit) -> String {
        match self {
            Outcome::Figures { values, notes } => {
                let mut s = match util::summary(values) {
                    Some((m, lo, hi)) if values.len() > 1 => {
                        format!("{} ({} – {})", unit.show(m), unit.show(lo), unit.show(hi))
                    }
                    Some((m, _, _)) => unit.show(m),
                    None => "no figure".into(),
                };
                if !notes.is_empty() {
                    s.push_str(&format!(" [{}]", dedup(notes).join("; ")));
                }
                s
            }
            Outcome::Missing(why) => format!("missing: {why}"),
            Outcome::Failed(why) => format!("FAILED: {why}"),
        }
    }
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// What a row must show to meet its target.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// ours/anchor at least this (rates) or at most this (latency, memory).
    Ratio(f64),
    /// Our figure below this many bytes.
    BelowBytes(f64),
}

struct Row {
    case: String,
    unit: Unit,
    ours: Outcome,
    anchor: String,
    theirs: Outcome,
    target: Option<Target>,
}

impl Row {
    /// ours / anchor: the median of the per-run ratios when both have
    /// the same runs (each run pairs subject and anchor measured one
    /// right after the other, so a busy moment of the machine touches
    /// both), else the ratio of the medians.
    fn ratio(&self) -> Option<f64> {
        if let (Outcome::Figures { values: a, .. }, Outcome::Figures { values: b, .. }) =
            (&self.ours, &self.theirs)
        {
            if a.len() == b.len() && b.iter().all(|x| *x > 0.0) {
                let per_run: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
                return util::summary(&per_run).map(|s| s.0);
            }
        }
        Some(self.ours.median()? / self.theirs.median()?)
    }

    fn verdict(&self) -> String {
        let Some(t) = self.target else {
            return String::new();
        };
        let hib = self.unit.higher_is_better();
        if let Outcome::Failed(_) = self.ours {
            return "NOT met (FAILED)".into();
        }
        match t {
            Target::Ratio(x) => {
                let want = format!("{} {x}×", if hib { "≥" } else { "≤" });
                match self.ratio() {
                    Some(r) if (hib && r >= x) || (!hib && r <= x) => format!("{want}: met"),
                    Some(_) => format!("{want}: NOT met"),
                    None => format!("{want}: no figure"),
                }
            }
            Target::BelowBytes(b) => {
                let want = format!("< {}", Unit::Bytes.show(b));
                match self.ours.median() {
                    Some(v) if v < b => format!("{want}: met"),
                    Some(_) => format!("{want}: NOT met"),
                    None => format!("{want}: no figure"),
                }
            }
        }
    }
}

/// One subject's run: per-metric values, or an error.
type RunFn<'a> = Box<dyn FnMut() -> Result<(Vec<f64>, Option<String>), String> + 'a>;

/// Runs every subject `runs` times, alternating subjects within each run;
/// returns, per subject, one outcome per metric.
fn interleave(
    runs: usize,
    metrics: usize,
    mut subjects: Vec<(&str, Result<RunFn<'_>, String>)>,
) -> Vec<Vec<Outcome>> {
    if OURS_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        for s in subjects.iter_mut().skip(1) {
            s.1 = Err("skipped (--ours-only)".into());
        }
    }
    let mut vals: Vec<Vec<Vec<f64>>> = subjects.iter().map(|_| vec![Vec::new(); metrics]).collect();
    let mut notes: Vec<Vec<String>> = subjects.iter().map(|_| Vec::new()).collect();
    let mut errors: Vec<Option<String>> = subjects
        .iter()
        .map(|(_, f)| f.as_ref().err().cloned())
        .collect();
    // Runs that ended in "FAILED: ..." (loss, disorder, a stall): the
    // subject then shows FAILED, never a speed.
    let mut failed: Vec<Vec<String>> = subjects.iter().map(|_| Vec::new()).collect();
    let mut fns: Vec<Option<RunFn<'_>>> = subjects.into_iter().map(|(_, f)| f.ok()).collect();
    // One unrecorded run of each subject first: the processes just
    // started (allocator, socket buffers, caches) and so did the case.
    // A warm-up run that lost messages still fails the case.
    for (k, f) in fns.iter_mut().enumerate() {
        let Some(f) = f else { continue };
        if let Err(e) = f() {
            if let Some(why) = e.strip_prefix("FAILED: ") {
                eprintln!("    warm-up run {e}");
                failed[k].push(format!("(warm-up run) {why}"));
            }
        }
    }
    for _ in 0..runs {
        for (k, f) in fns.iter_mut().enumerate() {
            let Some(f) = f else { continue };
            match f() {
                Ok((v, note)) => {
                    for (m, x) in v.into_iter().enumerate().take(metrics) {
                        vals[k][m].push(x);
                    }
                    notes[k].extend(note);
                }
                Err(e) if e.starts_with("FAILED: ") => {
                    eprintln!("    run {e}");
                    failed[k].push(e["FAILED: ".len()..].to_string());
                }
                Err(e) => {
                    eprintln!("    run failed: {e}");
                    notes[k].push(format!("a run failed: {e}"));
                    errors[k].get_or_insert(e);
                }
            }
        }
    }
    vals.into_iter()
        .zip(notes)
        .zip(errors)
        .zip(failed)
        .map(|(((per_metric, notes), err), failed)| {
            per_metric
                .into_iter()
                .map(|values| {
                    if let Some(first) = failed.first() {
                        Outcome::Failed(format!(
                            "{} of {} runs (with the warm-up): {first}",
                            failed.len(),
                            runs + 1
                        ))
                    } else if values.is_empty() {
                        Outcome::Missing(err.clone().unwrap_or_else(|| "no run".into()))
                    } else {
                        Outcome::Figures {
                            values,
                            notes: notes.clone(),
                        }
                    }
                })
                .collect()
        })
        .collect()
}

/// `--ours-only`: skip the anchors (for profiling).
static OURS_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct Args {
    runs: usize,
    quick: bool,
    only: Vec<String>,
    out: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        runs: 5,
        quick: false,
        only: Vec::new(),
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(5).max(1),
            "--quick" => a.quick = true,
            "--ours-only" => OURS_ONLY.store(true, std::sync::atomic::Ordering::Relaxed),
            "--only" => a.only.extend(it.next()),
            "--out" => a.out = it.next().map(PathBuf::from),
            _ => {} // `cargo bench` passes --bench; ignore the rest
        }
    }
    a
}

fn bounds(size: usize, quick: bool) -> Bounds {
    let max_msgs = match size {
        s if s <= 128 => 400_000,
        s if s <= 2048 => 250_000,
        _ => 20_000,
    };
    let max_time = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(1200)
    };
    Bounds { max_msgs, max_time }
}

/// Bounds of a plain-blast run: four times the usual count and time (a
/// run of the usual length, well under a second at 100 B, measured the
/// start more than the flow: buffers growing, threads waking; each
/// subject's spread from run to run was about 2x).
fn blast_bounds(size: usize, quick: bool) -> Bounds {
    let b = bounds(size, quick);
    if quick {
        return b;
    }
    Bounds {
        max_msgs: b.max_msgs * 4,
        max_time: b.max_time * 4,
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// A throughput run as a RunFn result: the delivered rate; lost messages
/// are noted.
fn tp(r: Result<util::Throughput, String>) -> Result<(Vec<f64>, Option<String>), String> {
    let t = r?;
    let note = (t.lost() > 0).then(|| format!("LOST {} of {}", t.lost(), t.expected));
    Ok((vec![t.rate()], note))
}

/// A plain-blast run as a RunFn result: the delivered rate when every
/// message arrived once and in order (noted "loss 0"), else "FAILED: ..."
/// with what was lost. Each run's check is printed.
fn checked(
    label: &str,
    r: Result<util::Checked, String>,
) -> Result<(Vec<f64>, Option<String>), String> {
    let c = r.map_err(|e| format!("FAILED: {e}"))?;
    eprintln!("    {label}: {}", c.summary());
    if !c.ok() {
        return Err(format!("FAILED: {}", c.summary()));
    }
    Ok((vec![c.rate()], Some("loss 0".into())))
}

fn main() {
    // `--parse-count N [--parse-size 100|1024|65536|dense]`: parse one frame
    // N times and exit, for counting instructions and cycles with
    // `perf stat` (deterministic, unlike a timed rate on a busy machine).
    let argv: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1).cloned())
    };
    if let Some(n) = flag("--parse-count").and_then(|v| v.parse::<u64>().ok()) {
        let size = flag("--parse-size").unwrap_or_else(|| "100".into());
        let frame = match size.as_str() {
            "dense" => parse::dense_frame(64 * 1024),
            s => parse::message_frame(s.parse().unwrap_or(100)),
        };
        let t = Instant::now();
        let ok = parse::count(&frame, n);
        println!(
            "parsed {ok} of {n} frames of {} bytes in {:.3} s",
            frame.len(),
            t.elapsed().as_secs_f64()
        );
        return;
    }
    let args = parse_args();
    let started = Instant::now();
    let nofile = util::raise_nofile();
    // HERMES_BENCH_SERVER: measure another build of the server (before /
    // after comparisons); by default the one cargo just built.
    let exe = std::env::var_os("HERMES_BENCH_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hermes-bus-server")));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("HERMES_BENCH_PY03")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/py03/bin/python"));
    let want =
        |case: &str| args.only.is_empty() || args.only.iter().any(|o| case.contains(o.as_str()));
    let runs = args.runs;
    let mut rows: Vec<Row> = Vec::new();

    // In-process: reading one frame (validation and field spans) against
    // copying it (memory speed) and against serde_json checking it.
    let frames = [
        ("100 B", parse::message_frame(100)),
        ("1 KB", parse::message_frame(1024)),
        ("64 KB", parse::message_frame(64 * 1024)),
        ("64 KB dense JSON", parse::dense_frame(64 * 1024)),
    ];
    for (name, frame) in &frames {
        let case = format!("parse {name} frame (BusMessage::parse_frame)");
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let time = if args.quick {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(300)
        };
        let f = frame.clone();
        let out = interleave(
            runs,
            1,
            vec![
                (
                    "ours",
                    Ok(Box::new(|| Ok((vec![parse::parse(&f, time)?], None))) as RunFn<'_>),
                ),
                (
                    "memcpy",
                    Ok(Box::new(|| Ok((vec![parse::memcpy(&f, time)?], None)))),
                ),
                (
                    "simd-json",
                    Ok(Box::new(|| Ok((vec![parse::simd_json(&f, time)?], None)))),
                ),
                (
                    "serde",
                    Ok(Box::new(|| Ok((vec![parse::serde(&f, time)?], None)))),
                ),
            ],
        );
        for (k, anchor) in [
            (1, "memcpy of the frame (memory speed)"),
            (2, "simd-json (copy + tape)"),
            (3, "serde_json, IgnoredAny"),
        ] {
            rows.push(Row {
                case: case.clone(),
                unit: Unit::ByteRate,
                ours: out[0][0].clone(),
                anchor: anchor.into(),
                theirs: out[k][0].clone(),
                target: None,
            });
        }
    }

    eprintln!("starting subjects ...");
    let ours = unix::start_ours(&exe, None);
    let py = unix::start_py03(&python);
    let rds = redis::start();
    for (n, r) in [
        ("our bus", ours.as_ref().err()),
        ("hermes-bus 0.3.0", py.as_ref().err()),
        ("redis", rds.as_ref().err()),
    ] {
        if let Some(e) = r {
            eprintln!("  {n}: {e}");
        }
    }
    let ours_sock = ours
        .as_ref()
        .map(|b| b.socket.clone())
        .map_err(|e| e.clone());
    let py_sock = py.as_ref().map(|b| b.socket.clone()).map_err(|e| e.clone());
    let bus_run = |sock: &Result<PathBuf, String>,
                   senders: usize,
                   receivers: usize,
                   size: usize,
                   b: Bounds|
     -> Result<RunFn<'static>, String> {
        let sock = sock.clone()?;
        Ok(Box::new(move || {
            tp(unix::bus_throughput(&sock, senders, receivers, size, b))
        }))
    };

    // One sender → bus → one receiver.
    for size in [100, 1024, 64 * 1024] {
        let case = format!("unix 1→1 {}", size_name(size));
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let b = bounds(size, args.quick);
        let rd = rds.as_ref().map_err(|e| e.clone());
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", bus_run(&ours_sock, 1, 1, size, b)),
                (
                    "raw",
                    Ok(Box::new(move || tp(unix::raw_throughput(size, b)))),
                ),
                ("py03", bus_run(&py_sock, 1, 1, size, b)),
                (
                    "redis",
                    rd.map(|r| -> RunFn<'_> {
                        Box::new(move || tp(redis::throughput(r, 1, size, b)))
                    }),
                ),
            ],
        );
        let o = out[0][0].clone();
        let t = |x| {
            if size == 100 {
                Some(Target::Ratio(x))
            } else {
                None
            }
        };
        rows.push(Row {
            case: case.clone(),
            unit: Unit::Rate,
            ours: o.clone(),
            anchor: "raw socket, 1 write/msg".into(),
            theirs: out[1][0].clone(),
            target: t(1.0),
        });
        rows.push(Row {
            case: case.clone(),
            unit: Unit::Rate,
            ours: o.clone(),
            anchor: "Python hermes-bus 0.3.0".into(),
            theirs: out[2][0].clone(),
            target: t(20.0),
        });
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: o,
            anchor: "Redis pub/sub (pipelined)".into(),
            theirs: out[3][0].clone(),
            target: None,
        });
    }

    // Our client library at both ends (what a program using it sees).
    let case = "unix 1→1 100 B via BusClient (send → recv)".to_string();
    if want(&case) {
        eprintln!("{case}");
        let b = bounds(100, args.quick);
        let cl = |sock: &Result<PathBuf, String>| -> Result<RunFn<'static>, String> {
            let sock = sock.clone()?;
            Ok(Box::new(move || tp(unix::client_throughput(&sock, 100, b))))
        };
        let out = interleave(
            runs,
            1,
            vec![("ours", cl(&ours_sock)), ("py03", cl(&py_sock))],
        );
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "Python hermes-bus 0.3.0, same client".into(),
            theirs: out[1][0].clone(),
            target: None,
        });
    }

    // Ten senders → one receiver, against our own one-to-one rate.
    for size in [100, 1024] {
        let case = format!("unix 10→1 {}", size_name(size));
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let b = bounds(size, args.quick);
        // Paired with our 1→1 rate measured run by run in this case.
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", bus_run(&ours_sock, 10, 1, size, b)),
                ("ours 1→1", bus_run(&ours_sock, 1, 1, size, b)),
            ],
        );
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "ours 1→1, runs alternating".into(),
            theirs: out[1][0].clone(),
            target: Some(Target::Ratio(0.8)),
        });
    }

    // One sender → broadcast to ten receivers (deliveries per second).
    for size in [100, 1024] {
        let case = format!("unix 1→10 broadcast {}", size_name(size));
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let b = bounds(size, args.quick);
        let b = Bounds {
            max_msgs: b.max_msgs / 10,
            ..b
        };
        let rd = rds.as_ref().map_err(|e| e.clone());
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", bus_run(&ours_sock, 1, 10, size, b)),
                ("py03", bus_run(&py_sock, 1, 10, size, b)),
                (
                    "redis",
                    rd.map(|r| -> RunFn<'_> {
                        Box::new(move || tp(redis::throughput(r, 10, size, b)))
                    }),
                ),
            ],
        );
        let o = out[0][0].clone();
        rows.push(Row {
            case: case.clone(),
            unit: Unit::Rate,
            ours: o.clone(),
            anchor: "Python hermes-bus 0.3.0".into(),
            theirs: out[1][0].clone(),
            target: None,
        });
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: o,
            anchor: "Redis pub/sub (pipelined)".into(),
            theirs: out[2][0].clone(),
            target: None,
        });
    }

    // Plain blast: senders write as fast as their sockets accept (no
    // window, no pacing), every message is checked (count and order per
    // sender); a run with loss is FAILED, never a speed.
    let blast_run = |label: &'static str,
                     sock: &Result<PathBuf, String>,
                     senders: usize,
                     receivers: usize,
                     size: usize,
                     b: Bounds|
     -> Result<RunFn<'static>, String> {
        let sock = sock.clone()?;
        Ok(Box::new(move || {
            checked(
                label,
                unix::bus_blast(&sock, senders, receivers, size, b, false),
            )
        }))
    };
    for size in [100, 1024, 64 * 1024] {
        let case = format!("unix 1→1 {} plain-blast", size_name(size));
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let b = blast_bounds(size, args.quick);
        let rd = rds.as_ref().map_err(|e| e.clone());
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", blast_run("ours", &ours_sock, 1, 1, size, b)),
                (
                    "raw",
                    Ok(Box::new(move || checked("raw", unix::raw_blast(size, b)))),
                ),
                (
                    "redis",
                    rd.map(|r| -> RunFn<'_> {
                        Box::new(move || checked("redis", redis::blast(r, 1, size, b)))
                    }),
                ),
            ],
        );
        rows.push(Row {
            case: case.clone(),
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "raw socket, 1 write/msg, no window".into(),
            theirs: out[1][0].clone(),
            target: (size == 100).then_some(Target::Ratio(1.0)),
        });
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "Redis pub/sub, plain blast".into(),
            theirs: out[2][0].clone(),
            target: (size == 64 * 1024).then_some(Target::Ratio(1.0)),
        });
    }
    let case = "unix 10→1 100 B plain-blast".to_string();
    if want(&case) {
        eprintln!("{case}");
        let b = blast_bounds(100, args.quick);
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", blast_run("ours 10→1", &ours_sock, 10, 1, 100, b)),
                ("ours 1→1", blast_run("ours 1→1", &ours_sock, 1, 1, 100, b)),
            ],
        );
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "ours 1→1 plain-blast, runs alternating".into(),
            theirs: out[1][0].clone(),
            target: Some(Target::Ratio(0.8)),
        });
    }
    // One-shot senders: each closes its connection right after its last
    // write (as `send_message` does); what it wrote must still arrive.
    let case = "unix 10→1 100 B plain-blast, senders close after writing".to_string();
    if want(&case) {
        eprintln!("{case}");
        let b = blast_bounds(100, args.quick);
        let closing = |sock: &Result<PathBuf, String>| -> Result<RunFn<'static>, String> {
            let sock = sock.clone()?;
            Ok(Box::new(move || {
                checked("ours, closing", unix::bus_blast(&sock, 10, 1, 100, b, true))
            }))
        };
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", closing(&ours_sock)),
                (
                    "ours 10→1",
                    blast_run("ours 10→1", &ours_sock, 10, 1, 100, b),
                ),
            ],
        );
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "ours 10→1 plain-blast, senders stay, runs alternating".into(),
            theirs: out[1][0].clone(),
            target: None,
        });
    }
    let case = "unix 1→10 broadcast 100 B plain-blast".to_string();
    if want(&case) {
        eprintln!("{case}");
        let b = blast_bounds(100, args.quick);
        let b = Bounds {
            max_msgs: b.max_msgs / 10,
            ..b
        };
        let rd = rds.as_ref().map_err(|e| e.clone());
        let out = interleave(
            runs,
            1,
            vec![
                ("ours", blast_run("ours", &ours_sock, 1, 10, 100, b)),
                (
                    "redis",
                    rd.map(|r| -> RunFn<'_> {
                        Box::new(move || checked("redis", redis::blast(r, 10, 100, b)))
                    }),
                ),
            ],
        );
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "Redis pub/sub, plain blast".into(),
            theirs: out[1][0].clone(),
            target: None,
        });
    }

    // Round trip client → bus → echo → bus → client.
    for size in [100, 1024] {
        let case = format!("unix round trip {}", size_name(size));
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let iters = if args.quick { 3000 } else { 20_000 };
        let limit = if args.quick {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(1500)
        };
        let lat = |r: Result<Vec<Duration>, String>| -> Result<(Vec<f64>, Option<String>), String> {
            let s = r?;
            Ok((
                [0.5, 0.99, 0.999]
                    .iter()
                    .map(|p| util::percentile(&s, *p).as_secs_f64() * 1e6)
                    .collect(),
                None,
            ))
        };
        let rt = |sock: &Result<PathBuf, String>| -> Result<RunFn<'static>, String> {
            let sock = sock.clone()?;
            Ok(Box::new(move || {
                lat(unix::bus_round_trip(&sock, size, iters, limit))
            }))
        };
        let out = interleave(
            runs,
            3,
            vec![
                ("ours", rt(&ours_sock)),
                (
                    "raw",
                    Ok(Box::new(move || {
                        lat(unix::raw_round_trip(size, iters, limit))
                    })),
                ),
                ("py03", rt(&py_sock)),
            ],
        );
        for (m, p) in ["p50", "p99", "p99.9"].iter().enumerate() {
            let t = if m == 0 && size == 100 {
                Some(Target::Ratio(2.2))
            } else {
                None
            };
            rows.push(Row {
                case: format!("{case} {p}"),
                unit: Unit::Micros,
                ours: out[0][m].clone(),
                anchor: "raw socket ping-pong".into(),
                theirs: out[1][m].clone(),
                target: t,
            });
            rows.push(Row {
                case: format!("{case} {p}"),
                unit: Unit::Micros,
                ours: out[0][m].clone(),
                anchor: "Python hermes-bus 0.3.0".into(),
                theirs: out[2][m].clone(),
                target: None,
            });
        }
    }

    // Hooks configured but filtered out, against no hooks.
    let case = "unix 1→1 100 B, hooks filtered out".to_string();
    if want(&case) {
        eprintln!("{case}");
        let yaml = "hooks:\n  - path: /bin/true\n    filter: {kind: topic, topic_prefix: \"never.\"}\n  - path: /bin/true\n    filter: {kind: message, to: nobody}\n";
        let hooked = unix::start_ours(&exe, Some(yaml));
        let hooked_sock = hooked
            .as_ref()
            .map(|b| b.socket.clone())
            .map_err(|e| e.clone());
        let b = bounds(100, args.quick);
        let out = interleave(
            runs,
            1,
            vec![
                ("hooks", bus_run(&hooked_sock, 1, 1, 100, b)),
                ("none", bus_run(&ours_sock, 1, 1, 100, b)),
            ],
        );
        rows.push(Row {
            case,
            unit: Unit::Rate,
            ours: out[0][0].clone(),
            anchor: "ours, no hooks".into(),
            theirs: out[1][0].clone(),
            target: Some(Target::Ratio(0.95)),
        });
        drop(hooked);
    }
    drop(ours);
    drop(py);
    drop(rds);

    // Resident memory of 10,000 idle registered sessions.
    let case = "unix 10,000 idle sessions, RSS per session".to_string();
    if want(&case) {
        eprintln!("{case}");
        let n = if args.quick { 2000 } else { 10_000 };
        // The bench holds one descriptor per session (the bus raises its
        // own limit for its side).
        let need = n as u64 + 100;
        let note = (nofile < need).then(|| format!("open-files limit {nofile} < {need}"));
        let mem = |start: &dyn Fn() -> Result<unix::BusServer, String>| -> Outcome {
            if let Some(n) = &note {
                return Outcome::Missing(n.clone());
            }
            let r = (|| -> Result<(f64, f64), String> {
                let mut bus = start()?;
                std::thread::sleep(Duration::from_millis(300));
                let base = bus.proc.rss().ok_or("no VmRSS")?;
                let sessions = unix::idle_sessions(&bus.socket, n)?;
                // Idle for a moment (our bus releases an idle session's
                // read buffer after 1 s of quiet).
                std::thread::sleep(Duration::from_millis(1500));
                let loaded = bus.proc.rss().ok_or("no VmRSS")?;
                if let Ok(Some(st)) = bus.proc.child.try_wait() {
                    return Err(format!("bus exited: {st}"));
                }
                drop(sessions);
                Ok((loaded.saturating_sub(base) as f64 / n as f64, loaded as f64))
            })();
            match r {
                Ok((per, total)) => Outcome::Figures {
                    values: vec![per],
                    notes: vec![format!("total {}", Unit::Bytes.show(total))],
                },
                Err(e) => Outcome::Missing(e),
            }
        };
        let o = mem(&|| unix::start_ours(&exe, None));
        let p = mem(&|| unix::start_py03(&python));
        rows.push(Row {
            case,
            unit: Unit::Bytes,
            ours: o,
            anchor: "Python hermes-bus 0.3.0".into(),
            theirs: p,
            target: Some(Target::BelowBytes(8192.0)),
        });
    }

    // ZeroMQ market data: paced one-way latency, ours against libzmq.
    let hermes = PathBuf::from(env!("CARGO_BIN_EXE_hermes-bus"));
    let zanchor = std::env::var_os("HERMES_BENCH_ZMQ_ANCHOR")
        .map(PathBuf::from)
        .ok_or_else(|| {
            "HERMES_BENCH_ZMQ_ANCHOR not set (bench/run builds bench/zmq-anchor)".to_string()
        });
    for (rate, rname, secs) in [(10_000u64, "10k/s", 3.0), (100_000, "100k/s", 2.0)] {
        let case = format!("zmq market-data latency 100 B @ {rname}");
        if !want(&case) {
            continue;
        }
        eprintln!("{case}");
        let secs = if args.quick { secs / 4.0 } else { secs };
        let count = (rate as f64 * secs) as u64;
        let h = hermes.clone();
        let za = zanchor.clone();
        let za2 = zanchor.clone();
        let h2 = hermes.clone();
        let out = interleave(
            runs,
            4,
            vec![
                (
                    "ours",
                    Ok(
                        Box::new(move || zmq::ours_latency(&h, rate, count, 100)?.checked("ours"))
                            as RunFn<'_>,
                    ),
                ),
                (
                    "libzmq",
                    za.map(|a| -> RunFn<'_> {
                        Box::new(move || {
                            zmq::anchor_latency(&a, None, rate, count, 100)?.checked("libzmq")
                        })
                    }),
                ),
                (
                    "libzmq peers, our proxy",
                    za2.map(|a| -> RunFn<'_> {
                        Box::new(move || {
                            zmq::anchor_latency(&a, Some(&h2), rate, count, 100)?
                                .checked("libzmq peers, our proxy")
                        })
                    }),
                ),
            ],
        );
        let anchor = "libzmq PUB → zmq_proxy(XSUB, XPUB) → libzmq SUB";
        for (m, p) in ["p50", "p99", "p99.9", "max"].iter().enumerate() {
            let t = (m < 3).then_some(Target::Ratio(1.0));
            rows.push(Row {
                case: format!("{case} {p}, our Publisher → hermes-bus proxy → our Receiver"),
                unit: Unit::Micros,
                ours: out[0][m].clone(),
                anchor: anchor.into(),
                theirs: out[1][m].clone(),
                target: t,
            });
            rows.push(Row {
                case: format!("{case} {p}, libzmq PUB → hermes-bus proxy → libzmq SUB"),
                unit: Unit::Micros,
                ours: out[2][m].clone(),
                anchor: anchor.into(),
                theirs: out[1][m].clone(),
                target: t,
            });
        }
    }

    // ZeroMQ market data: what each feature costs against plain
    // forwarding, measured alternately in the same run.
    let case = "zmq market-data cost 100 B blast".to_string();
    if want(&case) {
        eprintln!("{case}");
        let (count, t) = if args.quick {
            (100_000, Duration::from_secs(1))
        } else {
            (300_000, Duration::from_secs(3))
        };
        let run = |f: zmq::Feature, topics: u64| -> Result<RunFn<'static>, String> {
            Ok(Box::new(move || {
                zmq::cost_throughput(f, count, topics, 100, t)
            }))
        };
        // Sequence numbers and the last-value cache against plain
        // forwarding over 1,000 topics;
        // conflation against plain forwarding with a topic per envelope
        // (so nothing is replaced and every envelope must arrive).
        let out = interleave(
            runs,
            2,
            vec![
                ("plain 1,000 topics", run(zmq::Feature::Plain, 1000)),
                ("seq", run(zmq::Feature::Seq, 1000)),
                ("plain, a topic each", run(zmq::Feature::Plain, count)),
                ("conflate", run(zmq::Feature::Conflate, count)),
                ("last value", run(zmq::Feature::LastValue, 1000)),
            ],
        );
        rows.push(Row {
            case: format!("{case}, Publisher → proxy (lossless) → Receiver, 1,000 topics, sequence numbers on (Publisher and Receiver opted in)"),
            unit: Unit::Rate,
            ours: out[1][0].clone(),
            anchor: "ours, plain forwarding, same topics, runs alternating".into(),
            theirs: out[0][0].clone(),
            target: Some(Target::Ratio(0.9)),
        });
        rows.push(Row {
            case: format!("{case}, Publisher → proxy (lossless) → Receiver, 1,000 topics, last-value cache on (proxy last_value, default bounds)"),
            unit: Unit::Rate,
            ours: out[4][0].clone(),
            anchor: "ours, plain forwarding, same topics, runs alternating".into(),
            theirs: out[0][0].clone(),
            target: Some(Target::Ratio(0.9)),
        });
        rows.push(Row {
            case: format!("{case}, Publisher → proxy (lossless) → Receiver, a topic per envelope, conflation on (proxy slow-policy conflate, Receiver conflate; nothing to replace: the bookkeeping alone)"),
            unit: Unit::Rate,
            ours: out[3][0].clone(),
            anchor: "ours, plain forwarding, same topics, runs alternating".into(),
            theirs: out[2][0].clone(),
            target: Some(Target::Ratio(0.9)),
        });
        // The same runs' CPU time per envelope (publisher, proxy and
        // receiver are all in this process): what each feature adds in
        // work, which the rates above show only through the scheduling of
        // three busy threads on the machine's cores.
        for (what, ours, theirs) in [
            ("sequence numbers on, 1,000 topics", 1, 0),
            ("last-value cache on, 1,000 topics", 4, 0),
            ("conflation on, a topic per envelope", 3, 2),
        ] {
            rows.push(Row {
                case: format!("{case}, CPU per envelope (clients and proxy), {what}"),
                unit: Unit::Micros,
                ours: out[ours][1].clone(),
                anchor: "ours, plain forwarding, same topics, runs alternating".into(),
                theirs: out[theirs][1].clone(),
                target: None,
            });
        }
    }

    // ZeroMQ: from the separate zmq-anchor package (links libzmq).
    if want("zmq") {
        eprintln!("zmq (bench/zmq-anchor)");
        rows.extend(zmq_rows(runs, args.quick));
    }

    let table = render(&rows);
    println!("{table}");
    eprintln!("bench took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(out) = &args.out {
        if let Err(e) = std::fs::write(out, &table) {
            eprintln!("cannot write {}: {e}", out.display());
        }
    }
}

fn zmq_rows(runs: usize, quick: bool) -> Vec<Row> {
    let missing = |why: String| {
        vec![Row {
            case: "zmq proxy".into(),
            unit: Unit::Rate,
            ours: Outcome::Missing(why.clone()),
            anchor: "libzmq proxy (zmq_proxy), libzmq peers".into(),
            theirs: Outcome::Missing(why),
            target: Some(Target::Ratio(1.0)),
        }]
    };
    let Some(anchor) = std::env::var_os("HERMES_BENCH_ZMQ_ANCHOR").map(PathBuf::from) else {
        return missing(
            "HERMES_BENCH_ZMQ_ANCHOR not set (bench/run builds bench/zmq-anchor)".into(),
        );
    };
    let hermes = PathBuf::from(env!("CARGO_BIN_EXE_hermes-bus"));
    let mut cmd = std::process::Command::new(&anchor);
    cmd.arg("--hermes-bus")
        .arg(&hermes)
        .arg("--runs")
        .arg(runs.to_string());
    if quick {
        cmd.arg("--quick");
    }
    let out = match cmd.stderr(std::process::Stdio::inherit()).output() {
        Ok(o) => o,
        Err(e) => return missing(format!("cannot run {}: {e}", anchor.display())),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let rows = parse_zmq_rows(&text);
    if rows.is_empty() {
        return missing(format!(
            "{} printed no rows ({})",
            anchor.display(),
            out.status
        ));
    }
    rows
}

/// Lines `ROW<TAB>case<TAB>unit<TAB>target<TAB>ours<TAB>anchor name<TAB>anchor`,
/// where a figure is `v1,v2,..[|note]` or `missing: why`.
fn parse_zmq_rows(text: &str) -> Vec<Row> {
    let fig = |s: &str| -> Outcome {
        if let Some(why) = s.strip_prefix("missing: ") {
            return Outcome::Missing(why.to_string());
        }
        let (vals, note) = s.split_once('|').unwrap_or((s, ""));
        let values: Vec<f64> = vals
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        if values.is_empty() {
            return Outcome::Missing(format!("unreadable figure {s:?}"));
        }
        Outcome::Figures {
            values,
            notes: if note.is_empty() {
                vec![]
            } else {
                vec![note.to_string()]
            },
        }
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 7 || f[0] != "ROW" {
                return None;
            }
            let unit = match f[2] {
                "rate" => Unit::Rate,
                "us" => Unit::Micros,
                _ => return None,
            };
            let target = f[3].parse::<f64>().ok().map(Target::Ratio);
            Some(Row {
                case: f[1].to_string(),
                unit,
                target,
                ours: fig(f[4]),
                anchor: f[5].to_string(),
                theirs: fig(f[6]),
            })
        })
        .collect()
}

fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| case | ours: median (min – max) | anchor | anchor: median (min – max) | ours / anchor | target |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- |\n");
    for r in rows {
        let ratio = r
            .ratio()
            .map(|x| format!("{x:.2}×"))
            .unwrap_or_else(|| "–".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.case,
            r.ours.show(r.unit),
            r.anchor,
            r.theirs.show(r.unit),
            ratio,
            r.verdict()
        ));
    }
    s
}
