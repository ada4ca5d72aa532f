//! Wire error codes: what the bus answers in `{"type":"error","code":..}`.
//!
//! Every way a client can be wrong has one code here, so clients can match
//! on it and tests can assert it. The reference bus knew only
//! `endpoint_not_found`; the others are ours (README.md, "The protocol,
//! and where we differ from the reference").

use std::fmt;

/// A reason the bus refused or could not carry out a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame's payload is not valid JSON.
    BadJson,
    /// The frame's payload is not valid UTF-8.
    BadUtf8,
    /// A payload marked as MessagePack (first byte 0xC1) does not decode.
    BadMsgpack,
    /// The payload is valid JSON but not an object.
    NotObject,
    /// A required field (`type`, `endpoint`, `topic`) is absent.
    MissingField,
    /// A field has the wrong JSON type (e.g. a numeric `to`).
    BadField,
    /// The `type` is not one the bus knows.
    UnknownType,
    /// A second `register` on a connection that is already registered.
    AlreadyRegistered,
    /// `to` names no registered (or recently registered) endpoint.
    EndpointNotFound,
    /// The length header exceeds the maximum frame size; the connection closes.
    FrameTooLarge,
    /// Another connection registered this endpoint name; this one is closed.
    Replaced,
    /// The session was silent past the heartbeat timeout; it is closed.
    HeartbeatTimeout,
    /// The session did not read fast enough and its outbox overflowed.
    SlowConsumer,
    /// The bus is at its connection limit.
    TooManyConnections,
    /// The connecting process belongs to another user.
    PermissionDenied,
    /// The bus is shutting down.
    ShuttingDown,
    /// A topic prefix longer than the limit (`--max-topic-len`).
    TopicTooLong,
    /// The session holds as many subscriptions (or bytes of them) as it
    /// may (`--max-subscriptions`).
    TooManySubscriptions,
    /// An endpoint name longer than 255 bytes.
    NameTooLong,
    /// A message nested deeper than the limit (`--max-depth`); it is not
    /// routed, so no client has to parse it.
    TooDeep,
    /// A frame stayed incomplete past the frame deadline; the connection
    /// closes (a peer trickling a frame holds a buffer for it).
    FrameTimeout,
    /// The bytes buffered for incomplete frames, all connections together,
    /// are at their bound; this connection's large frame is refused and
    /// the connection closes.
    Overloaded,
    /// A message the sender asked a receipt for (`"ack": true`) was not
    /// written: its receiver went away for good before reading it.
    NotDelivered,
    /// A `subscribe` with `"snapshot": true` on a bus that keeps no last
    /// values (started without `--last-value`); nothing was subscribed.
    NoLastValue,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadUtf8 => "bad_utf8",
            ErrorCode::BadMsgpack => "bad_msgpack",
            ErrorCode::NotObject => "not_object",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadField => "bad_field",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::AlreadyRegistered => "already_registered",
            ErrorCode::EndpointNotFound => "endpoint_not_found",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Replaced => "replaced",
            ErrorCode::HeartbeatTimeout => "heartbeat_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::NotDelivered => "not_delivered",
            ErrorCode::TopicTooLong => "topic_too_long",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::NameTooLong => "name_too_long",
            ErrorCode::TooDeep => "too_deep",
            ErrorCode::FrameTimeout => "frame_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NoLastValue => "no_last_value",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol error with its human-readable detail, as sent to a client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct ProtocolError {
    /// The machine-readable code.
    pub code: ErrorCode,
    /// What exactly was wrong, for the person debugging the client.
    pub detail: String,
}

impl ProtocolError {
    /// Builds an error with a detail message.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        ProtocolError {
            code,
            detail: detail.into(),
        }
    }
}
