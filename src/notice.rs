//! What the bus itself says to one session: replies and notices, typed.
//!
//! The router and the transports queue a [`Notice`]; whoever writes it
//! encodes it in the session's wire form ([`Notice::json_frame`] for a
//! JSON session, [`Notice::msgpack_frame`] for a MessagePack one), once.
//! Every reply of the bus is built here and nowhere else: its shape on
//! the wire, its field order, and the stamps it carries (which come in
//! from the caller, so tests control them).

use bytes::{BufMut, Bytes, BytesMut};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::codec::{self, Codec};
use crate::error::ProtocolError;
use crate::router::monitor::{MonitorEvent, MonitorSpec};

/// One reply or notice of the bus to one session.
#[derive(Debug, Clone)]
pub enum Notice {
    /// `register` succeeded: `{"type":"registered","endpoint","session_id"}`.
    Registered {
        /// The name taken.
        endpoint: String,
        /// The session id given to it (a UUID).
        session_id: String,
    },
    /// `{"type":"error","code","detail"[,"id"]}`: a refused request, a
    /// dropped message's receipt, or why the connection is closing.
    Error {
        /// What went wrong.
        error: ProtocolError,
        /// The request's (or message's) `id`, when it had one.
        id: Option<Box<RawValue>>,
    },
    /// `{"type":"ack","id"}` (ours): every copy of the message was written
    /// (or held for its name).
    Ack {
        /// The message's `id`.
        id: Option<Box<RawValue>>,
    },
    /// `{"type":"pong"}`, or `{"type":"pong","keepalive":true}` sent by the
    /// bus to a quiet registered session.
    Pong {
        /// True for a keepalive (not an answer to a `ping`).
        keepalive: bool,
    },
    /// `{"type":"subscribed"|"unsubscribed","topic"}` (ours).
    Subscription {
        /// The prefix.
        topic: String,
        /// Subscribed (true) or unsubscribed.
        subscribed: bool,
        /// For a subscribe with `"snapshot": true`: how many kept values
        /// were sent before this answer (`"snapshot": N`).
        snapshot: Option<u64>,
    },
    /// `{"type":"endpoints_list","endpoints":{name: session_id}}`.
    Endpoints(Vec<(String, String)>),
    /// `{"type":"stats","stats":{..}}` (ours).
    Stats(serde_json::Value),
    /// `{"type":"monitoring","names","topics","transports","body","max_bytes"}`
    /// (ours): the answer to `monitor`, with the filter and bound in force.
    Monitoring(Box<MonitorSpec>),
    /// `{"type":"monitor","kind",..}` (ours): one routed message, sent to
    /// a session that monitors the traffic.
    Monitor(Box<MonitorEvent>),
}

impl Notice {
    /// An error notice.
    pub fn error(error: ProtocolError, id: Option<Box<RawValue>>) -> Notice {
        Notice::Error { error, id }
    }

    /// The `type` it has on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Notice::Registered { .. } => "registered",
            Notice::Error { .. } => "error",
            Notice::Ack { .. } => "ack",
            Notice::Pong { .. } => "pong",
            Notice::Subscription {
                subscribed: true, ..
            } => "subscribed",
            Notice::Subscription { .. } => "unsubscribed",
            Notice::Endpoints(_) => "endpoints_list",
            Notice::Stats(_) => "stats",
            Notice::Monitoring(_) => "monitoring",
            Notice::Monitor(_) => "monitor",
        }
    }

    /// About how many bytes its JSON frame takes, without encoding it (what
    /// a queue charges for it).
    pub fn size_hint(&self) -> usize {
        let id = |id: &Option<Box<RawValue>>| id.as_ref().map_or(0, |i| i.get().len() + 8);
        4 + 32
            + match self {
                Notice::Registered {
                    endpoint,
                    session_id,
                } => endpoint.len() + session_id.len() + 32,
                Notice::Error { error, id: i } => error.detail.len() + 48 + id(i),
                Notice::Ack { id: i } => id(i),
                Notice::Pong { .. } => 20,
                Notice::Subscription { topic, .. } => topic.len() + 40,
                Notice::Endpoints(list) => list.iter().map(|(n, s)| n.len() + s.len() + 6).sum(),
                // Not known without encoding it: a delivery of a stats
                // notice is charged its encoding instead (delivery.rs).
                Notice::Stats(_) => 0,
                Notice::Monitoring(spec) => {
                    64 + [&spec.names, &spec.topics, &spec.transports]
                        .iter()
                        .flat_map(|l| l.iter())
                        .map(|x| x.len() + 3)
                        .sum::<usize>()
                }
                Notice::Monitor(ev) => ev.size_hint(),
            }
    }

    /// Its Unix frame in JSON: 4-byte big-endian length, then the object.
    pub fn json_frame(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.size_hint());
        out.put_u32(0);
        let mut w = out.writer();
        // Serializing our own types into memory cannot fail.
        let _ = serde_json::to_writer(&mut w, self);
        let mut out = w.into_inner();
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out.freeze()
    }

    /// Its Unix frame in MessagePack: length, marker byte, then the map.
    pub fn msgpack_frame(&self) -> Bytes {
        // Through serde_json's Value, which reads the raw JSON ids.
        let payload = serde_json::to_value(self)
            .ok()
            .and_then(|v| codec::encode(Codec::MsgPack, &v).ok())
            .unwrap_or_default();
        let mut out = BytesMut::with_capacity(4 + payload.len());
        out.put_u32(payload.len() as u32);
        out.put_slice(&payload);
        out.freeze()
    }

    /// Its Unix frame in `codec`.
    pub fn frame(&self, codec: Codec) -> Bytes {
        match codec {
            Codec::Json => self.json_frame(),
            Codec::MsgPack => self.msgpack_frame(),
        }
    }
}

impl Serialize for Notice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", self.kind())?;
        match self {
            Notice::Registered {
                endpoint,
                session_id,
            } => {
                m.serialize_entry("endpoint", endpoint)?;
                m.serialize_entry("session_id", session_id)?;
            }
            Notice::Error { error, id } => {
                m.serialize_entry("code", error.code.as_str())?;
                m.serialize_entry("detail", &error.detail)?;
                if let Some(id) = id {
                    m.serialize_entry("id", id)?;
                }
            }
            Notice::Ack { id } => {
                if let Some(id) = id {
                    m.serialize_entry("id", id)?;
                }
            }
            Notice::Pong { keepalive } => {
                if *keepalive {
                    m.serialize_entry("keepalive", &true)?;
                }
            }
            Notice::Subscription {
                topic, snapshot, ..
            } => {
                m.serialize_entry("topic", topic)?;
                if let Some(n) = snapshot {
                    m.serialize_entry("snapshot", n)?;
                }
            }
            Notice::Endpoints(list) => m.serialize_entry("endpoints", &Endpoints(list))?,
            Notice::Stats(v) => m.serialize_entry("stats", v)?,
            Notice::Monitoring(spec) => {
                m.serialize_entry("names", &spec.names)?;
                m.serialize_entry("topics", &spec.topics)?;
                m.serialize_entry("transports", &spec.transports)?;
                m.serialize_entry("body", &spec.body)?;
                m.serialize_entry("max_bytes", &spec.max_bytes)?;
            }
            Notice::Monitor(ev) => ev.write_fields(&mut m)?,
        }
        m.end()
    }
}

/// The `endpoints` object of `endpoints_list`, written from the list
/// without building a map.
struct Endpoints<'a>(&'a [(String, String)]);

impl Serialize for Endpoints<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (name, session) in self.0 {
            m.serialize_entry(name, session)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn json(n: &Notice) -> String {
        let f = n.json_frame();
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4, "the header says the payload's length");
        String::from_utf8(f[4..].to_vec()).expect("UTF-8")
    }

    fn raw(s: &str) -> Option<Box<RawValue>> {
        Some(RawValue::from_string(s.to_owned()).expect("JSON"))
    }

    #[test]
    fn each_notice_has_the_protocols_shape() {
        let cases = [
            (
                Notice::Registered {
                    endpoint: "a".into(),
                    session_id: "u-1".into(),
                },
                r#"{"type":"registered","endpoint":"a","session_id":"u-1"}"#,
            ),
            (
                Notice::error(
                    ProtocolError::new(
                        ErrorCode::EndpointNotFound,
                        "Endpoint 'b' is not connected",
                    ),
                    raw(r#""m-7""#),
                ),
                r#"{"type":"error","code":"endpoint_not_found","detail":"Endpoint 'b' is not connected","id":"m-7"}"#,
            ),
            (Notice::Ack { id: raw("42") }, r#"{"type":"ack","id":42}"#),
            (Notice::Pong { keepalive: false }, r#"{"type":"pong"}"#),
            (
                Notice::Pong { keepalive: true },
                r#"{"type":"pong","keepalive":true}"#,
            ),
            (
                Notice::Subscription {
                    topic: "md/".into(),
                    subscribed: true,
                    snapshot: Some(3),
                },
                r#"{"type":"subscribed","topic":"md/","snapshot":3}"#,
            ),
            (
                Notice::Subscription {
                    topic: "md/".into(),
                    subscribed: false,
                    snapshot: None,
                },
                r#"{"type":"unsubscribed","topic":"md/"}"#,
            ),
            (
                Notice::Endpoints(vec![("a".into(), "1".into()), ("b\"".into(), "2".into())]),
                r#"{"type":"endpoints_list","endpoints":{"a":"1","b\"":"2"}}"#,
            ),
            (
                Notice::Stats(serde_json::json!({"n": 1})),
                r#"{"type":"stats","stats":{"n":1}}"#,
            ),
        ];
        for (n, want) in cases {
            assert_eq!(json(&n), want);
            assert!(n.size_hint() >= 4, "{n:?}");
        }
    }

    #[test]
    fn the_msgpack_form_is_the_same_object() {
        let n = Notice::error(
            ProtocolError::new(ErrorCode::SlowConsumer, "dropped"),
            raw(r#"{"k":[1,2.5]}"#),
        );
        let f = n.msgpack_frame();
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        assert_eq!(f[4], crate::codec::MSGPACK_MARKER);
        let back: serde_json::Value = codec::decode(&f[4..]).expect("MessagePack");
        let want: serde_json::Value = serde_json::from_str(&json(&n)).expect("JSON");
        assert_eq!(back, want);
        assert_eq!(n.frame(Codec::Json), n.json_frame());
    }
}
