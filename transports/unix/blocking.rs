//! A blocking wrapper of the client for programs without a tokio runtime.
//! It runs a small runtime of its own on a background thread.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::client::{self, BusClient, ClientConfig, ClientError};

/// A registered client with blocking calls.
pub struct BlockingClient {
    /// The runtime that drives the async client.
    rt: tokio::runtime::Runtime,
    /// The async client.
    inner: BusClient,
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

impl BlockingClient {
    /// Connects and registers (see [`BusClient::connect_with`]).
    pub fn connect(endpoint: &str, socket: impl Into<PathBuf>) -> Result<Self, ClientError> {
        let rt = runtime()?;
        let inner = rt.block_on(BusClient::connect_with(endpoint, ClientConfig::new(socket)))?;
        Ok(BlockingClient { rt, inner })
    }

    /// Sends `body` to `to` ("" broadcasts).
    pub fn send(&self, to: &str, body: Value) -> Result<(), ClientError> {
        self.rt.block_on(self.inner.send(to, body))
    }

    /// Drains what has arrived, without waiting.
    pub fn poll(&mut self) -> Vec<Value> {
        self.inner.poll()
    }

    /// Waits up to `timeout` for the next message.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Value> {
        let inner = &mut self.inner;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, inner.recv())
                .await
                .ok()
                .flatten()
        })
    }

    /// The bus's session id, None while reconnecting.
    pub fn session_id(&self) -> Option<String> {
        self.inner.session_id()
    }
}

/// Blocking [`client::send_message`].
pub fn send_message(
    socket: &Path,
    to: &str,
    body: Value,
    from: Option<&str>,
) -> Result<(), ClientError> {
    runtime()?.block_on(client::send_message(socket, to, body, from))
}
