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
/// the bus forwards.
pub const MAX_DEPTH: usize = 128;

fn null_raw() -> Box<RawValue> {
    // "null" is valid JSON, so this never falls back further.
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is valid JSON"))
}

/// A key or value: a range of the source frame, or text of its own.
#[derive(Debug, Clone)]
enum Text {
    /// `src[start..end]`; for a key, the text between its quotes (only
    /// keys without escapes are kept this way).
    Span(u32, u32),
    /// A key (unescaped) or a value (JSON text) set or decoded later.
    Owned(Box<str>),
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

fn known_slot(key: &[u8]) -> Option<usize> {
    KNOWN.iter().position(|k| *k == key)
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
        let spans = {
            let text = std::str::from_utf8(&src[4..]).map_err(|e| {
                ProtocolError::new(
                    ErrorCode::BadUtf8,
                    format!("payload is not valid UTF-8 ({e})"),
                )
            })?;
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
            // The fast scanner decides valid payloads; anything it refuses
            // goes through serde_json, which gives the error (or, should
            // the two ever disagree, the answer). Too deep is refused
            // outright: no client should have to parse it.
            let mut too_deep = false;
            if let Some(spans) = scan::object(text, max_depth, &mut too_deep) {
                spans
            } else if too_deep {
                return Err(ProtocolError::new(
                    ErrorCode::TooDeep,
                    format!("payload nests deeper than {max_depth} levels"),
                ));
            } else {
                let mut de = serde_json::Deserializer::from_str(text);
                de.deserialize_map(SpanVisitor { json: text })
                    .and_then(|s| de.end().map(|_| s))
                    .map_err(|e| {
                        ProtocolError::new(
                            ErrorCode::BadJson,
                            format!("payload is not valid JSON ({e})"),
                        )
                    })?
            }
        };
        let mut m = BusMessage {
            src,
            fields: spans.fields,
            changed: spans.repeated,
            known: [ABSENT; KNOWN.len()],
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
            // Spans lie in a payload checked to be UTF-8 and start and end
            // on token boundaries.
            Text::Span(..) => std::str::from_utf8(self.bytes_of(t)).unwrap_or(""),
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

/// The fields of a message: up to eight in place (no allocation for the
/// usual message), more in a vector.
#[derive(Debug, Clone)]
struct Fields {
    inline: [(Text, Text); INLINE],
    /// How many of `inline` are used (0 once spilled).
    len: usize,
    /// All the fields, once there were more than `INLINE`.
    spill: Vec<(Text, Text)>,
}

const INLINE: usize = 8;
const EMPTY: (Text, Text) = (Text::Span(0, 0), Text::Span(0, 0));

impl Default for Fields {
    fn default() -> Self {
        Fields {
            inline: [EMPTY; INLINE],
            len: 0,
            spill: Vec::new(),
        }
    }
}

impl std::ops::Deref for Fields {
    type Target = [(Text, Text)];
    fn deref(&self) -> &Self::Target {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }
}

impl std::ops::DerefMut for Fields {
    fn deref_mut(&mut self) -> &mut Self::Target {
        if self.spill.is_empty() {
            &mut self.inline[..self.len]
        } else {
            &mut self.spill
        }
    }
}

impl Fields {
    fn push(&mut self, f: (Text, Text)) {
        if self.spill.is_empty() {
            if self.len < INLINE {
                self.inline[self.len] = f;
                self.len += 1;
                return;
            }
            self.spill.reserve(2 * INLINE);
            for x in &mut self.inline[..self.len] {
                self.spill.push(std::mem::replace(x, EMPTY));
            }
            self.len = 0;
        }
        self.spill.push(f);
    }

    fn remove(&mut self, i: usize) -> (Text, Text) {
        if !self.spill.is_empty() {
            return self.spill.remove(i);
        }
        let f = std::mem::replace(&mut self.inline[i], EMPTY);
        self.inline[i..self.len].rotate_left(1);
        self.len -= 1;
        f
    }
}

/// Keys to positions, for the repeated-key check of objects with many keys.
type KeyIndex = std::collections::HashMap<Vec<u8>, usize>;
/// From this many keys on, repeated keys are found through a [`KeyIndex`].
const INDEX_FROM: usize = 32;

/// What parsing a payload records: field spans and whether a key repeated.
struct Spans {
    /// A filter of the keys seen so far (scanner only).
    seen: u64,
    fields: Fields,
    repeated: bool,
}

/// Visits the top-level object of a payload, turning each borrowed key
/// and raw value into a span of it (offset by the 4-byte header).
struct SpanVisitor<'j> {
    json: &'j str,
}

/// A key as the deserializer gives it: borrowed from the payload when it
/// has no escapes, decoded otherwise.
enum Key<'de> {
    Borrowed(&'de str),
    Decoded(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Decoded(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Decoded(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key::Decoded(v))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl SpanVisitor<'_> {
    /// The span of `s`, a slice of `self.json`.
    fn span(&self, s: &str) -> Text {
        let start = s.as_ptr() as usize - self.json.as_ptr() as usize;
        Text::Span((start + 4) as u32, (start + 4 + s.len()) as u32)
    }

    /// The decoded text of a key recorded so far.
    fn key_text<'a>(&'a self, k: &'a Text) -> &'a str {
        match k {
            Text::Span(a, b) => self
                .json
                .get(*a as usize - 4..*b as usize - 4)
                .unwrap_or(""),
            Text::Owned(s) => s,
        }
    }
}

impl<'de> Visitor<'de> for SpanVisitor<'de> {
    type Value = Spans;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Spans, A::Error> {
        let mut out = Spans {
            seen: 0,
            fields: Fields::default(),
            repeated: false,
        };
        // Repeated keys: a direct search while the object is small, a
        // hash index past INDEX_FROM keys (linear time for huge objects).
        let mut index: Option<std::collections::HashMap<String, usize>> = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            let v = self.span(value.get());
            let name = key.as_str();
            if index.is_none() && out.fields.len() >= INDEX_FROM {
                let m = out
                    .fields
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (self.key_text(k).to_owned(), i))
                    .collect();
                index = Some(m);
            }
            let dup = match &mut index {
                Some(m) => {
                    let d = m.get(name).copied();
                    if d.is_none() {
                        m.insert(name.to_owned(), out.fields.len());
                    }
                    d
                }
                None => out
                    .fields
                    .iter()
                    .position(|(k, _)| self.key_text(k) == name),
            };
            match dup {
                Some(i) => {
                    out.fields[i].1 = v;
                    out.repeated = true;
                }
                None => {
                    let k = match &key {
                        Key::Borrowed(s) => self.span(s),
                        Key::Decoded(s) => Text::Owned(s.as_str().into()),
                    };
                    out.fields.push((k, v));
                }
            }
        }
        Ok(out)
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
        // The top-level object is depth 1: `body` at 127 brackets is 128.
        assert!(BusMessage::parse(nest(127).as_bytes()).is_ok());
        let err = BusMessage::parse(nest(128).as_bytes()).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooDeep);
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
        assert_eq!(
            BusMessage::parse(b"\xff\xfe").unwrap_err().code,
            ErrorCode::BadUtf8
        );
        assert_eq!(
            BusMessage::parse(b"{nope").unwrap_err().code,
            ErrorCode::BadJson
        );
        assert_eq!(
            BusMessage::parse(b"[1,2]").unwrap_err().code,
            ErrorCode::NotObject
        );
        assert_eq!(
            BusMessage::parse(b"  42").unwrap_err().code,
            ErrorCode::NotObject
        );
        assert_eq!(BusMessage::parse(b"").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            BusMessage::parse(br#"{"a":1} x"#).unwrap_err().code,
            ErrorCode::BadJson
        );
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

/// Whether the fast scanner alone accepts `text` as a JSON object. For the
/// fuzz target `json_differential` (it must agree with serde_json); not
/// part of the API.
#[doc(hidden)]
pub fn scanner_accepts(text: &str) -> bool {
    scan::object(text, usize::MAX, &mut false).is_some()
}

/// A JSON scanner for the top-level object of a payload: it validates the
/// whole text (RFC 8259, as serde_json does: no comments, no trailing
/// commas, no control characters in strings, any nesting depth) and
/// records each member's key and value as spans, without building
/// anything. It only ever answers "valid, here are the spans" or "not
/// sure"; the caller then asks serde_json.
mod scan {
    use super::{Fields, KeyIndex, Spans, Text, INDEX_FROM};

    /// The spans of the object in `text` (spans offset by the 4-byte
    /// header), or None when the text is not a valid JSON object or nests
    /// deeper than `max_depth` (the top-level object is depth 1); then
    /// `too_deep` says which.
    pub(super) fn object(text: &str, max_depth: usize, too_deep: &mut bool) -> Option<Spans> {
        let s = text.as_bytes();
        let mut out = Spans {
            seen: 0,
            fields: Fields::default(),
            repeated: false,
        };
        let mut index = None;
        let mut i = ws(s, 0);
        if s.get(i) != Some(&b'{') {
            return None;
        }
        i = ws(s, i + 1);
        if s.get(i) == Some(&b'}') {
            i += 1;
        } else {
            loop {
                if s.get(i) != Some(&b'"') {
                    return None;
                }
                let (ke, escaped) = string_end(s, i + 1)?;
                let (ks, kend) = (i + 1, ke);
                i = ws(s, ke + 1);
                if s.get(i) != Some(&b':') {
                    return None;
                }
                i = ws(s, i + 1);
                let vs = i;
                i = value(s, i, max_depth, too_deep)?;
                let key = if escaped {
                    // Rare: decode the key (serde_json knows every escape).
                    let k: String = serde_json::from_str(&text[ks - 1..kend + 1]).ok()?;
                    Text::Owned(k.into_boxed_str())
                } else {
                    Text::Span((ks + 4) as u32, (kend + 4) as u32)
                };
                push(
                    &mut out,
                    text,
                    key,
                    Text::Span((vs + 4) as u32, (i + 4) as u32),
                    &mut index,
                );
                i = ws(s, i);
                match s.get(i) {
                    Some(b',') => i = ws(s, i + 1),
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        (ws(s, i) == s.len()).then_some(out)
    }

    /// Adds a member; a repeated key replaces the earlier value in place.
    /// Small objects are searched directly; past [`INDEX_FROM`] keys a
    /// hash index keeps a payload of very many keys linear in time.
    fn push(out: &mut Spans, text: &str, key: Text, value: Text, index: &mut Option<KeyIndex>) {
        if index.is_none() && out.fields.len() >= INDEX_FROM {
            let mut m = KeyIndex::with_capacity(2 * out.fields.len());
            for (i, (k, _)) in out.fields.iter().enumerate() {
                m.insert(key_bytes(text, k).to_vec(), i);
            }
            *index = Some(m);
        }
        if let Some(m) = index {
            let name = key_bytes(text, &key).to_vec();
            match m.get(&name) {
                Some(&i) => {
                    out.fields[i].1 = value;
                    out.repeated = true;
                }
                None => {
                    m.insert(name, out.fields.len());
                    out.fields.push((key, value));
                }
            }
            return;
        }
        let name = key_bytes(text, &key);
        // A 64-bit filter of the keys seen: a key whose bit is not set
        // cannot be a repeat, so the usual message compares no keys.
        let (f, l) = (
            u64::from(name.first().copied().unwrap_or(0)),
            u64::from(name.last().copied().unwrap_or(0)),
        );
        let bit = 1u64 << ((name.len() as u64 * 7 + f * 3 + l) & 63);
        let seen = out.seen & bit != 0;
        out.seen |= bit;
        if !seen {
            out.fields.push((key, value));
            return;
        }
        let dup = out.fields.iter().position(|(k, _)| {
            let other = key_bytes(text, k);
            // Length and first byte first: most keys differ there.
            other.len() == name.len() && other.first() == name.first() && other == name
        });
        match dup {
            Some(i) => {
                out.fields[i].1 = value;
                out.repeated = true;
            }
            None => out.fields.push((key, value)),
        }
    }

    fn key_bytes<'a>(text: &'a str, k: &'a Text) -> &'a [u8] {
        match k {
            Text::Span(a, b) => text
                .as_bytes()
                .get(*a as usize - 4..*b as usize - 4)
                .unwrap_or(b""),
            Text::Owned(o) => o.as_bytes(),
        }
    }

    #[inline]
    fn ws(s: &[u8], mut i: usize) -> usize {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = s.get(i) {
            i += 1;
        }
        i
    }

    /// Validates one value starting at `i` (no leading whitespace);
    /// returns the index just past it. Nesting is tracked on a stack, not
    /// by recursion, so depth costs no native stack.
    fn value(s: &[u8], mut i: usize, max_depth: usize, too_deep: &mut bool) -> Option<usize> {
        let mut stack: Vec<u8> = Vec::new();
        loop {
            // One value (or the opening of a container, at depth
            // 2 + what is open: the top-level object is depth 1).
            let c = *s.get(i)?;
            if (c == b'{' || c == b'[') && stack.len() + 2 > max_depth {
                *too_deep = true;
                return None;
            }
            match c {
                b'{' => {
                    i = ws(s, i + 1);
                    if s.get(i) == Some(&b'}') {
                        i += 1;
                    } else {
                        stack.push(b'{');
                        i = member_key(s, i)?;
                        continue;
                    }
                }
                b'[' => {
                    i = ws(s, i + 1);
                    if s.get(i) == Some(&b']') {
                        i += 1;
                    } else {
                        stack.push(b'[');
                        continue;
                    }
                }
                b'"' => i = string_end(s, i + 1)?.0 + 1,
                b't' => i = literal(s, i, b"true")?,
                b'f' => i = literal(s, i, b"false")?,
                b'n' => i = literal(s, i, b"null")?,
                b'-' | b'0'..=b'9' => i = number(s, i)?,
                _ => return None,
            }
            // A value is complete: close containers or move to the next
            // element.
            loop {
                let Some(&open) = stack.last() else {
                    return Some(i);
                };
                i = ws(s, i);
                match (open, *s.get(i)?) {
                    (_, b',') => {
                        i = ws(s, i + 1);
                        if open == b'{' {
                            i = member_key(s, i)?;
                        }
                        break;
                    }
                    (b'[', b']') | (b'{', b'}') => {
                        i += 1;
                        stack.pop();
                    }
                    _ => return None,
                }
            }
        }
    }

    /// `"key"` `:` and the whitespace after it; returns where the value
    /// starts.
    fn member_key(s: &[u8], i: usize) -> Option<usize> {
        if s.get(i) != Some(&b'"') {
            return None;
        }
        let (end, _) = string_end(s, i + 1)?;
        let i = ws(s, end + 1);
        if s.get(i) != Some(&b':') {
            return None;
        }
        Some(ws(s, i + 1))
    }

    fn literal(s: &[u8], i: usize, lit: &[u8]) -> Option<usize> {
        (s.get(i..i + lit.len())? == lit).then_some(i + lit.len())
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(s: &[u8], mut i: usize) -> Option<usize> {
        let digits = |s: &[u8], mut i: usize| -> Option<usize> {
            let start = i;
            while let Some(b'0'..=b'9') = s.get(i) {
                i += 1;
            }
            (i > start).then_some(i)
        };
        if s.get(i) == Some(&b'-') {
            i += 1;
        }
        match s.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => i = digits(s, i)?,
            _ => return None,
        }
        if s.get(i) == Some(&b'.') {
            i = digits(s, i + 1)?;
        }
        if let Some(b'e' | b'E') = s.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = s.get(i) {
                i += 1;
            }
            i = digits(s, i)?;
        }
        // serde_json refuses a digit right after a leading zero ("01").
        match s.get(i) {
            Some(b'0'..=b'9') => None,
            _ => Some(i),
        }
    }

    /// From just after an opening quote: the index of the closing quote,
    /// and whether the string had escapes. Refuses control characters and
    /// bad escapes (the text is already known to be UTF-8).
    fn string_end(s: &[u8], mut i: usize) -> Option<(usize, bool)> {
        let mut escaped = false;
        loop {
            i += plain_run(&s[i.min(s.len())..]);
            match *s.get(i)? {
                b'"' => return Some((i, escaped)),
                b'\\' => {
                    escaped = true;
                    match *s.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                        b'u' => {
                            let hex = s.get(i + 2..i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            i += 6;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    /// Length of the leading run of bytes that need no attention in a
    /// string: not `"`, not `\`, not a control character. Sixteen bytes
    /// at a time with SSE2 (part of every x86-64), then eight at a time.
    #[inline]
    fn plain_run(s: &[u8]) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: SSE2 is part of the x86-64 baseline; every x86-64
            // CPU has it (the function is safe code otherwise).
            unsafe { plain_run_sse2(s) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            plain_run_swar(s)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse2")]
    fn plain_run_sse2(s: &[u8]) -> usize {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
            _mm_set_epi64x,
        };
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let ctrl_max = _mm_set1_epi8(0x1f);
        let mut i = 0;
        while i + 16 <= s.len() {
            let mut lo = [0u8; 8];
            let mut hi = [0u8; 8];
            lo.copy_from_slice(&s[i..i + 8]);
            hi.copy_from_slice(&s[i + 8..i + 16]);
            let x = _mm_set_epi64x(i64::from_le_bytes(hi), i64::from_le_bytes(lo));
            let q = _mm_cmpeq_epi8(x, quote);
            let b = _mm_cmpeq_epi8(x, backslash);
            // x <= 0x1f (unsigned) exactly when min(x, 0x1f) == x.
            let c = _mm_cmpeq_epi8(_mm_min_epu8(x, ctrl_max), x);
            let m = _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(q, b), c)) as u32;
            if m != 0 {
                return i + m.trailing_zeros() as usize;
            }
            i += 16;
        }
        i + plain_run_swar(&s[i..])
    }

    /// [`plain_run`], eight bytes at a time.
    #[inline]
    fn plain_run_swar(s: &[u8]) -> usize {
        const ONES: u64 = u64::MAX / 255;
        const HIGH: u64 = ONES << 7;
        let mut i = 0;
        while i + 8 <= s.len() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&s[i..i + 8]);
            let x = u64::from_le_bytes(w);
            // High bit set in each byte that is < 0x20, == '"' or == '\\'
            // (exact: no false positives from borrows, since each test is
            // masked with !x or the xor'ed value).
            let ctrl = x.wrapping_sub(ONES * 0x20) & !x;
            let q = x ^ (ONES * u64::from(b'"'));
            let q = q.wrapping_sub(ONES) & !q;
            let b = x ^ (ONES * u64::from(b'\\'));
            let b = b.wrapping_sub(ONES) & !b;
            let m = (ctrl | q | b) & HIGH;
            if m != 0 {
                // The lowest flagged byte is exact; later ones may not be,
                // which does not matter.
                return i + (m.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while i < s.len() && !matches!(s[i], b'"' | b'\\' | 0..=0x1f) {
            i += 1;
        }
        i
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Valid for the scanner exactly when serde_json reads it as an
        /// object.
        fn agrees(text: &str) {
            // What the serde path accepts: an object of raw values
            // (numbers are not range-checked, escapes only in keys decoded).
            let serde_ok = serde_json::from_str::<
                std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>,
            >(text)
            .is_ok();
            let ours = object(text, usize::MAX, &mut false);
            assert_eq!(
                ours.is_some(),
                serde_ok,
                "scanner and serde_json disagree on {text:?}"
            );
        }

        #[test]
        fn matches_serde_json_on_edge_cases() {
            let cases = [
                r#"{}"#,
                r#" { } "#,
                r#"{"a":1}"#,
                r#"{"a":-0}"#,
                r#"{"a":-}"#,
                r#"{"a":01}"#,
                r#"{"a":1.}"#,
                r#"{"a":.5}"#,
                r#"{"a":1.5e}"#,
                r#"{"a":1.5e+3}"#,
                r#"{"a":1E-3}"#,
                r#"{"a":-1.25e10}"#,
                r#"{"a":1,}"#,
                r#"{,"a":1}"#,
                r#"{"a" 1}"#,
                r#"{"a":}"#,
                r#"{"a":[1,2,[3,{"b":null}]]}"#,
                r#"{"a":[1,]}"#,
                r#"{"a":[,1]}"#,
                r#"{"a":[}"#,
                r#"{"a":{"b":{"c":{}}}}"#,
                r#"{"a":{"b":1,}}"#,
                r#"{"a":tru}"#,
                r#"{"a":truex}"#,
                r#"{"a":true,"b":false,"c":null}"#,
                r#"{"a":"x\"y"}"#,
                r#"{"a":"\u00e9\ud83d\ude00"}"#,
                r#"{"a":"\u00g9"}"#,
                r#"{"a":"\x"}"#,
                r#"{"a":"\/\b\f\n\r\t"}"#,
                "{\"a\":\"tab\there\"}",
                "{\"a\":\"nl\nhere\"}",
                "{\"a\":\"del\u{7f}ok\"}",
                r#"{"a":"é ü 😀"}"#,
                r#"{"a":1} x"#,
                r#"{"a":1}}"#,
                r#"{"a":1"#,
                r#"{"a"#,
                r#"{"#,
                r#"[1]"#,
                r#"{"a":[1 2]}"#,
                r#"{"a":{"b"}}"#,
                r#"{"a":{"b":1 "c":2}}"#,
                r#"{"t\u0079pe":"m"}"#,
                r#"{"a":"unterminated}"#,
                "{\"a\":1}\n\t ",
                r#"{"a":[[[[[[[[[[]]]]]]]]]]}"#,
                r#"{"a":[[[[[[[[[[]]]]]]]]]}"#,
                r#"{"a":NaN}"#,
                r#"{"a":1e400}"#,
                r#"{"a":18446744073709551616}"#,
                r#"{"a":-9223372036854775809}"#,
                r#"{"a" : [ 1 , { } ] , "b" : "" }"#,
                "{\"aaaaaaaaaaaaaaaaaaaaaaaa\":\"bbbbbbbbbbbbbbbb\\\"cccccccc\"}",
                r#"{"a":"\"#,
                r#"{"a":"\u12"}"#,
            ];
            for c in cases {
                agrees(c);
            }
            let deep = format!("{{\"a\":{}{}}}", "[".repeat(300), "]".repeat(300));
            assert!(
                object(&deep, usize::MAX, &mut false).is_some(),
                "any depth, like serde_json's raw values"
            );
        }

        #[test]
        fn matches_serde_json_on_mutations() {
            // Every single-byte deletion and a few substitutions of a rich
            // document: the scanner must agree with serde_json each time.
            let doc = r#"{"type":"message","to":"b","n":-12.5e-3,"body":{"x":[1,true,null,"\u00e9\n"],"y":{}},"z":[]}"#;
            agrees(doc);
            for i in 0..doc.len() {
                if !doc.is_char_boundary(i) || !doc.is_char_boundary(i + 1) {
                    continue;
                }
                agrees(&format!("{}{}", &doc[..i], &doc[i + 1..]));
                for sub in ["\"", "\\", ",", "}", "]", "0", " ", "\u{1}", "x", "-", "."] {
                    agrees(&format!("{}{}{}", &doc[..i], sub, &doc[i + 1..]));
                }
            }
        }

        #[test]
        fn plain_run_stops_at_the_first_special_byte() {
            for len in 0..70 {
                for pos in 0..=len {
                    for special in [b'"', b'\\', 0u8, 0x1f, b'\n'] {
                        let mut v = vec![b'a'; len];
                        v.extend_from_slice("é\u{7f}".as_bytes());
                        if pos < len {
                            v[pos] = special;
                        }
                        let want = if pos < len { pos } else { v.len() };
                        assert_eq!(plain_run(&v), want, "len {len} pos {pos} byte {special}");
                    }
                }
            }
        }

        #[test]
        fn spans_point_at_keys_and_values() {
            let text = r#" {"a" : [1, 2] , "b":"x" ,"a":3} "#;
            let sp = object(text, usize::MAX, &mut false).unwrap();
            assert!(sp.repeated);
            assert_eq!(sp.fields.len(), 2);
            fn at<'a>(text: &'a str, t: &'a Text) -> &'a str {
                match t {
                    Text::Span(a, b) => &text[*a as usize - 4..*b as usize - 4],
                    Text::Owned(o) => o,
                }
            }
            assert_eq!(at(text, &sp.fields[0].0), "a");
            assert_eq!(at(text, &sp.fields[0].1), "3");
            assert_eq!(at(text, &sp.fields[1].0), "b");
            assert_eq!(at(text, &sp.fields[1].1), r#""x""#);
        }
    }
}
