//! What every client of the bus shares, whatever its socket: the Unix
//! `BusClient` and the ZeroMQ `Publisher` and `Receiver`.
//!
//! - [`backoff`]: the delays between reconnect attempts.
//! - [`disconnect`]: why a connection ended, and whether to dial again.
//! - [`byte_budget`]: the byte bound of a client's own queues.
//!
//! Each transport has one dial-and-handshake function
//! (`unix::dial::register`, `zmq::dial::dial`) and the ZeroMQ clients share
//! one task shape (`zmq::client_task`).

pub mod backoff;
pub mod byte_budget;
pub mod disconnect;

pub use backoff::Backoff;
pub use byte_budget::{ByteBudget, Charged};
pub use disconnect::Disconnect;
