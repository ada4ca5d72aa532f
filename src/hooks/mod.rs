//! Hooks: run something for each routed message, off the routing path.
//!
//! After the router delivered a message it [`offer`](HookEngine::offer)s a
//! [`HookEvent`] to the [`HookEngine`]. `offer` never blocks: it checks the
//! hooks' [`HookFilter`]s (no allocation when none matches), then puts the
//! event on a bounded queue, or drops and counts it when the queue is full.
//! A runner task takes events off the queue and calls every matching
//! [`Hook`], at most `max_concurrent` at a time, each within its time limit.
//!
//! Two kinds of hooks share the [`Hook`] trait: [`CommandHook`] (the
//! reference behaviour: a process per event, the message JSON on its stdin)
//! and any in-process implementation a library user passes to
//! [`HookEngine::start`].
//!
//! Which command hooks run is resolved by [`HookConfig::resolve`]:
//! `HERMES_BUS_HOOKS`, then `$HERMES_HOME/hermes-bus/hooks.yaml`, then
//! `$HERMES_HOME/hermes-notify/bus_callback.py`.
//!
//! ```yaml
//! # $HERMES_HOME/hermes-bus/hooks.yaml: the reference's plain list ...
//! - ~/.hermes/hooks/notify.py
//! ```
//! ```yaml
//! # ... or our mapping form, with filters and time limits.
//! hooks:
//!   - ~/.hermes/hooks/notify.py          # routed messages, like the reference
//!   - path: /usr/local/bin/md-audit
//!     filter: {kind: topic, topic_prefix: "md.", transport: zmq}
//!     timeout_ms: 2000
//! ```

pub mod command;
pub mod config;
pub mod engine;
pub mod error;
pub mod event;
pub mod filter;
pub mod hook;
pub mod stats;

pub use command::CommandHook;
pub use config::{HookConfig, HookSource, HookSpec};
pub use engine::HookEngine;
pub use error::HookError;
pub use event::{EventProps, HookEvent, HookEventKind};
pub use filter::HookFilter;
pub use hook::Hook;
pub use stats::HookStats;
