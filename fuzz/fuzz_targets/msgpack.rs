//! MessagePack payloads (marked with 0xC1) as the Unix session and the
//! ZeroMQ proxy decode them: `codec::to_raw_json`, `codec::decode`,
//! `envelope::peek_dtype`, `Registry::decode`, and the session's step from
//! transcoded JSON to a `BusMessage`.
//!
//! Invariants:
//! - No panic, and bounded work: the JSON produced is at most 32 bytes per
//!   input byte (plus a constant), so a small payload cannot claim a huge
//!   allocation or output (libFuzzer's -timeout and -rss_limit_mb bound
//!   time and memory per input).
//! - `to_raw_json` and `decode::<Value>` agree; what they produce is valid
//!   JSON; transcoding it back to MessagePack and to JSON again gives the
//!   same text (the transcoding is stable).
//! - The session's path: transcoded JSON that is an object parses to a
//!   `BusMessage` with the same members, or is `too_deep` (nesting past
//!   `MAX_DEPTH`); anything else is `not_object`.
//! - `peek_dtype`, when it finds a dtype and the payload decodes, names the
//!   first element of the decoded array.
#![no_main]

use std::collections::BTreeMap;

use hermes_bus::codec::{self, MSGPACK_MARKER};
use hermes_bus::envelope::{peek_dtype, Registry};
use hermes_bus::error::ErrorCode;
use hermes_bus::message::{BusMessage, MAX_DEPTH};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let mut payload = Vec::with_capacity(1 + data.len());
    payload.push(MSGPACK_MARKER);
    payload.extend_from_slice(data);

    let raw = codec::to_raw_json(&payload);
    let value = codec::decode::<Value>(&payload);
    assert_eq!(
        raw.is_ok(),
        value.is_ok(),
        "to_raw_json and decode disagree"
    );
    let dtype = peek_dtype(&payload);
    // The registry: typed, raw, or the codec error; never a panic.
    if let Ok(d) = Registry::builtin().decode(&payload) {
        let _ = d.to_raw_json();
        let _ = d.dtype();
    }
    let Ok(raw) = raw else {
        return;
    };
    let text = raw.get();
    assert!(
        text.len() <= 32 * payload.len() + 64,
        "{} bytes of MessagePack became {} bytes of JSON",
        payload.len(),
        text.len()
    );
    // Valid JSON, of any depth.
    serde_json::from_str::<&RawValue>(text)
        .unwrap_or_else(|e| panic!("transcoded JSON {text:?} is invalid: {e}"));

    // Stable transcoding: JSON -> MessagePack -> JSON gives the same text.
    if let Ok(again) = codec::json_to_msgpack(&raw) {
        let back = codec::to_raw_json(&again)
            .unwrap_or_else(|e| panic!("our own MessagePack does not decode: {e}"));
        assert_eq!(back.get(), text, "transcoding is not stable");
    }

    // The session's path to a message.
    match BusMessage::parse(text.as_bytes()) {
        Ok(m) => {
            // Raw values, so any depth compares.
            let obj: BTreeMap<String, &RawValue> = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("parsed, but not an object to serde_json: {e}"));
            assert_eq!(obj.len(), m.iter().count());
            for (k, r) in m.iter() {
                assert_eq!(obj.get(k).map(|v| v.get()), Some(r.get()), "member {k:?}");
            }
        }
        Err(e) if e.code == ErrorCode::TooDeep => {
            assert!(text.starts_with('{'));
            let open = text.bytes().filter(|&b| b == b'{' || b == b'[').count();
            assert!(open > MAX_DEPTH, "too_deep for {text:?}");
        }
        Err(e) => {
            assert_eq!(e.code, ErrorCode::NotObject, "{e} for {text:?}");
            assert!(!text.starts_with('{'));
        }
    }

    if let (Some(dt), Ok(Value::Array(items))) = (dtype, value) {
        assert_eq!(items.first(), Some(&Value::String(dt)), "peek_dtype");
    }
});
