//! `hermes-bus-server`: the bus in the foreground (for debugging, and what
//! `hermes-busd start` runs detached).

use clap::Parser;
use hermes_bus::cli::{PathArgs, ServeArgs};

/// Run the hermes-bus server in the foreground.
#[derive(Parser)]
#[command(name = "hermes-bus-server", version)]
struct Cli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    hermes_bus::logging::init_logging(cli.serve.log_file.as_deref());
    let paths = cli.paths.paths();
    let r = hermes_bus::serve::run(paths, cli.serve, Default::default()).await;
    if let Err(e) = &r {
        tracing::error!("{e:#}");
    }
    r
}
