//! `hermes-bus-server`: the bus in the foreground (for debugging, and what
//! `hermes-busd start` runs detached). `--check-args` only checks the
//! flags (what `hermes-busd restart` runs before stopping the old bus).

use clap::Parser;
use hermes_bus::cli::{PathArgs, ServeArgs};
use hermes_bus::logging::LogArgs;

/// mimalloc: see Cargo.toml (the bus's hot path allocates per message,
/// and frees on another thread).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run the hermes-bus server in the foreground.
#[derive(Parser)]
#[command(name = "hermes-bus-server", version)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Check the flags and exit (0 when valid, 2 with the error when not).
    #[arg(long)]
    check_args: bool,
}

fn main() {
    let cli = Cli::parse();
    if cli.check_args {
        #[cfg(feature = "zmq")]
        if cli.serve.zmq {
            if let Err(e) = cli.serve.zmq_proxy.transport() {
                eprintln!("error: --zmq: {e}");
                std::process::exit(hermes_bus::daemon::EXIT_USAGE);
            }
        }
        std::process::exit(0);
    }
    hermes_bus::logging::init(cli.serve.log_file.as_deref(), cli.log.format);
    let paths = cli.paths.paths();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            eprintln!("hermes-bus-server: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let r = rt.block_on(hermes_bus::serve::run(paths, cli.serve, Default::default()));
    if let Err(e) = r {
        // An expected failure (e.g. "already listening"): one line with
        // its causes, no backtrace.
        let mut msg = String::new();
        for c in e.chain() {
            let s = c.to_string();
            if !msg.contains(&s) {
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&s);
            }
        }
        // The log (stderr, or the daemon's log file) says it once.
        tracing::error!("{msg}");
        std::process::exit(1);
    }
}
