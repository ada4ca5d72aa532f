//! The one trait every hook implements, command or in-process.

use std::time::Duration;

use super::error::HookError;
use super::event::HookEvent;
use super::filter::HookFilter;

/// A hook: something run for each routed event its filter matches.
///
/// The engine calls hooks off the routing path, at most
/// `HookConfig::max_concurrent` at a time across all hooks, and drops the
/// `call` future when the hook's time limit passes or when the engine shuts
/// down. An implementation must therefore clean up on drop (a command hook
/// kills its process group).
#[async_trait::async_trait]
pub trait Hook: Send + Sync + 'static {
    /// A name for logs and stats (a command hook uses its path).
    fn name(&self) -> &str;

    /// Which events this hook wants; checked on the routing path.
    fn filter(&self) -> &HookFilter;

    /// This hook's own time limit; `None` uses the engine's default.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Runs the hook for one event.
    async fn call(&self, event: &HookEvent) -> Result<(), HookError>;
}
