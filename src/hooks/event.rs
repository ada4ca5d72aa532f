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
