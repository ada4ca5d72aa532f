//! In-process cost of reading one frame: `BusMessage::parse_frame` (UTF-8
//! and JSON validation, spans of the top-level fields) on the bench's own
//! message frames, against copying the same bytes (`memcpy`: memory
//! speed on this machine), against `simd-json` (a port of simdjson, the
//! reference SIMD JSON parser: a copy, since it parses in place, then its
//! tape) and against `serde_json` checking the same text.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hermes_bus::BusMessage;

use crate::util;

/// A frame as the bench senders write it (the reference client's shape)
/// with a `size`-byte body.
pub fn message_frame(size: usize) -> Bytes {
    let mut f = Vec::new();
    util::put_message(&mut f, "dst", "src", 1, &util::body(size));
    Bytes::from(f)
}

/// A frame whose body is token-dense JSON of about `size` bytes (numbers,
/// short strings, small objects and arrays): what a large frame looks like
/// when it is not one long string.
pub fn dense_frame(size: usize) -> Bytes {
    let mut body = String::from("{\"rows\":[");
    let mut i = 0u64;
    while body.len() + 120 < size {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            "{{\"id\":{i},\"px\":{}.{:02},\"qty\":-{},\"sym\":\"S{:04}\",\"ok\":{},\"t\":[1,2.5e-3,null]}}",
            100 + i % 97,
            i % 100,
            i % 13,
            i % 9973,
            i % 2 == 0
        ));
        i += 1;
    }
    body.push_str("]}");
    let mut f = Vec::new();
    util::put_message(&mut f, "dst", "src", 1, &body);
    Bytes::from(f)
}

/// Frames per second for `f` over about `time`.
fn rate(time: Duration, mut f: impl FnMut() -> bool) -> Result<f64, String> {
    let t0 = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..16 {
            if !f() {
                return Err("frame refused".into());
            }
        }
        n += 16;
        let e = t0.elapsed();
        if e >= time {
            return Ok(n as f64 / e.as_secs_f64());
        }
    }
}

/// Bytes per second of `BusMessage::parse_frame` on `frame`.
pub fn parse(frame: &Bytes, time: Duration) -> Result<f64, String> {
    let len = frame.len() as f64;
    rate(time, || {
        BusMessage::parse_frame(black_box(frame.clone()))
            .map(|m| black_box(m).contains("type"))
            .unwrap_or(false)
    })
    .map(|r| r * len)
}

/// Bytes per second of copying `frame` into a buffer (memory speed).
pub fn memcpy(frame: &Bytes, time: Duration) -> Result<f64, String> {
    let mut dst = vec![0u8; frame.len()];
    let len = frame.len() as f64;
    rate(time, || {
        dst.copy_from_slice(black_box(&frame[..]));
        black_box(&mut dst);
        true
    })
    .map(|r| r * len)
}

/// Bytes per second of `serde_json` validating the payload (UTF-8 and
/// JSON, nothing kept).
pub fn serde(frame: &Bytes, time: Duration) -> Result<f64, String> {
    let len = frame.len() as f64;
    rate(time, || {
        serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&frame[4..])).is_ok()
    })
    .map(|r| r * len)
}

/// Bytes per second of `simd-json` validating the payload: a copy into a
/// reused buffer (it parses in place), then its tape (reused buffers).
pub fn simd_json(frame: &Bytes, time: Duration) -> Result<f64, String> {
    let len = frame.len() as f64;
    let mut copy = Vec::with_capacity(frame.len());
    let mut buffers = simd_json::Buffers::new(frame.len());
    rate(time, || {
        copy.clear();
        copy.extend_from_slice(black_box(&frame[4..]));
        simd_json::to_tape_with_buffers(&mut copy, &mut buffers)
            .map(|t| !black_box(t).0.is_empty())
            .unwrap_or(false)
    })
    .map(|r| r * len)
}

/// Parses `frame` `n` times; returns how many parsed.
pub fn count(frame: &Bytes, n: u64) -> u64 {
    (0..n)
        .filter(|_| {
            BusMessage::parse_frame(black_box(frame.clone()))
                .map(|m| black_box(m).contains("type"))
                .unwrap_or(false)
        })
        .count() as u64
}
