//! Numbered envelopes on the ZeroMQ wire: the fifth, sequence frame.
//!
//! An envelope is four frames (topic, origin, data, ts); a numbered one has
//! a fifth: the JSON array `["<origin id>", <n>]`, where the origin id is
//! the numbering publisher instance (`name#epoch`, see [`crate::seq`]) and
//! `n` its number for this topic, from 1. Who sends and gets it:
//!
//! - Each side says in its ZMTP READY that it speaks it, with the property
//!   [`SEQ_PROPERTY`](super::zmtp::SEQ_PROPERTY) `= 1` (as
//!   `X-Hermes-Codec` says "MessagePack"). Reference and libzmq peers never
//!   send it.
//! - A `Publisher` numbers every envelope per topic, and sends the fifth
//!   frame only to a proxy that said it takes it (ours does; a libzmq
//!   proxy gets four frames).
//! - The proxy treats a fifth frame as a number only from a publisher that
//!   announced it (any other 5-frame message is forwarded as it is, as
//!   today). It passes numbered envelopes as they are to subscribers that
//!   asked, and to every other subscriber the same envelope without the
//!   fifth frame: a second wire form made once per message (the first four
//!   frames, the last one's MORE flag cleared), byte-identical to what an
//!   unnumbered publisher would have sent. Nothing else is parsed.
//! - A proxy-side drop for one subscriber (its queue full) consumes the
//!   number, so that subscriber's `Receiver` sees a gap.
//! - The bus numbers, as its own origin, the topic messages it forwards
//!   from Unix sessions, so those arrive numbered too.

use std::borrow::Cow;

use bytes::BytesMut;

use super::envelope::write_ascii_json_str;
use super::zmtp;

/// Writes the sequence frames of one origin: the fixed `["origin",` part
/// is encoded once, each frame adds only its number.
#[derive(Debug, Clone)]
pub struct SeqFramer {
    /// `["<origin id>",` as JSON (ASCII-escaped like every frame).
    head: Vec<u8>,
}

impl SeqFramer {
    /// The framer of origin id `origin`.
    pub fn new(origin: &str) -> SeqFramer {
        let mut head = Vec::with_capacity(origin.len() + 4);
        head.push(b'[');
        write_ascii_json_str(origin, true, &mut head);
        head.push(b',');
        SeqFramer { head }
    }

    /// Appends the last frame of a message: number `n` of this origin.
    pub fn put(&self, out: &mut BytesMut, n: u64) {
        let mut digits = [0u8; 20];
        let d = decimal(n, &mut digits);
        zmtp::put_frame_parts(out, false, &[&self.head, d, b"]"]);
    }

    /// The frame body for number `n` (for callers that build frame lists).
    pub fn body(&self, n: u64) -> Vec<u8> {
        let mut digits = [0u8; 20];
        let d = decimal(n, &mut digits);
        let mut out = Vec::with_capacity(self.head.len() + d.len() + 1);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(d);
        out.push(b']');
        out
    }
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Cheap shape check of a sequence frame (the proxy's hot path): a JSON
/// array opening with a string.
pub fn looks_like_seq_frame(frame: &[u8]) -> bool {
    frame.len() >= 5 && frame.starts_with(b"[\"") && frame.ends_with(b"]")
}

/// Reads a sequence frame: the origin id and the number; None when it is
/// not `["<string>", <unsigned integer>]`.
pub fn parse_seq_frame(frame: &[u8]) -> Option<(Cow<'_, str>, u64)> {
    if let Some((origin, n)) = parse_plain_seq_frame(frame) {
        return Some((Cow::Borrowed(origin), n));
    }
    let (origin, n): (Cow<'_, str>, u64) = serde_json::from_slice(frame).ok()?;
    Some((origin, n))
}

/// The form [`SeqFramer`] writes, `["<origin without escapes>",<digits>]`,
/// read without a JSON parser (the receiver's hot path); None for
/// anything else (escapes, spaces, ...), which the full parser then reads
/// or refuses. It accepts only what that parser accepts, with the same
/// result.
fn parse_plain_seq_frame(frame: &[u8]) -> Option<(&str, u64)> {
    let rest = frame.strip_prefix(b"[\"")?;
    let end = rest
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if rest[end] != b'"' {
        return None;
    }
    let origin = std::str::from_utf8(&rest[..end]).ok()?;
    let digits = rest[end + 1..].strip_prefix(b",")?.strip_suffix(b"]")?;
    // JSON numbers have no leading zero (but 0 itself).
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some((origin, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transports::zmq::zmtp::{FrameReader, Inbound};

    #[test]
    fn sequence_frames_round_trip_and_end_the_message() {
        let f = SeqFramer::new("feed é#00000000000000ff");
        assert_eq!(f.body(0), br#"["feed \u00e9#00000000000000ff",0]"#.to_vec());
        for n in [1u64, 9, 10, 12345, u64::MAX] {
            let body = f.body(n);
            assert!(looks_like_seq_frame(&body));
            let (origin, got) = parse_seq_frame(&body).expect("parses");
            assert_eq!((origin.as_ref(), got), ("feed é#00000000000000ff", n));
        }
        // As the fifth frame of a message: the reader sees 5 frames, and
        // the four-frame form is the prefix with MORE cleared.
        let mut wire = BytesMut::new();
        zmtp::put_message(&mut wire, &[&b"\"t\""[..], b"\"o\"", b"1", b"2.5"]);
        let four = wire.clone();
        // Re-encode with MORE on the ts frame, then the sequence frame.
        let mut wire = BytesMut::new();
        for body in [&b"\"t\""[..], b"\"o\"", b"1", b"2.5"] {
            zmtp::put_frame(&mut wire, true, body);
        }
        f.put(&mut wire, 42);
        let mut r = FrameReader::new(1 << 20);
        r.buf.extend_from_slice(&wire);
        let Ok(Some(Inbound::Message(m))) = r.next_item() else {
            panic!("one message");
        };
        assert_eq!(m.frames, 5);
        let [_, _, _, _, seq] = m.frames_n::<5>().expect("5 frames");
        assert_eq!(parse_seq_frame(seq).map(|(_, n)| n), Some(42));
        let (at, _) = zmtp::frame_offsets::<5>(&m.wire).expect("offsets");
        let mut stripped = m.wire[..at[4]].to_vec();
        zmtp::clear_more(&mut stripped, at[3]);
        assert_eq!(stripped, four.to_vec());
        // Other spellings the full parser reads, the same way; what it
        // refuses stays refused.
        for (frame, want) in [
            (&br#"[ "o" , 7 ]"#[..], Some(("o", 7))),
            (br#"["o\u00e9",7]"#, Some(("o\u{e9}", 7))),
            (
                "[\"\u{e9}\",18446744073709551615]".as_bytes(),
                Some(("\u{e9}", u64::MAX)),
            ),
            (br#"["o",18446744073709551616]"#, None),
            (br#"["o",07]"#, None),
            (br#"["o",0]"#, Some(("o", 0))),
            (b"[\"o\x01\",7]", None),
            (br#"["o",7]x"#, None),
        ] {
            let got = parse_seq_frame(frame);
            assert_eq!(
                got.as_ref().map(|(o, n)| (o.as_ref(), *n)),
                want,
                "{frame:?}"
            );
        }
        // Not sequence frames.
        for bad in [
            &b"[1,2]"[..],
            b"[\"o\"]",
            b"[\"o\",-1]",
            b"{}",
            b"[\"o\",1.5]",
        ] {
            assert!(parse_seq_frame(bad).is_none(), "{bad:?}");
        }
    }
}
