//! `hermes-busd start|stop|status|restart`: the daemon manager, as the
//! reference's command of the same name.

use clap::{Parser, Subcommand};
use hermes_bus::cli::PathArgs;
use hermes_bus::daemon;

/// Manage the hermes-bus daemon.
#[derive(Parser)]
#[command(name = "hermes-busd", version, about)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the bus in the background (server flags after `--`).
    Start {
        /// Flags for hermes-bus-server, e.g. `-- --hold-grace-ms 2000`.
        #[arg(last = true)]
        server_args: Vec<String>,
    },
    /// Stop the bus (SIGTERM, then SIGKILL after ~4.5 s).
    Stop,
    /// Show whether the bus runs, its endpoints, counters and log tail.
    Status,
    /// Stop, then start.
    Restart {
        /// Flags for hermes-bus-server.
        #[arg(last = true)]
        server_args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let paths = cli.paths.paths();
    let code = match cli.cmd {
        Cmd::Start { server_args } => daemon::cmd_start(&paths, &server_args),
        Cmd::Stop => daemon::cmd_stop(&paths),
        Cmd::Status => daemon::cmd_status(&paths),
        Cmd::Restart { server_args } => daemon::cmd_restart(&paths, &server_args),
    };
    std::process::exit(code);
}
