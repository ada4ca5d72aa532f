//! What the router hands to the hook engine: one routed message or topic
//! envelope, already encoded as JSON.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The kind of traffic a hook event describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookEventKind {
    /// A routed point-to-point or broadcast `message` (what the reference
    /// bus ran its hooks for).
    Message,
    /// A pub-sub envelope published on a topic.
    Topic,
}

impl HookEventKind {
    /// The lowercase name used in configuration files (`message`, `topic`).
    pub fn as_str(self) -> &'static str {
        match self {
            HookEventKind::Message => "message",
            HookEventKind::Topic => "topic",
        }
    }
}

/// What a hook filter looks at in an event, borrowed: known before the
/// event is built, so the routing path can ask whether any hook wants it
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventProps<'a> {
    /// Whether this is a routed message or a topic envelope.
    pub kind: HookEventKind,
    /// Which transport carried the traffic ("unix", "zmq").
    pub transport: &'a str,
    /// Target endpoint of a routed message (None for broadcast / topics).
    pub to: Option<&'a str>,
    /// Topic of a pub-sub envelope.
    pub topic: Option<&'a str>,
}

/// One piece of routed traffic offered to the hooks.
#[derive(Debug, Clone)]
pub struct HookEvent {
    /// Which transport carried the traffic ("unix", "zmq").
    pub transport: &'static str,
    /// Whether this is a routed message or a topic envelope.
    pub kind: HookEventKind,
    /// Target endpoint of a routed message (None for broadcast / topics).
    pub to: Option<String>,
    /// Topic of a pub-sub envelope.
    pub topic: Option<String>,
    /// The full message as routed, JSON bytes: what a command hook gets on stdin.
    pub json: Bytes,
}

impl HookEvent {
    /// What a hook filter looks at in this event.
    pub fn props(&self) -> EventProps<'_> {
        EventProps {
            kind: self.kind,
            transport: self.transport,
            to: self.to.as_deref(),
            topic: self.topic.as_deref(),
        }
    }

    /// A routed `message` event; `to` is `None` for a broadcast.
    pub fn message(transport: &'static str, to: Option<String>, json: Bytes) -> HookEvent {
        HookEvent {
            transport,
            kind: HookEventKind::Message,
            to,
            topic: None,
            json,
        }
    }

    /// A pub-sub envelope published on `topic`.
    pub fn topic(transport: &'static str, topic: String, json: Bytes) -> HookEvent {
        HookEvent {
            transport,
            kind: HookEventKind::Topic,
            to: None,
            topic: Some(topic),
            json,
        }
    }
}
