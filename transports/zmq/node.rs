//! `Node`: a name with an optional receiver and publisher, started and
//! stopped together. Dropping a `Node` stops both (the scope guard that
//! replaces the reference's `with node:`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::publisher::Publisher;
use super::receiver::Receiver;
use super::ZmqError;
use crate::transports::zmq::envelope::{Data, Envelope};

/// The smallest unit of a hermes cluster: receives, publishes, forwards.
#[derive(Debug)]
pub struct Node {
    /// The node's name: the origin of what it publishes and the last
    /// topic segment.
    name: String,
    /// Where it receives from, if anywhere.
    receiver: Option<Receiver>,
    /// Where it publishes to, if anywhere.
    publisher: Option<Publisher>,
}

impl Node {
    /// A node with its facilities (not started).
    pub fn new(name: &str, receiver: Option<Receiver>, publisher: Option<Publisher>) -> Node {
        Node {
            name: name.to_owned(),
            receiver,
            publisher,
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names of its facilities (receiver first, as the reference).
    pub fn facilities(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(r) = &self.receiver {
            v.push(r.name().to_owned());
        }
        if let Some(p) = &self.publisher {
            v.push(p.name().to_owned());
        }
        v
    }

    /// Starts the receiver and the publisher (needs a tokio runtime).
    pub fn start(&mut self) -> Result<(), ZmqError> {
        if let Some(r) = &mut self.receiver {
            r.start()?;
        }
        if let Some(p) = &mut self.publisher {
            p.start()?;
        }
        Ok(())
    }

    /// Stops both (the publisher first sends what it has queued, up to its
    /// linger time).
    pub async fn stop(&mut self) {
        if let Some(r) = &mut self.receiver {
            r.stop().await;
        }
        if let Some(p) = &mut self.publisher {
            p.stop().await;
        }
    }

    /// Publishes `data` on topic `channel/name` with origin `name`.
    /// Ok(false) when the publisher dropped it (see [`Publisher::publish`]).
    pub fn publish(&self, channel: &str, data: impl Into<Data>) -> Result<bool, ZmqError> {
        let p = self
            .publisher
            .as_ref()
            .ok_or(ZmqError::Missing("publisher"))?;
        let topic = format!("{channel}/{}", self.name);
        p.publish_parts(&topic, &self.name, &data.into())
    }

    /// The next received envelope, waiting up to `timeout` (None: until one
    /// arrives or the receiver stops).
    pub async fn recv(&self, timeout: Option<Duration>) -> Result<Option<Envelope>, ZmqError> {
        let r = self
            .receiver
            .as_ref()
            .ok_or(ZmqError::Missing("receiver"))?;
        Ok(match timeout {
            Some(t) => r.recv_timeout(t).await,
            None => r.recv().await,
        })
    }

    /// The reference's blocking `recv(block, timeout)`; see
    /// [`Receiver::recv_blocking`].
    pub fn recv_blocking(
        &self,
        block: bool,
        timeout: Option<Duration>,
    ) -> Result<Option<Envelope>, ZmqError> {
        let r = self
            .receiver
            .as_ref()
            .ok_or(ZmqError::Missing("receiver"))?;
        Ok(r.recv_blocking(block, timeout))
    }

    /// The receiver, for its counters and settings.
    pub fn receiver(&self) -> Option<&Receiver> {
        self.receiver.as_ref()
    }

    /// The publisher, for its counters and waits.
    pub fn publisher(&self) -> Option<&Publisher> {
        self.publisher.as_ref()
    }

    /// The reference's main loop: republishes every received envelope's
    /// data on channel `RAW` until `shutdown` or the receiver stops.
    /// Returns how many envelopes it forwarded.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<u64, ZmqError> {
        let r = self
            .receiver
            .as_ref()
            .ok_or(ZmqError::Missing("receiver"))?;
        if self.publisher.is_none() {
            return Err(ZmqError::Missing("publisher"));
        }
        let mut n = 0u64;
        loop {
            let env = tokio::select! {
                _ = shutdown.cancelled() => return Ok(n),
                e = r.recv() => e,
            };
            let Some(env) = env else { return Ok(n) };
            if self.publish("RAW", env.data)? {
                n += 1;
            }
        }
    }
}
