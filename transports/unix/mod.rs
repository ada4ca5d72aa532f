//! The Unix-socket transport: the main protocol (README.md, "The protocol,
//! and where we differ from the reference").
//!
//! - [`frame`]: the 4-byte length framing, pure functions on byte buffers.
//! - [`server`]: binds the socket, accepts connections, bounds them.
//! - [`session`]: one connection: its frames become commands on the bus.
//! - `conn`: one connection's I/O: the read loop (frames, bounded partial
//!   frames) and the write loop (the only writer of the socket).
//! - [`command`]: a frame's request as a typed command (pure parsing).
//! - [`client`]: `BusClient` and `send_message`, async (tokio).
//! - `dial`: the client's one dial-and-register path.
//! - [`blocking`]: a blocking wrapper for programs without a runtime.

pub mod blocking;
pub mod client;
pub mod command;
mod conn;
mod dial;
pub mod frame;
pub mod server;
pub mod session;

pub use client::{send_message, BusClient, ClientConfig, ClientError, ClientEvent};
pub use server::{UnixConfig, UnixServer};
