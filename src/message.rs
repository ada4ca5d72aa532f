//! `BusMessage`: one JSON object of the Unix-socket protocol.
//!
//! The bus reads only what routing needs (`type`, `to`, `from`, `id`, `ts`,
//! `endpoint`, `topic`); every field is kept as raw JSON text in arrival
//! order, so `body` and any unknown field pass through byte for byte and the
//! payload is never parsed into a tree or re-serialized.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{ErrorCode, ProtocolError};

/// A JSON object whose values are kept as raw JSON text.
#[derive(Debug, Clone, Default)]
pub struct BusMessage {
    /// Fields in arrival order; a repeated key keeps its last value, as
    /// Python's `json.loads` does.
    fields: Vec<(String, Box<RawValue>)>,
}

impl BusMessage {
    /// An empty object.
    pub fn new() -> Self {
        BusMessage { fields: Vec::new() }
    }

    /// A `{"type": kind}` object.
    pub fn with_type(kind: &str) -> Self {
        let mut m = BusMessage::new();
        m.set_str("type", kind);
        m
    }

    /// Parses one frame's payload. Distinguishes bad UTF-8, bad JSON and
    /// JSON that is not an object, so the client gets a precise error.
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        let text = std::str::from_utf8(payload).map_err(|e| {
            ProtocolError::new(
                ErrorCode::BadUtf8,
                format!("payload is not valid UTF-8 ({e})"),
            )
        })?;
        let first = text.trim_start().as_bytes().first().copied();
        if first != Some(b'{') {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => {
                    ProtocolError::new(ErrorCode::NotObject, "payload is JSON but not an object")
                }
                Err(e) => ProtocolError::new(
                    ErrorCode::BadJson,
                    format!("payload is not valid JSON ({e})"),
                ),
            });
        }
        serde_json::from_str::<BusMessage>(text).map_err(|e| {
            ProtocolError::new(
                ErrorCode::BadJson,
                format!("payload is not valid JSON ({e})"),
            )
        })
    }

    /// The raw JSON text of a field.
    pub fn raw(&self, key: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    /// True when the field is present (even if null).
    pub fn contains(&self, key: &str) -> bool {
        self.raw(key).is_some()
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
        if let Ok(s) = serde_json::from_str::<&str>(text) {
            return Ok(Some(Cow::Borrowed(s)));
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

    /// Sets a field to raw JSON, replacing an existing value in place.
    pub fn set_raw(&mut self, key: &str, value: Box<RawValue>) {
        if let Some(slot) = self.fields.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.fields.push((key.to_owned(), value));
        }
    }

    /// Sets a field to any serializable value.
    pub fn set<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        if let Ok(raw) = serde_json::value::to_raw_value(value) {
            self.set_raw(key, raw);
        }
    }

    /// Sets a string field.
    pub fn set_str(&mut self, key: &str, value: &str) {
        self.set(key, value);
    }

    /// Removes a field, returning its raw value.
    pub fn remove(&mut self, key: &str) -> Option<Box<RawValue>> {
        let pos = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.remove(pos).1)
    }

    /// Iterates the fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    /// Writes the object as compact JSON.
    pub fn write_json(&self, out: &mut BytesMut) {
        out.put_u8(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            write_json_str(out, k);
            out.put_u8(b':');
            out.put_slice(v.get().as_bytes());
        }
        out.put_u8(b'}');
    }

    /// The object as compact JSON bytes.
    pub fn to_json(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        self.write_json(&mut out);
        out.freeze()
    }

    /// The object as one Unix-protocol frame: 4-byte big-endian length, JSON.
    pub fn to_frame(&self) -> Bytes {
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
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
    }
}

/// Writes `s` as a JSON string literal.
fn write_json_str(out: &mut BytesMut, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
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
                let mut msg = BusMessage {
                    fields: Vec::with_capacity(map.size_hint().unwrap_or(8)),
                };
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
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.fields.len()))?;
        for (k, v) in &self.fields {
            map.serialize_entry(k, v)?;
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
    }
}
