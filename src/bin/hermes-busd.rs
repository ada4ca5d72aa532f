//! `hermes-busd start|stop|status|restart`: the daemon manager, as the
//! reference's command of the same name. Exit codes: 0 ok, 1 failure,
//! 2 usage, 3 not running.

use clap::Parser;
use hermes_bus::cli::{DaemonCmd, PathArgs};

/// mimalloc: see Cargo.toml (the bus's hot path allocates per message,
/// and frees on another thread).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Manage the hermes-bus daemon.
///
/// Exit codes: 0 ok, 1 failure, 2 usage, 3 not running.
#[derive(Parser)]
#[command(name = "hermes-busd", version)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(subcommand)]
    cmd: DaemonCmd,
}

fn main() {
    let cli = Cli::parse();
    std::process::exit(cli.cmd.run(&cli.paths.paths()));
}
