//! ZMTP 3.x from a peer: the frame reader (`FrameReader::next_item`) fed an
//! arbitrary byte stream in arbitrary chunks, and the NULL handshake
//! (greeting, READY properties) over an in-memory stream.
//!
//! Input: byte 0 picks the chunking; byte 1 the message limit (bits 0-2),
//! our socket type (bits 3-4) and whether the stream starts with a
//! handshake (bit 7); the rest is what the peer sent.
//!
//! Invariants:
//! - No panic, whatever the lengths (up to 2^64 - 1).
//! - In sync: the reader yields exactly the items (messages with their
//!   wire bytes, commands, `Oversized` reports with their totals) that a
//!   plain one-shot reading of the whole stream with 128-bit arithmetic
//!   gives, in order, whatever the chunking, and fails exactly where that
//!   reading meets a protocol error.
//! - A frame announcing 2^63 bytes or more (past ZMTP's 63-bit sizes,
//!   near 2^64 in particular, where sums wrap) is never part of a yielded
//!   message: it is a protocol error as soon as its header is in (the peer
//!   is closed), in a message being read or one being skipped, and nothing
//!   after it is yielded.
//! - Every message yielded is whole: at least one frame, MORE on all but
//!   the last, no command frame, its bodies within the limit, and its wire
//!   bytes re-read by a fresh reader give back exactly that message.
//! - Handshake: it succeeds exactly when the stream starts with a ZMTP 3.x
//!   NULL greeting and a READY whose properties are well formed and name a
//!   socket type ours accepts; then it reports the peer's minor version and
//!   exactly those properties, and leaves the rest of the stream to the
//!   reader.
#![no_main]

use bytes::Bytes;
use hermes_bus::transports::zmq::zmtp::{
    self, FrameReader, Inbound, PeerInfo, SocketType, SubChange, ZmtpError,
};
use hermes_bus_fuzz::chunks;
use libfuzzer_sys::fuzz_target;

const MORE: u8 = 1;
const LONG: u8 = 2;
const COMMAND: u8 = 4;
/// ZMTP sizes are 63-bit.
const MAX_WIRE: u64 = i64::MAX as u64;

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Message(Vec<u8>, usize),
    Command(String, Vec<u8>),
    Oversized(u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// Waiting for more bytes.
    More,
    /// A protocol error: the connection closes.
    Error,
    /// A frame length of 2^63 or more: a protocol error too.
    Poison,
}

fn header(s: &[u8], at: usize) -> Option<(usize, u64)> {
    let flags = *s.get(at)?;
    if flags & LONG != 0 {
        let b: [u8; 8] = s.get(at + 1..at + 9)?.try_into().ok()?;
        Some((9, u64::from_be_bytes(b)))
    } else {
        Some((2, u64::from(*s.get(at + 1)?)))
    }
}

/// The reference reading of a whole stream.
fn oracle(s: &[u8], max_msg: u64) -> (Vec<Item>, End) {
    let mut items = Vec::new();
    let n = s.len() as u128;
    let mut p = 0usize;
    'item: loop {
        let mut q = p;
        let mut frames = 0usize;
        let mut total: u128 = 0;
        loop {
            let Some(&flags) = s.get(q) else {
                return (items, End::More);
            };
            if flags & !(MORE | LONG | COMMAND) != 0 {
                return (items, End::Error);
            }
            let Some((hdr, len)) = header(s, q) else {
                return (items, End::More);
            };
            if len > MAX_WIRE {
                return (items, End::Poison);
            }
            let end = q as u128 + hdr as u128 + u128::from(len);
            if flags & COMMAND != 0 {
                if frames > 0 || flags & MORE != 0 || len > max_msg.max(4096) {
                    return (items, End::Error);
                }
                if end > n {
                    return (items, End::More);
                }
                let body = &s[q + hdr..end as usize];
                let Some(&k) = body.first() else {
                    return (items, End::Error);
                };
                let k = usize::from(k);
                if body.len() < 1 + k {
                    return (items, End::Error);
                }
                let data = &body[1 + k..];
                // RFC 37: a PING has a 2-byte TTL, contexts are at most
                // 16 bytes.
                let bad_beat = match &body[1..1 + k] {
                    b"PING" => data.len() < 2 || data.len() > 2 + 16,
                    b"PONG" => data.len() > 16,
                    _ => false,
                };
                if bad_beat {
                    return (items, End::Error);
                }
                let name = String::from_utf8_lossy(&body[1..1 + k]).into_owned();
                items.push(Item::Command(name, data.to_vec()));
                p = end as usize;
                continue 'item;
            }
            total += u128::from(len);
            if total > u128::from(max_msg) {
                // Skip the rest of this message.
                let mut end = end;
                let mut more = flags & MORE != 0;
                while more {
                    if end > n {
                        return (items, End::More);
                    }
                    let r = end as usize;
                    let Some(&f) = s.get(r) else {
                        return (items, End::More);
                    };
                    if f & (COMMAND | !(MORE | LONG)) != 0 {
                        return (items, End::Error);
                    }
                    let Some((h, l)) = header(s, r) else {
                        return (items, End::More);
                    };
                    if l > MAX_WIRE {
                        return (items, End::Poison);
                    }
                    total += u128::from(l);
                    end = r as u128 + h as u128 + u128::from(l);
                    more = f & MORE != 0;
                }
                if end > n {
                    return (items, End::More);
                }
                items.push(Item::Oversized(u64::try_from(total).unwrap_or(u64::MAX)));
                p = end as usize;
                continue 'item;
            }
            frames += 1;
            if end > n {
                return (items, End::More);
            }
            q = end as usize;
            if flags & MORE == 0 {
                items.push(Item::Message(s[p..q].to_vec(), frames));
                p = q;
                continue 'item;
            }
        }
    }
}

fn to_item(i: &Inbound) -> Item {
    match i {
        Inbound::Message(m) => Item::Message(m.wire.to_vec(), m.frames),
        Inbound::Command(n, d) => Item::Command(n.clone(), d.to_vec()),
        Inbound::Ping(p) => {
            let mut d = p.ttl_ds.to_be_bytes().to_vec();
            d.extend_from_slice(&p.context);
            Item::Command("PING".into(), d)
        }
        Inbound::Pong(p) => Item::Command("PONG".into(), p.context.to_vec()),
        Inbound::Oversized(t) => Item::Oversized(*t),
    }
}

/// Feeds `parts` to `r`, draining items after each; stops at an error.
fn feed(r: &mut FrameReader, parts: &[&[u8]], max_msg: u64, budget: usize) -> (Vec<Item>, bool) {
    let mut items = Vec::new();
    for part in parts {
        r.buf.extend_from_slice(part);
        loop {
            match r.next_item() {
                Ok(Some(item)) => {
                    check_item(&item, max_msg);
                    items.push(to_item(&item));
                    // Every item consumes at least two bytes.
                    assert!(items.len() <= budget, "items without progress");
                }
                Ok(None) => break,
                Err(ZmtpError::Protocol(_) | ZmtpError::Heartbeat(_)) => return (items, true),
                Err(e) => panic!("unexpected error kind from the frame reader: {e}"),
            }
        }
    }
    (items, false)
}

/// What must hold for every item, on its own.
fn check_item(item: &Inbound, max_msg: u64) {
    match item {
        Inbound::Message(m) => {
            assert!(m.frames >= 1);
            // Walk the wire: whole frames, MORE on all but the last.
            let w = &m.wire[..];
            let mut at = 0usize;
            let mut bodies = Vec::new();
            while at < w.len() {
                let flags = w[at];
                assert_eq!(
                    flags & !(MORE | LONG),
                    0,
                    "command or reserved flag in a message"
                );
                let (h, l) = header(w, at).expect("whole header");
                assert!(l <= MAX_WIRE, "a 2^63+ length yielded in a message");
                let end = (at as u128) + h as u128 + u128::from(l);
                assert!(
                    end <= w.len() as u128,
                    "a frame cut short in a yielded message"
                );
                bodies.push(&w[at + h..end as usize]);
                at = end as usize;
                let last = at == w.len();
                assert_eq!(
                    flags & MORE == 0,
                    last,
                    "MORE flag of frame {}",
                    bodies.len()
                );
            }
            assert_eq!(bodies.len(), m.frames, "frame count");
            let it: Vec<&[u8]> = m.frames().collect();
            assert_eq!(it, bodies, "FrameIter");
            let total: u64 = bodies.iter().map(|b| b.len() as u64).sum();
            assert!(total <= max_msg, "a message over the limit was yielded");
            assert_eq!(m.body_len() as u64, total);
            assert_eq!(m.first_frame(), bodies[0]);
            if let Some(f4) = m.frames_n::<4>() {
                assert_eq!(&f4[..], &bodies[..]);
            }
            // Re-read by a fresh reader: the same message, nothing else.
            let mut again = FrameReader::new(usize::MAX);
            again.buf.extend_from_slice(w);
            match again.next_item() {
                Ok(Some(Inbound::Message(m2))) => {
                    assert_eq!(m2.wire, m.wire);
                    assert_eq!(m2.frames, m.frames);
                }
                other => panic!("wire of a yielded message re-reads as {other:?}"),
            }
            assert!(again.buf.is_empty());
            if let Some(SubChange::Subscribe(p) | SubChange::Cancel(p)) =
                SubChange::from_inbound(item)
            {
                assert_eq!(m.frames, 1);
                assert_eq!(&p[..], &bodies[0][1..]);
            }
        }
        Inbound::Command(name, _) => {
            let _ = SubChange::from_inbound(item);
            assert!(name != "PING" && name != "PONG", "heartbeats are typed");
        }
        Inbound::Ping(p) => {
            assert!(p.context.len() <= zmtp::MAX_PING_CONTEXT);
            // The PONG re-reads as a PONG with the same context.
            let mut out = bytes::BytesMut::new();
            zmtp::put_pong(&mut out, p);
            let mut again = FrameReader::new(usize::MAX);
            again.buf.extend_from_slice(&out);
            match again.next_item() {
                Ok(Some(Inbound::Pong(q))) => assert_eq!(q.context, p.context),
                other => panic!("a PONG re-reads as {other:?}"),
            }
        }
        Inbound::Pong(p) => assert!(p.context.len() <= zmtp::MAX_PING_CONTEXT),
        Inbound::Oversized(total) => assert!(*total > max_msg),
    }
}

/// Compares what the reader gave with the reference.
fn compare(got: &[Item], failed: bool, want: &[Item], end: End) {
    match end {
        End::More => {
            assert_eq!(got, want, "reader out of sync");
            assert!(!failed, "reader failed where the stream is valid so far");
        }
        End::Error => {
            assert_eq!(got, want, "reader out of sync");
            assert!(failed, "reader accepted a protocol violation");
        }
        End::Poison => {
            for item in &got[want.len().min(got.len())..] {
                assert!(
                    !matches!(item, Item::Message(..)),
                    "a message yielded at or after a 2^63+ frame length: {item:?}"
                );
            }
            assert_eq!(got, want, "reader out of sync");
            assert!(failed, "a frame length of 2^63 or more must close the peer");
        }
    }
}

fn check_stream(seed: u8, stream: &[u8], max_msg: usize) {
    let max64 = max_msg as u64;
    let (want, end) = oracle(stream, max64);
    let budget = stream.len() / 2 + 1;
    for parts in [chunks(seed, stream), vec![stream]] {
        let mut r = FrameReader::new(max_msg);
        let (got, failed) = feed(&mut r, &parts, max64, budget);
        compare(&got, failed, &want, end);
    }
}

/// Reference parse of READY properties.
fn properties(mut d: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    while let Some(&n) = d.first() {
        let n = usize::from(n);
        let name = d.get(1..1 + n)?;
        let l: [u8; 4] = d.get(1 + n..5 + n)?.try_into().ok()?;
        let l = u32::from_be_bytes(l) as usize;
        let value = d.get(5 + n..5 + n + l)?;
        out.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
        d = &d[5 + n + l..];
    }
    Some(out)
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

fn check_handshake(stream: &[u8], max_msg: usize, ours: SocketType) {
    let mut reader = FrameReader::new(max_msg);
    let mut src: &[u8] = stream;
    let mut sink = tokio::io::sink();
    let res: Result<PeerInfo, ZmtpError> = RT.with(|rt| {
        rt.block_on(zmtp::handshake(
            &mut src,
            &mut sink,
            &mut reader,
            ours,
            &[],
            std::time::Duration::from_secs(5),
        ))
    });
    // The reference verdict.
    let g = stream.get(..zmtp::GREETING_LEN);
    let greeting_ok = g.is_some_and(|g| {
        let mech_end = g[12..32].iter().position(|&c| c == 0).unwrap_or(20);
        g[0] == 0xFF && g[9] & 1 == 1 && g[10] >= 3 && &g[12..12 + mech_end] == b"NULL"
    });
    let ready = if greeting_ok {
        let (items, _) = oracle(&stream[zmtp::GREETING_LEN..], max_msg as u64);
        match items.first() {
            Some(Item::Command(name, data)) if name == "READY" => properties(data),
            _ => None,
        }
    } else {
        None
    };
    let socket_type = ready.as_ref().map(|props| {
        props
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Socket-Type"))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    });
    let expect_ok = socket_type.as_deref().is_some_and(|t| ours.accepts(t));
    match res {
        Ok(info) => {
            assert!(
                expect_ok,
                "handshake accepted {:?}",
                &stream[..stream.len().min(80)]
            );
            assert_eq!(info.minor, stream[11]);
            assert_eq!(Some(&info.properties), ready.as_ref());
            assert_eq!(Some(&info.socket_type), socket_type.as_ref());
            // The rest of the stream is the reader's, in sync.
            let rest = Bytes::copy_from_slice(&reader.buf);
            assert!(stream.ends_with(&rest), "handshake lost or invented bytes");
            let max64 = max_msg as u64;
            let (want, end) = oracle(&rest, max64);
            let (got, failed) = feed(&mut reader, &[&[][..]], max64, rest.len() / 2 + 1);
            compare(&got, failed, &want, end);
        }
        Err(e) => {
            assert!(!expect_ok, "handshake refused a valid peer: {e}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let seed = data[0];
    let ctl = data[1];
    let max_msg = [0, 1, 8, 100, 1000, 4096, 1 << 20, usize::MAX][usize::from(ctl & 7)];
    let ours = [
        SocketType::Pub,
        SocketType::Sub,
        SocketType::XPub,
        SocketType::XSub,
    ][usize::from((ctl >> 3) & 3)];
    let stream = &data[2..];
    if ctl & 0x80 != 0 {
        check_handshake(stream, max_msg, ours);
    } else {
        check_stream(seed, stream, max_msg);
    }
});
