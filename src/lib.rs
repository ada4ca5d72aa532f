//! # hermes-bus
//!
//! A message bus for local IPC over a Unix socket and for pub-sub over
//! ZeroMQ, wire-compatible with the Python packages `hermes-bus` (0.3.0,
//! 0.7.0) and `hermes-zmq` (1.3.0): their unmodified clients work against
//! this bus, and this crate's clients work against theirs.
//!
//! # Where to start
//! - [`BusClient`](transports::unix::BusClient): a named endpoint on the
//!   bus's Unix socket: send to other endpoints, receive what they send.
//! - [`Publisher`](transports::zmq::Publisher): publishes topic envelopes
//!   into a ZeroMQ proxy (`hermes-bus proxy` or `server --zmq`).
//! - [`Receiver`](transports::zmq::Receiver): subscribes to topic prefixes
//!   through the proxy.
//! - [`Node`](transports::zmq::Node): a publisher and a receiver under one
//!   name.
//!
//! Each needs a running bus or proxy (`hermes-busd start`, `hermes-bus
//! proxy`), hence `no_run` below.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use hermes_bus::transports::unix::BusClient;
//!
//! let mut me = BusClient::connect("worker", "/tmp/hermes-bus.sock").await?;
//! me.send("planner", serde_json::json!({"status": "ready"})).await?;
//! if let Some(msg) = me.recv().await {
//!     println!("{} says {}", msg["from"], msg["body"]);
//! }
//! me.close().await;
//! # Ok(()) }
//! ```
//!
#![cfg_attr(
    feature = "zmq",
    doc = r#"
```no_run
# async fn demo() -> Result<(), Box<dyn std::error::Error>> {
use hermes_bus::transports::zmq::{Publisher, Receiver};

// Publishers connect to the proxy's XSUB side, receivers to its XPUB side.
let mut publisher = Publisher::new("tcp://127.0.0.1:5559", "feed")?;
publisher.start()?;
let data = serde_json::value::to_raw_value(&serde_json::json!({"px": 64000.5}))?;
publisher.publish_parts("md/BTC", "feed", &data.into())?;

let mut receiver = Receiver::new("tcp://127.0.0.1:5560", "reader", &["md/"], &[])?;
receiver.start()?;
if let Some(env) = receiver.recv().await {
    println!("{} from {}", env.topic, env.origin);
}
# Ok(()) }
```

```no_run
# async fn demo() -> Result<(), Box<dyn std::error::Error>> {
use hermes_bus::transports::zmq::{Node, Publisher, Receiver};

// A node: one name, a receiver and a publisher.
let rx = Receiver::new("tcp://127.0.0.1:5560", "strategy", &["md/"], &[])?;
let tx = Publisher::new("tcp://127.0.0.1:5559", "strategy")?;
let mut node = Node::new("strategy", Some(rx), Some(tx));
node.start()?;
let order = serde_json::value::to_raw_value(&serde_json::json!({"side": "buy"}))?;
node.publish("orders", order)?;
let next = node.recv(Some(std::time::Duration::from_secs(1))).await?;
# let _ = next;
# Ok(()) }
```
"#
)]
//!
//! # Layout
//! - [`message`]: `BusMessage`, the JSON object of the Unix protocol, parsed
//!   once; unknown fields and `body` are kept as raw JSON.
//! - [`envelope`] (feature `zmq`; in `transports/zmq/`): the pub-sub
//!   `Envelope` (topic, origin, data, ts) and the
//!   `Message` struct model.
//! - [`codec`]: JSON (default) and MessagePack data encodings.
//! - [`delivery`]: what the router hands to a session, encoded at most once
//!   per wire form and shared by reference count.
//! - [`notice`]: the bus's own replies and notices to a session, typed,
//!   and their encoding in each wire form.
//! - [`outbox`]: the bounded per-session queue between router and writer.
//! - [`bounded`]: one bounded queue (items + bytes, pushes that never wait,
//!   async and blocking waits, a progress clock).
//! - [`router`]: plain state: sessions, fan-out, flow-control decisions
//!   and counters. Never awaits. Inside it, [`router::names`] (endpoint
//!   names, live or held; returns what happened) and [`router::topics`]
//!   (topic subscriptions, with per-change and per-publish costs
//!   independent of their number).
//! - [`last_value`]: the newest value of each topic (bounded in topics
//!   and bytes), replayed to late joiners by the proxy and the router.
//! - [`seq`]: sequence numbers per (origin, topic) and gap detection,
//!   plain state (the numbering counters and the receivers' tracker).
//! - [`clock`]: wall-clock time and fresh ids, generated in one place.
//! - [`error`]: the wire error codes.
//! - [`stats`]: the counters `status` shows.
//! - [`hooks`]: hook resolution and execution, off the routing path.
//! - [`transport`]: the `Transport` trait and the `Bus` handle every
//!   transport gets (router + hooks + shutdown).
//! - [`config`]: paths and environment (`HERMES_BUS_ROOT`, `HERMES_HOME`).
//! - [`daemon`]: pid file, start / stop / status / restart.
//! - [`logging`]: `tracing` to stderr or to a self-trimming log file.
//! - [`metrics`]: the Prometheus text of the status, and its HTTP
//!   responder (`--metrics`).
//! - [`signals`]: shutdown on SIGINT / SIGTERM, for every program.
//! - [`serve`]: running the bus in the foreground (signals, ordered shutdown).
//! - [`cli`] (features `unix` + `cli`): the command-line options the
//!   binaries share.
//! - [`transports`]: the Unix-socket transport (server, client) and the
//!   ZeroMQ transport (proxy, Publisher, Receiver, Node).
//!
//! Data flows one way: frame → session → router → outboxes → writer.
#![warn(missing_docs)]

pub mod bounded;
mod choice;
#[cfg(all(feature = "unix", feature = "cli"))]
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub(crate) mod conflation;
mod counters;
#[cfg(feature = "unix")]
pub mod daemon;
pub mod delivery;
pub mod error;
pub mod hooks;
pub mod last_value;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod notice;
pub mod outbox;
pub mod router;
pub mod seq;
#[cfg(all(feature = "unix", feature = "cli"))]
pub mod serve;
pub mod signals;
pub mod stats;
pub mod transport;

pub use router::topics;
/// The pub-sub model (lives with the ZeroMQ transport, its only user).
#[cfg(feature = "zmq")]
pub use transports::zmq::envelope;

#[path = "../transports/mod.rs"]
pub mod transports;

pub use delivery::{Delivery, TopicMessage};
pub use error::ErrorCode;
pub use message::BusMessage;
pub use router::{Router, RouterConfig, SessionId};
/// The shutdown signal [`Transport::serve`] takes (re-exported so an
/// embedding program needs no `tokio-util` dependency of its own).
pub use tokio_util::sync::CancellationToken;
pub use transport::{Bus, Transport};

/// The README's Rust snippets, compiled as doc tests so they stay true.
#[cfg(all(doctest, feature = "unix"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
