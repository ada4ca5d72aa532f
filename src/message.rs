//! `BusMessage`: one JSON object of the Unix-socket protocol.
//!
//! The bus reads only what routing needs (`type`, `to`, `from`, `id`, `ts`,
//! `endpoint`, `topic`); every field is kept as raw JSON text in arrival
//! order, so `body` and any unknown field pass through byte for byte and the
//! payload is never parsed into a tree or re-serialized.
//!
//! Parsing copies the frame once into a shared buffer and records where
//! each key and value lies in it: no allocation per field. A message the
//! bus did not change is sent on as that very buffer (header included),
//! so the common case (a client that sets `id`, `ts` and its own `from`)
//! costs one copy and no encoding; a changed one is encoded compactly.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{ErrorCode, ProtocolError};

mod fallback;
mod fields;
mod scan;

use fallback::serde_spans;
use fields::{Fields, Text};

/// The raw JSON text of one field value, borrowed from a [`BusMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawJson<'a>(&'a str);

impl<'a> RawJson<'a> {
    /// The JSON text, exactly as received (or as set).
    pub fn get(&self) -> &'a str {
        self.0
    }

    /// An owned copy as a `RawValue`.
    pub fn to_raw_value(&self) -> Box<RawValue> {
        RawValue::from_string(self.0.to_owned()).unwrap_or_else(|_| null_raw())
    }
}

impl fmt::Display for RawJson<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// How deep a message may nest by default: serde_json's own recursion
/// limit, so every client built on it (ours included) can read whatever
/// the bus forwards. Its counter starts at 128 and fails on entering the
/// 128th container, so it reads 127 levels at most (found by fuzzing).
pub const MAX_DEPTH: usize = 127;

fn null_raw() -> Box<RawValue> {
    // "null" is valid JSON, so this never falls back further.
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is valid JSON"))
}

/// A JSON object whose values are kept as raw JSON text.
#[derive(Debug, Clone)]
pub struct BusMessage {
    /// The frame it was parsed from: 4-byte length, then the JSON payload.
    /// Empty for a message built in code.
    src: Bytes,
    /// Fields in arrival order; a repeated key keeps its last value (in
    /// the place of its first), as Python's `json.loads` does.
    fields: Fields,
    /// True when `src` no longer says what the fields say (a field was
    /// set or removed, a key repeated, or there is no `src`).
    changed: bool,
    /// Where the keys routing reads on every message (`type`, `to`,
    /// `from`, `id`, `ts`) are in `fields`, or [`ABSENT`].
    known: [u32; KNOWN.len()],
}

/// The keys looked up on every routed message, indexed at parse time.
const KNOWN: [&[u8]; 5] = [b"type", b"to", b"from", b"id", b"ts"];
const ABSENT: u32 = u32::MAX;

/// The slot of a known key (a `match`, compiled to a switch on length
/// and a compare: this runs for every key of every message).
fn known_slot(key: &[u8]) -> Option<usize> {
    let slot = match key {
        b"type" => 0,
        b"to" => 1,
        b"from" => 2,
        b"id" => 3,
        b"ts" => 4,
        _ => return None,
    };
    debug_assert_eq!(KNOWN[slot], key);
    Some(slot)
}

impl Default for BusMessage {
    fn default() -> Self {
        BusMessage::new()
    }
}

impl BusMessage {
    /// An empty object.
    pub fn new() -> Self {
        BusMessage {
            src: Bytes::new(),
            fields: Fields::default(),
            changed: true,
            known: [ABSENT; KNOWN.len()],
        }
    }

    /// A `{"type": kind}` object.
    pub fn with_type(kind: &str) -> Self {
        let mut m = BusMessage::new();
        m.set_str("type", kind);
        m
    }

    /// Parses one frame's payload. Distinguishes bad UTF-8, bad JSON and
    /// JSON that is not an object, so the client gets a precise error.
    /// Nests at most [`MAX_DEPTH`] levels.
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        Self::parse_limited(payload, MAX_DEPTH)
    }

    /// [`BusMessage::parse`] with a nesting limit (the top-level object is
    /// depth 1; deeper is `too_deep`).
    pub fn parse_limited(payload: &[u8], max_depth: usize) -> Result<Self, ProtocolError> {
        // One copy, into the buffer the message keeps (and is sent on as
        // when unchanged); validated once, there.
        let mut src = BytesMut::with_capacity(4 + payload.len());
        src.put_u32(payload.len() as u32);
        src.put_slice(payload);
        Self::parse_frame_limited(src.freeze(), max_depth)
    }

    /// Parses a whole frame (4-byte big-endian length, then the payload)
    /// without copying it: the message keeps `frame` and, unchanged, is
    /// sent on as it. The length header must match the payload. Nests at
    /// most [`MAX_DEPTH`] levels.
    pub fn parse_frame(frame: Bytes) -> Result<Self, ProtocolError> {
        Self::parse_frame_limited(frame, MAX_DEPTH)
    }

    /// [`BusMessage::parse_frame`] with a nesting limit.
    pub fn parse_frame_limited(frame: Bytes, max_depth: usize) -> Result<Self, ProtocolError> {
        let src = frame;
        let announced = src
            .get(..4)
            .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize);
        if announced != Some(src.len().saturating_sub(4)) {
            return Err(ProtocolError::new(
                ErrorCode::BadJson,
                "frame length header does not match its payload",
            ));
        }
        // The message keeps the frame; the fields are recorded into it in
        // place (spans of the frame).
        let mut m = BusMessage {
            src,
            fields: Fields::default(),
            changed: false,
            known: [ABSENT; KNOWN.len()],
        };
        // The scanner checks UTF-8 and JSON in one pass and decides valid
        // payloads. Anything it refuses is looked at as before: UTF-8
        // first (bad_utf8), then too deep (refused outright: no client
        // should have to parse it), then serde_json, which gives the error
        // (or, should the two ever disagree, the answer).
        let mut too_deep = false;
        m.changed = match scan::object_into(&m.src[4..], &mut m.fields, max_depth, &mut too_deep) {
            Some(repeated) => repeated,
            None => {
                let text = utf8(&m.src[4..])?;
                let first = text.trim_start().as_bytes().first().copied();
                if first != Some(b'{') {
                    return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                        Ok(_) => ProtocolError::new(
                            ErrorCode::NotObject,
                            "payload is JSON but not an object",
                        ),
                        Err(e) => ProtocolError::new(
                            ErrorCode::BadJson,
                            format!("payload is not valid JSON ({e})"),
                        ),
                    });
                }
                if too_deep {
                    return Err(ProtocolError::new(
                        ErrorCode::TooDeep,
                        format!("payload nests deeper than {max_depth} levels"),
                    ));
                }
                let spans = serde_spans(text).map_err(|e| {
                    ProtocolError::new(
                        ErrorCode::BadJson,
                        format!("payload is not valid JSON ({e})"),
                    )
                })?;
                m.fields = spans.fields;
                spans.repeated
            }
        };
        m.reindex();
        Ok(m)
    }

    fn bytes_of<'a>(&'a self, t: &'a Text) -> &'a [u8] {
        match t {
            Text::Span(a, b) => &self.src[*a as usize..*b as usize],
            Text::Owned(s) => s.as_bytes(),
        }
    }

    fn str_of<'a>(&'a self, t: &'a Text) -> &'a str {
        match t {
            // Spans lie in a payload checked to be UTF-8 (the scanner, or
            // serde_json, accepted all of it before any span was kept) and
            // start and end on token boundaries, which are ASCII: checked
            // again in debug builds only (a per-field check cost 2-3 % of
            // the bus's CPU time per message).
            Text::Span(..) => {
                let b = self.bytes_of(t);
                debug_assert!(std::str::from_utf8(b).is_ok());
                // SAFETY: `b` is valid UTF-8, as said above.
                unsafe { std::str::from_utf8_unchecked(b) }
            }
            Text::Owned(s) => s,
        }
    }

    /// Rebuilds the positions of the known keys.
    fn reindex(&mut self) {
        let mut known = [ABSENT; KNOWN.len()];
        for (i, (k, _)) in self.fields.iter().enumerate() {
            if let Some(slot) = known_slot(self.bytes_of(k)) {
                known[slot] = i as u32;
            }
        }
        self.known = known;
    }

    fn find(&self, key: &str) -> Option<usize> {
        let key = key.as_bytes();
        if let Some(slot) = known_slot(key) {
            let i = self.known[slot];
            return (i != ABSENT).then_some(i as usize);
        }
        self.fields.iter().position(|(k, _)| {
            let k = self.bytes_of(k);
            k.len() == key.len() && k.first() == key.first() && k == key
        })
    }

    /// The raw JSON text of a field.
    pub fn raw(&self, key: &str) -> Option<RawJson<'_>> {
        let i = self.find(key)?;
        Some(RawJson(self.str_of(&self.fields[i].1)))
    }

    /// True when the field is present (even if null).
    pub fn contains(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    /// A string field: `Ok(None)` when absent or null, `Err` when present
    /// with another JSON type.
    pub fn str_field(&self, key: &str) -> Result<Option<Cow<'_, str>>, ProtocolError> {
        let Some(raw) = self.raw(key) else {
            return Ok(None);
        };
        let text = raw.get();
        if text == "null" {
            return Ok(None);
        }
        let b = text.as_bytes();
        if b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"' && !b.contains(&b'\\') {
            return Ok(Some(Cow::Borrowed(&text[1..text.len() - 1])));
        }
        serde_json::from_str::<String>(text)
            .map(|s| Some(Cow::Owned(s)))
            .map_err(|_| {
                ProtocolError::new(
                    ErrorCode::BadField,
                    format!("field '{key}' must be a string"),
                )
            })
    }

    /// The `type` field (required on every frame).
    pub fn kind(&self) -> Result<Cow<'_, str>, ProtocolError> {
        self.str_field("type")?
            .ok_or_else(|| ProtocolError::new(ErrorCode::MissingField, "field 'type' is required"))
    }

    fn set_text(&mut self, key: &str, value: Box<str>) {
        self.changed = true;
        if let Some(i) = self.find(key) {
            self.fields[i].1 = Text::Owned(value);
        } else {
            if let Some(slot) = known_slot(key.as_bytes()) {
                self.known[slot] = self.fields.len() as u32;
            }
            self.fields
                .push((Text::Owned(key.into()), Text::Owned(value)));
        }
    }

    /// Sets a field to raw JSON, replacing an existing value in place.
    pub fn set_raw(&mut self, key: &str, value: Box<RawValue>) {
        self.set_text(key, Box::<str>::from(value));
    }

    /// Sets a field to the raw JSON of another message's field.
    pub fn set_json(&mut self, key: &str, value: RawJson<'_>) {
        self.set_text(key, value.get().into());
    }

    /// Sets a field to any serializable value.
    pub fn set<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        if let Ok(text) = serde_json::to_string(value) {
            self.set_text(key, text.into_boxed_str());
        }
    }

    /// Sets a string field (a no-op when it already holds that string).
    pub fn set_str(&mut self, key: &str, value: &str) {
        if let Some(i) = self.find(key) {
            let cur = self.bytes_of(&self.fields[i].1);
            if cur.len() == value.len() + 2
                && cur[0] == b'"'
                && cur[cur.len() - 1] == b'"'
                && &cur[1..cur.len() - 1] == value.as_bytes()
                && !value.bytes().any(needs_escape)
            {
                return;
            }
        }
        self.set(key, value);
    }

    /// Removes a field, returning its raw value.
    pub fn remove(&mut self, key: &str) -> Option<Box<RawValue>> {
        let pos = self.find(key)?;
        let (_, v) = self.fields.remove(pos);
        self.changed = true;
        self.reindex();
        Some(match v {
            Text::Owned(s) => RawValue::from_string(s.into()).unwrap_or_else(|_| null_raw()),
            span => RawJson(self.str_of(&span)).to_raw_value(),
        })
    }

    /// Iterates the fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, RawJson<'_>)> {
        self.fields
            .iter()
            .map(|(k, v)| (self.str_of(k), RawJson(self.str_of(v))))
    }

    /// Writes the object as compact JSON.
    pub fn write_json(&self, out: &mut BytesMut) {
        out.put_u8(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            match k {
                // A span key has no escapes and no control characters.
                Text::Span(..) => {
                    out.put_u8(b'"');
                    out.put_slice(self.bytes_of(k));
                    out.put_u8(b'"');
                }
                Text::Owned(s) => write_json_str(out, s),
            }
            out.put_u8(b':');
            out.put_slice(self.bytes_of(v));
        }
        out.put_u8(b'}');
    }

    /// The object as JSON bytes (as received when unchanged, else compact).
    pub fn to_json(&self) -> Bytes {
        if !self.changed && !self.src.is_empty() {
            return self.src.slice(4..);
        }
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        self.write_json(&mut out);
        out.freeze()
    }

    /// The object as one Unix-protocol frame: 4-byte big-endian length,
    /// JSON. An unchanged message is its source frame, shared, not copied.
    pub fn to_frame(&self) -> Bytes {
        if !self.changed && !self.src.is_empty() {
            return self.src.clone();
        }
        let mut out = BytesMut::with_capacity(4 + self.encoded_len_hint());
        out.put_u32(0);
        self.write_json(&mut out);
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out.freeze()
    }

    fn encoded_len_hint(&self) -> usize {
        2 + self
            .fields
            .iter()
            .map(|(k, v)| self.bytes_of(k).len() + self.bytes_of(v).len() + 4)
            .sum::<usize>()
    }
}

/// The payload as text, for a payload the scanner refused: checked with
/// SIMD (`simdutf8`); an invalid one is checked again by the standard
/// library, whose error (with the offending position) the client gets.
fn utf8(payload: &[u8]) -> Result<&str, ProtocolError> {
    if let Ok(text) = simdutf8::basic::from_utf8(payload) {
        return Ok(text);
    }
    std::str::from_utf8(payload).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadUtf8,
            format!("payload is not valid UTF-8 ({e})"),
        )
    })
}

/// Whether the fast scanner alone accepts `text` as a JSON object. For the
/// fuzz target `json_differential` (it must agree with serde_json); not
/// part of the API.
#[doc(hidden)]
pub fn scanner_accepts(text: &str) -> bool {
    scanner_accepts_bytes(text.as_bytes())
}

/// Whether the fast scanner alone accepts `payload` (any bytes: it checks
/// UTF-8 too) as a JSON object. For fuzzing; not part of the API.
#[doc(hidden)]
pub fn scanner_accepts_bytes(payload: &[u8]) -> bool {
    scan::object_into(payload, &mut Fields::default(), usize::MAX, &mut false).is_some()
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f
}

/// Writes `s` as a JSON string literal.
fn write_json_str(out: &mut BytesMut, s: &str) {
    if !s.bytes().any(needs_escape) {
        out.put_u8(b'"');
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
    } else if let Ok(v) = serde_json::to_vec(s) {
        out.put_slice(&v);
    }
}

impl<'de> Deserialize<'de> for BusMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = BusMessage;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BusMessage, A::Error> {
                let mut msg = BusMessage::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    msg.set_raw(&k, v);
                }
                Ok(msg)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

impl serde::Serialize for BusMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let mut map = s.serialize_map(Some(self.fields.len()))?;
        for (k, v) in self.iter() {
            let raw: &RawValue = serde_json::from_str(v.get()).map_err(S::Error::custom)?;
            map.serialize_entry(k, raw)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_key_has_its_own_slot() {
        for (i, k) in KNOWN.iter().enumerate() {
            assert_eq!(known_slot(k), Some(i));
        }
        for other in [&b""[..], b"t", b"tos", b"body", b"ID", b"type "] {
            assert_eq!(known_slot(other), None);
        }
    }

    #[test]
    fn keeps_unknown_fields_and_body_verbatim() {
        let src =
            br#"{"type": "message", "to": "b", "body": {"x": [1, 2.50, "\u00e9"]}, "extra": 7}"#;
        let m = BusMessage::parse(src).unwrap();
        assert_eq!(m.kind().unwrap(), "message");
        assert_eq!(
            m.raw("body").unwrap().get(),
            r#"{"x": [1, 2.50, "\u00e9"]}"#
        );
        let out = m.to_json();
        let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(back["extra"], 7);
        assert_eq!(back["to"], "b");
    }

    #[test]
    fn nesting_past_the_limit_is_too_deep() {
        let nest = |n: usize| {
            format!(
                r#"{{"type":"message","body":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // The top-level object is depth 1: `body` at 126 brackets is 127,
        // the deepest serde_json reads.
        assert!(BusMessage::parse(nest(126).as_bytes()).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nest(126)).is_ok());
        let err = BusMessage::parse(nest(127).as_bytes()).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooDeep);
        assert!(serde_json::from_str::<serde_json::Value>(&nest(127)).is_err());
        assert_eq!(
            BusMessage::parse(nest(1500).as_bytes()).unwrap_err().code,
            ErrorCode::TooDeep
        );
        assert!(BusMessage::parse_limited(nest(1500).as_bytes(), 2000).is_ok());
        let objs = format!(r#"{{"a":{}1{}}}"#, r#"{"b":"#.repeat(200), "}".repeat(200));
        assert_eq!(
            BusMessage::parse(objs.as_bytes()).unwrap_err().code,
            ErrorCode::TooDeep
        );
    }

    #[test]
    fn classifies_bad_input() {
        let cases: [(&[u8], ErrorCode); 6] = [
            (b"\xff\xfe", ErrorCode::BadUtf8),
            (b"{nope", ErrorCode::BadJson),
            (b"[1,2]", ErrorCode::NotObject),
            (b"  42", ErrorCode::NotObject),
            (b"", ErrorCode::BadJson),
            (br#"{"a":1} x"#, ErrorCode::BadJson),
        ];
        for (input, code) in cases {
            assert_eq!(
                BusMessage::parse(input).unwrap_err().code,
                code,
                "{input:?}"
            );
        }
        let m = BusMessage::parse(br#"{"to": 5}"#).unwrap();
        assert_eq!(m.str_field("to").unwrap_err().code, ErrorCode::BadField);
        assert_eq!(m.kind().unwrap_err().code, ErrorCode::MissingField);
    }

    #[test]
    fn frame_has_length_prefix_and_last_duplicate_wins() {
        let mut m = BusMessage::parse(br#"{"a":1,"a":2}"#).unwrap();
        m.set_str("b", "x\"y");
        let f = m.to_frame();
        let n = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(n, f.len() - 4);
        assert_eq!(&f[4..], br#"{"a":2,"b":"x\"y"}"#);
        // A repeated key alone also makes the frame canonical.
        let m = BusMessage::parse(br#"{"a":1, "a":2}"#).unwrap();
        assert_eq!(&m.to_frame()[4..], br#"{"a":2}"#);
    }

    #[test]
    fn many_keys_are_indexed_and_repeats_still_win() {
        let n = 100_000;
        let mut text = String::from("{");
        for i in 0..n {
            text.push_str(&format!("\"k{i}\":{i},"));
        }
        text.push_str("\"k7\":\"last\"}");
        let m = BusMessage::parse(text.as_bytes()).unwrap();
        assert_eq!(m.raw("k7").unwrap().get(), r#""last""#);
        assert_eq!(m.iter().count(), n);
        // The same through the fallback (serde_json) path: invalid at the end.
        let bad = format!("{}x", &text[..text.len() - 1]);
        assert_eq!(
            BusMessage::parse(bad.as_bytes()).unwrap_err().code,
            ErrorCode::BadJson
        );
    }

    #[test]
    fn many_fields_spill_and_keep_their_order() {
        let text: String = format!(
            "{{{}}}",
            (0..20)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut m = BusMessage::parse(text.as_bytes()).unwrap();
        assert_eq!(m.raw("k19").unwrap().get(), "19");
        assert_eq!(m.remove("k3").unwrap().get(), "3");
        m.set_str("k0", "zero");
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 19);
        assert_eq!(v["k0"], "zero");
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys[..4], ["k0", "k1", "k2", "k4"]);
        let mut small = BusMessage::parse(br#"{"a":1,"b":2,"c":3}"#).unwrap();
        small.remove("a");
        small.set_str("d", "x");
        assert_eq!(&small.to_json()[..], br#"{"b":2,"c":3,"d":"x"}"#);
    }

    #[test]
    fn known_keys_are_found_after_any_change() {
        let mut m = BusMessage::default();
        assert!(m.raw("type").is_none() && m.raw("to").is_none());
        m.set_str("to", "b");
        m.set_str("type", "message");
        assert_eq!(m.kind().unwrap(), "message");
        let mut m = BusMessage::parse(br#"{"x":1,"type":"message","to":"b","id":"1"}"#).unwrap();
        m.remove("x");
        assert_eq!(m.str_field("to").unwrap().unwrap(), "b");
        assert_eq!(m.raw("id").unwrap().get(), r#""1""#);
        m.remove("type");
        assert!(m.kind().is_err());
        m.set("ts", &1.5);
        assert_eq!(m.raw("ts").unwrap().get(), "1.5");
        assert_eq!(m.str_field("to").unwrap().unwrap(), "b");
    }

    #[test]
    fn parse_frame_keeps_the_frame_itself() {
        let f = crate::transports::unix::frame::encode(br#"{"type":"ping"}"#);
        let m = BusMessage::parse_frame(f.clone()).unwrap();
        assert_eq!(m.kind().unwrap(), "ping");
        assert_eq!(m.to_frame().as_ptr(), f.as_ptr(), "shared, not copied");
        assert!(BusMessage::parse_frame(f.slice(..f.len() - 1)).is_err());
        assert!(BusMessage::parse_frame(Bytes::new()).is_err());
    }

    #[test]
    fn unchanged_message_is_passed_on_as_received() {
        let src = br#"{"type": "message", "from": "a", "id": "1", "body": {"k": [1, 2]}}"#;
        let mut m = BusMessage::parse(src).unwrap();
        m.set_str("from", "a");
        let f = m.to_frame();
        assert_eq!(&f[4..], &src[..]);
        assert_eq!(
            u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize,
            src.len()
        );
        m.set_str("from", "b");
        assert_eq!(
            &m.to_frame()[4..],
            br#"{"type":"message","from":"b","id":"1","body":{"k": [1, 2]}}"#
        );
    }

    #[test]
    fn bad_utf8_anywhere_in_a_large_frame_is_found_and_placed() {
        // The SIMD check finds it; the detail (with the position) is the
        // standard library's, as before.
        let body = "x".repeat(70_000);
        let good = format!(r#"{{"type":"message","body":"{body}","é":"ü"}}"#);
        assert!(BusMessage::parse(good.as_bytes()).is_ok());
        for pos in [
            0,
            1,
            15,
            16,
            31,
            63,
            64,
            65,
            4095,
            4096,
            40_000,
            good.len() - 1,
        ] {
            for bad in scan::BAD_UTF8 {
                let mut v = good.as_bytes().to_vec();
                v.splice(pos..pos, bad.iter().copied());
                let want = std::str::from_utf8(&v).unwrap_err();
                let e = BusMessage::parse(&v).unwrap_err();
                assert_eq!(e.code, ErrorCode::BadUtf8, "at {pos}");
                assert_eq!(e.detail, format!("payload is not valid UTF-8 ({want})"));
            }
        }
    }

    /// What parsing answered before the one-pass scanner: UTF-8 by the
    /// standard library, then serde_json (the reference of the test below).
    fn reference_parse(payload: &[u8]) -> Result<Vec<(String, String)>, (ErrorCode, String)> {
        let text = std::str::from_utf8(payload).map_err(|e| {
            (
                ErrorCode::BadUtf8,
                format!("payload is not valid UTF-8 ({e})"),
            )
        })?;
        if text.trim_start().as_bytes().first() != Some(&b'{') {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => (
                    ErrorCode::NotObject,
                    "payload is JSON but not an object".to_string(),
                ),
                Err(e) => (
                    ErrorCode::BadJson,
                    format!("payload is not valid JSON ({e})"),
                ),
            });
        }
        let spans = serde_spans(text).map_err(|e| {
            (
                ErrorCode::BadJson,
                format!("payload is not valid JSON ({e})"),
            )
        })?;
        let m = BusMessage {
            src: crate::transports::unix::frame::encode(payload),
            fields: spans.fields,
            changed: spans.repeated,
            known: [ABSENT; KNOWN.len()],
        };
        Ok(m.iter()
            .map(|(k, v)| (k.to_string(), v.get().to_string()))
            .collect())
    }

    #[test]
    fn parse_answers_as_std_and_serde_json_do_on_mutated_bytes() {
        // Byte-level changes (invalid UTF-8 included) of a few payloads:
        // the same fields, or the same error code and detail.
        let bases: [&[u8]; 5] = [
            br#"{"type":"message","to":"b","from":"a","id":"1","ts":1.5,"body":{"k":[1,2.5,"\u00e9"]}}"#,
            "{\"type\": \"message\", \"body\": \"héllo wörld 😀 and some more text to pass 64 bytes........\"}".as_bytes(),
            br#"  [1, {"a": 2}]  "#,
            br#"{"a":1,"a":{"b":[true,false,null]},"t\u0079pe":"x"}"#,
            br#""just a string""#,
        ];
        let palette = [
            0x00u8, 0x1f, b' ', b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'0', b'-', b'e',
            b'x', 0x7f, 0x80, 0xbf, 0xc3, 0xa9, 0xe2, 0xed, 0xf0, 0xff,
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33) as usize % n.max(1)
        };
        let (mut ok, mut bad) = (0, 0);
        for round in 0..20_000 {
            let mut v = bases[round % bases.len()].to_vec();
            for _ in 0..1 + next(3) {
                let at = next(v.len() + 1);
                match next(4) {
                    0 if at < v.len() => {
                        v.remove(at);
                    }
                    1 => v.insert(at, palette[next(palette.len())]),
                    2 if at < v.len() => v[at] = palette[next(palette.len())],
                    _ => v.truncate(at.max(1)),
                }
            }
            let ours = BusMessage::parse_limited(&v, usize::MAX)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_string(), v.get().to_string()))
                        .collect::<Vec<_>>()
                })
                .map_err(|e| (e.code, e.detail));
            assert_eq!(
                ours,
                reference_parse(&v),
                "on {:?}",
                String::from_utf8_lossy(&v)
            );
            if ours.is_ok() {
                ok += 1;
            } else {
                bad += 1;
            }
        }
        assert!(ok > 1000 && bad > 1000, "{ok} {bad}");
    }

    #[test]
    fn bad_utf8_comes_before_too_deep_wherever_it_is() {
        // The one-pass scanner meets the depth first; the answer is still
        // the one of a whole-payload UTF-8 check first.
        let deep = "[".repeat(200);
        let mut after = format!("{{\"a\":{deep}").into_bytes();
        after.push(0xff);
        let mut before = b"{\"a\":\"\xff\",\"b\":".to_vec();
        before.extend_from_slice(deep.as_bytes());
        for v in [after, before] {
            assert_eq!(BusMessage::parse(&v).unwrap_err().code, ErrorCode::BadUtf8);
        }
        let e = BusMessage::parse(format!("{{\"a\":{deep}").as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooDeep);
    }

    #[test]
    fn escaped_keys_and_values_are_decoded_for_lookup() {
        let m = BusMessage::parse(br#"{"t\u0079pe": "m\u0065ssage", "to": "\u00e9"}"#).unwrap();
        assert_eq!(m.kind().unwrap(), "message");
        assert_eq!(m.str_field("to").unwrap().unwrap(), "\u{e9}");
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(v["type"], "message");
        let mut m2 = m.clone();
        m2.set_str("x", "1");
        let v: serde_json::Value = serde_json::from_slice(&m2.to_json()).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["x"], "1");
        let via_serde: serde_json::Value = serde_json::to_value(&m2).unwrap();
        assert_eq!(via_serde, v);
    }
}
