//! The proxy as the bus's ZeroMQ transport.
//!
//! One sink session, subscribed to every topic, joins the proxy to the
//! router:
//! - the proxy subscribes its publishers upstream to what the bus wants
//!   (`demand.rs`): the topic prefixes of Unix sessions (router interest
//!   changes, followed as they happen) and of topic hooks, beside its own
//!   subscribers' prefixes; publishers drop the rest at the source;
//! - envelopes from ZeroMQ publishers that the bus wants are queued
//!   (bounded, never waiting on the proxy's hot path) to a bridge task
//!   that decodes them once and publishes them into the router, so Unix
//!   sessions subscribed to a topic and topic hooks see them;
//! - what the router delivers to the sink (topics published by other
//!   transports) goes out to the proxy's subscribers as envelopes,
//!   numbered (the bus numbers them as its own origin, see
//!   [`crate::seq`]): the subscribers that asked for numbers get the
//!   fifth, sequence frame, every other one the usual four frames.
//!
//! A numbered envelope from a publisher keeps its number on its way into
//! the router (`seq`, `seq_origin` for the Unix sessions that ask); one
//! without is numbered by the router.
//!
//! No loops: the router never delivers a message back to the session that
//! published it, and messages from the router are only sent to ZeroMQ
//! subscribers, never offered back to the router.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::demand::{BusDemand, DemandLimits};
use super::proxy::{EnvelopeSink, ProxyConfig, ProxyEndpoints, ProxyHandle, ProxyStats, ZmqProxy};
use super::queue::{Pushed, WireQueue};
use super::sequence::{self, SeqFramer};
use super::zmtp::RawMessage;
use super::ZmqError;
use crate::delivery::TopicMessage;
use crate::seq::Seq;
use crate::transport::{Bus, InterestSink, Transport, TransportStatus};
use crate::transports::zmq::envelope;

/// Transport name in hook filters and status.
pub const TRANSPORT_NAME: &str = "zmq";
/// Capacity of the sink session's outbox (messages from the router).
const SINK_OUTBOX: usize = 65_536;
/// Capacity of the queue from the proxy to the router.
const TO_BUS_QUEUE: usize = 65_536;

/// The ZeroMQ proxy as a [`Transport`].
pub struct ZmqTransport {
    /// The proxy (bound or not yet).
    proxy: ZmqProxy,
}

impl ZmqTransport {
    /// A transport that binds when served.
    pub fn new(cfg: ProxyConfig) -> ZmqTransport {
        ZmqTransport {
            proxy: ZmqProxy::new(cfg),
        }
    }

    /// A transport bound now (ports known before serving).
    pub async fn bind(cfg: ProxyConfig) -> Result<ZmqTransport, ZmqError> {
        Ok(ZmqTransport {
            proxy: ZmqProxy::bind(cfg).await?,
        })
    }

    /// The bound addresses (None before binding).
    pub fn endpoints(&self) -> Option<ProxyEndpoints> {
        self.proxy.endpoints()
    }

    /// The proxy's counters (live).
    pub fn stats(&self) -> Arc<ProxyStats> {
        self.proxy.stats()
    }
}

/// The proxy's counters as a status source.
struct Status(Arc<ProxyStats>);

impl TransportStatus for Status {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.0.snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

/// The proxy's side of the bridge: queues envelopes for the router.
struct ToBus {
    /// Wire bytes of envelopes waiting for the bridge task.
    queue: WireQueue,
    /// Which envelopes the router wants (the others came for proxy
    /// subscribers only and are not decoded for it).
    demand: Arc<BusDemand>,
    /// For the drop counter.
    stats: Arc<ProxyStats>,
}

impl EnvelopeSink for ToBus {
    fn offer(&self, msg: &RawMessage) {
        if !self.demand.wants(msg.first_frame()) {
            self.stats.to_bus_unwanted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queue.push(msg.wire.clone()) != Pushed::Ok {
            self.stats.to_bus_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Decodes one queued envelope (4 frames, or 5 with a sequence frame: the
/// proxy offers 5 only from a numbering publisher) into the router's form.
/// `last_origin` keeps the last numbering origin seen, shared by the
/// messages it numbered (one allocation per change of origin).
fn to_topic_message(wire: &Bytes, last_origin: &mut Option<Arc<str>>) -> Option<TopicMessage> {
    let mut frames = [&[][..]; 5];
    let mut n = 0;
    let raw = RawMessage {
        wire: wire.clone(),
        frames: 0,
    };
    for f in raw.frames() {
        if n == 5 {
            return None;
        }
        frames[n] = f;
        n += 1;
    }
    let seq = match n {
        4 => None,
        5 => {
            let (origin, n) = sequence::parse_seq_frame(frames[4])?;
            let origin = match last_origin {
                Some(o) if **o == *origin => o.clone(),
                _ => {
                    let o: Arc<str> = Arc::from(&*origin);
                    *last_origin = Some(o.clone());
                    o
                }
            };
            Some(Seq { origin, n })
        }
        _ => return None,
    };
    let (topic, origin, ts) = envelope::parse_header(frames[0], frames[1], frames[3]).ok()?;
    let data = crate::codec::to_raw_json(frames[2]).ok()?;
    Some(TopicMessage {
        topic,
        origin,
        data,
        ts,
        seq,
    })
}

#[async_trait]
impl Transport for ZmqTransport {
    fn name(&self) -> &'static str {
        TRANSPORT_NAME
    }

    async fn serve(self: Box<Self>, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stats = self.proxy.stats();
        bus.add_status(TRANSPORT_NAME, Arc::new(Status(stats.clone())));
        let (sid, mut outbox) = bus.attach(TRANSPORT_NAME, SINK_OUTBOX);
        // Relays every topic of other transports to ZeroMQ subscribers (a
        // sink's subscription is no demand: it asks publishers for nothing).
        if let Err(e) = bus.subscribe(sid, "") {
            tracing::error!("zmq bridge cannot subscribe to the router: {e}");
        }
        // What the bus wants from publishers: the hooks' fixed prefixes,
        // then the sessions' as they change.
        let demand = Arc::new(BusDemand::new(
            DemandLimits::of(self.proxy.config()),
            stats.clone(),
        ));
        demand.add_fixed(&bus.hooks().topic_interest(TRANSPORT_NAME));
        // A router that keeps last values (`--last-value`) wants every
        // topic, whoever subscribed: a later snapshot may ask for any.
        if bus.router().config().last_value.is_some() {
            demand.add_fixed(&[String::new()]);
        }
        let watcher: Arc<dyn InterestSink> = demand.clone();
        bus.watch_interest(watcher.clone());
        let to_bus = Arc::new(ToBus {
            queue: WireQueue::new(TO_BUS_QUEUE, 256 << 20),
            demand: demand.clone(),
            stats: stats.clone(),
        });

        // Proxy → router.
        let inbound = {
            let bus = bus.clone();
            let to_bus = to_bus.clone();
            let stats = stats.clone();
            let done = shutdown.clone();
            tokio::spawn(async move {
                let mut batch = VecDeque::new();
                let mut last_origin = None;
                loop {
                    let ready = tokio::select! {
                        _ = done.cancelled() => false,
                        r = to_bus.queue.wait() => r,
                    };
                    if !ready {
                        break;
                    }
                    to_bus.queue.take_all(&mut batch);
                    for wire in batch.drain(..) {
                        match to_topic_message(&wire, &mut last_origin) {
                            Some(m) => {
                                bus.publish(TRANSPORT_NAME, sid, m);
                                stats.to_bus.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {
                                stats.publishers.malformed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        };

        // Router → proxy subscribers, once the proxy runs.
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel::<ProxyHandle>();
        let outbound = {
            let stats = stats.clone();
            let done = shutdown.clone();
            tokio::spawn(async move {
                let Ok(handle) = handle_rx.await else { return };
                let mut batch = VecDeque::new();
                // The framer of the last numbering origin (the bus's own,
                // nearly always): its head is encoded once.
                let mut framer: Option<(Arc<str>, SeqFramer)> = None;
                loop {
                    let more = tokio::select! {
                        _ = done.cancelled() => false,
                        r = outbox.recv_batch(&mut batch) => r,
                    };
                    if !more {
                        break;
                    }
                    // Handed to the proxy: the bridge's outbox gives their
                    // bytes back (and counts it as progress).
                    let bytes = batch.iter().map(|d| d.charge()).sum();
                    outbox.written(batch.len(), bytes);
                    for d in batch.drain(..) {
                        let Some(m) = d.topic_message() else { continue };
                        let topic = envelope::topic_frame(&m.topic);
                        let mut origin = Vec::with_capacity(m.origin.len() + 2);
                        envelope::write_ascii_json_str(&m.origin, true, &mut origin);
                        let ts = serde_json::to_vec(&m.ts).unwrap_or_else(|_| b"0".to_vec());
                        let data = m.data.get().as_bytes();
                        match &m.seq {
                            Some(seq) => {
                                let f = match &framer {
                                    Some((o, f)) if Arc::ptr_eq(o, &seq.origin) => f,
                                    _ => {
                                        let f = SeqFramer::new(&seq.origin);
                                        &framer.insert((seq.origin.clone(), f)).1
                                    }
                                };
                                let frame = f.body(seq.n);
                                handle.send_numbered(&[&topic, &origin, data, &ts, &frame]);
                            }
                            None => handle.send(&[&topic, &origin, data, &ts]),
                        }
                        stats.from_bus.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };

        let sink: Arc<dyn EnvelopeSink> = to_bus.clone();
        let res = self
            .proxy
            .run_with(
                Some(sink),
                move |h| {
                    demand.attach(h.clone());
                    let _ = handle_tx.send(h);
                },
                shutdown.clone(),
            )
            .await;
        bus.unwatch_interest(&watcher);
        to_bus.queue.close(true);
        let _ = inbound.await;
        let _ = outbound.await;
        bus.detach(sid);
        res.map_err(anyhow::Error::from)
    }
}
