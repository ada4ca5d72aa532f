//! The ZeroMQ transport: the proxy ("PostOffice") and the `Publisher`,
//! `Receiver` and `Node` clients of `hermes-zmq` 1.3.0, on our own ZMTP 3.x
//! (NULL mechanism) over tokio.
//!
//! - [`zmtp`]: greeting, READY, frames, subscriptions.
//! - [`endpoint`]: `tcp://` and `ipc://` endpoints (TCP keepalive on
//!   every TCP socket).
//! - [`heartbeat`]: ZMTP 3.1 PING/PONG heartbeats as plain state
//!   (`heartbeat_task` drives them on a connection, for the proxy and the
//!   clients alike).
//! - [`proxy`]: the XSUB/XPUB/capture proxy (config, bind and accept, the
//!   public API); its parts: `hub` (subscriptions and fan-out, plain
//!   state), `upstream` (the subscriptions publishers are sent, one log
//!   for all), `publisher_conn` and `subscriber_conn` (the connection
//!   loops, sharing `conn`), `subscription` (what a subscription's bytes
//!   mean: bare topic prefixes), `replay` (last values to a late joiner,
//!   from a [`crate::last_value::LastValues`]), [`queue`] (per-peer
//!   queues, on [`crate::bounded`]); [`stats`]: its counters.
//! - [`bridge`]: the proxy as the bus's `Transport`, wired to the router;
//!   `demand` (the topics the bus's sessions and hooks want, held
//!   upstream so publishers filter at the source).
//! - [`publisher`], [`receiver`], [`node`]: the clients.
//! - [`sequence`]: numbered envelopes (the fifth, sequence frame), opted
//!   into through READY; the numbering and gap tracking are
//!   [`crate::seq`].
//! - [`cli`] (feature `cli`): the `proxy`, `pub` and `sub` subcommands, and
//!   the proxy flags `server --zmq` shares.
//!
//! See the ZeroMQ section of the top-level `README.md` for why we do not use the `zeromq`
//! crate's sockets.

pub mod bridge;
#[cfg(feature = "cli")]
pub mod cli;
mod client_task;
mod conn;
mod demand;
mod dial;
pub mod endpoint;
pub mod envelope;
pub mod heartbeat;
mod heartbeat_task;
mod hub;
pub mod node;
mod prefix_set;
pub mod proxy;
pub mod publisher;
mod publisher_conn;
pub mod queue;
pub mod receiver;
mod replay;
pub mod sequence;
pub mod stats;
mod subscriber_conn;
mod subscription;
mod upstream;
pub mod zmtp;

pub use bridge::ZmqTransport;
pub use endpoint::Endpoint;
pub use heartbeat::HeartbeatConfig;
pub use node::Node;
pub use proxy::{
    LastValueReplay, ProxyConfig, ProxyEndpoints, ProxySnapshot, ProxyStats, ZmqProxy,
};
pub use publisher::{Publisher, PublisherConfig};
pub use receiver::{OnGap, Receiver, ReceiverConfig, SlowPolicy};

use std::time::Duration;

/// Errors of the ZeroMQ transport and clients.
#[derive(Debug, thiserror::Error)]
pub enum ZmqError {
    /// An address was not `tcp://host:port` or `ipc://path`.
    #[error("bad endpoint {0:?} (expected tcp://host:port or ipc://path)")]
    Endpoint(String),
    /// Binding a listening address failed.
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
    /// Another socket-level failure.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The proxy was asked to serve without bound listeners.
    #[error("proxy is not bound")]
    NotBound,
    /// An envelope could not be encoded.
    #[error("envelope: {0}")]
    Envelope(#[from] crate::transports::zmq::envelope::EnvelopeError),
    /// A client was used before `start()` (or after `stop()`).
    #[error("{0} is not running")]
    NotRunning(&'static str),
    /// The Node has no publisher or no receiver for the call.
    #[error("node has no {0}")]
    Missing(&'static str),
    /// Waiting for something (a connection, a subscriber) timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Reconnect delays of the clients: like libzmq's `ZMQ_RECONNECT_IVL`
/// (100 ms), backing off to at most this.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// First reconnect delay.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// How long a client waits for a connect or handshake to finish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
