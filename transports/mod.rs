//! Transports: each turns its wire into sessions of the one router.
//!
//! - [`unix`]: the Unix-socket bus (the main protocol): server and client.
//! - `zmq`: the ZeroMQ proxy and the Publisher / Receiver / Node clients.
//! - [`client`]: what the clients of both share (reconnect backoff,
//!   disconnect reasons).

#[cfg(any(feature = "unix", feature = "zmq"))]
pub mod client;

#[cfg(feature = "unix")]
pub mod unix;

#[cfg(feature = "zmq")]
pub mod zmq;
