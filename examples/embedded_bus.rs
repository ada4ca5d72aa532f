//! A bus embedded in a program, with an in-process hook that sees every
//! routed message: the shape of a gateway that wants the bus inside it.
//!
//! ```sh
//! cargo run --example embedded_bus -- /tmp/embedded.sock
//! hermes-bus --socket /tmp/embedded.sock listen b &
//! hermes-bus --socket /tmp/embedded.sock send b '{"n": 1}'
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use hermes_bus::hooks::{Hook, HookConfig, HookEngine, HookError, HookEvent, HookFilter};
use hermes_bus::transports::unix::{UnixConfig, UnixServer};
use hermes_bus::{Bus, RouterConfig, Transport};
use tokio_util::sync::CancellationToken;

/// Counts routed messages and logs their targets.
struct Audit {
    /// Which events it wants: routed messages, like the reference hooks.
    filter: HookFilter,
    /// How many it has seen.
    seen: AtomicU64,
}

#[async_trait]
impl Hook for Audit {
    fn name(&self) -> &str {
        "audit"
    }
    fn filter(&self) -> &HookFilter {
        &self.filter
    }
    async fn call(&self, event: &HookEvent) -> Result<(), HookError> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!(
            "audit #{n}: to={:?} {}",
            event.to,
            String::from_utf8_lossy(&event.json)
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/embedded-hermes.sock".to_owned());
    let audit = Arc::new(Audit {
        filter: HookFilter::messages(),
        seen: AtomicU64::new(0),
    });
    let hooks = HookEngine::start(HookConfig::default(), vec![audit]);
    let bus = Bus::new(RouterConfig::default(), hooks);
    let server = UnixServer::bind(UnixConfig::new(&socket))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    eprintln!("embedded bus on {socket} (Ctrl-C stops)");
    Box::new(server).serve(bus, shutdown).await
}
