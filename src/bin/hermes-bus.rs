//! `hermes-bus`: every command in one binary: `server`, `daemon ...`,
//! `send`, `request`, `listen`, `endpoints`, `stats`, `monitor`, `top`,
//! `bench`, the ZeroMQ `proxy`, `pub`, `sub`, and `completions` / `man`.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage, 3 no bus running. Data goes to
//! stdout (a closed pipe ends the command quietly with 0), notices and
//! errors to stderr, each error once, naming the socket or address.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use hermes_bus::cli::{DaemonCmd, PathArgs, ServeArgs};
use hermes_bus::daemon::{self, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK};
use hermes_bus::logging::{self, LogArgs};
use hermes_bus::transports::unix::client::{
    self, BusClient, ClientConfig, ClientError, ClientEvent,
};
use serde_json::Value;

/// mimalloc: see Cargo.toml (the bus's hot path allocates per message,
/// and frees on another thread).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "tools/bench.rs"]
mod bench;
#[path = "tools/monitor.rs"]
mod monitor;
#[path = "tools/top.rs"]
mod top;

/// A fast, hard-to-break message bus (Unix socket + ZeroMQ).
///
/// Exit codes: 0 ok, 1 failure, 2 usage, 3 no bus running.
#[derive(Parser)]
#[command(name = "hermes-bus", version, about)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    /// Never start the daemon when no bus answers (also
    /// HERMES_BUS_AUTOSTART=0).
    #[arg(long, global = true)]
    no_autostart: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `hermes-bus server`: the server's flags and its log format.
#[derive(clap::Args)]
struct ServerCmd {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the bus in the foreground.
    Server(Box<ServerCmd>),
    /// Manage the background daemon (as `hermes-busd`).
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Send one message: `send TO BODY_JSON` ("" as TO broadcasts); prints
    /// its id.
    Send {
        /// Target endpoint ("" broadcasts).
        to: String,
        /// The body, a JSON value.
        body: String,
        /// The sender name shown to the receiver.
        #[arg(long)]
        from: Option<String>,
        /// Print `{"id","to"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send BODY to NAME and print the first message sent back to us;
    /// exit 1 when none comes within the timeout.
    Request {
        /// The endpoint to ask.
        name: String,
        /// The body, a JSON value.
        body: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 5.0, value_parser = parse_secs)]
        timeout: f64,
        /// Our endpoint name, where the reply is addressed (default: a
        /// fresh `request-XXXXXXXX`).
        #[arg(long)]
        from: Option<String>,
        /// Print the whole reply message as JSON (default: its body).
        #[arg(long)]
        json: bool,
    },
    /// Register NAME and print what arrives: one JSON per line when piped
    /// or with --json, a readable line on a terminal.
    Listen {
        /// The endpoint name to register.
        name: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Also subscribe to these topic prefixes.
        #[arg(long)]
        topic: Vec<String>,
        /// One JSON message per line, even on a terminal.
        #[arg(long)]
        json: bool,
    },
    /// List the registered endpoints (name and session id).
    Endpoints {
        /// One JSON object `{name: session_id}`.
        #[arg(long)]
        json: bool,
    },
    /// The bus's counters: endpoints, totals, transports, hooks.
    Stats {
        /// The whole `stats` reply as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show every routed message, one line each (point-to-point,
    /// broadcast, topics, ZeroMQ envelopes in the bus): from → to, kind,
    /// size, optionally the body. A monitor that reads too slowly loses
    /// events (counted and shown); it never slows the bus.
    Monitor(monitor::MonitorArgs),
    /// Live rates per endpoint, topic and transport, queue depths, drops
    /// and hook activity, refreshed each second (--once, --json).
    Top(top::TopArgs),
    /// A quick throughput and latency check against the running bus:
    /// N messages of S bytes between two sessions, then round trips;
    /// fails when anything was lost.
    Bench(bench::BenchArgs),
    /// Run the ZeroMQ proxy in the foreground.
    #[cfg(feature = "zmq")]
    Proxy(hermes_bus::transports::zmq::cli::ProxyArgs),
    /// Publish through a ZeroMQ proxy; fails when no proxy accepts the
    /// connection, warns when nobody subscribed.
    #[cfg(feature = "zmq")]
    Pub(hermes_bus::transports::zmq::cli::PubArgs),
    /// Subscribe through a ZeroMQ proxy; one JSON envelope per line when
    /// piped or with --json.
    #[cfg(feature = "zmq")]
    Sub(hermes_bus::transports::zmq::cli::SubArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `hermes-bus completions bash >
    /// ~/.local/share/bash-completion/completions/hermes-bus`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `hermes-bus man | man -l -`.
    Man,
}

/// A failure with its exit code; the message is printed once.
struct Fail {
    /// The exit code.
    code: i32,
    /// What went wrong and the likely fix.
    msg: String,
}

impl Fail {
    fn new(code: i32, msg: impl Into<String>) -> Fail {
        Fail {
            code,
            msg: msg.into(),
        }
    }
}

/// Any error: typed client errors get their exit code and a message that
/// names the socket; the rest print their chain with each cause once.
fn fail(e: anyhow::Error, socket: &Path) -> Fail {
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return Fail::new(EXIT_OK, "");
    }
    if let Some(ce) = e.downcast_ref::<ClientError>() {
        match ce {
            ClientError::NotRunning { .. } => return Fail::new(EXIT_NOT_RUNNING, ce.to_string()),
            ClientError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Fail::new(
                    EXIT_NOT_RUNNING,
                    format!(
                        "no bus is running on {} ({io}); start it with `hermes-busd start`",
                        socket.display()
                    ),
                );
            }
            ClientError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                return Fail::new(
                    EXIT_FAILURE,
                    format!(
                        "cannot connect to the bus on {} ({io}); is it another user's bus?",
                        socket.display()
                    ),
                );
            }
            ClientError::Timeout => {
                return Fail::new(
                    EXIT_FAILURE,
                    format!(
                        "the bus on {} did not answer in time (hung? see `hermes-busd status`)",
                        socket.display()
                    ),
                );
            }
            _ => {}
        }
    }
    Fail::new(EXIT_FAILURE, chain_once(&e))
}

/// `a: b: c` for an error chain, leaving out a cause whose text the
/// message already contains (a `#[from]` error shown twice).
fn chain_once(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for c in e.chain() {
        let s = c.to_string();
        if msg.contains(&s) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s);
    }
    msg
}

fn main() {
    let cli = Cli::parse();
    let paths = cli.paths.paths();
    let code = match cli.cmd {
        Cmd::Daemon(d) => d.run(&paths),
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hermes-bus", &mut out);
            write_stdout(&out)
        }
        Cmd::Man => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => write_stdout(&out),
                Err(e) => {
                    eprintln!("hermes-bus: cannot render the man page: {e}");
                    EXIT_FAILURE
                }
            }
        }
        cmd => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("hermes-bus: cannot start the async runtime: {e}");
                    std::process::exit(EXIT_FAILURE);
                }
            };
            let socket = paths.socket.clone();
            let r = rt.block_on(run(paths, cli.no_autostart, cmd));
            // Do not wait for tasks that still block (a reconnecting
            // client): the command is done.
            rt.shutdown_timeout(Duration::from_millis(200));
            match r {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    let f = match e.downcast::<FailError>() {
                        Ok(FailError(f)) => f,
                        Err(e) => fail(e, &socket),
                    };
                    if !f.msg.is_empty() {
                        eprintln!("hermes-bus: {}", f.msg);
                    }
                    f.code
                }
            }
        }
    };
    std::process::exit(code);
}

/// A [`Fail`] carried through `anyhow`.
#[derive(Debug)]
struct FailError(Fail);

impl std::fmt::Debug for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::fmt::Display for FailError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.msg)
    }
}

impl std::error::Error for FailError {}

fn bail(code: i32, msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(FailError(Fail::new(code, msg)))
}

fn write_stdout(b: &[u8]) -> i32 {
    let mut o = std::io::stdout().lock();
    match o.write_all(b).and_then(|_| o.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("hermes-bus: cannot write to stdout: {e}");
            EXIT_FAILURE
        }
    }
}

/// One line to stdout; a closed pipe ends the process quietly (exit 0).
fn line(s: &str) {
    daemon::out(format_args!("{s}"));
}

/// A number of seconds: finite and not negative.
fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(v)
        .map(|_| v)
        .map_err(|_| format!("{s:?} is not a usable number of seconds"))
}

fn announce_autostart(socket: &Path) {
    eprintln!(
        "hermes-bus: no bus answers on {}; starting one (hermes-busd start; --no-autostart or HERMES_BUS_AUTOSTART=0 turn this off)",
        socket.display()
    );
}

fn client_config(paths: &hermes_bus::config::Paths, no_autostart: bool) -> ClientConfig {
    let mut cfg = ClientConfig::new(&paths.socket);
    if no_autostart {
        cfg.autostart = false;
    }
    cfg.on_autostart = Some(announce_autostart);
    cfg
}

fn parse_body(body: &str) -> anyhow::Result<Value> {
    serde_json::from_str(body).map_err(|e| {
        bail(
            daemon::EXIT_USAGE,
            format!("BODY is not valid JSON ({e}); e.g. '{{\"text\": \"hi\"}}' or '\"a string\"'"),
        )
    })
}

/// A message for a person: `from → to: body` (topic messages show it).
fn human_message(m: &Value) -> String {
    let from = m["from"].as_str().or(m["origin"].as_str()).unwrap_or("?");
    let what = match (m["type"].as_str(), m["topic"].as_str()) {
        (_, Some(t)) => format!("[{t}]"),
        (Some("message"), _) => m["to"]
            .as_str()
            .map(|t| {
                if t.is_empty() {
                    "*".to_owned()
                } else {
                    t.to_owned()
                }
            })
            .unwrap_or_default(),
        (Some(t), _) => format!("({t})"),
        _ => String::new(),
    };
    let body = if !m["body"].is_null() {
        &m["body"]
    } else if !m["data"].is_null() {
        &m["data"]
    } else {
        m
    };
    format!("{from} → {what}: {body}")
}

async fn run(paths: hermes_bus::config::Paths, no_autostart: bool, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Server(args) => {
            let ServerCmd { serve, log } = *args;
            logging::init(serve.log_file.as_deref(), log.format);
            let r = hermes_bus::serve::run(paths, serve, Default::default()).await;
            if let Err(e) = &r {
                tracing::error!("{}", chain_once(e));
            }
            r
        }
        Cmd::Daemon(_) | Cmd::Completions { .. } | Cmd::Man => {
            unreachable!("handled before the runtime starts")
        }
        Cmd::Send {
            to,
            body,
            from,
            json,
        } => {
            let body = parse_body(&body)?;
            let cfg = client_config(&paths, no_autostart);
            let id = client::send_message_with(&cfg, &to, body, from.as_deref()).await?;
            if json {
                line(&serde_json::json!({"id": id, "to": to}).to_string());
            } else if to.is_empty() {
                line(&format!("broadcast {id}"));
            } else {
                line(&format!("sent {id} to {to}"));
            }
            Ok(())
        }
        Cmd::Request {
            name,
            body,
            timeout,
            from,
            json,
        } => {
            let body = parse_body(&body)?;
            let me = from.unwrap_or_else(|| {
                format!(
                    "request-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                )
            });
            let mut c = BusClient::connect_with(&me, client_config(&paths, no_autostart)).await?;
            c.send(&name, body).await?;
            let wait = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::MAX);
            let reply = tokio::time::timeout(wait, async {
                match c.recv().await {
                    Some(m) if m["type"] == "error" => Err(bail(
                        EXIT_FAILURE,
                        format!(
                            "the bus refused the request to {name}: {} {}",
                            m["code"].as_str().unwrap_or("error"),
                            m["detail"].as_str().unwrap_or("")
                        )
                        .trim_end()
                        .to_owned(),
                    )),
                    Some(m) => Ok(m),
                    None => Err(bail(EXIT_FAILURE, "the connection to the bus closed")),
                }
            })
            .await;
            c.close().await;
            match reply {
                Ok(Ok(m)) => {
                    if json {
                        line(&m.to_string());
                    } else {
                        line(&m["body"].to_string());
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(bail(
                    EXIT_FAILURE,
                    format!(
                        "no reply from {name} within {timeout} s (a reply is a message sent to {me}, the request's `from`)"
                    ),
                )),
            }
        }
        Cmd::Listen {
            name,
            count,
            topic,
            json,
        } => {
            logging::init(None, logging::LogFormat::Text);
            listen(&paths, no_autostart, &name, count, &topic, json).await
        }
        Cmd::Endpoints { json } => {
            let eps = client::list_endpoints(&paths.socket).await?;
            if json {
                line(&Value::Object(eps).to_string());
            } else if eps.is_empty() {
                eprintln!(
                    "hermes-bus: no endpoints registered on {}",
                    paths.socket.display()
                );
            } else {
                let mut rows = vec![vec!["NAME".to_owned(), "SESSION".to_owned()]];
                for (name, sid) in eps {
                    rows.push(vec![name, sid.as_str().unwrap_or("").to_owned()]);
                }
                daemon::print_table("", &rows);
            }
            Ok(())
        }
        Cmd::Stats { json } => {
            let s = client::stats(&paths.socket).await?;
            if json {
                line(&s.to_string());
            } else {
                line(&format!(
                    "bus on {} (pid {})",
                    paths.socket.display(),
                    s["pid"]
                ));
                daemon::print_stats_tables(&s);
            }
            Ok(())
        }
        Cmd::Monitor(a) => monitor::run(&paths.socket, a).await,
        Cmd::Top(a) => top::run(&paths.socket, a).await,
        Cmd::Bench(a) => bench::run(&paths.socket, a).await,
        #[cfg(feature = "zmq")]
        Cmd::Proxy(a) => {
            logging::init(None, logging::LogFormat::Text);
            hermes_bus::transports::zmq::cli::run_proxy(a).await
        }
        #[cfg(feature = "zmq")]
        Cmd::Pub(a) => hermes_bus::transports::zmq::cli::run_pub(a)
            .await
            .map_err(|e| bail(zmq_code(&e), chain_once(&e))),
        #[cfg(feature = "zmq")]
        Cmd::Sub(a) => hermes_bus::transports::zmq::cli::run_sub(a)
            .await
            .map_err(|e| bail(zmq_code(&e), chain_once(&e))),
    }
}

#[cfg(feature = "zmq")]
fn zmq_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<hermes_bus::transports::zmq::cli::CliFailure>() {
        Some(f) => f.code,
        None if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) =>
        {
            EXIT_OK
        }
        None => EXIT_FAILURE,
    }
}

/// Subscribes the client to each topic prefix.
async fn subscribe(c: &BusClient, topics: &[String]) -> Result<(), ClientError> {
    for t in topics {
        c.send_raw(&serde_json::json!({"type": "subscribe", "topic": t}))
            .await?;
    }
    Ok(())
}

/// `listen`: prints messages; tells (on stderr) when the connection to
/// the bus is lost and comes back; exits 1 when another session takes
/// the name over (`replaced`).
async fn listen(
    paths: &hermes_bus::config::Paths,
    no_autostart: bool,
    name: &str,
    count: Option<u64>,
    topics: &[String],
    json: bool,
) -> anyhow::Result<()> {
    let mut c = BusClient::connect_with(name, client_config(paths, no_autostart)).await?;
    let mut events = c.events();
    subscribe(&c, topics).await?;
    eprintln!(
        "hermes-bus: listening as {name} on {}{}",
        paths.socket.display(),
        if topics.is_empty() {
            String::new()
        } else {
            format!(" (topics {})", topics.join(", "))
        }
    );
    let human = !json && std::io::stdout().is_terminal();
    let mut shutdown = Box::pin(hermes_bus::signals::shutdown_signal());
    let mut seen = 0u64;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = events.recv() => match ev {
                Ok(ClientEvent::Disconnected { reason }) => eprintln!(
                    "hermes-bus: lost the bus on {} ({reason}); reconnecting",
                    paths.socket.display()
                ),
                Ok(ClientEvent::Connected { session_id }) => {
                    eprintln!("hermes-bus: reconnected as {name} (session {session_id})");
                    subscribe(&c, topics).await?;
                }
                _ => {}
            },
            m = c.recv() => {
                let Some(m) = m else { break };
                if m["type"] == "error" {
                    let code = m["code"].as_str().unwrap_or("error");
                    if code == "replaced" {
                        c.close().await;
                        return Err(bail(
                            EXIT_FAILURE,
                            format!("another session registered {name} on {} and took it over (replaced); exiting", paths.socket.display()),
                        ));
                    }
                    eprintln!(
                        "hermes-bus: the bus says {code}: {}",
                        m["detail"].as_str().unwrap_or("")
                    );
                    continue;
                }
                if human {
                    line(&human_message(&m));
                } else {
                    line(&m.to_string());
                }
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
        }
    }
    c.close().await;
    Ok(())
}
