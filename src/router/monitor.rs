//! Traffic monitors: sessions that asked to see every routed message
//! (`{"type":"monitor"}`, ours), their filters, and their bounded queues.
//!
//! The router offers each routed message (point-to-point, broadcast,
//! topic publish, whatever the transport) to [`Monitors`] after routing
//! it; with no monitor that is one branch. A matching monitor gets a
//! [`MonitorEvent`] (a typed notice) in its own outbox.
//!
//! **This is the one place that drops by design.** A monitor's events go
//! into its outbox only while that outbox holds less than the monitor's
//! byte bound; past it, events are dropped and counted, and the count is
//! told to the monitor on the next event that gets through (`dropped`).
//! A monitor never makes a sender wait and is never the subject of the
//! slow-consumer policy: a monitor that does not read only loses events.

use bytes::Bytes;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::delivery::Delivery;
use crate::error::{ErrorCode, ProtocolError};
use crate::notice::Notice;
use crate::outbox::Outbox;

use super::SessionId;

/// A monitor's byte bound when it names none.
pub const DEFAULT_MONITOR_BYTES: usize = 4 << 20;
/// The smallest byte bound a monitor may ask for.
pub const MIN_MONITOR_BYTES: usize = 4096;
/// Most entries in each filter list.
pub const MAX_FILTERS: usize = 256;
/// Longest filter entry, in bytes.
pub const MAX_FILTER_LEN: usize = 1024;

/// What a monitor asks to see. Empty `names` and `topics` select every
/// message; otherwise an event is shown when its sender or target is in
/// `names`, or its topic starts with one of `topics` (as several
/// `dbus-monitor` match rules: any one selects). A non-empty `transports`
/// restricts that to traffic that entered through one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorSpec {
    /// Endpoint names (sender or target; a topic's origin).
    #[serde(default)]
    pub names: Vec<String>,
    /// Topic prefixes (`""` for every topic, no point-to-point message).
    #[serde(default)]
    pub topics: Vec<String>,
    /// Transports the traffic entered through (`unix`, `zmq`).
    #[serde(default)]
    pub transports: Vec<String>,
    /// Include each message's body (a topic's data).
    #[serde(default)]
    pub body: bool,
    /// The byte bound of the monitor's queue (clamped by the bus).
    #[serde(default)]
    pub max_bytes: usize,
}

impl MonitorSpec {
    /// Checks the filter's size bounds.
    pub fn check(&self) -> Result<(), ProtocolError> {
        for (what, list) in [
            ("names", &self.names),
            ("topics", &self.topics),
            ("transports", &self.transports),
        ] {
            if list.len() > MAX_FILTERS {
                return Err(ProtocolError::new(
                    ErrorCode::BadField,
                    format!("monitor: at most {MAX_FILTERS} {what}"),
                ));
            }
            if list.iter().any(|s| s.len() > MAX_FILTER_LEN) {
                return Err(ProtocolError::new(
                    ErrorCode::BadField,
                    format!("monitor: an entry of {what} is longer than {MAX_FILTER_LEN} bytes"),
                ));
            }
        }
        Ok(())
    }

    fn wants(&self, transport: &str, from: &str, to: Option<&str>, topic: Option<&str>) -> bool {
        if !self.transports.is_empty() && !self.transports.iter().any(|t| t == transport) {
            return false;
        }
        if self.names.is_empty() && self.topics.is_empty() {
            return true;
        }
        self.names
            .iter()
            .any(|n| n == from || Some(n.as_str()) == to)
            || topic.is_some_and(|t| self.topics.iter().any(|p| t.starts_with(p.as_str())))
    }
}

/// What kind of traffic an event shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A `message` to one endpoint.
    Message,
    /// A `message` to every endpoint.
    Broadcast,
    /// A topic publish (Unix `publish` or a ZeroMQ envelope).
    Publish,
}

impl EventKind {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Broadcast => "broadcast",
            EventKind::Publish => "publish",
        }
    }
}

/// The content of an event whose monitor asked for bodies, shared with
/// the routed message (nothing is copied under the router's lock; the
/// body is read out when the event is encoded).
#[derive(Debug, Clone)]
pub enum Content {
    /// A message's Unix JSON (the `body` field is shown).
    Message(Bytes),
    /// A topic message (its `data` is shown).
    Topic(Delivery),
}

/// One routed message as a monitor sees it:
/// `{"type":"monitor","kind","transport","from","to"|"topic","id","ts","size","delivered"[,"body"][,"dropped"]}`.
#[derive(Debug, Clone)]
pub struct MonitorEvent {
    /// Message, broadcast or publish.
    pub kind: EventKind,
    /// The transport it entered through.
    pub transport: &'static str,
    /// The sender's name (a topic's origin).
    pub from: String,
    /// The target endpoint (a message), or the topic (a publish).
    pub to: String,
    /// The message's `id`.
    pub id: Option<Box<RawValue>>,
    /// Its timestamp (Unix seconds).
    pub ts: f64,
    /// Bytes of its body (a message) or data (a topic).
    pub size: usize,
    /// Sessions (and held names) it was queued to.
    pub delivered: usize,
    /// The body, when the monitor asked for it.
    pub content: Option<Content>,
    /// Events this monitor lost (its queue was full) since the last one
    /// it was sent.
    pub dropped: u64,
}

impl MonitorEvent {
    /// About how many bytes its JSON takes (what its queue charges).
    pub fn size_hint(&self) -> usize {
        let content = match &self.content {
            Some(Content::Message(b)) => b.len(),
            Some(Content::Topic(_)) => self.size,
            None => 0,
        };
        160 + self.from.len()
            + self.to.len()
            + self.id.as_ref().map_or(0, |i| i.get().len())
            + content
    }

    /// Writes its fields (after `type`) into a notice's map.
    pub fn write_fields<M: SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        m.serialize_entry("kind", self.kind.as_str())?;
        m.serialize_entry("transport", self.transport)?;
        m.serialize_entry("from", &self.from)?;
        match self.kind {
            EventKind::Message => m.serialize_entry("to", &self.to)?,
            EventKind::Broadcast => {}
            EventKind::Publish => m.serialize_entry("topic", &self.to)?,
        }
        if let Some(id) = &self.id {
            m.serialize_entry("id", id)?;
        }
        m.serialize_entry("ts", &self.ts)?;
        m.serialize_entry("size", &self.size)?;
        m.serialize_entry("delivered", &self.delivered)?;
        match &self.content {
            Some(Content::Message(json)) => {
                #[derive(Deserialize)]
                struct Body<'a> {
                    #[serde(borrow)]
                    body: Option<&'a RawValue>,
                }
                let body = serde_json::from_slice::<Body<'_>>(json)
                    .ok()
                    .and_then(|b| b.body);
                m.serialize_entry("body", &body)?;
            }
            Some(Content::Topic(d)) => {
                m.serialize_entry("body", &d.topic_message().map(|t| &t.data))?;
            }
            None => {}
        }
        if self.dropped > 0 {
            m.serialize_entry("dropped", &self.dropped)?;
        }
        Ok(())
    }
}

/// One monitoring session.
struct Monitor {
    sid: SessionId,
    spec: MonitorSpec,
    outbox: Outbox,
    /// Events lost since the last one sent.
    pending_drops: u64,
}

/// Counters of the monitors, for `status`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MonitorStats {
    /// Monitoring sessions now.
    pub monitors: usize,
    /// Events queued to monitors.
    pub events: u64,
    /// Events dropped for a full monitor queue (by design: see the module).
    pub dropped: u64,
}

/// A routed message, as the router describes it to the monitors.
pub struct Seen<'a> {
    /// Message, broadcast or publish.
    pub kind: EventKind,
    /// The transport it entered through.
    pub transport: &'static str,
    /// The sender's name (a topic's origin).
    pub from: &'a str,
    /// The target endpoint, or the topic.
    pub to: &'a str,
    /// The message's `id`.
    pub id: Option<&'a str>,
    /// Its timestamp.
    pub ts: f64,
    /// Bytes of its body or data.
    pub size: usize,
    /// Copies queued.
    pub delivered: usize,
}

/// Every monitor of the bus. See the module docs.
#[derive(Default)]
pub struct Monitors {
    list: Vec<Monitor>,
    stats: MonitorStats,
}

impl Monitors {
    /// True when nobody monitors (the router's one branch).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Starts (or changes) monitoring for session `sid`, whose outbox is
    /// `outbox`; `max_bytes` is clamped to `[MIN_MONITOR_BYTES, limit]`
    /// (0: the default). Returns the spec in force.
    pub fn start(
        &mut self,
        sid: SessionId,
        outbox: Outbox,
        mut spec: MonitorSpec,
        limit: usize,
    ) -> MonitorSpec {
        if spec.max_bytes == 0 {
            spec.max_bytes = DEFAULT_MONITOR_BYTES;
        }
        spec.max_bytes = spec.max_bytes.min(limit).max(MIN_MONITOR_BYTES);
        let shown = spec.clone();
        match self.list.iter_mut().find(|m| m.sid == sid) {
            Some(m) => m.spec = spec,
            None => self.list.push(Monitor {
                sid,
                spec,
                outbox,
                pending_drops: 0,
            }),
        }
        self.stats.monitors = self.list.len();
        shown
    }

    /// Stops monitoring for a session (it closed).
    pub fn stop(&mut self, sid: SessionId) {
        if self.list.is_empty() {
            return;
        }
        self.list.retain(|m| m.sid != sid);
        self.stats.monitors = self.list.len();
    }

    /// The counters.
    pub fn stats(&self) -> MonitorStats {
        self.stats
    }

    /// Offers one routed message to every monitor; `content` makes the
    /// shared body, for the monitors that asked for it.
    pub fn offer(&mut self, seen: &Seen<'_>, content: impl Fn() -> Content) {
        let topic = (seen.kind == EventKind::Publish).then_some(seen.to);
        let to = (seen.kind == EventKind::Message).then_some(seen.to);
        let mut closed = false;
        for m in &mut self.list {
            if !m.spec.wants(seen.transport, seen.from, to, topic) {
                continue;
            }
            let ev = MonitorEvent {
                kind: seen.kind,
                transport: seen.transport,
                from: seen.from.to_owned(),
                to: seen.to.to_owned(),
                id: seen
                    .id
                    .and_then(|i| RawValue::from_string(i.to_owned()).ok()),
                ts: seen.ts,
                size: seen.size,
                delivered: seen.delivered,
                content: m.spec.body.then(&content),
                dropped: m.pending_drops,
            };
            // Never past the bound (an empty queue takes one, as any).
            if !m.outbox.is_empty() && m.outbox.bytes() + ev.size_hint() > m.spec.max_bytes {
                m.pending_drops += 1;
                self.stats.dropped += 1;
                continue;
            }
            match m
                .outbox
                .push_forced(Delivery::notice(Notice::Monitor(Box::new(ev))))
            {
                Ok(()) => {
                    m.pending_drops = 0;
                    self.stats.events += 1;
                }
                Err(_) => closed = true,
            }
        }
        if closed {
            self.list.retain(|m| !m.outbox.is_closed());
            self.stats.monitors = self.list.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::standalone;
    use std::collections::VecDeque;

    fn seen<'a>(kind: EventKind, from: &'a str, to: &'a str) -> Seen<'a> {
        Seen {
            kind,
            transport: "unix",
            from,
            to,
            id: Some("\"m1\""),
            ts: 1.5,
            size: 10,
            delivered: 1,
        }
    }

    #[test]
    fn filters_select_by_name_or_topic_and_restrict_by_transport() {
        let all = MonitorSpec::default();
        assert!(all.wants("unix", "a", Some("b"), None));
        let names = MonitorSpec {
            names: vec!["b".into()],
            ..MonitorSpec::default()
        };
        assert!(names.wants("unix", "a", Some("b"), None));
        assert!(names.wants("zmq", "b", None, Some("t")));
        assert!(!names.wants("unix", "a", Some("c"), None));
        let topics = MonitorSpec {
            topics: vec!["md/".into()],
            transports: vec!["zmq".into()],
            ..MonitorSpec::default()
        };
        assert!(topics.wants("zmq", "x", None, Some("md/BTC")));
        assert!(!topics.wants("unix", "x", None, Some("md/BTC")));
        assert!(!topics.wants("zmq", "x", Some("md/"), None));
    }

    #[test]
    fn a_full_monitor_drops_counts_and_tells_on_the_next_event() {
        let (tx, mut rx) = standalone(1 << 20, 1 << 30);
        let mut ms = Monitors::default();
        let spec = MonitorSpec {
            body: true,
            ..MonitorSpec::default()
        };
        let got = ms.start(7, tx, spec, 1 << 20);
        assert_eq!(got.max_bytes, DEFAULT_MONITOR_BYTES.min(1 << 20));
        let frame = Bytes::from_static(br#"{"type":"message","body":{"x":1}}"#);
        let mut n = 0;
        while ms.stats().dropped == 0 {
            ms.offer(&seen(EventKind::Message, "a", "b"), || {
                Content::Message(frame.clone())
            });
            n += 1;
        }
        assert!(n > 100, "{n} events before the bound");
        ms.offer(&seen(EventKind::Broadcast, "a", ""), || {
            Content::Message(frame.clone())
        });
        assert_eq!(ms.stats().dropped, 2);
        // The writer drains: the next event says what was lost.
        let mut b = VecDeque::new();
        rx.try_recv_batch(&mut b);
        let first: serde_json::Value = serde_json::from_slice(&b[0].unix_frame()[4..]).unwrap();
        assert_eq!(first["type"], "monitor");
        assert_eq!(first["kind"], "message");
        assert_eq!(first["to"], "b");
        assert_eq!(first["id"], "m1");
        assert_eq!(first["body"], serde_json::json!({"x": 1}));
        loop {
            let bytes = b.iter().map(Delivery::charge).sum();
            rx.written(b.len(), bytes);
            b.clear();
            if rx.try_recv_batch(&mut b) == 0 {
                break;
            }
        }
        ms.offer(&seen(EventKind::Publish, "o", "md/x"), || {
            Content::Message(frame.clone())
        });
        b.clear();
        rx.try_recv_batch(&mut b);
        let last: serde_json::Value = serde_json::from_slice(&b[0].unix_frame()[4..]).unwrap();
        assert_eq!(last["dropped"], 2);
        assert_eq!(last["topic"], "md/x");
        assert_eq!(ms.stats().events, n);
        ms.stop(7);
        assert!(ms.is_empty());
    }
}
