//! The pub-sub envelope as the ZeroMQ side decodes it: four frames (topic,
//! origin, data, ts), `Envelope::from_frames`, `parse_header`, `parse_ts`,
//! the proxy's cheap `looks_like_envelope`, `peek_dtype`, and the
//! ASCII-escaped topic and subscription encodings.
//!
//! Input: byte 0 gives the frame count (0 to 5); each frame but the last is
//! a length byte and that many bytes; the last frame is the rest.
//!
//! Invariants:
//! - No panic; a count other than 4 is `FrameCount`.
//! - `looks_like_envelope` only passes four frames with a parseable ts.
//! - A decoded envelope has a finite ts and exactly the topic and origin
//!   serde_json reads; `parse_header` and `to_raw_json` of JSON data (the
//!   bus bridge's path) agree with `from_frames`; when topic and origin are
//!   written without padding the proxy's cheap check passes it too (it
//!   never drops a well-formed one).
//! - Our own encoding of a decoded envelope passes the cheap check and
//!   decodes back to an equal envelope (JSON), or to the same topic, origin,
//!   ts and the same data value (MessagePack).
//! - `topic_frame(t)` is ASCII, reads back as `t`, and every
//!   `subscription_for` of a prefix of `t` is a byte prefix of it (so a
//!   prefix subscription matches the topic on the wire).
//! - `peek_dtype`, when it names a dtype of a payload that decodes, names
//!   the array's first element.
#![no_main]

use hermes_bus::codec::{self, Codec};
use hermes_bus::envelope::{
    looks_like_envelope, parse_header, parse_ts, peek_dtype, subscription_for, topic_frame,
    Envelope, EnvelopeError, Registry,
};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fn split(data: &[u8]) -> Vec<&[u8]> {
    let Some((&b0, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let n = usize::from(b0 % 6);
    let mut frames = Vec::with_capacity(n);
    for i in 0..n {
        if i + 1 == n {
            frames.push(rest);
            break;
        }
        let Some((&len, r)) = rest.split_first() else {
            frames.push(&[][..]);
            continue;
        };
        let len = usize::from(len).min(r.len());
        frames.push(&r[..len]);
        rest = &r[len..];
    }
    frames
}

fn check_topic_encoding(t: &str) {
    let f = topic_frame(t);
    assert!(f.is_ascii(), "topic frame of {t:?} is not ASCII");
    let back: String = serde_json::from_slice(&f).expect("topic frame is a JSON string");
    assert_eq!(back, t);
    for (n, (i, _)) in t.char_indices().chain([(t.len(), ' ')]).enumerate() {
        if n > 64 && i != t.len() {
            continue;
        }
        let sub = subscription_for(&t[..i]);
        assert!(
            f.starts_with(&sub),
            "subscription for {:?} does not prefix the topic frame of {t:?}",
            &t[..i]
        );
    }
}

fn unpadded(f: &[u8]) -> bool {
    f.first() == Some(&b'"') && f.last() == Some(&b'"')
}

fn data_value(d: &hermes_bus::envelope::Data) -> Option<serde_json::Value> {
    let raw = d.to_raw_json().ok()?;
    serde_json::from_str(raw.get()).ok()
}

fuzz_target!(|data: &[u8]| {
    let frames = split(data);
    let reg = Registry::builtin();
    let looks = looks_like_envelope(&frames);
    if looks {
        assert_eq!(frames.len(), 4);
        assert!(parse_ts(frames[3]).is_some());
        assert!(!frames[2].is_empty());
    }
    for f in &frames {
        if let Some(ts) = parse_ts(f) {
            assert!(ts.is_finite());
        }
        if let Ok(s) = std::str::from_utf8(f) {
            check_topic_encoding(s);
        }
        if let Some(dt) = peek_dtype(f) {
            if let Ok(raw) = codec::to_raw_json(f) {
                if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
                    let first: Option<String> = items
                        .first()
                        .and_then(|v| serde_json::from_str(v.get()).ok());
                    assert_eq!(first.as_deref(), Some(dt.as_str()), "peek_dtype");
                }
            }
        }
    }
    let res = Envelope::from_frames(&frames, &reg);
    if frames.len() != 4 {
        assert!(matches!(res, Err(EnvelopeError::FrameCount(n)) if n == frames.len()));
        return;
    }
    let header = parse_header(frames[0], frames[1], frames[3]);
    let e = match res {
        Ok(e) => e,
        Err(_) => {
            // The bridge's path refuses it too, or only its data is bad.
            if header.is_ok() {
                assert!(codec::to_raw_json(frames[2]).is_err());
            }
            return;
        }
    };
    let (topic, origin, ts) = header.expect("from_frames accepted the header");
    assert_eq!((&e.topic, &e.origin), (&topic, &origin));
    assert_eq!(e.ts.to_bits(), ts.to_bits());
    assert!(e.ts.is_finite());
    assert_eq!(
        serde_json::from_slice::<String>(frames[0]).ok().as_ref(),
        Some(&e.topic)
    );
    // The bridge's view of the data: what decodes as JSON is raw JSON too.
    // (A MessagePack struct may hold values JSON cannot, e.g. bin in an
    // ignored element: typed for a Receiver, not transcodable by the proxy.)
    if codec::Codec::detect(frames[2]) == Codec::Json {
        let raw = codec::to_raw_json(frames[2]);
        assert!(
            raw.is_ok(),
            "decoded, but the data is not raw JSON: {raw:?}"
        );
    }
    if unpadded(frames[0]) && unpadded(frames[1]) {
        assert!(
            looks,
            "the proxy's cheap check drops a well-formed envelope"
        );
    }
    check_topic_encoding(&e.topic);
    check_topic_encoding(&e.origin);

    // Our own encoding, back.
    let ours = e.to_frames(Codec::Json).expect("encode as JSON");
    assert!(
        looks_like_envelope(&ours),
        "our own envelope fails the cheap check"
    );
    let back = Envelope::from_frames(&ours, &reg).expect("our own envelope decodes");
    assert_eq!(back, e, "JSON round trip");
    if let Ok(mp) = e.to_frames(Codec::MsgPack) {
        assert!(looks_like_envelope(&mp));
        let back = Envelope::from_frames(&mp, &reg).expect("our own MessagePack envelope decodes");
        assert_eq!(
            (&back.topic, &back.origin, back.ts.to_bits()),
            (&e.topic, &e.origin, e.ts.to_bits())
        );
        if let (Some(a), Some(b)) = (data_value(&back.data), data_value(&e.data)) {
            assert_eq!(a, b, "MessagePack round trip of the data");
        }
    }
});
