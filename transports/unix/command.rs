//! The Unix protocol's requests as typed commands.
//!
//! [`Command::parse`] reads one decoded message and says what it asks
//! for, or why it is refused (with the `id` to answer with). It is pure:
//! no bus, no socket, no clock, so every rule of the protocol's request
//! layer is tested here without either. The session carries a command
//! out on the bus; a `message` is batched with the ones after it.

use serde_json::value::RawValue;

use crate::codec::Codec;
use crate::error::{ErrorCode, ProtocolError};
use crate::message::BusMessage;

/// What one frame asks the bus for.
// `Message` is by far the most common and is moved on into the routing
// batch: boxing it would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    /// `message`: route to `to`, or to every registered endpoint when
    /// `to` is empty or absent (routing reads the fields it needs).
    Message(BusMessage),
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
    },
    /// `unsubscribe` (ours).
    Unsubscribe {
        /// The prefix.
        topic: String,
    },
    /// `publish` (ours): a topic message.
    Publish(Publish),
}

/// The fields of a `publish`.
#[derive(Debug)]
pub struct Publish {
    /// The topic.
    pub topic: String,
    /// The origin the client named (a registered session's own name wins
    /// over it).
    pub origin: Option<String>,
    /// The payload, raw JSON (`null` when absent).
    pub data: Box<RawValue>,
    /// The client's timestamp, when it gave one.
    pub ts: Option<f64>,
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
        let parsed = match msg.kind() {
            Ok(kind) if kind == "message" => return Ok(Command::Message(msg)),
            Ok(kind) => match kind.as_ref() {
                "ping" => Ok(Command::Ping),
                "register" => register(&msg),
                "list_endpoints" => Ok(Command::ListEndpoints),
                "stats" => Ok(Command::Stats),
                "subscribe" => topic(&msg).map(|topic| Command::Subscribe { topic }),
                "unsubscribe" => topic(&msg).map(|topic| Command::Unsubscribe { topic }),
                "publish" => publish(&mut msg).map(Command::Publish),
                other => Err(ProtocolError::new(
                    ErrorCode::UnknownType,
                    format!("unknown message type '{other}'"),
                )),
            },
            Err(e) => Err(e),
        };
        parsed.map_err(|error| Refused {
            error,
            id: msg.raw("id").map(|r| r.to_raw_value()),
        })
    }
}

/// `register`: a non-empty string `endpoint` (the registry checks the
/// rest) and an optional known `codec`.
fn register(msg: &BusMessage) -> Result<Command, ProtocolError> {
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
        Some(endpoint) => Ok(Command::Register {
            endpoint: endpoint.into_owned(),
            codec,
        }),
        None => Err(ProtocolError::new(
            ErrorCode::MissingField,
            "register needs a string field 'endpoint'",
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

    fn refused(json: &str) -> (ErrorCode, Option<String>) {
        match parse(json) {
            Err(r) => (r.error.code, r.id.map(|i| i.get().to_owned())),
            Ok(c) => panic!("{json} was accepted as {c:?}"),
        }
    }

    #[test]
    fn each_type_becomes_its_command() {
        assert!(matches!(parse(r#"{"type":"ping"}"#), Ok(Command::Ping)));
        assert!(matches!(
            parse(r#"{"type":"list_endpoints"}"#),
            Ok(Command::ListEndpoints)
        ));
        assert!(matches!(parse(r#"{"type":"stats"}"#), Ok(Command::Stats)));
        match parse(r#"{"type":"message","to":"b","body":{"x":[1,2]}}"#) {
            Ok(Command::Message(m)) => {
                assert_eq!(
                    m.raw("body").map(|b| b.get().to_owned()).as_deref(),
                    Some(r#"{"x":[1,2]}"#)
                )
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"subscribe","topic":"md/"}"#) {
            Ok(Command::Subscribe { topic }) => assert_eq!(topic, "md/"),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"unsubscribe"}"#) {
            Ok(Command::Unsubscribe { topic }) => assert_eq!(topic, "", "absent: everything"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn register_takes_an_endpoint_and_an_optional_codec() {
        match parse(r#"{"type":"register","endpoint":"a"}"#) {
            Ok(Command::Register { endpoint, codec }) => {
                assert_eq!((endpoint.as_str(), codec), ("a", Codec::Json))
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"register","endpoint":"a","codec":"msgpack"}"#) {
            Ok(Command::Register { codec, .. }) => assert_eq!(codec, Codec::MsgPack),
            other => panic!("{other:?}"),
        }
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
        match parse(r#"{"type":"publish","topic":"t/1","data":{"p":1.5},"ts":12.5,"origin":"o"}"#) {
            Ok(Command::Publish(p)) => {
                assert_eq!(p.topic, "t/1");
                assert_eq!(p.data.get(), r#"{"p":1.5}"#);
                assert_eq!(p.ts, Some(12.5));
                assert_eq!(p.origin.as_deref(), Some("o"));
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"publish","topic":"t"}"#) {
            Ok(Command::Publish(p)) => {
                assert_eq!((p.data.get(), p.ts, p.origin), ("null", None, None))
            }
            other => panic!("{other:?}"),
        }
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
