//! The serde_json path of parsing: the reference the fast scanner
//! ([`super::scan`]) must agree with, used when the scanner refuses a
//! payload (to give serde_json's error, with its position) and by the
//! differential fuzz target.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::fields::{Fields, Text};

/// Keys to positions, for the repeated-key check of objects with many keys.
pub(super) type KeyIndex = std::collections::HashMap<Vec<u8>, usize>;
/// From this many keys on, repeated keys are found through a [`KeyIndex`].
pub(super) const INDEX_FROM: usize = 32;

/// What parsing a payload records: field spans and whether a key repeated.
pub(super) struct Spans {
    /// The fields, in arrival order (a repeated key in its first place).
    pub(super) fields: Fields,
    /// Whether a key repeated (the frame then differs from the fields).
    pub(super) repeated: bool,
}

/// The fields of the object in `text` through serde_json (the reference
/// the scanner must agree with, and the error when it refuses).
pub(super) fn serde_spans(text: &str) -> Result<Spans, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let spans = de.deserialize_map(SpanVisitor { json: text })?;
    de.end()?;
    Ok(spans)
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
