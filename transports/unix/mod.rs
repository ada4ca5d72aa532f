//! The Unix-socket transport: the main protocol (PROTOCOL.md, section 1).
//!
//! - [`frame`]: the 4-byte length framing, pure functions on byte buffers.
//! - [`server`]: binds the socket, accepts connections, bounds them.
//! - [`session`]: one connection: reads frames, asks the bus, writes its outbox.
//! - [`client`]: `BusClient` and `send_message`, async (tokio).
//! - `dial`: the client's one dial-and-register path.
//! - [`blocking`]: a blocking wrapper for programs without a runtime.

pub mod blocking;
pub mod client;
mod dial;
pub mod frame;
pub mod server;
pub mod session;

pub use client::{send_message, BusClient, ClientConfig, ClientError, ClientEvent};
pub use server::{UnixConfig, UnixServer};
