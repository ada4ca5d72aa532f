//! The hand-written JSON scanner of `BusMessage::parse` against serde_json,
//! on the same payload.
//!
//! Reference: serde_json reading the payload as an object whose keys are
//! decoded strings and whose values are raw JSON (`&RawValue`), members in
//! order, duplicates included; the last duplicate wins, in the place of
//! the first (Python's `json.loads`, and what the bus must keep).
//!
//! Invariants:
//! - Accept/reject agree: `parse` is Ok exactly when the reference reads an
//!   object nesting at most `MAX_DEPTH` (127) levels; a valid object nesting
//!   deeper is `too_deep`; otherwise the code is `bad_utf8` (not UTF-8),
//!   `not_object` (valid JSON, not an object) or `bad_json` (anything
//!   else; `too_deep` is also allowed when the text nests past the limit
//!   before or around its fault: which of two faults is reported first is
//!   not pinned).
//! - The fast scanner alone (`message::scanner_accepts`, no depth limit)
//!   accepts exactly what the reference accepts: it never lets invalid
//!   JSON through and never sends a valid object down the slow path.
//! - For an accepted object: the same keys in the same order, each with the
//!   reference's raw value text byte for byte (last duplicate wins);
//!   `type`, `to`, `id`, `from`, `ts` read as strings the way serde_json
//!   reads them (`Option<String>`), with a typed `bad_field` otherwise.
//! - Forwarding: without repeated keys the message is sent on as the very
//!   payload received; with repeated keys it is re-encoded to an object
//!   without repeats that the reference reads back to the same fields.
//! - Against `serde_json::Value` as a second reference: whatever `Value`
//!   reads, we read the same (each raw value parses to the same `Value`).
//!   Where we accept and `Value` refuses, the reason must be one of the
//!   documented differences (fuzz/README.md): a number out of `f64` range,
//!   or a lone UTF-16 surrogate escape in a value (we keep values raw). Any
//!   other difference fails (nesting included: the bus's limit is
//!   serde_json's).
#![no_main]

use std::collections::HashMap;
use std::fmt;

use hermes_bus::error::ErrorCode;
use hermes_bus::message::{scanner_accepts, scanner_accepts_bytes, BusMessage, MAX_DEPTH};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The members of the top-level object, in order, duplicates included.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug)]
enum Reference<'a> {
    Object(Vec<(String, &'a RawValue)>),
    Error(ErrorCode),
}

fn reference(text: &str) -> Reference<'_> {
    match serde_json::from_str::<Entries>(text) {
        Ok(e) => Reference::Object(e.0),
        Err(_) => {
            let object = text
                .trim_start_matches([' ', '\t', '\n', '\r'])
                .starts_with('{');
            if !object && serde_json::from_str::<IgnoredAny>(text).is_ok() {
                Reference::Error(ErrorCode::NotObject)
            } else {
                Reference::Error(ErrorCode::BadJson)
            }
        }
    }
}

/// Members without repeats: first place, last value.
fn dedup<'a>(entries: &[(String, &'a RawValue)]) -> Vec<(String, &'a str)> {
    let mut out: Vec<(String, &str)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (k, v) in entries {
        match at.get(k.as_str()) {
            Some(&i) => out[i].1 = v.get(),
            None => {
                at.insert(k, out.len());
                out.push((k.clone(), v.get()));
            }
        }
    }
    out
}

/// Deepest nesting of containers (the top-level one is 1), skipping
/// strings; exact on valid JSON, an estimate on anything else.
fn depth(s: &[u8]) -> usize {
    let (mut d, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in s {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                d += 1;
                max = max.max(d);
            }
            b'}' | b']' => d = d.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A documented difference between reading raw values and `Value`.
fn documented_value_difference(err: &str) -> bool {
    err.contains("number out of range")
        || err.contains("surrogate")
        || err.contains("unexpected end of hex escape")
}

fn check_object(data: &[u8], text: &str, m: &BusMessage, entries: &[(String, &RawValue)]) {
    let want = dedup(entries);
    let got: Vec<(String, &str)> = m.iter().map(|(k, v)| (k.to_owned(), v.get())).collect();
    assert_eq!(got, want, "fields differ from serde_json's");
    for (k, v) in &want {
        assert_eq!(m.raw(k).map(|r| r.get()), Some(*v), "raw({k:?})");
    }
    for key in ["type", "to", "id", "from", "ts"] {
        let raw = want.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        assert_eq!(m.raw(key).map(|r| r.get()), raw, "raw({key:?})");
        assert_eq!(m.contains(key), raw.is_some());
        let expect: Result<Option<String>, ()> = match raw {
            None => Ok(None),
            Some(r) => serde_json::from_str::<Option<String>>(r).map_err(|_| ()),
        };
        let ours = m.str_field(key);
        match (&ours, &expect) {
            (Ok(a), Ok(b)) => assert_eq!(a.as_deref(), b.as_deref(), "str_field({key:?})"),
            (Err(e), Err(())) => assert_eq!(e.code, ErrorCode::BadField),
            _ => panic!("str_field({key:?}): ours {ours:?}, serde_json {expect:?}"),
        }
        if key == "type" {
            match (m.kind(), expect) {
                (Ok(a), Ok(Some(b))) => assert_eq!(a, b),
                (Err(e), Ok(None)) => assert_eq!(e.code, ErrorCode::MissingField),
                (Err(e), Err(())) => assert_eq!(e.code, ErrorCode::BadField),
                (k, e) => panic!("kind(): ours {k:?}, serde_json {e:?}"),
            }
        }
    }
    // Forwarding: as received when nothing repeated, else re-encoded
    // without repeats.
    let out = m.to_json();
    if want.len() == entries.len() {
        assert_eq!(
            &out[..],
            data,
            "an unchanged message must be sent on as received"
        );
        assert_eq!(&m.to_frame()[4..], data);
    } else {
        let back = std::str::from_utf8(&out).expect("re-encoded message is UTF-8");
        let again = match serde_json::from_str::<Entries>(back) {
            Ok(e) => e.0,
            Err(e) => panic!("re-encoded message {back:?} is not a JSON object: {e}"),
        };
        let again: Vec<(String, &str)> = again.iter().map(|(k, v)| (k.clone(), v.get())).collect();
        assert_eq!(again, want, "re-encoding changed the fields");
    }
    // serde_json::Value as a second reference.
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => {
            assert_eq!(map.len(), want.len());
            for (k, raw) in &want {
                let v: serde_json::Value = serde_json::from_str(raw)
                    .unwrap_or_else(|e| panic!("raw value {raw:?} of {k:?}: {e}"));
                assert_eq!(Some(&v), map.get(k), "value of {k:?}");
            }
        }
        Ok(other) => panic!("Value reads {other:?}, not an object"),
        Err(e) => {
            let e = e.to_string();
            assert!(
                documented_value_difference(&e),
                "undocumented difference: accepted, but serde_json::Value says {e}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let ours = BusMessage::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        let e = ours.expect_err("accepted a payload that is not UTF-8");
        assert_eq!(e.code, ErrorCode::BadUtf8);
        assert!(
            !scanner_accepts_bytes(data),
            "the scanner accepts bad UTF-8"
        );
        return;
    };
    let want = reference(text);
    let scanner = scanner_accepts(text);
    assert_eq!(scanner_accepts_bytes(data), scanner);
    let deep = depth(data) > MAX_DEPTH;
    match (&ours, &want) {
        (Ok(m), Reference::Object(entries)) => {
            assert!(scanner, "valid object {text:?} fell back to the slow path");
            assert!(!deep, "accepted nesting past MAX_DEPTH: {text:?}");
            check_object(data, text, m, entries);
        }
        (Err(e), Reference::Object(_)) => {
            assert!(scanner, "valid object {text:?} refused by the scanner");
            assert!(deep, "refused {text:?} ({e}), serde_json reads an object");
            assert_eq!(e.code, ErrorCode::TooDeep, "{e}");
        }
        (Err(e), Reference::Error(code)) => {
            assert!(!scanner, "the scanner accepts invalid {text:?}");
            if e.code != *code {
                assert!(
                    deep && *code == ErrorCode::BadJson && e.code == ErrorCode::TooDeep,
                    "error code for {text:?}: {e}, serde_json: {code}"
                );
            }
        }
        (Ok(_), Reference::Error(code)) => {
            panic!("accepted {text:?}, serde_json says {code}")
        }
    }
    // Whatever Value reads as an object, we read too (the converse, with its
    // documented exceptions, is checked above).
    if let Ok(serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(text) {
        assert!(
            ours.is_ok(),
            "serde_json::Value reads {text:?} as an object, we do not"
        );
    }
});
