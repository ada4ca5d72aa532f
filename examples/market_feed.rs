//! A simulated market-data feed through an in-process ZeroMQ proxy.
//!
//! One publisher sends `Quote` and `Trade` message structs for many
//! symbols at a chosen rate on topics `quotes/SYMBOL` and `trades/SYMBOL`;
//! several receivers each subscribe to one symbol prefix (`quotes/A`,
//! `quotes/B`, ...) and the example prints, every second, the publish rate
//! and each receiver's rate and lag (receive time − send time).
//!
//! ```text
//! cargo run --release --example market_feed -- --rate 50000 --seconds 5
//! # through a proxy that already runs (`hermes-bus proxy`, `server --zmq`):
//! cargo run --release --example market_feed -- --addr tcp://127.0.0.1:6000 --zmq-out tcp://127.0.0.1:6001
//! ```
//!
//! Each line reports what the publisher was asked to publish and what it
//! really sent; what it dropped is split by cause: `filtered` (no
//! subscriber wanted the topic: a ZeroMQ PUB drops those at the source),
//! `disconnected` and `dropped` (queue full). `--seq` makes the receivers
//! ask for sequence numbers and count gaps; `--no-numbering` turns the
//! publisher's numbering off.
//!
//! Market-data features on show:
//! - Sequence numbers: the publisher numbers every envelope per topic
//!   (`PublisherConfig::seq`, on by default); one more receiver, `seq`,
//!   opts in (`ReceiverConfig::seq`) and reports every gap through
//!   `on_gap` (a small `--pub-queue` with a high `--rate` makes the
//!   publisher drop, and each drop shows up as a gap).
//! - Conflation: a slow receiver (`ReceiverConfig::conflate`) reads one
//!   quote per `--slow-ms`; while it lags, its queue keeps only the newest
//!   quote of each symbol. At the end it reports how many were conflated
//!   and checks that what it saw last of each symbol is the newest quote
//!   published.
//! - Last values: the in-process proxy keeps the newest envelope of each
//!   topic (`ProxyConfig::last_value`, `hermes-bus proxy --last-value`);
//!   after the feed, a late receiver (`ReceiverConfig::last_value`)
//!   subscribes to `quotes/` and gets the newest quote of every symbol at
//!   once, checked against what was published. (With `--zmq-in` the
//!   external proxy needs `--last-value` for this.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hermes_bus::envelope::{unix_now, Data, Quote, Trade};
use hermes_bus::last_value::LastValueLimits;
use hermes_bus::transports::zmq::proxy::{ProxyConfig, ZmqProxy};
use hermes_bus::transports::zmq::{
    OnGap, Publisher, PublisherConfig, Receiver, ReceiverConfig, SlowPolicy,
};
use tokio_util::sync::CancellationToken;

/// Command-line options.
#[derive(Debug, Parser)]
struct Args {
    /// Number of symbols (spread over the letters A-Z).
    #[arg(long, default_value_t = 260)]
    symbols: usize,
    /// Messages per second (quotes and trades together).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Symbol prefixes, one receiver each.
    #[arg(long, value_delimiter = ',', default_value = "A,B,C")]
    prefixes: Vec<String>,
    /// One trade per this many quotes.
    #[arg(long, default_value_t = 4)]
    quotes_per_trade: u64,
    /// An external proxy's XSUB address (publishers connect here); without
    /// it the example runs its own proxy in-process.
    #[arg(long = "zmq-in", visible_alias = "addr", value_name = "ADDR")]
    zmq_in: Option<String>,
    /// The publisher's queue limit in envelopes (small values with a high
    /// rate make it drop; the sequence receiver reports those as gaps).
    #[arg(long, default_value_t = 1_000_000)]
    pub_queue: usize,
    /// The slow, conflating receiver reads one envelope per this many
    /// milliseconds.
    #[arg(long, default_value_t = 2)]
    slow_ms: u64,
    /// The external proxy's XPUB address (subscribers connect here).
    #[arg(
        long = "zmq-out",
        value_name = "ADDR",
        default_value = "tcp://127.0.0.1:6001"
    )]
    zmq_out: String,
    /// Receivers ask for sequence numbers and count gaps (`gaps`,
    /// `missing` in their stats at the end).
    #[arg(long)]
    seq: bool,
    /// The publisher does not number its envelopes (to measure what
    /// numbering costs).
    #[arg(long)]
    no_numbering: bool,
}

/// Per-receiver tallies the printer reads.
#[derive(Default)]
struct Tally {
    /// Envelopes received.
    count: AtomicU64,
    /// Sum of lags in microseconds.
    lag_us: AtomicU64,
    /// Largest lag in microseconds since the last print.
    max_lag_us: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The proxy: an external one (--addr), or our own on free ports.
    let stop = CancellationToken::new();
    let (front, back, proxy) = match &args.zmq_in {
        Some(front) => (front.clone(), args.zmq_out.clone(), None),
        None => {
            let proxy = ZmqProxy::bind(ProxyConfig {
                frontend: "tcp://127.0.0.1:0".into(),
                backend: "tcp://127.0.0.1:0".into(),
                last_value: Some(LastValueLimits::default()),
                ..ProxyConfig::default()
            })
            .await?;
            let ep = proxy
                .endpoints()
                .ok_or_else(|| anyhow::anyhow!("proxy not bound"))?;
            let stats = proxy.stats();
            let task = tokio::spawn(proxy.run(stop.clone()));
            (
                ep.frontend.to_string(),
                ep.backend.to_string(),
                Some((stats, task)),
            )
        }
    };
    println!(
        "proxy{}: publishers → {front}, subscribers → {back}",
        if proxy.is_some() {
            " (in-process)"
        } else {
            " (external)"
        }
    );

    let symbols: Vec<String> = (0..args.symbols.max(1))
        .map(|i| format!("{}{:03}", (b'A' + (i % 26) as u8) as char, i / 26))
        .collect();

    // Receivers, one per symbol prefix.
    let mut receivers = Vec::new();
    for prefix in &args.prefixes {
        let mut cfg = ReceiverConfig::new(back.clone(), format!("sub-{prefix}"));
        cfg.topics = vec![format!("quotes/{prefix}"), format!("trades/{prefix}")];
        cfg.slow_policy = SlowPolicy::Warn;
        cfg.seq = args.seq;
        let mut r = Receiver::with_config(cfg)?;
        r.start()?;
        r.wait_connected(Duration::from_secs(5))
            .await
            .map_err(|e| anyhow::anyhow!("no proxy answers at {back} for subscribers: {e}"))?;
        let r = Arc::new(r);
        let tally = Arc::new(Tally::default());
        let (r2, t2, done) = (r.clone(), tally.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let env = tokio::select! {
                    _ = done.cancelled() => break,
                    e = r2.recv() => e,
                };
                let Some(env) = env else { break };
                let lag = ((unix_now() - env.ts).max(0.0) * 1e6) as u64;
                t2.count.fetch_add(1, Ordering::Relaxed);
                t2.lag_us.fetch_add(lag, Ordering::Relaxed);
                t2.max_lag_us.fetch_max(lag, Ordering::Relaxed);
                debug_assert!(
                    env.data.downcast_ref::<Quote>().is_some()
                        || env.data.downcast_ref::<Trade>().is_some()
                );
            }
        });
        receivers.push((prefix.clone(), r, tally));
    }

    // Sequence numbers: a receiver of everything that opted in, printing
    // each gap (the first few; all are counted in its stats).
    let mut scfg = ReceiverConfig::new(back.clone(), "seq");
    scfg.seq = true;
    scfg.slow_policy = SlowPolicy::Warn;
    let printed = Arc::new(AtomicU64::new(0));
    let p2 = printed.clone();
    scfg.on_gap = Some(OnGap::new(move |g| {
        if p2.fetch_add(1, Ordering::Relaxed) < 5 {
            println!(
                "seq: gap on {} from {}: expected {}, got {} ({} missing)",
                g.topic,
                g.origin,
                g.expected,
                g.got,
                g.missing()
            );
        }
    }));
    let mut seq_rx = Receiver::with_config(scfg)?;
    seq_rx.start()?;
    seq_rx.wait_connected(Duration::from_secs(5)).await?;
    let seq_rx = Arc::new(seq_rx);
    {
        let (r, done) = (seq_rx.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    e = r.recv() => if e.is_none() { break },
                }
            }
        });
    }

    // Conflation: a slow reader of every quote; its queue keeps the newest
    // quote per symbol while it lags. It remembers the last quote time it
    // saw per symbol, to compare with the newest published.
    let mut ccfg = ReceiverConfig::new(back.clone(), "slow");
    ccfg.topics = vec!["quotes/".into()];
    ccfg.conflate = true;
    ccfg.slow_policy = SlowPolicy::Warn;
    let mut slow_rx = Receiver::with_config(ccfg)?;
    slow_rx.start()?;
    slow_rx.wait_connected(Duration::from_secs(5)).await?;
    let slow_rx = Arc::new(slow_rx);
    let slow_seen: Arc<Mutex<HashMap<String, f64>>> = Arc::default();
    let slow_count = Arc::new(AtomicU64::new(0));
    let slow_task = {
        let (r, seen, n, done) = (
            slow_rx.clone(),
            slow_seen.clone(),
            slow_count.clone(),
            stop.clone(),
        );
        let pause = Duration::from_millis(args.slow_ms);
        tokio::spawn(async move {
            loop {
                let env = tokio::select! {
                    _ = done.cancelled() => break,
                    e = r.recv() => e,
                };
                let Some(env) = env else { break };
                if let Some(q) = env.data.downcast_ref::<Quote>() {
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(q.symbol.clone(), q.ts);
                }
                n.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
            }
        })
    };

    let mut pcfg = PublisherConfig::new(front.clone(), "feed");
    pcfg.queue = args.pub_queue;
    pcfg.seq = !args.no_numbering;
    let mut publisher = Publisher::with_config(pcfg)?;
    publisher.start()?;
    publisher
        .wait_connected(Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("no proxy answers at {front} for publishers: {e}"))?;
    if let Some(first) = args.prefixes.first() {
        if publisher
            .wait_for_subscriber(&format!("quotes/{first}"), Duration::from_secs(5))
            .await
            .is_err()
        {
            println!("warning: no subscription for quotes/{first} reached the publisher yet");
        }
    }

    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut published = 0u64;
    let mut last_print = Instant::now();
    let mut last_pub = 0u64;
    let mut last_ps = publisher.stats();
    let mut last_counts = vec![0u64; receivers.len()];
    let mut seq = 0u64;
    // The newest quote time sent per symbol (for the conflation and
    // last-value checks).
    let mut newest: HashMap<String, f64> = HashMap::new();
    while Instant::now() < end {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while published < due {
            let sym = &symbols[(seq as usize) % symbols.len()];
            let px = 100.0 + (seq % 1000) as f64 / 100.0;
            let (topic, data) = if seq % (args.quotes_per_trade + 1) == args.quotes_per_trade {
                let t = Trade {
                    ts: unix_now(),
                    symbol: sym.clone(),
                    price: px,
                    size: 100.0,
                    side: "buy".into(),
                };
                (format!("trades/{sym}"), Data::typed(t))
            } else {
                let q = Quote {
                    ts: unix_now(),
                    symbol: sym.clone(),
                    bid: px - 0.01,
                    bid_size: 300.0,
                    ask: px + 0.01,
                    ask_size: 200.0,
                };
                (format!("quotes/{sym}"), Data::typed(q))
            };
            // Only quotes that really left count as the newest (the
            // publisher drops when its queue is full).
            if publisher.publish_parts(&topic, "feed", &data)? {
                if let Some(q) = data.downcast_ref::<Quote>() {
                    newest.insert(q.symbol.clone(), q.ts);
                }
            }
            published += 1;
            seq += 1;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let secs = last_print.elapsed().as_secs_f64();
            // What was asked, and what really left; drops by cause, so a
            // topic nobody subscribed to is not counted as published.
            let ps = publisher.stats();
            let mut line = format!(
                "asked {:>8.0}/s sent {:>8.0}/s (filtered {}, disconnected {}, dropped {})",
                (published - last_pub) as f64 / secs,
                (ps.sent - last_ps.sent) as f64 / secs,
                ps.filtered - last_ps.filtered,
                ps.disconnected - last_ps.disconnected,
                ps.dropped - last_ps.dropped,
            );
            last_ps = ps;
            for (i, (prefix, _, t)) in receivers.iter().enumerate() {
                let n = t.count.load(Ordering::Relaxed);
                let got = n - last_counts[i];
                let lag_sum = t.lag_us.swap(0, Ordering::Relaxed);
                let max = t.max_lag_us.swap(0, Ordering::Relaxed);
                let mean = if got > 0 {
                    lag_sum as f64 / got as f64 / 1000.0
                } else {
                    0.0
                };
                line.push_str(&format!(
                    " | {prefix}*: {:>7.0}/s lag {:>6.2} ms (max {:>6.2})",
                    got as f64 / secs,
                    mean,
                    max as f64 / 1000.0
                ));
                last_counts[i] = n;
            }
            let ss = seq_rx.stats();
            let cs = slow_rx.stats();
            line.push_str(&format!(
                " | seq: numbered {} gaps {} | slow: read {} conflated {}",
                ss.numbered,
                ss.gaps,
                slow_count.load(Ordering::Relaxed),
                cs.conflated
            ));
            println!("{line}");
            last_print = Instant::now();
            last_pub = published;
        }
    }
    publisher.flush(Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ps = publisher.stats();
    println!(
        "total: asked {published}, sent {}, filtered {} (no subscriber for the topic), disconnected {}, dropped {} (queue full)",
        ps.sent, ps.filtered, ps.disconnected, ps.dropped
    );
    let received: u64 = receivers
        .iter()
        .map(|(_, _, t)| t.count.load(Ordering::Relaxed))
        .sum();
    println!(
        "received by the {} receivers together: {received}",
        receivers.len()
    );
    println!("publisher: {}", serde_json::to_string(&ps)?);
    for (prefix, r, _) in &receivers {
        println!("receiver {prefix}*: {}", serde_json::to_string(&r.stats())?);
    }
    if let Some((stats, _)) = &proxy {
        println!("proxy: {}", serde_json::to_string(&stats.snapshot())?);
    }

    // Sequence numbers: what the numbered receiver saw.
    let ss = seq_rx.stats();
    println!(
        "sequence numbers: {} numbered envelopes checked, {} gaps, {} missing (publisher dropped {}: each is a gap for whoever wanted its topic)",
        ss.numbered, ss.gaps, ss.missing, ps.dropped
    );

    // Conflation: let the slow reader drain its queue (at most one quote
    // per symbol), then compare what it saw last with the newest quotes.
    let drain_end = Instant::now() + Duration::from_secs(5);
    while slow_rx.pending() > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(2 * args.slow_ms + 10)).await;
    let cs = slow_rx.stats();
    let (current, stale) = {
        let seen = slow_seen.lock().unwrap_or_else(|p| p.into_inner());
        let current = newest
            .iter()
            .filter(|(sym, ts)| seen.get(*sym) == Some(*ts))
            .count();
        (current, newest.len() - current)
    };
    println!(
        "conflation: the slow receiver (one read per {} ms) read {} quotes, {} conflated (replaced by a newer quote of the same symbol while it lagged), dropped {}; its last quote is the newest published for {current} of {} symbols ({stale} not)",
        args.slow_ms,
        slow_count.load(Ordering::Relaxed),
        cs.conflated,
        cs.dropped,
        newest.len()
    );
    // Last values: a receiver that joins now gets the newest quote of
    // every symbol from the proxy's cache, before any live traffic (the
    // feed has stopped, so all it gets is the replay).
    let mut lcfg = ReceiverConfig::new(back.clone(), "late");
    lcfg.topics = vec!["quotes/".into()];
    lcfg.last_value = Some(true);
    // Replayed values are old by design: no lag policy for them.
    lcfg.slow_policy = SlowPolicy::Warn;
    lcfg.lag_threshold = Duration::from_secs(3600);
    let mut late = Receiver::with_config(lcfg)?;
    late.start()?;
    late.wait_connected(Duration::from_secs(5)).await?;
    let mut replayed: HashMap<String, f64> = HashMap::new();
    while let Some(env) = late.recv_timeout(Duration::from_millis(500)).await {
        if let Some(q) = env.data.downcast_ref::<Quote>() {
            replayed.insert(q.symbol.clone(), q.ts);
        }
    }
    let newest_ok = newest
        .iter()
        .filter(|(sym, ts)| replayed.get(*sym) == Some(*ts))
        .count();
    println!(
        "last values: a receiver joining after the feed got {} quotes at once, the newest of {newest_ok} of {} symbols{}",
        replayed.len(),
        newest.len(),
        if proxy.is_none() && replayed.is_empty() {
            " (the external proxy keeps last values only with --last-value)"
        } else {
            ""
        }
    );
    late.stop().await;

    publisher.stop().await;
    stop.cancel();
    let _ = slow_task.await;
    if let Some((_, task)) = proxy {
        let _ = task.await;
    }
    Ok(())
}
