//! The `proxy`, `pub` and `sub` subcommands (clap argument structs and
//! their async entry points; the binary wires them in).

use std::io::Write;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::heartbeat::{HeartbeatConfig, MAX_TTL};
use super::proxy::{
    LastValueReplay, ProxyConfig, ZmqProxy, DEFAULT_BACKEND, DEFAULT_CAPTURE, DEFAULT_FRONTEND,
    DEFAULT_SLOW_TIMEOUT,
};
use super::publisher::{Publisher, PublisherConfig};
use super::receiver::{Receiver, ReceiverConfig, SlowPolicy};
use super::{Endpoint, ZmqTransport};
use crate::codec::Codec;
use crate::last_value::{LastValueLimits, DEFAULT_MAX_BYTES, DEFAULT_MAX_TOPICS};
use crate::transport::{Bus, Transport};
use crate::transports::zmq::envelope::{Data, Registry};

/// The ZeroMQ proxy's settings: one set of flags for `hermes-bus proxy`
/// and `server --zmq`. Each is `--zmq-*`; the names the proxy command had
/// on its own (`--frontend`, `--lossless`...) are aliases.
#[derive(Debug, Clone, Args)]
pub struct ZmqProxyArgs {
    /// XSUB address publishers connect to.
    #[arg(id = "zmq_in", value_name = "ADDR", long = "zmq-in", visible_aliases = ["frontend", "proxy-in"], default_value = DEFAULT_FRONTEND)]
    pub frontend: String,
    /// XPUB address subscribers connect to.
    #[arg(id = "zmq_out", value_name = "ADDR", long = "zmq-out", visible_aliases = ["backend", "proxy-out"], default_value = DEFAULT_BACKEND)]
    pub backend: String,
    /// Also serve a capture PUB socket with a copy of all traffic (the
    /// reference's debug address; without a value: tcp://127.0.0.1:6002).
    #[arg(id = "zmq_capture", value_name = "ADDR", long = "zmq-capture", visible_aliases = ["capture", "debug-addr"], num_args = 0..=1, default_missing_value = DEFAULT_CAPTURE)]
    pub capture: Option<String>,
    /// Largest message accepted, in bytes (larger ones are dropped and counted).
    #[arg(id = "zmq_max_msg_size", value_name = "BYTES", long = "zmq-max-msg-size", visible_alias = "max-msg-size", default_value_t = 16 * 1024 * 1024)]
    pub max_msg_size: usize,
    /// Per-subscriber queue limit in messages (beyond it: drop and count).
    #[arg(
        id = "zmq_sub_queue",
        value_name = "N",
        long = "zmq-sub-queue",
        visible_alias = "sub-queue",
        default_value_t = 100_000
    )]
    pub sub_queue: usize,
    /// Per-subscriber queue limit in bytes.
    #[arg(id = "zmq_sub_queue_bytes", value_name = "BYTES", long = "zmq-sub-queue-bytes", visible_alias = "sub-queue-bytes", default_value_t = 64 * 1024 * 1024)]
    pub sub_queue_bytes: usize,
    /// Maximum connections per side (`proxy` also takes `--max-connections`).
    #[arg(
        id = "zmq_max_connections",
        value_name = "N",
        long = "zmq-max-connections",
        default_value_t = 4096
    )]
    pub max_connections: usize,
    /// Lossless: a full subscriber queue makes the proxy stop reading the
    /// publisher until it drains (pushback) instead of dropping; only a
    /// subscriber stuck for the slow-consumer timeout gets drops.
    #[arg(id = "zmq_lossless", long = "zmq-lossless", visible_alias = "lossless")]
    pub lossless: bool,
    /// With lossless: seconds without progress after which a subscriber is
    /// stuck (its messages are dropped and counted, publishers resume).
    /// `proxy` also takes `--slow-consumer-timeout`.
    #[arg(id = "zmq_slow_consumer_timeout", value_name = "SECS", long = "zmq-slow-consumer-timeout", default_value_t = DEFAULT_SLOW_TIMEOUT.as_secs_f64(), value_parser = parse_secs)]
    pub slow_consumer_timeout: f64,
    /// Most bytes of subscription cancels kept for publishers that have
    /// not read them yet, across all publishers (past it the oldest go and
    /// those publishers are resynced).
    #[arg(id = "zmq_max_upstream_pending_bytes", value_name = "BYTES", long = "zmq-max-upstream-pending-bytes", default_value_t = super::proxy::DEFAULT_MAX_UPSTREAM_PENDING_BYTES)]
    pub max_upstream_pending_bytes: usize,
    /// What a lagging subscriber's queue does: queue (every envelope;
    /// drops past the bound, or pushback with lossless) or conflate (at
    /// most one queued envelope per topic, the newest in the place of the
    /// old; counted as `conflated`). `proxy` also takes `--slow-policy`.
    #[arg(
        id = "zmq_slow_policy",
        value_name = "POLICY",
        long = "zmq-slow-policy",
        default_value = "queue"
    )]
    pub slow_policy: crate::router::SlowPolicy,
    /// ZMTP heartbeats (libzmq's ZMQ_HEARTBEAT_IVL): send every peer a
    /// PING this often, in seconds (0: never, the default, as libzmq).
    /// `proxy` also takes `--heartbeat-ivl`.
    #[arg(id = "zmq_heartbeat_ivl", value_name = "SECS", long = "zmq-heartbeat-ivl", default_value_t = 0.0, value_parser = parse_secs)]
    pub heartbeat_ivl: f64,
    /// Drop a peer that sent nothing for this many seconds after a PING
    /// (ZMQ_HEARTBEAT_TIMEOUT; default: the interval). `proxy` also takes
    /// `--heartbeat-timeout`.
    #[arg(id = "zmq_heartbeat_timeout", value_name = "SECS", long = "zmq-heartbeat-timeout", value_parser = parse_secs)]
    pub heartbeat_timeout: Option<f64>,
    /// TTL sent in our PINGs, in seconds (ZMQ_HEARTBEAT_TTL): peers drop
    /// us after hearing nothing that long (0: no limit; at most 6553.5).
    /// `proxy` also takes `--heartbeat-ttl`.
    #[arg(id = "zmq_heartbeat_ttl", value_name = "SECS", long = "zmq-heartbeat-ttl", default_value_t = 0.0, value_parser = parse_ttl)]
    pub heartbeat_ttl: f64,
    /// Keep the newest envelope of each topic and send a subscriber the
    /// matching ones when it subscribes, before live traffic (`proxy`
    /// also takes `--last-value`).
    #[arg(id = "zmq_last_value", long = "zmq-last-value")]
    pub last_value: bool,
    /// With the last-value cache: most topics kept (the least recently
    /// updated go first, counted).
    #[arg(id = "zmq_last_value_topics", value_name = "N", long = "zmq-last-value-topics", default_value_t = DEFAULT_MAX_TOPICS)]
    pub last_value_topics: usize,
    /// With the last-value cache: most bytes kept.
    #[arg(id = "zmq_last_value_bytes", value_name = "BYTES", long = "zmq-last-value-bytes", default_value_t = DEFAULT_MAX_BYTES)]
    pub last_value_bytes: usize,
    /// With the last-value cache: replay to every subscriber that does not
    /// decline (all), or only to those that ask (opt-in: our Receiver with
    /// its last-value option). The reference hermes-zmq Receiver stops
    /// itself on an envelope older than 1 s: use opt-in where it runs.
    #[arg(
        id = "zmq_last_value_replay",
        value_name = "MODE",
        long = "zmq-last-value-replay",
        default_value = "all"
    )]
    pub last_value_replay: LastValueReplay,
    /// Match every subscription as raw bytes only (libzmq), instead of
    /// also reading a bare one such as `RAW/` as the topic prefix `"RAW/`
    /// (`proxy` also takes `--strict-subscriptions`).
    #[arg(id = "zmq_strict_subscriptions", long = "zmq-strict-subscriptions")]
    pub strict_subscriptions: bool,
}

impl ZmqProxyArgs {
    /// The proxy configuration these arguments describe.
    pub fn config(&self) -> ProxyConfig {
        ProxyConfig {
            frontend: self.frontend.clone(),
            backend: self.backend.clone(),
            capture: self.capture.clone(),
            max_msg_size: self.max_msg_size,
            sub_queue: self.sub_queue,
            sub_queue_bytes: self.sub_queue_bytes,
            max_connections: self.max_connections,
            lossless: self.lossless,
            slow_timeout: secs(self.slow_consumer_timeout),
            max_upstream_pending_bytes: self.max_upstream_pending_bytes,
            slow_policy: self.slow_policy,
            heartbeat: HeartbeatConfig {
                interval: secs(self.heartbeat_ivl),
                timeout: self.heartbeat_timeout.map(secs),
                ttl: secs(self.heartbeat_ttl),
            },
            last_value: self.last_value.then_some(LastValueLimits {
                max_topics: self.last_value_topics,
                max_bytes: self.last_value_bytes,
            }),
            last_value_replay: self.last_value_replay,
            strict_subscriptions: self.strict_subscriptions,
            ..ProxyConfig::default()
        }
    }

    /// The ZeroMQ transport of `server --zmq`, its addresses checked now
    /// (a typo fails at start, not later).
    pub fn transport(&self) -> anyhow::Result<Box<dyn Transport>> {
        let cfg = self.config();
        for a in [&cfg.frontend, &cfg.backend]
            .into_iter()
            .chain(cfg.capture.as_ref())
        {
            a.parse::<Endpoint>()?;
        }
        Ok(Box::new(ZmqTransport::new(cfg)))
    }
}

/// `hermes-bus proxy`: the ZeroMQ proxy in the foreground.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// The proxy's settings (shared with `server --zmq`).
    #[command(flatten)]
    pub proxy: ZmqProxyArgs,
    /// Same as --zmq-max-connections.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Same as --zmq-slow-consumer-timeout.
    #[arg(long, value_parser = parse_secs)]
    pub slow_consumer_timeout: Option<f64>,
    /// Same as --zmq-slow-policy.
    #[arg(long, value_name = "POLICY")]
    pub slow_policy: Option<crate::router::SlowPolicy>,
    /// Same as --zmq-heartbeat-ivl. (`server` has its own
    /// `--heartbeat-timeout`, for Unix sessions, hence the two spellings.)
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub heartbeat_ivl: Option<f64>,
    /// Same as --zmq-heartbeat-timeout.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub heartbeat_timeout: Option<f64>,
    /// Same as --zmq-heartbeat-ttl.
    #[arg(long, value_name = "SECS", value_parser = parse_ttl)]
    pub heartbeat_ttl: Option<f64>,
    /// Same as --zmq-last-value.
    #[arg(long)]
    pub last_value: bool,
    /// Same as --zmq-last-value-topics.
    #[arg(long, value_name = "N")]
    pub last_value_topics: Option<usize>,
    /// Same as --zmq-last-value-bytes.
    #[arg(long, value_name = "BYTES")]
    pub last_value_bytes: Option<usize>,
    /// Same as --zmq-last-value-replay.
    #[arg(long, value_name = "MODE")]
    pub last_value_replay: Option<LastValueReplay>,
    /// Same as --zmq-strict-subscriptions.
    #[arg(long)]
    pub strict_subscriptions: bool,
    /// Serve the proxy's counters in the Prometheus text format at
    /// http://ADDR/metrics (e.g. 127.0.0.1:9101).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Log a one-line summary (rates, drops, connections) every this many
    /// seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = parse_secs)]
    pub summary_secs: f64,
}

impl ProxyArgs {
    /// The proxy configuration these arguments describe.
    pub fn config(&self) -> ProxyConfig {
        let mut args = self.proxy.clone();
        if let Some(n) = self.max_connections {
            args.max_connections = n;
        }
        if let Some(t) = self.slow_consumer_timeout {
            args.slow_consumer_timeout = t;
        }
        if let Some(p) = self.slow_policy {
            args.slow_policy = p;
        }
        if let Some(t) = self.heartbeat_ivl {
            args.heartbeat_ivl = t;
        }
        if self.heartbeat_timeout.is_some() {
            args.heartbeat_timeout = self.heartbeat_timeout;
        }
        if let Some(t) = self.heartbeat_ttl {
            args.heartbeat_ttl = t;
        }
        args.last_value |= self.last_value;
        if let Some(n) = self.last_value_topics {
            args.last_value_topics = n;
        }
        if let Some(n) = self.last_value_bytes {
            args.last_value_bytes = n;
        }
        if let Some(m) = self.last_value_replay {
            args.last_value_replay = m;
        }
        args.strict_subscriptions |= self.strict_subscriptions;
        args.config()
    }
}

/// Seconds as a `Duration` (the value was checked by [`parse_secs`]).
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(DEFAULT_SLOW_TIMEOUT)
}

/// A number of seconds: finite, not negative, not absurdly large.
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if Duration::try_from_secs_f64(v).is_err() {
        return Err(format!("{s:?} is not a usable number of seconds"));
    }
    Ok(v)
}

/// A heartbeat TTL in seconds: as [`parse_secs`], and at most what a PING
/// carries (6553.5 s).
pub fn parse_ttl(s: &str) -> Result<f64, String> {
    let v = parse_secs(s)?;
    if v > MAX_TTL.as_secs_f64() {
        return Err(format!(
            "{s:?}: a heartbeat TTL is at most {} seconds",
            MAX_TTL.as_secs_f64()
        ));
    }
    Ok(v)
}

/// `hermes-bus pub TOPIC [DATA]`: publishes envelopes through a proxy.
#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    /// Topic, e.g. `RAW/node1`.
    pub topic: String,
    /// Data, as JSON (e.g. `'{"p": 1}'`, `'"text"'`, `42`). Default: null.
    /// Text that is not JSON is refused unless --raw.
    pub data: Option<String>,
    /// Send DATA as a JSON string, whatever it contains.
    #[arg(long)]
    pub raw: bool,
    /// The proxy's XSUB address (where publishers connect).
    #[arg(id = "zmq_in", value_name = "ADDR", long = "zmq-in", visible_alias = "addr", default_value = DEFAULT_FRONTEND)]
    pub addr: String,
    /// Origin name.
    #[arg(long, default_value = "hermes-bus")]
    pub name: String,
    /// How many times to publish.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Pause between publications, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// How long to wait for the proxy to accept the connection (then
    /// fail, exit 3) and for a subscriber of the topic (then warn: a PUB
    /// drops what nobody subscribed to), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub wait_ms: u64,
    /// Data codec: json or msgpack (msgpack only if the proxy accepts it).
    #[arg(long, default_value = "json", value_parser = parse_codec)]
    pub codec: Codec,
    /// Print the publisher's counters as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `hermes-bus sub [PREFIX]`: prints envelopes, one per line.
#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    /// Topic prefix; none: everything.
    pub prefix: Option<String>,
    /// The proxy's XPUB address (where subscribers connect).
    #[arg(id = "zmq_out", value_name = "ADDR", long = "zmq-out", visible_alias = "addr", default_value = DEFAULT_BACKEND)]
    pub addr: String,
    /// Receiver name.
    #[arg(long, default_value = "hermes-bus-sub")]
    pub name: String,
    /// Keep only envelopes from these origins (repeatable).
    #[arg(long = "exchange")]
    pub exchanges: Vec<String>,
    /// Exit after this many envelopes.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many seconds.
    #[arg(long)]
    pub timeout_s: Option<f64>,
    /// What to do with envelopes lagging over 1 s: warn, drop, stop.
    #[arg(long, default_value = "warn")]
    pub slow: SlowPolicy,
    /// Accept MessagePack data frames from the proxy.
    #[arg(long, default_value = "json", value_parser = parse_codec)]
    pub codec: Codec,
    /// One JSON envelope per line, even on a terminal (always when piped).
    #[arg(long)]
    pub json: bool,
    /// Ask for sequence numbers: each line gets `seq` and `seq_origin`,
    /// and every gap (envelopes lost on the way) is reported on stderr.
    #[arg(long)]
    pub seq: bool,
}

/// A `pub` / `sub` failure with the exit code the binary should use
/// (2: bad input; 3: nothing answered at the address).
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CliFailure {
    /// The process exit code.
    pub code: i32,
    /// What went wrong and the likely fix.
    pub msg: String,
}

fn parse_codec(s: &str) -> Result<Codec, String> {
    Codec::from_name(s).ok_or_else(|| format!("unknown codec {s:?} (json, msgpack)"))
}

pub use crate::signals::signal_token;

/// Runs the proxy inside `bus` (so Unix sessions and hooks see ZeroMQ
/// topics) until SIGINT/SIGTERM.
pub async fn run_proxy_with_bus(args: ProxyArgs, bus: Bus) -> anyhow::Result<()> {
    let t = ZmqTransport::bind(args.config()).await?;
    if let Some(ep) = t.endpoints() {
        tracing::info!(frontend = %ep.frontend, backend = %ep.backend, capture = ?ep.capture.as_ref().map(|c| c.to_string()), "zmq proxy serving");
    }
    let shutdown = signal_token();
    Box::new(t).serve(bus, shutdown).await
}

/// `hermes-bus proxy`: runs the proxy alone (no router), as the
/// reference's PostOffice, until SIGINT/SIGTERM; prints the bound
/// addresses as one JSON line first.
pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let p = ZmqProxy::bind(args.config()).await?;
    if let Some(ep) = p.endpoints() {
        let line = serde_json::json!({
            "frontend": ep.frontend.to_string(),
            "backend": ep.backend.to_string(),
            "capture": ep.capture.map(|c| c.to_string()),
        });
        print_line(&line.to_string())?;
    }
    let stats = p.stats();
    let started = std::time::Instant::now();
    let shutdown = signal_token();
    if let Some(listener) = metrics {
        let stats = stats.clone();
        let source: crate::metrics::Source =
            std::sync::Arc::new(move || crate::metrics::render(&proxy_status(&stats, started)));
        if let Ok(at) = listener.local_addr() {
            tracing::info!("metrics on http://{at}/metrics");
        }
        tokio::spawn(crate::metrics::serve(listener, source, shutdown.clone()));
    }
    if args.summary_secs > 0.0 {
        tokio::spawn(log_summaries(
            stats.clone(),
            secs(args.summary_secs),
            shutdown.clone(),
        ));
    }
    p.run(shutdown.clone()).await?;
    shutdown.cancel();
    tracing::info!(
        "zmq proxy stopped: {}",
        serde_json::to_string(&stats.snapshot()).unwrap_or_default()
    );
    Ok(())
}

/// A standalone proxy's status: `{"uptime_s", "transports": {"zmq": ..}}`
/// (the shape of the bus's `stats`, for the metrics).
fn proxy_status(stats: &super::ProxyStats, started: std::time::Instant) -> serde_json::Value {
    serde_json::json!({
        "uptime_s": started.elapsed().as_secs_f64(),
        "transports": {"zmq": stats.snapshot()},
    })
}

/// Logs one line every `every`: message and byte rates in and out, drops
/// since the last line, connections.
async fn log_summaries(
    stats: std::sync::Arc<super::ProxyStats>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let every = every.max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = stats.snapshot();
    let mut at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stats.snapshot();
        let dt = at.elapsed().as_secs_f64().max(1e-3);
        at = tokio::time::Instant::now();
        tracing::info!("{}", summary_line(&last, &now, dt));
        last = now;
    }
}

/// The summary of the change from `a` to `b` over `dt` seconds.
fn summary_line(a: &super::ProxySnapshot, b: &super::ProxySnapshot, dt: f64) -> String {
    let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
    let drops = |s: &super::ProxySnapshot| {
        s.publishers.drops + s.subscribers.drops + s.capture.drops + s.to_bus_dropped
    };
    format!(
        "zmq proxy: in {:.0} msg/s ({:.2} MB/s), out {:.0} msg/s ({:.2} MB/s), drops +{} (total {}), publishers {}, subscribers {}",
        rate(a.publishers.messages, b.publishers.messages),
        rate(a.publishers.bytes, b.publishers.bytes) / 1e6,
        rate(a.subscribers.messages, b.subscribers.messages),
        rate(a.subscribers.bytes, b.subscribers.bytes) / 1e6,
        drops(b).saturating_sub(drops(a)),
        drops(b),
        b.publishers.open,
        b.subscribers.open,
    )
}

fn print_line(s: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    out.flush()
}

/// The data of `pub`: JSON as given, a JSON string with `raw`, null when
/// absent; text that is not JSON is an error that says how to send it.
pub fn pub_data(data: Option<&str>, raw: bool) -> Result<Box<serde_json::value::RawValue>, String> {
    let to_raw =
        |v: serde_json::Value| serde_json::value::to_raw_value(&v).map_err(|e| e.to_string());
    match data {
        None => to_raw(serde_json::Value::Null),
        Some(text) if raw => to_raw(serde_json::Value::String(text.to_owned())),
        Some(text) => serde_json::from_str::<Box<serde_json::value::RawValue>>(text).map_err(|e| {
            format!(
                "DATA is not valid JSON ({e}); quote a string as JSON (e.g. '\"{}\"') or pass --raw to send it as a string",
                text.escape_default()
            )
        }),
    }
}

/// Publishes `count` envelopes: fails (exit 3) when no proxy accepted the
/// connection within `--wait-ms`, warns on stderr when no subscriber was
/// there (the messages were filtered at the source). Prints one line: a
/// summary, or the publisher's counters with `--json`.
pub async fn run_pub(args: PubArgs) -> anyhow::Result<()> {
    let data =
        pub_data(args.data.as_deref(), args.raw).map_err(|msg| CliFailure { code: 2, msg })?;
    let data = Data::Json(data);
    let mut cfg = PublisherConfig::new(&args.addr, &args.name);
    cfg.codec = args.codec;
    let mut p = Publisher::with_config(cfg)?;
    p.start()?;
    let wait = Duration::from_millis(args.wait_ms);
    let started = tokio::time::Instant::now();
    if p.wait_connected(wait).await.is_err() {
        p.stop().await;
        return Err(CliFailure {
            code: 3,
            msg: format!(
                "no ZeroMQ proxy accepted the connection at {} within {} ms; nothing was published (start one with `hermes-bus proxy` or `hermes-bus server --zmq`, or pass --zmq-in ADDR)",
                args.addr, args.wait_ms
            ),
        }
        .into());
    }
    let left = wait.saturating_sub(started.elapsed());
    let no_subscriber = p.wait_for_subscriber(&args.topic, left).await.is_err();
    for i in 0..args.count {
        p.publish_parts(&args.topic, &args.name, &data)?;
        if args.interval_ms > 0 && i + 1 < args.count {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    }
    let _ = p.flush(Duration::from_secs(5)).await;
    p.stop().await;
    let v = serde_json::to_value(p.stats())?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    if no_subscriber || n("filtered") > 0 {
        eprintln!(
            "hermes-bus: warning: no subscriber for {:?} at {}: {} of {} messages were filtered (dropped at the source, as a ZeroMQ PUB does)",
            args.topic,
            args.addr,
            n("filtered"),
            args.count
        );
    }
    if args.json {
        print_line(&v.to_string())?;
    } else {
        print_line(&format!(
            "published {} of {} to {:?} via {} (filtered {}, dropped {}, disconnected {})",
            args.count
                .saturating_sub(n("filtered") + n("dropped") + n("disconnected")),
            args.count,
            args.topic,
            args.addr,
            n("filtered"),
            n("dropped"),
            n("disconnected")
        ))?;
    }
    Ok(())
}

/// Prints one line per envelope: JSON `{"topic","origin","data","ts"}`
/// when piped or with `--json`, `origin → [topic]: data` on a terminal.
/// Says on stderr when no proxy answers at the address; exits 3 when
/// none ever did.
pub async fn run_sub(args: SubArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let mut cfg = ReceiverConfig::new(&args.addr, &args.name);
    cfg.topics = args.prefix.iter().cloned().collect();
    cfg.exchanges = args.exchanges.clone();
    cfg.slow_policy = args.slow;
    cfg.codec = args.codec;
    cfg.registry = std::sync::Arc::new(Registry::empty());
    cfg.seq = args.seq;
    cfg.on_gap = args.seq.then(|| {
        super::receiver::OnGap::new(|g| {
            eprintln!(
                "hermes-bus: gap from {} on [{}]: expected #{}, got #{} ({} missing)",
                g.origin,
                g.topic,
                g.expected,
                g.got,
                g.missing()
            );
        })
    });
    let mut r = Receiver::with_config(cfg)?;
    r.start()?;
    let human = !args.json && std::io::stdout().is_terminal();
    let shutdown = signal_token();
    let deadline = args
        .timeout_s
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut check = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(2),
        Duration::from_secs(1),
    );
    let (mut ever_connected, mut said_absent) = (false, false);
    let mut n = 0u64;
    loop {
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let env = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep => break,
            _ = check.tick() => {
                let now = r.is_connected();
                if !now && !said_absent {
                    said_absent = true;
                    eprintln!(
                        "hermes-bus: no ZeroMQ proxy answers at {}{}; still trying (is `hermes-bus proxy` or `server --zmq` running?)",
                        args.addr,
                        if ever_connected { " any more" } else { "" }
                    );
                } else if now && said_absent {
                    said_absent = false;
                    eprintln!("hermes-bus: connected to {}", args.addr);
                }
                ever_connected |= now;
                continue;
            }
            e = r.recv() => e,
        };
        let Some(env) = env else { break };
        ever_connected = true;
        if human {
            let n = env
                .seq
                .as_ref()
                .map(|s| format!(" #{}", s.n))
                .unwrap_or_default();
            print_line(&format!(
                "{} → [{}]{n}: {}",
                env.origin,
                env.topic,
                serde_json::to_string(&env.data)?
            ))?;
        } else {
            let mut line = serde_json::json!({
                "topic": env.topic,
                "origin": env.origin,
                "data": env.data,
                "ts": env.ts,
            });
            if let Some(seq) = &env.seq {
                line["seq"] = seq.n.into();
                line["seq_origin"] = seq.origin.to_string().into();
            }
            print_line(&line.to_string())?;
        }
        n += 1;
    }
    ever_connected |= r.is_connected();
    r.stop().await;
    if !ever_connected {
        return Err(CliFailure {
            code: 3,
            msg: format!(
                "no ZeroMQ proxy answered at {} (start one with `hermes-bus proxy` or `hermes-bus server --zmq`, or pass --zmq-out ADDR)",
                args.addr
            ),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `hermes-bus proxy`'s flags alone.
    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    #[test]
    fn conflation_is_opt_in_under_both_spellings() {
        use crate::router::SlowPolicy;
        let parse = |args: &[&str]| {
            Cmd::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))
                .map(|c| c.proxy.config().slow_policy)
        };
        assert_eq!(parse(&[]).expect("default"), SlowPolicy::Queue);
        for flag in ["--slow-policy", "--zmq-slow-policy"] {
            assert_eq!(
                parse(&[flag, "conflate"]).expect(flag),
                SlowPolicy::Conflate
            );
            assert!(parse(&[flag, "latest"]).is_err(), "{flag} latest refused");
        }
    }

    #[test]
    fn lossless_is_opt_in_with_a_slow_consumer_timeout() {
        let off = Cmd::try_parse_from(["proxy"])
            .expect("defaults")
            .proxy
            .config();
        assert!(!off.lossless);
        assert_eq!(off.slow_timeout, DEFAULT_SLOW_TIMEOUT);
        assert_eq!(
            off.max_upstream_pending_bytes,
            super::super::proxy::DEFAULT_MAX_UPSTREAM_PENDING_BYTES
        );
        let on = Cmd::try_parse_from(["proxy", "--lossless", "--slow-consumer-timeout", "1.5"])
            .expect("flags")
            .proxy
            .config();
        assert!(on.lossless);
        assert_eq!(on.slow_timeout, Duration::from_millis(1500));
        for bad in ["-1", "nan", "inf", "x"] {
            assert!(
                Cmd::try_parse_from(["proxy", &format!("--slow-consumer-timeout={bad}")]).is_err(),
                "{bad} refused"
            );
        }
        let long = Cmd::try_parse_from([
            "proxy",
            "--zmq-lossless",
            "--zmq-slow-consumer-timeout",
            "2",
        ])
        .expect("the --zmq-* names")
        .proxy
        .config();
        assert!(long.lossless);
        assert_eq!(long.slow_timeout, Duration::from_secs(2));
    }

    #[test]
    fn last_value_and_strict_subscriptions_are_opt_in() {
        let off = Cmd::try_parse_from(["proxy"])
            .expect("defaults")
            .proxy
            .config();
        assert_eq!(off.last_value, None);
        assert!(!off.strict_subscriptions);
        for argv in [
            &[
                "proxy",
                "--last-value",
                "--last-value-topics",
                "5",
                "--last-value-bytes",
                "9000",
                "--last-value-replay",
                "opt-in",
                "--strict-subscriptions",
            ][..],
            &[
                "proxy",
                "--zmq-last-value",
                "--zmq-last-value-topics",
                "5",
                "--zmq-last-value-bytes",
                "9000",
                "--zmq-last-value-replay",
                "opt-in",
                "--zmq-strict-subscriptions",
            ][..],
        ] {
            let on = Cmd::try_parse_from(argv).expect("flags").proxy.config();
            assert_eq!(
                on.last_value,
                Some(LastValueLimits {
                    max_topics: 5,
                    max_bytes: 9000
                }),
                "{argv:?}"
            );
            assert!(on.strict_subscriptions, "{argv:?}");
            assert_eq!(on.last_value_replay, LastValueReplay::OptIn);
        }
        assert!(Cmd::try_parse_from(["proxy", "--last-value-replay", "some"]).is_err());
        let dflt = Cmd::try_parse_from(["proxy", "--last-value"])
            .expect("flag")
            .proxy
            .config();
        assert_eq!(dflt.last_value, Some(LastValueLimits::default()));
        assert_eq!(dflt.last_value_replay, LastValueReplay::All);
    }

    #[test]
    fn server_and_proxy_take_the_same_proxy_flags() {
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            zmq: ZmqProxyArgs,
        }
        let argv = [
            "x",
            "--zmq-in",
            "tcp://127.0.0.1:7000",
            "--zmq-out",
            "tcp://127.0.0.1:7001",
            "--zmq-sub-queue",
            "7",
            "--zmq-max-connections",
            "9",
            "--zmq-max-upstream-pending-bytes",
            "12345",
        ];
        let a = Serve::try_parse_from(argv)
            .expect("server flags")
            .zmq
            .config();
        let b = Cmd::try_parse_from(argv)
            .expect("proxy flags")
            .proxy
            .config();
        for c in [&a, &b] {
            assert_eq!(c.frontend, "tcp://127.0.0.1:7000");
            assert_eq!(c.backend, "tcp://127.0.0.1:7001");
            assert_eq!(c.sub_queue, 7);
            assert_eq!(c.max_connections, 9);
            assert_eq!(c.max_upstream_pending_bytes, 12345);
        }
        let old = Cmd::try_parse_from([
            "x",
            "--frontend",
            "tcp://127.0.0.1:7",
            "--max-connections",
            "3",
        ])
        .expect("the proxy's own names")
        .proxy
        .config();
        assert_eq!(
            (old.frontend.as_str(), old.max_connections),
            ("tcp://127.0.0.1:7", 3)
        );
    }

    #[test]
    fn heartbeats_are_off_by_default_and_set_by_either_spelling() {
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            zmq: ZmqProxyArgs,
        }
        let off = Cmd::try_parse_from(["proxy"])
            .expect("defaults")
            .proxy
            .config();
        assert_eq!(off.heartbeat, HeartbeatConfig::OFF);
        let want = HeartbeatConfig {
            interval: Duration::from_millis(200),
            timeout: Some(Duration::from_secs(1)),
            ttl: Duration::from_secs(3),
        };
        let long = [
            "x",
            "--zmq-heartbeat-ivl",
            "0.2",
            "--zmq-heartbeat-timeout",
            "1",
            "--zmq-heartbeat-ttl",
            "3",
        ];
        let server = Serve::try_parse_from(long)
            .expect("server flags")
            .zmq
            .config();
        let proxy = Cmd::try_parse_from(long)
            .expect("proxy flags")
            .proxy
            .config();
        let short = Cmd::try_parse_from([
            "x",
            "--heartbeat-ivl",
            "0.2",
            "--heartbeat-timeout",
            "1",
            "--heartbeat-ttl",
            "3",
        ])
        .expect("the proxy's own names")
        .proxy
        .config();
        for c in [server, proxy, short] {
            assert_eq!(c.heartbeat, want);
            assert_eq!(c.heartbeat.ttl_deciseconds(), 30);
        }
        let default_timeout = Cmd::try_parse_from(["x", "--heartbeat-ivl", "2"])
            .expect("ivl alone")
            .proxy
            .config();
        assert_eq!(
            default_timeout.heartbeat.effective_timeout(),
            Duration::from_secs(2)
        );
        for bad in [
            ["x", "--heartbeat-ttl", "7000"],
            ["x", "--zmq-heartbeat-ivl", "-1"],
            ["x", "--heartbeat-timeout", "nan"],
        ] {
            assert!(Cmd::try_parse_from(bad).is_err(), "{bad:?} refused");
        }
    }
}
