//! The Unix protocol's requests as typed commands.
//!
//! [`Command::parse`] reads one decoded message and says what it asks
//! for, or why it is refused (with the `id` to answer with). It is pure:
//! no bus, no socket, no clock, so every rule of the protocol's request
//! layer is tested here without either. A `message` or `publish` is
//! routed (the session batches them: [`Bus::submit`]); any other request
//! is answered at once by [`Request::apply`].

use serde_json::value::RawValue;

use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::error::{ErrorCode, ProtocolError};
use crate::message::BusMessage;
use crate::notice::Notice;
use crate::router::monitor::MonitorSpec;
use crate::router::snapshot::Snapshot;
use crate::router::SessionId;
use crate::transport::{Bus, Inbound, Publish};

/// What one frame asks the bus for.
// Traffic is by far the most common and moves on into the routing batch
// as it is: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    /// Traffic to route: a `message` (to `to`, or broadcast when `to` is
    /// empty or absent) or a `publish` (ours).
    Route(Inbound),
    /// Anything answered at once, and the request's `id` (an error
    /// answer carries it).
    Request(Request, Option<Box<RawValue>>),
}

/// A request the bus answers at once.
#[derive(Debug, PartialEq)]
pub enum Request {
    /// `ping`: answered `pong`.
    Ping,
    /// `register`: take the endpoint name, in the given codec.
    Register {
        /// The endpoint name.
        endpoint: String,
        /// What every frame the bus sends this session from now on is
        /// encoded in (`"codec"`, ours; JSON by default).
        codec: Codec,
    },
    /// `list_endpoints`: answered `endpoints_list`.
    ListEndpoints,
    /// `stats` (ours): answered with the bus's status.
    Stats,
    /// `subscribe` (ours): a topic prefix, `""` for everything.
    Subscribe {
        /// The prefix.
        topic: String,
        /// `"seq"` (ours, optional): from now on this session's topic
        /// deliveries carry their number (`seq`, `seq_origin`), or stop
        /// to (false). Absent: as before.
        seq: Option<bool>,
        /// `"snapshot": true`: first the kept value of every matching topic
        /// (a bus with `--last-value`), then live traffic; the answer comes
        /// after them, with their count.
        snapshot: bool,
    },
    /// `unsubscribe` (ours).
    Unsubscribe {
        /// The prefix.
        topic: String,
    },
    /// `monitor` (ours): from now on, a `monitor` event for each routed
    /// message the filter selects (bounded queue, drops counted).
    Monitor(MonitorSpec),
}

/// Why a frame is refused, and the `id` its error reply carries.
#[derive(Debug)]
pub struct Refused {
    /// The error to answer.
    pub error: ProtocolError,
    /// The request's `id`, when it had one.
    pub id: Option<Box<RawValue>>,
}

impl Command {
    /// What `msg` asks for. A refused one is answered with the error and
    /// changes nothing else.
    pub fn parse(mut msg: BusMessage) -> Result<Command, Refused> {
        // The type is copied (a few bytes, never for a `message`) so the
        // message can be taken apart below.
        let kind = match msg.kind() {
            Ok(kind) if kind == "message" => return Ok(Command::Route(Inbound::Message(msg))),
            Ok(kind) => Ok(kind.into_owned()),
            Err(e) => Err(e),
        };
        let parsed = kind.and_then(|kind| match kind.as_str() {
            "publish" => publish(&mut msg).map(|p| Command::Route(Inbound::Publish(p))),
            "ping" => Ok(Command::Request(Request::Ping, None)),
            "register" => register(&msg).map(|r| Command::Request(r, None)),
            "list_endpoints" => Ok(Command::Request(Request::ListEndpoints, None)),
            "stats" => Ok(Command::Request(Request::Stats, None)),
            "subscribe" => topic(&msg).and_then(|topic| {
                let seq = flag(&msg, "seq")?;
                let snapshot = flag(&msg, "snapshot")?.unwrap_or(false);
                Ok(Command::Request(
                    Request::Subscribe {
                        topic,
                        seq,
                        snapshot,
                    },
                    None,
                ))
            }),
            "unsubscribe" => {
                topic(&msg).map(|topic| Command::Request(Request::Unsubscribe { topic }, None))
            }
            "monitor" => monitor(&msg).map(|spec| Command::Request(Request::Monitor(spec), None)),
            other => Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!("unknown message type '{other}'"),
            )),
        });
        let id = || msg.raw("id").map(|r| r.to_raw_value());
        match parsed {
            Ok(Command::Request(r, _)) => Ok(Command::Request(r, id())),
            Ok(route) => Ok(route),
            Err(error) => Err(Refused { error, id: id() }),
        }
    }
}

impl Request {
    /// Carries the request out for session `sid` and queues its answer.
    /// `codec` is the session's wire form, which a `register` may switch:
    /// the switch is queued in order, ahead of the `registered` reply, so
    /// that reply and everything after it are in the new form. A subscribe
    /// with a snapshot to send returns it: the session sends it a chunk at
    /// a time ([`Bus::snapshot_chunk`]), then answers.
    pub fn apply(
        self,
        bus: &Bus,
        sid: SessionId,
        codec: &mut Codec,
    ) -> Result<Option<Snapshot>, ProtocolError> {
        let reply = |n: Notice| bus.reply(sid, Delivery::notice(n), false);
        match self {
            Request::Ping => reply(Notice::Pong { keepalive: false }),
            Request::Register {
                endpoint,
                codec: wanted,
            } => {
                let before = *codec;
                if wanted != before {
                    bus.reply(sid, Delivery::codec(wanted), false);
                }
                if let Err(e) = bus.register(sid, &endpoint) {
                    if wanted != before {
                        bus.reply(sid, Delivery::codec(before), false);
                    }
                    return Err(e);
                }
                *codec = wanted;
            }
            // The names are copied under the router's lock; the (possibly
            // large) reply is encoded by the writer, outside it.
            Request::ListEndpoints => reply(Notice::Endpoints(bus.endpoints())),
            Request::Stats => reply(Notice::Stats(bus.status())),
            Request::Subscribe {
                topic,
                seq,
                snapshot: false,
            } => {
                bus.subscribe(sid, &topic)?;
                // In order, ahead of the reply: what is queued after the
                // reply is in the new form.
                if let Some(on) = seq {
                    bus.reply(sid, Delivery::seq_switch(on), false);
                }
                reply(Notice::Subscription {
                    topic,
                    subscribed: true,
                    snapshot: None,
                });
            }
            Request::Subscribe {
                topic,
                seq,
                snapshot: true,
            } => match bus.subscribe_snapshot(sid, &topic)? {
                Some(snap) => {
                    // Ahead of the kept values, so they are in the new form.
                    if let Some(on) = seq {
                        bus.reply(sid, Delivery::seq_switch(on), false);
                    }
                    return Ok(Some(snap));
                }
                // Held already: it gets these topics live.
                None => {
                    if let Some(on) = seq {
                        bus.reply(sid, Delivery::seq_switch(on), false);
                    }
                    reply(Notice::Subscription {
                        topic,
                        subscribed: true,
                        snapshot: Some(0),
                    });
                }
            },
            Request::Unsubscribe { topic } => {
                bus.unsubscribe(sid, &topic);
                reply(Notice::Subscription {
                    topic,
                    subscribed: false,
                    snapshot: None,
                });
            }
            Request::Monitor(spec) => {
                let spec = bus.monitor(sid, spec)?;
                reply(Notice::Monitoring(Box::new(spec)));
            }
        }
        Ok(None)
    }

    /// True for a request whose answer is costly to build: the session
    /// lets its worker serve others before it reads the next one.
    pub fn is_costly(&self) -> bool {
        matches!(self, Request::ListEndpoints | Request::Stats)
    }
}

/// `register`: a non-empty string `endpoint` (the registry checks the
/// rest) and an optional known `codec`.
fn register(msg: &BusMessage) -> Result<Request, ProtocolError> {
    let codec = match msg.str_field("codec")? {
        None => Codec::Json,
        Some(name) => Codec::from_name(&name).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::BadField,
                format!("unknown codec '{name}' (json or msgpack)"),
            )
        })?,
    };
    match msg.str_field("endpoint")? {
        Some(endpoint) => Ok(Request::Register {
            endpoint: endpoint.into_owned(),
            codec,
        }),
        None => Err(ProtocolError::new(
            ErrorCode::MissingField,
            "register needs a string field 'endpoint'",
        )),
    }
}

/// `monitor`: optional string lists `names`, `topics`, `transports`, an
/// optional boolean `body` and a byte bound `max_bytes`.
fn monitor(msg: &BusMessage) -> Result<MonitorSpec, ProtocolError> {
    fn field<T: serde::de::DeserializeOwned + Default>(
        msg: &BusMessage,
        key: &str,
        what: &str,
    ) -> Result<T, ProtocolError> {
        match msg.raw(key) {
            None => Ok(T::default()),
            Some(raw) if raw.get() == "null" => Ok(T::default()),
            Some(raw) => serde_json::from_str(raw.get()).map_err(|_| {
                ProtocolError::new(
                    ErrorCode::BadField,
                    format!("monitor: field '{key}' must be {what}"),
                )
            }),
        }
    }
    let spec = MonitorSpec {
        names: field(msg, "names", "a list of strings")?,
        topics: field(msg, "topics", "a list of strings")?,
        transports: field(msg, "transports", "a list of strings")?,
        body: field(msg, "body", "a boolean")?,
        max_bytes: field(msg, "max_bytes", "a number of bytes")?,
    };
    spec.check()?;
    Ok(spec)
}

/// A boolean field: None when absent or null.
fn flag(msg: &BusMessage, key: &str) -> Result<Option<bool>, ProtocolError> {
    match msg.raw(key).map(|r| r.get()) {
        None | Some("null") => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadField,
            format!("field '{key}' must be a boolean"),
        )),
    }
}

/// The `topic` of a (un)subscribe: a string, or everything when absent.
fn topic(msg: &BusMessage) -> Result<String, ProtocolError> {
    Ok(msg
        .str_field("topic")?
        .map(|t| t.into_owned())
        .unwrap_or_default())
}

/// The fields of a `publish`; `data` is taken out of the message (it is
/// the message's bulk: moved, not copied).
fn publish(msg: &mut BusMessage) -> Result<Publish, ProtocolError> {
    let topic = msg
        .str_field("topic")?
        .ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::MissingField,
                "publish needs a string field 'topic'",
            )
        })?
        .into_owned();
    let origin = msg.str_field("origin")?.map(|o| o.into_owned());
    let ts =
        match msg.raw("ts") {
            Some(raw) => Some(serde_json::from_str::<f64>(raw.get()).map_err(|_| {
                ProtocolError::new(ErrorCode::BadField, "field 'ts' must be a number")
            })?),
            None => None,
        };
    let data = msg.remove("data").unwrap_or_else(null);
    Ok(Publish {
        topic,
        origin,
        data,
        ts,
    })
}

/// JSON `null`.
fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Command, Refused> {
        Command::parse(BusMessage::parse(json.as_bytes()).expect("a JSON object"))
    }

    fn request(json: &str) -> Request {
        match parse(json) {
            Ok(Command::Request(r, _)) => r,
            other => panic!("{json}: {other:?}"),
        }
    }

    fn refused(json: &str) -> (ErrorCode, Option<String>) {
        match parse(json) {
            Err(r) => (r.error.code, r.id.map(|i| i.get().to_owned())),
            Ok(c) => panic!("{json} was accepted as {c:?}"),
        }
    }

    #[test]
    fn each_type_becomes_its_command() {
        assert_eq!(request(r#"{"type":"ping"}"#), Request::Ping);
        assert_eq!(
            request(r#"{"type":"list_endpoints"}"#),
            Request::ListEndpoints
        );
        assert_eq!(request(r#"{"type":"stats"}"#), Request::Stats);
        assert_eq!(
            request(r#"{"type":"subscribe","topic":"md/"}"#),
            Request::Subscribe {
                topic: "md/".into(),
                seq: None,
                snapshot: false
            }
        );
        assert_eq!(
            request(r#"{"type":"subscribe","topic":"md/","seq":true}"#),
            Request::Subscribe {
                topic: "md/".into(),
                seq: Some(true),
                snapshot: false
            }
        );
        assert_eq!(
            request(r#"{"type":"subscribe","topic":"md/","snapshot":true}"#),
            Request::Subscribe {
                topic: "md/".into(),
                seq: None,
                snapshot: true
            }
        );
        assert_eq!(
            refused(r#"{"type":"subscribe","topic":"md/","snapshot":"yes","id":3}"#),
            (ErrorCode::BadField, Some("3".to_owned()))
        );
        assert_eq!(
            refused(r#"{"type":"subscribe","topic":"md/","seq":"yes","id":2}"#),
            (ErrorCode::BadField, Some("2".to_owned()))
        );
        assert_eq!(
            request(r#"{"type":"unsubscribe"}"#),
            Request::Unsubscribe { topic: "".into() },
            "absent: everything"
        );
        match parse(r#"{"type":"message","to":"b","body":{"x":[1,2]}}"#) {
            Ok(Command::Route(Inbound::Message(m))) => assert_eq!(
                m.raw("body").map(|b| b.get().to_owned()).as_deref(),
                Some(r#"{"x":[1,2]}"#)
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            request(r#"{"type":"monitor","names":["a"],"body":true,"max_bytes":65536}"#),
            Request::Monitor(MonitorSpec {
                names: vec!["a".into()],
                body: true,
                max_bytes: 65536,
                ..MonitorSpec::default()
            })
        );
        assert_eq!(
            request(r#"{"type":"monitor"}"#),
            Request::Monitor(MonitorSpec::default())
        );
        assert_eq!(
            refused(r#"{"type":"monitor","topics":"md/","id":1}"#),
            (ErrorCode::BadField, Some("1".to_owned()))
        );
        assert!(request(r#"{"type":"stats"}"#).is_costly());
        assert!(!request(r#"{"type":"ping"}"#).is_costly());
    }

    #[test]
    fn register_takes_an_endpoint_and_an_optional_codec() {
        assert_eq!(
            request(r#"{"type":"register","endpoint":"a"}"#),
            Request::Register {
                endpoint: "a".into(),
                codec: Codec::Json
            }
        );
        assert_eq!(
            request(r#"{"type":"register","endpoint":"a","codec":"msgpack"}"#),
            Request::Register {
                endpoint: "a".into(),
                codec: Codec::MsgPack
            }
        );
        assert_eq!(refused(r#"{"type":"register"}"#).0, ErrorCode::MissingField);
        assert_eq!(
            refused(r#"{"type":"register","endpoint":7,"id":"r1"}"#),
            (ErrorCode::BadField, Some(r#""r1""#.to_owned()))
        );
        assert_eq!(
            refused(r#"{"type":"register","endpoint":"a","codec":"xml"}"#).0,
            ErrorCode::BadField
        );
    }

    #[test]
    fn publish_reads_its_fields_and_moves_the_data() {
        let publish = |json: &str| match parse(json) {
            Ok(Command::Route(Inbound::Publish(p))) => p,
            other => panic!("{json}: {other:?}"),
        };
        let p =
            publish(r#"{"type":"publish","topic":"t/1","data":{"p":1.5},"ts":12.5,"origin":"o"}"#);
        assert_eq!(p.topic, "t/1");
        assert_eq!(p.data.get(), r#"{"p":1.5}"#);
        assert_eq!(p.ts, Some(12.5));
        assert_eq!(p.origin.as_deref(), Some("o"));
        let p = publish(r#"{"type":"publish","topic":"t"}"#);
        assert_eq!((p.data.get(), p.ts, p.origin), ("null", None, None));
        assert_eq!(
            refused(r#"{"type":"publish","data":1,"id":5}"#),
            (ErrorCode::MissingField, Some("5".to_owned()))
        );
        assert_eq!(
            refused(r#"{"type":"publish","topic":"t","ts":"now"}"#).0,
            ErrorCode::BadField
        );
    }

    #[test]
    fn unknown_or_missing_types_are_refused_with_the_id() {
        assert_eq!(
            refused(r#"{"type":"launch","id":"x"}"#),
            (ErrorCode::UnknownType, Some(r#""x""#.to_owned()))
        );
        assert_eq!(refused(r#"{"to":"b"}"#).0, ErrorCode::MissingField);
        assert_eq!(refused(r#"{"type":3}"#).0, ErrorCode::BadField);
    }
}
