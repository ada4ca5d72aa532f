//! Command-line options shared by the binaries (`hermes-bus`,
//! `hermes-busd`, `hermes-bus-server`), with clap.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::config::Paths;
use crate::router::{RouterConfig, SlowConsumerPolicy, SlowPolicy};
use crate::transports::unix::UnixConfig;

/// Where the bus lives.
#[derive(Debug, Clone, Args, Default)]
pub struct PathArgs {
    /// Bus root directory (default: $HERMES_BUS_ROOT, else ~/.hermes).
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Socket path (default: ROOT/hermes-bus.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
}

impl PathArgs {
    /// The resolved paths.
    pub fn paths(&self) -> Paths {
        Paths::resolve(self.root.as_deref(), self.socket.as_deref())
    }
}

/// How the server behaves: limits, timings, policies, hooks.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Evict a session silent for longer than this many seconds.
    #[arg(long, default_value_t = 90.0)]
    pub heartbeat_timeout: f64,
    /// Check for silent sessions every this many seconds.
    #[arg(long, default_value_t = 15.0)]
    pub heartbeat_check: f64,
    /// Hold messages for a name that went away for this many milliseconds
    /// (0 disables holding).
    #[arg(long, default_value_t = 5000)]
    pub hold_grace_ms: u64,
    /// Hold at most this many messages per name (a sender to a full
    /// mailbox waits for the name to come back or its grace to end).
    #[arg(long, default_value_t = 4096)]
    pub hold_limit: usize,
    /// Hold at most this many bytes per name (K, M, G suffixes: KiB...).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub hold_bytes: usize,
    /// Deliveries queued per session before its senders wait.
    #[arg(long, default_value_t = 16384)]
    pub outbox_capacity: usize,
    /// Bytes queued per session before its senders wait (K, M, G suffixes).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub outbox_bytes: usize,
    /// Bytes all outboxes and held mailboxes together may hold (K, M, G
    /// suffixes); past it, senders wait.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory_budget: usize,
    /// Seconds a receiver may make no progress (write nothing to its
    /// socket) while senders wait for it, before the slow-consumer policy
    /// applies to it and they go on.
    #[arg(long, default_value_t = 10.0)]
    pub slow_consumer_timeout: f64,
    /// The slow-consumer policy: drop (what is queued for it and what
    /// comes while it stays stuck; counted) or disconnect (with a reason).
    #[arg(long, default_value = "drop")]
    pub slow_consumer: SlowConsumerPolicy,
    /// What a lagging topic subscriber's outbox does: queue (every value,
    /// in order; senders wait) or conflate (at most one queued value per
    /// topic, the newest in the place of the old; counted as `conflated`).
    /// The ZeroMQ side has its own: --zmq-slow-policy.
    #[arg(long, default_value = "queue")]
    pub slow_policy: SlowPolicy,
    /// Most topic subscriptions one session may hold.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_subscriptions: usize,
    /// Most bytes of topic subscriptions one session may hold (K, M, G).
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    pub max_subscription_bytes: usize,
    /// Longest topic prefix, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub max_topic_len: usize,
    /// Bytes of the bus's per-topic sequence counters (K, M, G): past it
    /// the least recently used are forgotten (counted in status) and
    /// their topics start again at 1.
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub max_seq_bytes: usize,
    /// Keep the newest value of each topic, so a session that subscribes
    /// with `"snapshot": true` gets them first (with --zmq, the proxy's
    /// cache too: its subscribers get them when they subscribe).
    #[arg(long)]
    pub last_value: bool,
    /// With --last-value: most topics kept (the least recently updated go
    /// first, counted).
    #[arg(long, value_name = "N", default_value_t = crate::last_value::DEFAULT_MAX_TOPICS)]
    pub last_value_topics: usize,
    /// With --last-value: most bytes kept (K, M, G suffixes).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub last_value_bytes: usize,
    /// Most connections open at once.
    #[arg(long, default_value_t = 16384)]
    pub max_connections: usize,
    /// Largest frame in bytes.
    #[arg(long, default_value_t = crate::transports::unix::frame::MAX_FRAME)]
    pub max_frame: usize,
    /// Accept connections from other users' processes.
    #[arg(long)]
    pub allow_other_users: bool,
    /// Milliseconds of silence towards a registered session after which it
    /// is sent a keepalive `pong` (0: never). Reference clients drop every
    /// pong; the 0.7.0 client would otherwise take a silent second for a
    /// lost connection and reconnect (sends made meanwhile return False).
    #[arg(long, default_value_t = 500)]
    pub keepalive_ms: u64,
    /// Seconds a frame may take to arrive whole once it started.
    #[arg(long, default_value_t = 30.0)]
    pub frame_timeout: f64,
    /// Bytes buffered for incomplete large frames, all connections
    /// together (K, M, G); a connection that would pass it is closed.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub max_partial_bytes: usize,
    /// Deepest nesting of a message accepted (the top-level object is 1);
    /// deeper ones are answered `too_deep` and never forwarded. The default
    /// is serde_json's recursion limit, which Rust clients parse with.
    #[arg(long, default_value_t = crate::message::MAX_DEPTH)]
    pub max_depth: usize,
    /// Seconds to let sessions drain at shutdown.
    #[arg(long, default_value_t = 2.0)]
    pub drain_timeout: f64,
    /// Hook processes running at once.
    #[arg(long, default_value_t = 16)]
    pub hook_concurrency: usize,
    /// Hook events waiting at most (more are dropped and counted).
    #[arg(long, default_value_t = 1024)]
    pub hook_queue: usize,
    /// Milliseconds a hook may run before it is killed.
    #[arg(long, default_value_t = 10_000)]
    pub hook_timeout_ms: u64,
    /// Write the log to this file (trimmed to its last half past 500 KB).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Serve metrics in the Prometheus text format at
    /// http://ADDR/metrics (e.g. 127.0.0.1:9100), from the same data as
    /// `stats`.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Remove this pid file at exit if it holds our pid (daemon mode).
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Also run the ZeroMQ proxy in this process, sharing the router.
    #[cfg(feature = "zmq")]
    #[arg(long)]
    pub zmq: bool,
    /// The ZeroMQ proxy's settings (the same flags as `hermes-bus proxy`).
    #[cfg(feature = "zmq")]
    #[command(flatten, next_help_heading = "ZeroMQ proxy (with --zmq)")]
    pub zmq_proxy: crate::transports::zmq::cli::ZmqProxyArgs,
}

/// A size in bytes: a number with an optional K, M or G suffix (powers of
/// 1024; "KiB", "MB" and the like are read the same way).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 65536, 64K, 32M, 1G)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit '{other}' in '{s}' (K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

impl ServeArgs {
    /// The router's limits.
    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            heartbeat_timeout: secs(self.heartbeat_timeout),
            hold_grace: Duration::from_millis(self.hold_grace_ms),
            hold_limit: self.hold_limit,
            hold_bytes: self.hold_bytes,
            outbox_capacity: self.outbox_capacity,
            outbox_bytes: self.outbox_bytes,
            memory_budget: self.memory_budget,
            slow_consumer_timeout: secs(self.slow_consumer_timeout),
            slow_consumer: self.slow_consumer,
            topic_policy: self.slow_policy,
            topics: crate::topics::TopicLimits {
                max_per_session: self.max_subscriptions,
                max_bytes_per_session: self.max_subscription_bytes,
                max_prefix: self.max_topic_len,
            },
            seq_bytes: self.max_seq_bytes,
            last_value: self
                .last_value
                .then_some(crate::last_value::LastValueLimits {
                    max_topics: self.last_value_topics,
                    max_bytes: self.last_value_bytes,
                }),
        }
    }

    /// The Unix transport's settings for a socket path.
    pub fn unix_config(&self, socket: PathBuf) -> UnixConfig {
        UnixConfig {
            socket,
            max_connections: self.max_connections,
            max_frame: self.max_frame,
            allow_other_users: self.allow_other_users,
            drain_timeout: secs(self.drain_timeout),
            keepalive: Duration::from_millis(self.keepalive_ms),
            frame_timeout: secs(self.frame_timeout),
            max_partial_bytes: self.max_partial_bytes,
            max_depth: self.max_depth,
        }
    }

    /// The heartbeat check interval.
    pub fn sweep_interval(&self) -> Duration {
        secs(self.heartbeat_check).max(Duration::from_millis(10))
    }
}

/// The daemon manager's commands (`hermes-busd X`, `hermes-bus daemon X`).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DaemonCmd {
    /// Start the bus in the background (server flags after `--`). Safe to
    /// run concurrently: exactly one bus starts, the others report it.
    Start {
        /// A client's autostart: refrain for a while after an explicit
        /// `stop` (a start with stdin, stdout and stderr on /dev/null, as
        /// the reference Python client runs it, counts as one too).
        #[arg(long, hide = true)]
        auto: bool,
        /// Flags for hermes-bus-server, e.g. `-- --hold-grace-ms 2000`.
        #[arg(last = true)]
        server_args: Vec<String>,
    },
    /// Stop the bus that owns the socket, whoever started it (SIGTERM,
    /// then SIGKILL after ~4.5 s); clients do not autostart it again for 5
    /// minutes (`start` lifts that).
    Stop,
    /// Show whether the bus runs: endpoints, totals, transports, hooks,
    /// log tail; or why not. Exit 0 running, 3 not running.
    Status {
        /// One JSON object instead of the tables.
        #[arg(long)]
        json: bool,
    },
    /// Check the new server flags, then stop and start (a bad flag leaves
    /// the running bus alone).
    Restart {
        /// Flags for hermes-bus-server.
        #[arg(last = true)]
        server_args: Vec<String>,
    },
}

impl DaemonCmd {
    /// Runs the command; returns the process exit code.
    pub fn run(&self, paths: &Paths) -> i32 {
        use crate::daemon;
        match self {
            DaemonCmd::Start { auto, server_args } => {
                daemon::cmd_start(paths, server_args, daemon::StartMode::detect(*auto))
            }
            DaemonCmd::Stop => daemon::cmd_stop(paths),
            DaemonCmd::Status { json } => daemon::cmd_status(paths, *json),
            DaemonCmd::Restart { server_args } => daemon::cmd_restart(paths, server_args),
        }
    }
}
