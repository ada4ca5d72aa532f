//! The Unix-socket frame codec and message parser on an arbitrary byte
//! stream, delivered in arbitrary chunks.
//!
//! Input: byte 0 picks the chunking, byte 1 the maximum frame size, the
//! rest is the stream a client sent.
//!
//! Invariants:
//! - `frame::decode` and `frame::peek` (the session's way: parse in place,
//!   advance past whole frames) both yield exactly the frames a plain
//!   one-shot reading of the whole stream yields, in order, whatever the
//!   chunking; they stop with `TooLarge { len, max }` exactly where that
//!   reading meets a header over the maximum, and otherwise keep exactly
//!   the trailing partial frame buffered.
//! - Every frame parses (as the session does: MessagePack when marked,
//!   else JSON) to a message or a typed `ProtocolError` of a code that
//!   parsing can give; `parse` and `parse_frame` agree; a frame whose
//!   header does not match its payload is refused.
//! - A parsed message lists each key once and re-encodes (`to_frame`) to a
//!   frame with a correct header that parses back to the same fields; its
//!   routing fields read as a string, absent, or a typed `BadField`.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use hermes_bus::codec::{self, MSGPACK_MARKER};
use hermes_bus::error::{ErrorCode, ProtocolError};
use hermes_bus::message::BusMessage;
use hermes_bus::transports::unix::frame::{self, FrameError, MAX_FRAME};
use hermes_bus_fuzz::chunks;
use libfuzzer_sys::fuzz_target;

/// What reading a stream gives: whole frames, then an error or the
/// partial frame left buffered.
#[derive(Debug, PartialEq)]
struct Read {
    frames: Vec<Vec<u8>>,
    end: Result<Vec<u8>, FrameError>,
}

/// The reference: the whole stream at once, plain arithmetic.
fn oracle(s: &[u8], max: usize) -> Read {
    let mut frames = Vec::new();
    let mut p = 0;
    let end = loop {
        let rest = &s[p..];
        if rest.len() < 4 {
            break Ok(rest.to_vec());
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > max {
            break Err(FrameError::TooLarge { len, max });
        }
        if rest.len() - 4 < len {
            break Ok(rest.to_vec());
        }
        frames.push(rest[4..4 + len].to_vec());
        p += 4 + len;
    };
    Read { frames, end }
}

/// `frame::decode` on a buffer fed chunk by chunk.
fn by_decode(parts: &[&[u8]], max: usize) -> Read {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        loop {
            match frame::decode(&mut buf, max) {
                Ok(Some(f)) => frames.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    return Read {
                        frames,
                        end: Err(e),
                    }
                }
            }
        }
    }
    Read {
        frames,
        end: Ok(buf.to_vec()),
    }
}

/// `frame::peek` the way the session reads: in place, then advance.
fn by_peek(parts: &[&[u8]], max: usize) -> Read {
    let mut buf: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        let mut used = 0;
        loop {
            match frame::peek(&buf[used..], max) {
                Ok(Some(len)) => {
                    frames.push(buf[used + 4..used + 4 + len].to_vec());
                    used += 4 + len;
                }
                Ok(None) => break,
                Err(e) => {
                    return Read {
                        frames,
                        end: Err(e),
                    }
                }
            }
        }
        buf.drain(..used);
    }
    Read {
        frames,
        end: Ok(buf),
    }
}

/// The session's MessagePack path (transports/unix/session.rs).
fn parse_msgpack(payload: &[u8]) -> Result<BusMessage, ProtocolError> {
    let raw = codec::to_raw_json(payload)
        .map_err(|e| ProtocolError::new(ErrorCode::BadMsgpack, e.to_string()))?;
    BusMessage::parse(raw.get().as_bytes())
}

fn fields(m: &BusMessage) -> Vec<(String, String)> {
    m.iter()
        .map(|(k, v)| (k.to_owned(), v.get().to_owned()))
        .collect()
}

fn with_header(len: u32, payload: &[u8]) -> Bytes {
    let mut f = BytesMut::with_capacity(4 + payload.len());
    f.put_u32(len);
    f.put_slice(payload);
    f.freeze()
}

fn check_message(m: &BusMessage) {
    let out = m.to_frame();
    assert!(out.len() >= 4);
    let n = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
    assert_eq!(n, out.len() - 4, "to_frame header must match its payload");
    assert_eq!(&m.to_json()[..], &out[4..], "to_json is to_frame's payload");
    let back = BusMessage::parse_frame(out.clone())
        .unwrap_or_else(|e| panic!("re-encoded message does not parse: {e}"));
    assert_eq!(fields(&back), fields(m), "re-encoding changed the fields");
    // Each key once (a repeated key keeps its last value, in one place).
    let mut keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n, "a key is listed twice");
    for key in ["type", "to", "from", "id", "ts", "endpoint", "topic"] {
        match m.str_field(key) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code, ErrorCode::BadField, "{key}: {e}"),
        }
    }
    if let Err(e) = m.kind() {
        assert!(
            matches!(e.code, ErrorCode::MissingField | ErrorCode::BadField),
            "{e}"
        );
    }
}

fn check_payload(payload: &[u8]) {
    if payload.first() == Some(&MSGPACK_MARKER) {
        match parse_msgpack(payload) {
            Ok(m) => check_message(&m),
            // Transcoded MessagePack is valid JSON: only "not an object"
            // or "too deep".
            Err(e) => assert!(
                matches!(
                    e.code,
                    ErrorCode::BadMsgpack | ErrorCode::NotObject | ErrorCode::TooDeep
                ),
                "{e}"
            ),
        }
        return;
    }
    let frame_in = frame::encode(payload);
    let a = BusMessage::parse(payload);
    let b = BusMessage::parse_frame(frame_in.clone());
    match (&a, &b) {
        (Ok(x), Ok(y)) => {
            assert_eq!(fields(x), fields(y), "parse and parse_frame disagree");
            check_message(y);
        }
        (Err(x), Err(y)) => {
            assert_eq!(x.code, y.code, "parse and parse_frame disagree");
            assert!(
                matches!(
                    x.code,
                    ErrorCode::BadUtf8
                        | ErrorCode::BadJson
                        | ErrorCode::NotObject
                        | ErrorCode::TooDeep
                ),
                "unexpected parse error {x}"
            );
        }
        _ => panic!("parse {a:?} but parse_frame {b:?}"),
    }
    // A header that does not match the payload is refused.
    let wrong = with_header((payload.len() as u32).wrapping_add(1), payload);
    assert!(BusMessage::parse_frame(wrong).is_err());
    if payload.len() >= 4 {
        assert!(BusMessage::parse_frame(Bytes::copy_from_slice(&payload[..3])).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let seed = data[0];
    let max = if data[1] >= 0x80 {
        MAX_FRAME
    } else {
        usize::from(data[1]) * 4
    };
    let stream = &data[2..];
    let want = oracle(stream, max);
    let parts = chunks(seed, stream);
    let got = by_decode(&parts, max);
    assert_eq!(got, want, "frame::decode out of sync");
    let got = by_peek(&parts, max);
    assert_eq!(got, want, "frame::peek out of sync");
    if let Err(FrameError::TooLarge { len, max: m }) = want.end {
        assert!(len > m && m == max);
    }
    for f in &want.frames {
        check_payload(f);
    }
});
