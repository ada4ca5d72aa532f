//! Running the bus: build a `Bus`, start the configured transports, wait
//! for SIGTERM or SIGINT, shut down in order (stop accepting, drain
//! outboxes for a bounded time, stop hooks, remove socket and pid files).

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::config::Paths;
use crate::hooks::{HookConfig, HookEngine};
use crate::transport::{Bus, Transport};
use crate::transports::unix::UnixServer;

/// Builds the hook engine from the environment and the flags.
pub fn hook_engine(paths: &Paths, args: &ServeArgs) -> HookEngine {
    let mut cfg = match HookConfig::resolve(&paths.hermes_home) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("hook configuration ignored: {e}");
            HookConfig::default()
        }
    };
    cfg.max_concurrent = args.hook_concurrency.max(1);
    cfg.queue_capacity = args.hook_queue.max(1);
    cfg.timeout = Duration::from_millis(args.hook_timeout_ms.max(1));
    HookEngine::start(cfg, Vec::new())
}

/// Serves in the foreground until SIGTERM / SIGINT (or `stop` fires).
pub async fn run(paths: Paths, args: ServeArgs, stop: CancellationToken) -> anyhow::Result<()> {
    // The metrics address first: a taken port fails before the socket
    // is made.
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let unix = UnixServer::bind(args.unix_config(paths.socket.clone()))?;
    let hooks = hook_engine(&paths, &args);
    let bus = Bus::new(args.router_config(), hooks.clone());
    let shutdown = stop.child_token();
    spawn_signal_handler(shutdown.clone())?;
    let sweeper = bus.spawn_sweeper(args.sweep_interval(), shutdown.clone());
    if let Some(listener) = metrics {
        let b = bus.clone();
        let source: crate::metrics::Source =
            std::sync::Arc::new(move || crate::metrics::render(&b.status()));
        if let Ok(at) = listener.local_addr() {
            tracing::info!("metrics on http://{at}/metrics");
        }
        tokio::spawn(crate::metrics::serve(listener, source, shutdown.clone()));
    }

    #[allow(unused_mut)] // the zmq feature adds to it
    let mut transports: Vec<Box<dyn Transport>> = vec![Box::new(unix)];
    #[cfg(feature = "zmq")]
    if args.zmq {
        // `--last-value` turns on the proxy's cache too.
        let mut zmq = args.zmq_proxy.clone();
        zmq.last_value |= args.last_value;
        transports.push(zmq.transport()?);
    }
    let mut running = tokio::task::JoinSet::new();
    for t in transports {
        let name = t.name();
        let (bus, shutdown) = (bus.clone(), shutdown.clone());
        running.spawn(async move { (name, t.serve(bus, shutdown).await) });
    }
    tracing::info!(pid = std::process::id(), socket = %paths.socket.display(), "bus running");

    // A transport that ends (or fails) ends the bus: the others are told
    // to stop and drain.
    let mut result = Ok(());
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok((name, Ok(()))) => tracing::info!(transport = name, "transport stopped"),
            Ok((name, Err(e))) => {
                tracing::error!(transport = name, "transport failed: {e:#}");
                if result.is_ok() {
                    result = Err(e.context(format!("{name} transport failed")));
                }
            }
            Err(e) => tracing::error!("transport task panicked: {e}"),
        }
        shutdown.cancel();
    }
    let _ = sweeper.await;
    hooks.shutdown(Duration::from_secs(2)).await;
    if let Some(pid_file) = &args.pid_file {
        remove_pid_file_if_ours(pid_file);
    }
    tracing::info!("bus stopped");
    result
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::signals::shutdown_signal() => {
                tracing::info!("SIGINT or SIGTERM: shutting down");
                shutdown.cancel();
            }
            _ = shutdown.cancelled() => {}
        }
    });
    Ok(())
}

/// Removes the pid file when it holds this process's pid.
pub fn remove_pid_file_if_ours(path: &Path) {
    if let Ok(text) = std::fs::read_to_string(path) {
        if text.trim() == std::process::id().to_string() {
            let _ = std::fs::remove_file(path);
        }
    }
}
