//! `hermes-bus`: every command in one binary: `server`, `daemon ...`,
//! `send`, `listen`, `endpoints`, and the ZeroMQ `proxy`, `pub`, `sub`.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hermes_bus::cli::{DaemonCmd, PathArgs, ServeArgs};
use hermes_bus::logging;
use hermes_bus::transports::unix::client::{self, BusClient, ClientConfig};

/// A fast, hard-to-break message bus (Unix socket + ZeroMQ).
#[derive(Parser)]
#[command(name = "hermes-bus", version, about)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the bus in the foreground.
    Server(Box<ServeArgs>),
    /// Manage the background daemon (as `hermes-busd`).
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Send one message: `send TO BODY_JSON` ("" as TO broadcasts).
    Send {
        /// Target endpoint ("" broadcasts).
        to: String,
        /// The body, a JSON object.
        body: String,
        /// The sender name shown to the receiver.
        #[arg(long)]
        from: Option<String>,
    },
    /// Register NAME and print what arrives, one JSON per line.
    Listen {
        /// The endpoint name to register.
        name: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Also subscribe to these topic prefixes.
        #[arg(long)]
        topic: Vec<String>,
    },
    /// List the registered endpoints (name and session id).
    Endpoints,
    /// Print the bus counters as JSON.
    Stats,
    /// Run the ZeroMQ proxy in the foreground.
    #[cfg(feature = "zmq")]
    Proxy(hermes_bus::transports::zmq::cli::ProxyArgs),
    /// Publish one envelope through a ZeroMQ proxy.
    #[cfg(feature = "zmq")]
    Pub(hermes_bus::transports::zmq::cli::PubArgs),
    /// Subscribe through a ZeroMQ proxy; one JSON envelope per line.
    #[cfg(feature = "zmq")]
    Sub(hermes_bus::transports::zmq::cli::SubArgs),
}

fn main() {
    let cli = Cli::parse();
    let paths = cli.paths.paths();
    let code = match cli.cmd {
        Cmd::Daemon(d) => d.run(&paths),
        cmd => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("hermes-bus: cannot start runtime: {e}");
                    std::process::exit(1);
                }
            };
            match rt.block_on(run(paths, cmd)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("hermes-bus: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}

async fn run(paths: hermes_bus::config::Paths, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Server(args) => {
            logging::init_logging(args.log_file.as_deref());
            hermes_bus::serve::run(paths, *args, Default::default()).await
        }
        Cmd::Daemon(_) => anyhow::bail!("daemon commands run outside the runtime"),
        Cmd::Send { to, body, from } => {
            let body: serde_json::Value =
                serde_json::from_str(&body).context("BODY_JSON is not valid JSON")?;
            client::send_message(&paths.socket, &to, body, from.as_deref()).await?;
            Ok(())
        }
        Cmd::Listen { name, count, topic } => {
            logging::init_logging(None);
            let mut c = BusClient::connect_with(&name, ClientConfig::new(&paths.socket)).await?;
            for t in topic {
                c.send_raw(&serde_json::json!({"type": "subscribe", "topic": t}))
                    .await?;
            }
            let mut seen = 0u64;
            let stdout = std::io::stdout();
            while let Some(m) = c.recv().await {
                let mut out = stdout.lock();
                writeln!(out, "{m}")?;
                out.flush()?;
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
            Ok(())
        }
        Cmd::Endpoints => {
            let eps = client::list_endpoints(&paths.socket).await?;
            for (name, sid) in eps {
                println!("{name}\t{}", sid.as_str().unwrap_or(""));
            }
            Ok(())
        }
        Cmd::Stats => {
            let s = client::stats(&paths.socket).await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        #[cfg(feature = "zmq")]
        Cmd::Proxy(a) => {
            logging::init_logging(None);
            hermes_bus::transports::zmq::cli::run_proxy(a).await
        }
        #[cfg(feature = "zmq")]
        Cmd::Pub(a) => hermes_bus::transports::zmq::cli::run_pub(a).await,
        #[cfg(feature = "zmq")]
        Cmd::Sub(a) => hermes_bus::transports::zmq::cli::run_sub(a).await,
    }
}
