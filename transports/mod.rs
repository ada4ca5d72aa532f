//! Transports: each turns its wire into sessions of the one router.
//!
//! - [`unix`]: the Unix-socket bus (the main protocol): server and client.
//! - `zmq`: the ZeroMQ proxy and the Publisher / Receiver / Node clients.

#[cfg(feature = "unix")]
pub mod unix;

#[cfg(feature = "zmq")]
pub mod zmq;
