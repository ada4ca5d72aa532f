//! The pub-sub `Envelope` (topic, origin, data, ts) and the `Message`
//! struct model of `hermes-zmq` 1.3.0.
//!
//! On the wire an envelope is four frames, each a JSON document: the topic
//! (a JSON string), the origin (a JSON string), the data (any JSON value; a
//! message struct is the array `[dtype, ts, field1, ...]`) and the send time
//! (a JSON number). Strings are written the way Python's `json.dumps` writes
//! them by default (`ensure_ascii`: every non-ASCII character as `\uXXXX`),
//! so that byte-prefix subscriptions match between Python peers and ours.
//!
//! Message structs are declared with [`message_struct!`](crate::message_struct); a [`Registry`]
//! maps a `dtype` to the Rust type that decodes it, and anything else stays
//! raw JSON.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::{DeserializeOwned, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::codec::{self, Codec, CodecError};

#[doc(hidden)]
pub use serde as __serde;

/// Why an envelope could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The message did not have exactly four frames.
    #[error("expected 4 frames, got {0}")]
    FrameCount(usize),
    /// The topic frame was not a JSON string.
    #[error("topic frame is not a JSON string")]
    BadTopic,
    /// The origin frame was not a JSON string.
    #[error("origin frame is not a JSON string")]
    BadOrigin,
    /// The ts frame was not a JSON number.
    #[error("ts frame is not a JSON number")]
    BadTs,
    /// The data frame could not be decoded in its codec.
    #[error("data frame: {0}")]
    Data(#[from] CodecError),
}

pub use crate::clock::unix_now;

/// Appends `s` as a JSON string the way Python's `json.dumps` does by
/// default: `"`, `\` and control characters escaped, and every non-ASCII
/// character as `\uXXXX` (UTF-16 surrogate pairs above U+FFFF).
/// `close` false leaves the closing quote off (a subscription prefix).
pub fn write_ascii_json_str(s: &str, close: bool, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    let bytes = s.as_bytes();
    // Fast path: copy runs of plain ASCII in one go.
    for (i, ch) in s.char_indices() {
        let c = ch as u32;
        let plain = (0x20..0x7f).contains(&c) && ch != '"' && ch != '\\';
        if plain {
            continue;
        }
        out.extend_from_slice(&bytes[run_start..i]);
        run_start = i + ch.len_utf8();
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\u{7f}' => out.push(0x7f),
            _ => {
                let mut units = [0u16; 2];
                for u in ch.encode_utf16(&mut units).iter() {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(HEX[((u >> shift) & 0xf) as usize]);
                    }
                }
            }
        }
    }
    out.extend_from_slice(&bytes[run_start..]);
    if close {
        out.push(b'"');
    }
}

/// The topic frame of `topic`: a JSON string, ASCII-escaped.
pub fn topic_frame(topic: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + 2);
    write_ascii_json_str(topic, true, &mut out);
    out
}

/// The ZeroMQ subscription bytes for a topic prefix: the opening quote and
/// the escaped prefix, no closing quote (`RAW/` → `"RAW/`). The empty prefix
/// gives the empty subscription (everything, as the reference subscribes).
pub fn subscription_for(prefix: &str) -> Vec<u8> {
    if prefix.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(prefix.len() + 1);
    write_ascii_json_str(prefix, false, &mut out);
    out
}

/// A message struct: serialized as `[dtype, ts, fields...]`.
/// Implemented by [`message_struct!`](crate::message_struct); implement it by hand only together
/// with that array form.
pub trait MessageStruct: Serialize + DeserializeOwned + fmt::Debug + Send + Sync + 'static {
    /// The `dtype` on the wire (the reference uses the class name).
    const DTYPE: &'static str;
    /// The struct's own timestamp (float Unix seconds).
    fn ts(&self) -> f64;
}

/// A decoded message struct of any registered type.
pub trait AnyMessage: fmt::Debug + Send + Sync + 'static {
    /// Its `dtype`.
    fn dtype(&self) -> &'static str;
    /// Its timestamp.
    fn ts(&self) -> f64;
    /// Encodes it in `codec`.
    fn encode(&self, codec: Codec) -> Result<Vec<u8>, CodecError>;
    /// For downcasting to the concrete struct.
    fn as_any(&self) -> &dyn Any;
}

impl<T: MessageStruct> AnyMessage for T {
    fn dtype(&self) -> &'static str {
        T::DTYPE
    }
    fn ts(&self) -> f64 {
        MessageStruct::ts(self)
    }
    fn encode(&self, codec: Codec) -> Result<Vec<u8>, CodecError> {
        codec::encode(codec, self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Declares a message struct: a Rust struct with a leading `ts: f64`,
/// serialized as the array `[dtype, ts, field1, field2, ...]` of the
/// reference (base class fields first), and a [`MessageStruct`] impl.
///
/// ```
/// hermes_bus::message_struct! {
///     /// A heartbeat.
///     pub struct Beat = "Beat" {
///         /// Sequence number.
///         pub seq: u64,
///     }
/// }
/// let b = Beat { ts: 1.0, seq: 7 };
/// assert_eq!(serde_json::to_string(&b).unwrap(), r#"["Beat",1.0,7]"#);
/// ```
#[macro_export]
macro_rules! message_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident = $dtype:literal {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis struct $name {
            /// When the message was created (float Unix seconds); the
            /// reference's `Message.ts`.
            pub ts: f64,
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $crate::transports::zmq::envelope::MessageStruct for $name {
            const DTYPE: &'static str = $dtype;
            fn ts(&self) -> f64 {
                self.ts
            }
        }

        impl $crate::transports::zmq::envelope::__serde::Serialize for $name {
            fn serialize<S>(&self, s: S) -> ::core::result::Result<S::Ok, S::Error>
            where
                S: $crate::transports::zmq::envelope::__serde::Serializer,
            {
                use $crate::transports::zmq::envelope::__serde::ser::SerializeTuple;
                let n = 2usize $( + { let _ = stringify!($field); 1usize } )*;
                let mut t = s.serialize_tuple(n)?;
                t.serialize_element($dtype)?;
                t.serialize_element(&self.ts)?;
                $( t.serialize_element(&self.$field)?; )*
                t.end()
            }
        }

        impl<'de> $crate::transports::zmq::envelope::__serde::Deserialize<'de> for $name {
            fn deserialize<D>(d: D) -> ::core::result::Result<Self, D::Error>
            where
                D: $crate::transports::zmq::envelope::__serde::Deserializer<'de>,
            {
                use $crate::transports::zmq::envelope::__serde::de::{Error, IgnoredAny, SeqAccess, Visitor};
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut ::core::fmt::Formatter) -> ::core::fmt::Result {
                        f.write_str(concat!("a ", $dtype, " array [dtype, ts, ...]"))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> ::core::result::Result<$name, A::Error> {
                        let mut idx = 0usize;
                        let dtype: ::std::borrow::Cow<'de, str> = a
                            .next_element()?
                            .ok_or_else(|| A::Error::invalid_length(idx, &self))?;
                        if dtype != $dtype {
                            return Err(A::Error::custom(format!(
                                "dtype {dtype:?} is not {:?}", $dtype
                            )));
                        }
                        idx += 1;
                        let ts: f64 = a
                            .next_element()?
                            .ok_or_else(|| A::Error::invalid_length(idx, &self))?;
                        $(
                            idx += 1;
                            let $field: $ty = a
                                .next_element()?
                                .ok_or_else(|| A::Error::invalid_length(idx, &self))?;
                        )*
                        let _ = idx;
                        // Extra trailing elements are ignored, as the
                        // reference's `load` zips fields with values.
                        while a.next_element::<IgnoredAny>()?.is_some() {}
                        Ok($name { ts $(, $field)* })
                    }
                }
                d.deserialize_seq(V)
            }
        }
    };
}

message_struct! {
    /// The reference's base `Message` (dtype `Message`): just `dtype` and
    /// `ts`. Subclass-like structs add fields after `ts`.
    pub struct Message = "Message" {}
}

message_struct! {
    /// A top-of-book quote (dtype `Quote`). Not in the reference package
    /// (its structs module defines only `Message`); ours, for market-data
    /// feeds, in the same array form.
    pub struct Quote = "Quote" {
        /// Instrument symbol, e.g. `AAPL`.
        pub symbol: String,
        /// Best bid price.
        pub bid: f64,
        /// Size at the best bid.
        pub bid_size: f64,
        /// Best ask price.
        pub ask: f64,
        /// Size at the best ask.
        pub ask_size: f64,
    }
}

message_struct! {
    /// A trade print (dtype `Trade`). Ours, like [`Quote`].
    pub struct Trade = "Trade" {
        /// Instrument symbol, e.g. `AAPL`.
        pub symbol: String,
        /// Trade price.
        pub price: f64,
        /// Trade size.
        pub size: f64,
        /// Aggressor side: `buy`, `sell` or empty when unknown.
        pub side: String,
    }
}

/// The `data` of an envelope: raw JSON, or a decoded message struct.
#[derive(Debug, Clone)]
pub enum Data {
    /// Any JSON value, kept as text (unknown or no dtype).
    Json(Box<RawValue>),
    /// A message struct whose dtype is registered.
    Typed(Arc<dyn AnyMessage>),
}

impl Data {
    /// Data from any serializable value (as JSON).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Data, CodecError> {
        Ok(Data::Json(serde_json::value::to_raw_value(value)?))
    }

    /// Data from a message struct.
    pub fn typed<T: MessageStruct>(msg: T) -> Data {
        Data::Typed(Arc::new(msg))
    }

    /// The struct, when this is a `T`.
    pub fn downcast_ref<T: MessageStruct>(&self) -> Option<&T> {
        match self {
            Data::Typed(m) => m.as_any().downcast_ref::<T>(),
            Data::Json(_) => None,
        }
    }

    /// The dtype: a typed struct's, or the first element of a JSON array
    /// when that is a string.
    pub fn dtype(&self) -> Option<String> {
        match self {
            Data::Typed(m) => Some(m.dtype().to_owned()),
            Data::Json(raw) => peek_dtype(raw.get().as_bytes()),
        }
    }

    /// Encodes the data frame in `codec`.
    pub fn encode(&self, codec: Codec) -> Result<Vec<u8>, CodecError> {
        match (self, codec) {
            (Data::Typed(m), c) => m.encode(c),
            (Data::Json(raw), Codec::Json) => Ok(raw.get().as_bytes().to_vec()),
            (Data::Json(raw), Codec::MsgPack) => codec::json_to_msgpack(raw),
        }
    }

    /// The data as raw JSON (typed structs are serialized).
    pub fn to_raw_json(&self) -> Result<Box<RawValue>, CodecError> {
        match self {
            Data::Json(raw) => Ok(raw.clone()),
            Data::Typed(m) => {
                let bytes = m.encode(Codec::Json)?;
                codec::to_raw_json(&bytes)
            }
        }
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        match (self.to_raw_json(), other.to_raw_json()) {
            (Ok(a), Ok(b)) => a.get() == b.get(),
            _ => false,
        }
    }
}

impl<T: MessageStruct> From<T> for Data {
    fn from(msg: T) -> Data {
        Data::typed(msg)
    }
}

impl From<Box<RawValue>> for Data {
    fn from(raw: Box<RawValue>) -> Data {
        Data::Json(raw)
    }
}

/// Reads the first element of a payload (either codec) when the payload is
/// an array whose first element is a string: the dtype.
pub fn peek_dtype(payload: &[u8]) -> Option<String> {
    struct Head;
    impl<'de> Visitor<'de> for Head {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            // A non-string first element is not a dtype: no error, None.
            let first: Option<serde_json::Value> = a.next_element()?;
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(match first {
                Some(serde_json::Value::String(s)) => Some(s),
                _ => None,
            })
        }
    }
    struct HeadSeed;
    impl<'de> serde::de::DeserializeSeed<'de> for HeadSeed {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(Head)
        }
    }
    let first = *payload.first()?;
    match Codec::detect(payload) {
        Codec::Json => {
            if first != b'[' && !first.is_ascii_whitespace() {
                return None;
            }
            let mut de = serde_json::Deserializer::from_slice(payload);
            serde::de::DeserializeSeed::deserialize(HeadSeed, &mut de)
                .ok()
                .flatten()
        }
        Codec::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(&payload[1..]);
            serde::de::DeserializeSeed::deserialize(HeadSeed, &mut de)
                .ok()
                .flatten()
        }
    }
}

type DecodeFn = fn(&[u8]) -> Result<Arc<dyn AnyMessage>, CodecError>;

fn decode_as<T: MessageStruct>(payload: &[u8]) -> Result<Arc<dyn AnyMessage>, CodecError> {
    Ok(Arc::new(codec::decode::<T>(payload)?))
}

/// Maps a `dtype` to the struct that decodes it. Unknown dtypes stay raw.
#[derive(Clone)]
pub struct Registry {
    /// dtype → decoder of that struct, from either codec.
    decoders: HashMap<&'static str, DecodeFn>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_set().entries(self.decoders.keys()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin()
    }
}

impl Registry {
    /// A registry with no types (everything stays raw JSON).
    pub fn empty() -> Registry {
        Registry {
            decoders: HashMap::new(),
        }
    }

    /// A registry with the built-in structs: [`Message`], [`Quote`], [`Trade`].
    pub fn builtin() -> Registry {
        let mut r = Registry::empty();
        r.register::<Message>();
        r.register::<Quote>();
        r.register::<Trade>();
        r
    }

    /// The shared built-in registry.
    pub fn shared() -> Arc<Registry> {
        static SHARED: OnceLock<Arc<Registry>> = OnceLock::new();
        SHARED.get_or_init(|| Arc::new(Registry::builtin())).clone()
    }

    /// Registers `T` under its dtype (replacing an earlier one).
    pub fn register<T: MessageStruct>(&mut self) -> &mut Self {
        self.decoders.insert(T::DTYPE, decode_as::<T>);
        self
    }

    /// Whether a dtype is known.
    pub fn knows(&self, dtype: &str) -> bool {
        self.decoders.contains_key(dtype)
    }

    /// Decodes a data payload (either codec): the registered struct for its
    /// dtype, raw JSON otherwise (also when the struct does not fit, as the
    /// reference keeps what it cannot load). Errors only on a payload that
    /// is not valid in its codec.
    pub fn decode(&self, payload: &[u8]) -> Result<Data, CodecError> {
        if let Some(dtype) = peek_dtype(payload) {
            if let Some(dec) = self.decoders.get(dtype.as_str()) {
                if let Ok(m) = dec(payload) {
                    // serde_json does not check the UTF-8 of what a struct
                    // skips (extra trailing elements): a JSON payload that
                    // is not UTF-8 is refused below, as raw JSON is.
                    if Codec::detect(payload) == Codec::MsgPack
                        || std::str::from_utf8(payload).is_ok()
                    {
                        return Ok(Data::Typed(m));
                    }
                }
            }
        }
        Ok(Data::Json(codec::to_raw_json(payload)?))
    }
}

/// A topic envelope: what hermes pub-sub carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The topic, e.g. `RAW/node1`; subscriptions match a prefix of it.
    pub topic: String,
    /// The sending node's name.
    pub origin: String,
    /// The payload.
    pub data: Data,
    /// Float Unix seconds, set when the envelope is sent.
    pub ts: f64,
    /// Its number, when it arrived numbered (a `Receiver` that asked for
    /// numbers; see `sequence.rs`). Never sent by `Publisher::publish`,
    /// which numbers on its own.
    pub seq: Option<crate::seq::Seq>,
}

impl Envelope {
    /// An envelope stamped now.
    pub fn new(
        topic: impl Into<String>,
        origin: impl Into<String>,
        data: impl Into<Data>,
    ) -> Envelope {
        Envelope {
            topic: topic.into(),
            origin: origin.into(),
            data: data.into(),
            ts: unix_now(),
            seq: None,
        }
    }

    /// The four frames, data in `codec`, with this envelope's `ts`.
    pub fn to_frames(&self, codec: Codec) -> Result<[Vec<u8>; 4], EnvelopeError> {
        let mut origin = Vec::with_capacity(self.origin.len() + 2);
        write_ascii_json_str(&self.origin, true, &mut origin);
        let ts = serde_json::to_vec(&self.ts).map_err(CodecError::from)?;
        Ok([
            topic_frame(&self.topic),
            origin,
            self.data.encode(codec)?,
            ts,
        ])
    }

    /// Decodes four frames (data in either codec; see [`Registry::decode`]).
    pub fn from_frames<F: AsRef<[u8]>>(
        frames: &[F],
        registry: &Registry,
    ) -> Result<Envelope, EnvelopeError> {
        let [topic, origin, data, ts] = frames else {
            return Err(EnvelopeError::FrameCount(frames.len()));
        };
        let (topic, origin, ts) = parse_header(topic.as_ref(), origin.as_ref(), ts.as_ref())?;
        let data = registry.decode(data.as_ref())?;
        Ok(Envelope {
            topic,
            origin,
            data,
            ts,
            seq: None,
        })
    }
}

/// Parses the topic, origin and ts frames of an envelope.
pub fn parse_header(
    topic: &[u8],
    origin: &[u8],
    ts: &[u8],
) -> Result<(String, String, f64), EnvelopeError> {
    let topic: String = serde_json::from_slice(topic).map_err(|_| EnvelopeError::BadTopic)?;
    let origin: String = serde_json::from_slice(origin).map_err(|_| EnvelopeError::BadOrigin)?;
    let ts = parse_ts(ts).ok_or(EnvelopeError::BadTs)?;
    Ok((topic, origin, ts))
}

/// Parses a ts frame (a JSON number).
pub fn parse_ts(frame: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(frame).ok()?.trim();
    let first = *s.as_bytes().first()?;
    if !(first == b'-' || first.is_ascii_digit()) {
        return None;
    }
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A cheap check that four frames look like an envelope, without decoding
/// the data: topic and origin are quoted strings, ts is a number, and data
/// is non-empty. Used on the proxy's hot path.
pub fn looks_like_envelope<F: AsRef<[u8]>>(frames: &[F]) -> bool {
    let [topic, origin, data, ts] = frames else {
        return false;
    };
    let quoted = |b: &[u8]| b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"';
    quoted(topic.as_ref())
        && quoted(origin.as_ref())
        && !data.as_ref().is_empty()
        && parse_ts(ts.as_ref()).is_some()
}

// Serde helper so `Data` can be part of serializable structs (as JSON).
impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Data::Json(raw) => raw.serialize(s),
            Data::Typed(_) => match self.to_raw_json() {
                Ok(raw) => raw.serialize(s),
                Err(e) => Err(serde::ser::Error::custom(e)),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Data, D::Error> {
        Ok(Data::Json(Box::<RawValue>::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_escaping_like_python() {
        assert_eq!(topic_frame("RAW/n1"), br#""RAW/n1""#.to_vec());
        assert_eq!(
            topic_frame("é/€/😀"),
            br#""\u00e9/\u20ac/\ud83d\ude00""#.to_vec()
        );
        assert_eq!(
            topic_frame("a\"b\\c\n\u{1}"),
            br#""a\"b\\c\n\u0001""#.to_vec()
        );
        assert_eq!(subscription_for("RAW/"), b"\"RAW/".to_vec());
        assert_eq!(subscription_for(""), Vec::<u8>::new());
    }

    #[test]
    fn structs_roundtrip_and_registry() {
        let q = Quote {
            ts: 1.5,
            symbol: "AAPL".into(),
            bid: 1.0,
            bid_size: 2.0,
            ask: 3.0,
            ask_size: 4.0,
        };
        let json = serde_json::to_string(&q).expect("ser");
        assert_eq!(json, r#"["Quote",1.5,"AAPL",1.0,2.0,3.0,4.0]"#);
        let reg = Registry::builtin();
        for c in [Codec::Json, Codec::MsgPack] {
            let bytes = codec::encode(c, &q).expect("enc");
            let d = reg.decode(&bytes).expect("dec");
            assert_eq!(d.downcast_ref::<Quote>(), Some(&q));
        }
        let d = reg.decode(br#"["Unknown", 1, 2]"#).expect("raw");
        assert!(matches!(d, Data::Json(_)));
        assert_eq!(d.dtype().as_deref(), Some("Unknown"));
        let d = reg
            .decode(br#"["Quote", 1]"#)
            .expect("short quote stays raw");
        assert!(matches!(d, Data::Json(_)));
        assert!(reg.decode(b"not json").is_err());
        let m = reg.decode(br#"["Message", 2.5]"#).expect("msg");
        assert_eq!(m.downcast_ref::<Message>(), Some(&Message { ts: 2.5 }));
    }

    #[test]
    fn typed_decode_refuses_bad_utf8_like_raw_json() {
        // Found by the `envelope` fuzz target: bad UTF-8 in an element the
        // struct ignores was accepted as a typed `Message`.
        let data = b"[\"Message\",1.5,\"x\xf2a\"]";
        assert!(codec::to_raw_json(data).is_err());
        assert!(Registry::builtin().decode(data).is_err());
        let frames = [&b"\"T\""[..], b"\"o\"", data, b"-0"];
        assert!(Envelope::from_frames(&frames, &Registry::builtin()).is_err());
    }

    #[test]
    fn envelope_frames_roundtrip() {
        let e = Envelope {
            topic: "RAW/x".into(),
            origin: "x".into(),
            data: Data::json(&[1, 2]).expect("j"),
            ts: 3.25,
            seq: None,
        };
        let f = e.to_frames(Codec::Json).expect("frames");
        assert!(looks_like_envelope(&f));
        let back = Envelope::from_frames(&f, &Registry::builtin()).expect("back");
        assert_eq!(back, e);
        assert!(matches!(
            Envelope::from_frames(&f[..3], &Registry::builtin()),
            Err(EnvelopeError::FrameCount(3))
        ));
    }
}
