//! ZMTP 3.x with the NULL mechanism, over any tokio stream: greeting,
//! READY with `Socket-Type`, multipart framing (MORE flag, short and long
//! frames), commands, and subscriptions (`\x01`/`\x00`-prefixed messages of
//! ZMTP 3.0 and the `SUBSCRIBE`/`CANCEL` commands of ZMTP 3.1).
//!
//! We announce version 3.0, so libzmq peers send subscriptions as messages;
//! we accept both forms. The parser works in place on a `BytesMut` and hands
//! out each multipart message as one `Bytes` of its wire form (headers
//! included), so a proxy can forward it to many peers without re-encoding.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of the ZMTP 3 greeting.
pub const GREETING_LEN: usize = 64;
const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// Property our peers put in READY to say which data codec they accept
/// (`msgpack`); reference and libzmq peers never send it.
pub const CODEC_PROPERTY: &str = "X-Hermes-Codec";

/// Property our peers put in READY (value `1`) to say they speak numbered
/// envelopes (a fifth, sequence frame; see `sequence.rs`): a publisher
/// that sends them, a subscriber that wants them, a proxy that passes
/// them. Reference and libzmq peers never send it, and never get one.
pub const SEQ_PROPERTY: &str = "X-Hermes-Seq";

/// Property our `Receiver` may put in READY to ask for (`1`) or decline
/// (`0`) the replay of the proxy's last values when it subscribes; without
/// it the proxy's default applies (replay when it keeps last values).
pub const LAST_VALUE_PROPERTY: &str = "X-Hermes-Last-Value";

/// Why a ZMTP conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer's greeting was not ZMTP 3.x.
    #[error("bad greeting: {0}")]
    BadGreeting(&'static str),
    /// The peer wants a security mechanism other than NULL.
    #[error("unsupported mechanism {0:?}")]
    Mechanism(String),
    /// The peer's READY (or what came instead) was invalid.
    #[error("bad handshake: {0}")]
    BadHandshake(String),
    /// The peer's socket type cannot talk to ours.
    #[error("incompatible socket type {peer:?} for {ours:?}")]
    SocketType {
        /// The type the peer announced.
        peer: String,
        /// Our socket type.
        ours: &'static str,
    },
    /// The peer sent an ERROR command.
    #[error("peer error: {0}")]
    PeerError(String),
    /// A frame broke the framing rules (unknown flags, command inside a
    /// multipart message).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The handshake did not finish in time.
    #[error("handshake timed out")]
    Timeout,
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// A PING or PONG command broke RFC 37.
    #[error("bad heartbeat: {0}")]
    Heartbeat(#[from] HeartbeatError),
    /// The peer sent nothing for the heartbeat timeout after our PING, or
    /// for the TTL its own PING asked for.
    #[error("heartbeat: {0}")]
    HeartbeatExpired(crate::transports::zmq::heartbeat::Expired),
}

/// Longest context a PING may carry, and so a PONG echo (RFC 37).
pub const MAX_PING_CONTEXT: usize = 16;

/// Why a PING or PONG command is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// A PING shorter than its 2-byte TTL.
    #[error("PING of {0} bytes has no 2-byte TTL")]
    Truncated(usize),
    /// A PING or PONG context past [`MAX_PING_CONTEXT`] bytes.
    #[error("{command} context of {len} bytes (at most 16)")]
    ContextTooLong {
        /// `PING` or `PONG`.
        command: &'static str,
        /// The context's length.
        len: usize,
    },
}

/// A ZMTP 3.1 PING command (RFC 37): the sender's TTL and a context the
/// PONG must echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// How long the sender wants us to keep it without hearing from it,
    /// in deciseconds; 0: no limit.
    pub ttl_ds: u16,
    /// Up to [`MAX_PING_CONTEXT`] bytes to echo in the PONG.
    pub context: Bytes,
}

impl Ping {
    /// Parses a PING's data (after the command name).
    pub fn parse(mut data: Bytes) -> Result<Ping, HeartbeatError> {
        if data.len() < 2 {
            return Err(HeartbeatError::Truncated(data.len()));
        }
        let ttl_ds = u16::from_be_bytes([data[0], data[1]]);
        data.advance(2);
        if data.len() > MAX_PING_CONTEXT {
            return Err(HeartbeatError::ContextTooLong {
                command: "PING",
                len: data.len(),
            });
        }
        Ok(Ping {
            ttl_ds,
            context: data,
        })
    }

    /// The TTL as a duration; None for 0 (no limit).
    pub fn ttl(&self) -> Option<Duration> {
        (self.ttl_ds > 0).then(|| Duration::from_millis(u64::from(self.ttl_ds) * 100))
    }
}

/// A ZMTP 3.1 PONG command: the context of the PING it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The echoed context.
    pub context: Bytes,
}

impl Pong {
    /// Parses a PONG's data (after the command name).
    pub fn parse(data: Bytes) -> Result<Pong, HeartbeatError> {
        if data.len() > MAX_PING_CONTEXT {
            return Err(HeartbeatError::ContextTooLong {
                command: "PONG",
                len: data.len(),
            });
        }
        Ok(Pong { context: data })
    }
}

/// Appends a PING with a TTL in deciseconds (0: none) and a context (cut
/// to [`MAX_PING_CONTEXT`] bytes).
pub fn put_ping(out: &mut BytesMut, ttl_ds: u16, context: &[u8]) {
    let context = &context[..context.len().min(MAX_PING_CONTEXT)];
    put_frame_header(out, FLAG_COMMAND, 1 + 4 + 2 + context.len());
    out.put_u8(4);
    out.put_slice(b"PING");
    out.put_u16(ttl_ds);
    out.put_slice(context);
}

/// Appends the PONG answering `ping` (its context echoed).
pub fn put_pong(out: &mut BytesMut, ping: &Ping) {
    put_command(out, "PONG", &ping.context);
}

/// The socket types this crate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// Publisher (sends messages, receives subscriptions).
    Pub,
    /// Subscriber (sends subscriptions, receives messages).
    Sub,
    /// Proxy side facing subscribers.
    XPub,
    /// Proxy side facing publishers.
    XSub,
}

impl SocketType {
    /// The name in the `Socket-Type` property.
    pub fn name(self) -> &'static str {
        match self {
            SocketType::Pub => "PUB",
            SocketType::Sub => "SUB",
            SocketType::XPub => "XPUB",
            SocketType::XSub => "XSUB",
        }
    }

    /// Whether a peer of type `peer` may talk to us (ZMTP's valid pairs).
    pub fn accepts(self, peer: &str) -> bool {
        match self {
            SocketType::Pub | SocketType::XPub => peer == "SUB" || peer == "XSUB",
            SocketType::Sub | SocketType::XSub => peer == "PUB" || peer == "XPUB",
        }
    }
}

/// What the peer told us in its handshake.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's ZMTP minor version (0 or 1).
    pub minor: u8,
    /// The peer's `Socket-Type`.
    pub socket_type: String,
    /// Every READY property (name, value), e.g. `Identity`, our codec one.
    pub properties: Vec<(String, Vec<u8>)>,
}

impl PeerInfo {
    /// A property's value by name (case-insensitive, as ZMTP says).
    pub fn property(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether the peer answers PINGs: a ZMTP 3.1 peer, or our proxy (it
    /// announces 3.0 so that libzmq peers send subscriptions as messages,
    /// has always answered PINGs, and says so by the codec property in its
    /// READY). A 3.0 peer that is not ours is never sent one.
    pub fn takes_pings(&self) -> bool {
        self.minor >= 1 || self.property(CODEC_PROPERTY).is_some()
    }

    /// Whether the peer accepts MessagePack data frames.
    pub fn wants_msgpack(&self) -> bool {
        self.property(CODEC_PROPERTY) == Some(b"msgpack")
    }

    /// Whether the peer speaks numbered envelopes ([`SEQ_PROPERTY`]).
    pub fn wants_seq(&self) -> bool {
        self.property(SEQ_PROPERTY) == Some(b"1")
    }

    /// What the peer said about last-value replay: Some(true) asks for
    /// it, Some(false) declines it, None (absent or another value) leaves
    /// it to the proxy.
    pub fn last_value(&self) -> Option<bool> {
        match self.property(LAST_VALUE_PROPERTY) {
            Some(b"1") => Some(true),
            Some(b"0") => Some(false),
            _ => None,
        }
    }
}

/// Our greeting: signature, version 3.0, NULL, as-server 0, filler.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Appends one frame (short or long form as its size needs).
pub fn put_frame(out: &mut BytesMut, more: bool, body: &[u8]) {
    put_frame_header(out, if more { FLAG_MORE } else { 0 }, body.len());
    out.put_slice(body);
}

fn put_frame_header(out: &mut BytesMut, flags: u8, len: usize) {
    if len <= 255 {
        out.reserve(2 + len);
        out.put_u8(flags);
        out.put_u8(len as u8);
    } else {
        out.reserve(9 + len);
        out.put_u8(flags | FLAG_LONG);
        out.put_u64(len as u64);
    }
}

/// Appends one frame whose body is `parts` one after the other (no
/// intermediate buffer).
pub fn put_frame_parts(out: &mut BytesMut, more: bool, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum();
    put_frame_header(out, if more { FLAG_MORE } else { 0 }, len);
    for p in parts {
        out.put_slice(p);
    }
}

/// Clears the MORE flag of the frame whose header starts at `at` in `out`
/// (making it the last frame of its message).
pub fn clear_more(out: &mut [u8], at: usize) {
    if let Some(flags) = out.get_mut(at) {
        *flags &= !FLAG_MORE;
    }
}

/// The offsets of the first `N` frame headers of a message's wire form,
/// and the end of the `N`th frame; None when it has fewer frames.
pub fn frame_offsets<const N: usize>(wire: &[u8]) -> Option<([usize; N], usize)> {
    let mut at = [0usize; N];
    let mut pos = 0usize;
    for slot in at.iter_mut() {
        *slot = pos;
        let (hdr, len) = parse_header(wire.get(pos..)?)?;
        pos = pos
            .checked_add(hdr)?
            .checked_add(usize::try_from(len).ok()?)?;
        if pos > wire.len() {
            return None;
        }
    }
    Some((at, pos))
}

/// Appends a multipart message.
pub fn put_message<F: AsRef<[u8]>>(out: &mut BytesMut, frames: &[F]) {
    let n = frames.len();
    for (i, f) in frames.iter().enumerate() {
        put_frame(out, i + 1 < n, f.as_ref());
    }
}

/// Appends a command frame (`name` + `data`).
pub fn put_command(out: &mut BytesMut, name: &str, data: &[u8]) {
    put_frame_header(out, FLAG_COMMAND, 1 + name.len() + data.len());
    out.put_u8(name.len() as u8);
    out.put_slice(name.as_bytes());
    out.put_slice(data);
}

/// Appends a READY command with `Socket-Type` and extra properties.
pub fn put_ready(out: &mut BytesMut, ours: SocketType, extra: &[(&str, &[u8])]) {
    let mut props = BytesMut::new();
    let mut prop = |name: &str, value: &[u8]| {
        props.put_u8(name.len() as u8);
        props.put_slice(name.as_bytes());
        props.put_u32(value.len() as u32);
        props.put_slice(value);
    };
    prop("Socket-Type", ours.name().as_bytes());
    for (n, v) in extra {
        prop(n, v);
    }
    put_command(out, "READY", &props);
}

/// Appends a subscription (`subscribe` true) or cancel in the ZMTP 3.0
/// message form, which every 3.x peer accepts.
pub fn put_subscription(out: &mut BytesMut, subscribe: bool, prefix: &[u8]) {
    put_frame_header(out, 0, 1 + prefix.len());
    out.put_u8(u8::from(subscribe));
    out.put_slice(prefix);
}

/// The first frame's body of a message's wire bytes (frame headers
/// included), or nothing when they hold no complete frame: a queued
/// envelope's topic, read where it lies (a conflating queue's key).
pub fn first_frame_of(wire: &[u8]) -> &[u8] {
    FrameIter { rest: wire }.next().unwrap_or(&[])
}

/// A complete multipart message as received: its wire bytes (frame headers
/// included, ready to forward) and its frame count.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The wire form, shared by every peer it is forwarded to.
    pub wire: Bytes,
    /// How many frames it has.
    pub frames: usize,
}

impl RawMessage {
    /// Iterates over the frame bodies.
    pub fn frames(&self) -> FrameIter<'_> {
        FrameIter { rest: &self.wire }
    }

    /// The frame bodies, when there are exactly `N`.
    pub fn frames_n<const N: usize>(&self) -> Option<[&[u8]; N]> {
        if self.frames != N {
            return None;
        }
        let mut out = [&[][..]; N];
        for (slot, f) in out.iter_mut().zip(self.frames()) {
            *slot = f;
        }
        Some(out)
    }

    /// The first frame's body (the topic of an envelope).
    pub fn first_frame(&self) -> &[u8] {
        first_frame_of(&self.wire)
    }

    /// Total body bytes (without frame headers).
    pub fn body_len(&self) -> usize {
        self.frames().map(<[u8]>::len).sum()
    }
}

/// Iterator over the frame bodies of a [`RawMessage`].
pub struct FrameIter<'a> {
    /// The wire bytes not yet walked.
    rest: &'a [u8],
}

impl<'a> Iterator for FrameIter<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (hdr, len) = parse_header(self.rest)?;
        let end = hdr.checked_add(usize::try_from(len).ok()?)?;
        let body = self.rest.get(hdr..end)?;
        self.rest = self.rest.get(end..)?;
        Some(body)
    }
}

/// The largest frame length the wire allows: ZMTP sizes are 63-bit
/// (RFC 23: a long size's most significant bit must be zero). A length
/// past it is a protocol error, never a number to compute with.
pub const MAX_WIRE_FRAME: u64 = i64::MAX as u64;

/// A frame header: its size and the announced body length; None when the
/// header is not all there yet. The length is only a claim of the peer:
/// every use of it below is checked.
fn parse_header(b: &[u8]) -> Option<(usize, u64)> {
    let flags = *b.first()?;
    if flags & FLAG_LONG != 0 {
        let raw: [u8; 8] = b.get(1..9)?.try_into().ok()?;
        Some((9, u64::from_be_bytes(raw)))
    } else {
        Some((2, u64::from(*b.get(1)?)))
    }
}

/// One item read from a peer after the handshake.
#[derive(Debug)]
pub enum Inbound {
    /// A complete multipart message.
    Message(RawMessage),
    /// A command other than PING and PONG: its name and data.
    Command(String, Bytes),
    /// A PING (ZMTP 3.1 heartbeat).
    Ping(Ping),
    /// A PONG (ZMTP 3.1 heartbeat).
    Pong(Pong),
    /// A message larger than the limit was skipped entirely (its bytes
    /// were read and discarded, so the stream stays in sync).
    Oversized(u64),
}

/// State of skipping an oversized message.
#[derive(Debug, Clone, Copy)]
struct Skip {
    /// Body bytes of the current frame still to discard.
    remaining: u64,
    /// Whether more frames of the message follow the current one.
    more: bool,
    /// Total size seen so far (for the report).
    total: u64,
}

/// Incremental parser of frames in a read buffer.
#[derive(Debug)]
pub struct FrameReader {
    /// Bytes read and not yet parsed.
    pub buf: BytesMut,
    /// Largest message (sum of frame bodies) accepted.
    max_msg: u64,
    /// Set while discarding an oversized message.
    skip: Option<Skip>,
}

/// Read chunk size: large enough to batch many small messages per syscall.
const READ_CHUNK: usize = 64 * 1024;

impl FrameReader {
    /// A reader that skips messages over `max_msg` bytes.
    pub fn new(max_msg: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_msg: max_msg as u64,
            skip: None,
        }
    }

    /// Reads more bytes from `r`; `Ok(false)` on a clean end of stream.
    pub async fn fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
    ) -> Result<bool, ZmtpError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = r.read_buf(&mut self.buf).await?;
        Ok(n > 0)
    }

    /// Parses the next complete item, or None when more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<Inbound>, ZmtpError> {
        if let Some(done) = self.skip_step()? {
            return Ok(Some(done));
        }
        if self.skip.is_some() {
            return Ok(None);
        }
        let b = &self.buf[..];
        let mut pos = 0usize;
        let mut frames = 0usize;
        let mut total = 0u64;
        loop {
            let Some(&flags) = b.get(pos) else {
                return Ok(None);
            };
            if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
                return Err(ZmtpError::Protocol("reserved flag bits set"));
            }
            let Some((hdr, len64)) = parse_header(&b[pos..]) else {
                return Ok(None);
            };
            if len64 > MAX_WIRE_FRAME {
                return Err(ZmtpError::Protocol("frame length past 2^63-1"));
            }
            if flags & FLAG_COMMAND != 0 {
                if frames > 0 {
                    return Err(ZmtpError::Protocol("command inside a multipart message"));
                }
                if flags & FLAG_MORE != 0 {
                    return Err(ZmtpError::Protocol("command with MORE flag"));
                }
                if len64 > self.max_msg.max(4096) {
                    return Err(ZmtpError::Protocol("oversized command"));
                }
                // Bounded by the check above, so it fits.
                let len = len64 as usize;
                if b.len() < hdr + len {
                    self.buf.reserve((hdr + len - b.len()).min(1 << 20));
                    return Ok(None);
                }
                let mut body = self.buf.split_to(hdr + len).freeze();
                body.advance(hdr);
                return parse_command(body).map(Some);
            }
            // Checked: a peer's length must never wrap the running total
            // (a wrapped total would pass the limit and cut the message
            // short, desyncing every subscriber it is forwarded to).
            total = total.saturating_add(len64);
            if total > self.max_msg {
                // Discard this message: what is buffered now, then the
                // rest as it arrives.
                let avail = (b.len() - pos - hdr) as u64;
                let take = avail.min(len64);
                self.buf.advance(pos + hdr + take as usize);
                self.skip = Some(Skip {
                    remaining: len64 - take,
                    more: flags & FLAG_MORE != 0,
                    total,
                });
                return match self.skip_step()? {
                    Some(done) => Ok(Some(done)),
                    None => Ok(None),
                };
            }
            // total <= max_msg here, so this frame's length fits memory;
            // still, no unchecked arithmetic on a peer's numbers.
            let Some(end) = usize::try_from(len64)
                .ok()
                .and_then(|len| pos.checked_add(hdr)?.checked_add(len))
            else {
                return Err(ZmtpError::Protocol("frame length overflows"));
            };
            frames += 1;
            if b.len() < end {
                // Grow toward the whole message, at most 1 MiB per step, so
                // a peer announcing a huge frame and sending slowly costs
                // memory only as its bytes actually arrive.
                let need = end - b.len();
                self.buf.reserve(need.clamp(READ_CHUNK / 4, 1 << 20));
                return Ok(None);
            }
            pos = end;
            if flags & FLAG_MORE == 0 {
                let wire = self.buf.split_to(pos).freeze();
                return Ok(Some(Inbound::Message(RawMessage { wire, frames })));
            }
        }
    }

    /// Advances an ongoing skip; returns the report when the oversized
    /// message has been fully discarded.
    fn skip_step(&mut self) -> Result<Option<Inbound>, ZmtpError> {
        while let Some(mut s) = self.skip {
            if s.remaining > 0 {
                let take = (self.buf.len() as u64).min(s.remaining);
                self.buf.advance(take as usize);
                s.remaining -= take;
                self.skip = Some(s);
                if s.remaining > 0 {
                    return Ok(None);
                }
            }
            if !s.more {
                self.skip = None;
                return Ok(Some(Inbound::Oversized(s.total)));
            }
            let Some(&flags) = self.buf.first() else {
                return Ok(None);
            };
            if flags & (FLAG_COMMAND | !(FLAG_MORE | FLAG_LONG)) != 0 {
                return Err(ZmtpError::Protocol("bad frame inside a skipped message"));
            }
            let Some((hdr, len)) = parse_header(&self.buf) else {
                return Ok(None);
            };
            if len > MAX_WIRE_FRAME {
                return Err(ZmtpError::Protocol("frame length past 2^63-1"));
            }
            self.buf.advance(hdr);
            self.skip = Some(Skip {
                remaining: len,
                more: flags & FLAG_MORE != 0,
                total: s.total.saturating_add(len),
            });
        }
        Ok(None)
    }
}

fn parse_command(mut body: Bytes) -> Result<Inbound, ZmtpError> {
    let Some(&n) = body.first() else {
        return Err(ZmtpError::Protocol("empty command"));
    };
    let n = n as usize;
    if body.len() < 1 + n {
        return Err(ZmtpError::Protocol("truncated command name"));
    }
    let name = &body[1..1 + n];
    if name == b"PING" {
        body.advance(1 + n);
        return Ok(Inbound::Ping(Ping::parse(body)?));
    }
    if name == b"PONG" {
        body.advance(1 + n);
        return Ok(Inbound::Pong(Pong::parse(body)?));
    }
    let name = String::from_utf8_lossy(name).into_owned();
    body.advance(1 + n);
    Ok(Inbound::Command(name, body))
}

/// A subscription change carried by a message or command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubChange {
    /// Add a prefix.
    Subscribe(Bytes),
    /// Remove a prefix (one reference of it).
    Cancel(Bytes),
}

impl SubChange {
    /// Reads a subscription from a single-frame message (`\x01`/`\x00`
    /// prefix) or a `SUBSCRIBE`/`CANCEL` command; None for anything else.
    pub fn from_inbound(item: &Inbound) -> Option<SubChange> {
        match item {
            Inbound::Message(m) if m.frames == 1 => {
                let f = m.first_frame();
                let start = m.wire.len() - f.len();
                match f.first() {
                    Some(1) => Some(SubChange::Subscribe(m.wire.slice(start + 1..))),
                    Some(0) => Some(SubChange::Cancel(m.wire.slice(start + 1..))),
                    _ => None,
                }
            }
            Inbound::Command(name, data) if name == "SUBSCRIBE" => {
                Some(SubChange::Subscribe(data.clone()))
            }
            Inbound::Command(name, data) if name == "CANCEL" => {
                Some(SubChange::Cancel(data.clone()))
            }
            _ => None,
        }
    }
}

/// Performs the NULL handshake: sends our greeting and READY, reads and
/// checks the peer's. Bytes after the handshake stay in `reader.buf`.
pub async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    reader: &mut FrameReader,
    ours: SocketType,
    extra: &[(&str, &[u8])],
    limit: Duration,
) -> Result<PeerInfo, ZmtpError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let fut = async {
        let mut out = BytesMut::with_capacity(GREETING_LEN + 64);
        out.put_slice(&greeting());
        put_ready(&mut out, ours, extra);
        w.write_all(&out).await?;
        w.flush().await?;
        while reader.buf.len() < GREETING_LEN {
            if !reader.fill(r).await? {
                return Err(ZmtpError::Closed);
            }
            // Reject non-ZMTP peers as soon as the signature shows it.
            check_signature(&reader.buf)?;
        }
        let g = reader.buf.split_to(GREETING_LEN);
        check_signature(&g)?;
        if g[10] < 3 {
            return Err(ZmtpError::BadGreeting("ZMTP version below 3"));
        }
        let mech_end = g[12..32].iter().position(|&c| c == 0).unwrap_or(20);
        let mech = String::from_utf8_lossy(&g[12..12 + mech_end]).into_owned();
        if mech != "NULL" {
            return Err(ZmtpError::Mechanism(mech));
        }
        let minor = g[11];
        loop {
            match reader.next_item()? {
                Some(Inbound::Command(name, data)) if name == "READY" => {
                    let properties = parse_properties(&data)?;
                    let mut info = PeerInfo {
                        minor,
                        socket_type: String::new(),
                        properties,
                    };
                    info.socket_type = info
                        .property("Socket-Type")
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    if !ours.accepts(&info.socket_type) {
                        return Err(ZmtpError::SocketType {
                            peer: info.socket_type,
                            ours: ours.name(),
                        });
                    }
                    return Ok(info);
                }
                Some(Inbound::Command(name, data)) if name == "ERROR" => {
                    let reason = data
                        .get(1..)
                        .map(|r| String::from_utf8_lossy(r).into_owned())
                        .unwrap_or_default();
                    return Err(ZmtpError::PeerError(reason));
                }
                Some(_) => return Err(ZmtpError::BadHandshake("expected READY".into())),
                None => {
                    if !reader.fill(r).await? {
                        return Err(ZmtpError::Closed);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(ZmtpError::Timeout),
    }
}

fn check_signature(b: &[u8]) -> Result<(), ZmtpError> {
    if let Some(&first) = b.first() {
        if first != 0xFF {
            return Err(ZmtpError::BadGreeting("signature"));
        }
    }
    if let Some(&tail) = b.get(9) {
        if tail & 1 != 1 {
            return Err(ZmtpError::BadGreeting("signature"));
        }
    }
    Ok(())
}

fn parse_properties(mut d: &[u8]) -> Result<Vec<(String, Vec<u8>)>, ZmtpError> {
    let bad = || ZmtpError::BadHandshake("malformed READY properties".into());
    let mut out = Vec::new();
    while !d.is_empty() {
        let n = d[0] as usize;
        let name = d.get(1..1 + n).ok_or_else(bad)?;
        let len_bytes: [u8; 4] = d
            .get(1 + n..5 + n)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?;
        let vlen = u32::from_be_bytes(len_bytes) as usize;
        let value = d.get(5 + n..5 + n + vlen).ok_or_else(bad)?;
        out.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
        d = &d[5 + n + vlen..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message whose second frame announces a LONG length near 2^64
    /// (the total would wrap) or at 2^63: never yielded, never a panic.
    #[test]
    fn wrapping_and_63_bit_lengths_are_never_yielded() {
        for bad_len in [u64::MAX - 2, u64::MAX - 40, 1u64 << 63, (1u64 << 63) + 5] {
            let mut out = BytesMut::new();
            put_frame(&mut out, true, b"\"T/x");
            out.put_u8(FLAG_MORE | FLAG_LONG);
            out.put_u64(bad_len);
            out.put_slice(&[b'A'; 100]);
            let mut r = FrameReader::new(1 << 20);
            r.buf.put_slice(&out);
            let mut yielded = Vec::new();
            let end = loop {
                match r.next_item() {
                    Ok(Some(item)) => yielded.push(item),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            assert!(
                yielded.iter().all(|i| !matches!(i, Inbound::Message(_))),
                "len {bad_len:#x}: {yielded:?}"
            );
            assert!(end.is_err(), "len {bad_len:#x}: the connection must close");
        }
        // Just under the limit but past max_msg: skipped in sync, counted.
        let mut out = BytesMut::new();
        put_frame(&mut out, true, b"\"T/x");
        out.put_u8(FLAG_LONG);
        out.put_u64(5000);
        out.put_slice(&[b'A'; 5000]);
        put_message(&mut out, &[b"\"ok\"".as_slice()]);
        let mut r = FrameReader::new(1024);
        r.buf.put_slice(&out);
        assert!(matches!(r.next_item(), Ok(Some(Inbound::Oversized(_)))));
        match r.next_item() {
            Ok(Some(Inbound::Message(m))) => assert_eq!(m.first_frame(), b"\"ok\""),
            other => panic!("the next message is intact: {other:?}"),
        }
    }

    #[test]
    fn parse_messages_and_commands() {
        let mut out = BytesMut::new();
        put_message(&mut out, &[b"\"a\"".as_slice(), b"x", &[7u8; 300]]);
        put_command(&mut out, "PING", &[0, 0, 9]);
        put_subscription(&mut out, true, b"\"RAW/");
        let mut r = FrameReader::new(1 << 20);
        let all = out.freeze();
        // Feed byte by byte: incomplete input is never an error.
        let mut got = Vec::new();
        for b in all.iter() {
            r.buf.put_u8(*b);
            while let Some(item) = r.next_item().expect("parse") {
                got.push(item);
            }
        }
        assert_eq!(got.len(), 3);
        match &got[0] {
            Inbound::Message(m) => {
                assert_eq!(m.frames, 3);
                let f: Vec<_> = m.frames().collect();
                assert_eq!(f[0], b"\"a\"");
                assert_eq!(f[2].len(), 300);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            match &got[1] {
                Inbound::Ping(p) => p.clone(),
                other => panic!("{other:?}"),
            },
            Ping {
                ttl_ds: 0,
                context: Bytes::from_static(&[9])
            }
        );
        assert_eq!(
            SubChange::from_inbound(&got[2]),
            Some(SubChange::Subscribe(Bytes::from_static(b"\"RAW/")))
        );
    }

    #[test]
    fn oversized_is_skipped_and_stream_stays_in_sync() {
        let mut out = BytesMut::new();
        put_message(
            &mut out,
            &[&[1u8; 100][..], &[2u8; 5000][..], &[3u8; 10][..]],
        );
        put_message(&mut out, &[b"ok".as_slice()]);
        let all = out.freeze();
        let mut r = FrameReader::new(1000);
        let mut got = Vec::new();
        for chunk in all.chunks(7) {
            r.buf.put_slice(chunk);
            while let Some(item) = r.next_item().expect("parse") {
                got.push(item);
            }
        }
        assert!(matches!(got[0], Inbound::Oversized(_)));
        assert!(matches!(&got[1], Inbound::Message(m) if m.first_frame() == b"ok"));
        assert_eq!(got.len(), 2);
    }

    /// Reads one item from `wire` with a fresh reader.
    fn one_item(wire: &[u8]) -> Result<Option<Inbound>, ZmtpError> {
        let mut r = FrameReader::new(1 << 20);
        r.buf.put_slice(wire);
        r.next_item()
    }

    #[test]
    fn ping_and_pong_encode_and_parse() {
        let mut out = BytesMut::new();
        put_ping(&mut out, 300, b"ctx-0123");
        // Wire: command flag, size, \x04PING, TTL 300 (0x012C), context.
        assert_eq!(
            &out[..9],
            &[FLAG_COMMAND, 15, 4, b'P', b'I', b'N', b'G', 0x01, 0x2C]
        );
        let ping = match one_item(&out) {
            Ok(Some(Inbound::Ping(p))) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(ping.ttl_ds, 300);
        assert_eq!(ping.ttl(), Some(Duration::from_secs(30)));
        assert_eq!(&ping.context[..], b"ctx-0123");
        let mut pong = BytesMut::new();
        put_pong(&mut pong, &ping);
        assert_eq!(&pong[..], b"\x04\x0d\x04PONGctx-0123");
        match one_item(&pong) {
            Ok(Some(Inbound::Pong(p))) => assert_eq!(&p.context[..], b"ctx-0123"),
            other => panic!("{other:?}"),
        }
        // No TTL, no context (what libzmq sends without ZMQ_HEARTBEAT_TTL).
        let mut bare = BytesMut::new();
        put_ping(&mut bare, 0, b"");
        match one_item(&bare) {
            Ok(Some(Inbound::Ping(p))) => {
                assert_eq!((p.ttl(), p.context.len()), (None, 0));
            }
            other => panic!("{other:?}"),
        }
        // Our encoder cuts a long context to the RFC's 16 bytes.
        let mut long = BytesMut::new();
        put_ping(&mut long, 1, &[7u8; 40]);
        match one_item(&long) {
            Ok(Some(Inbound::Ping(p))) => assert_eq!(p.context.len(), MAX_PING_CONTEXT),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_pings_and_pongs_are_typed_errors() {
        for (name, data, want) in [
            ("PING", &b""[..], HeartbeatError::Truncated(0)),
            ("PING", &b"\x01"[..], HeartbeatError::Truncated(1)),
            (
                "PING",
                &[0u8; 2 + 17][..],
                HeartbeatError::ContextTooLong {
                    command: "PING",
                    len: 17,
                },
            ),
            (
                "PONG",
                &[0u8; 17][..],
                HeartbeatError::ContextTooLong {
                    command: "PONG",
                    len: 17,
                },
            ),
        ] {
            let mut out = BytesMut::new();
            put_command(&mut out, name, data);
            match one_item(&out) {
                Err(ZmtpError::Heartbeat(e)) => assert_eq!(e, want),
                other => panic!("{name} {data:?}: {other:?}"),
            }
        }
        // Exactly 16 bytes of context is fine both ways.
        let mut out = BytesMut::new();
        put_command(&mut out, "PONG", &[1u8; 16]);
        assert!(matches!(one_item(&out), Ok(Some(Inbound::Pong(p))) if p.context.len() == 16));
        // Other commands stay generic.
        let mut out = BytesMut::new();
        put_command(&mut out, "PINGX", b"");
        assert!(matches!(one_item(&out), Ok(Some(Inbound::Command(n, _))) if n == "PINGX"));
    }

    #[test]
    fn who_takes_pings() {
        let mut info = PeerInfo::default();
        assert!(!info.takes_pings(), "a ZMTP 3.0 peer that is not ours");
        info.minor = 1;
        assert!(info.takes_pings(), "any ZMTP 3.1 peer");
        info.minor = 0;
        info.properties
            .push((CODEC_PROPERTY.into(), b"msgpack".to_vec()));
        assert!(info.takes_pings(), "our proxy");
    }

    #[test]
    fn bad_flags_are_errors() {
        let mut r = FrameReader::new(100);
        r.buf.put_slice(&[0x80, 1, 0]);
        assert!(r.next_item().is_err());
    }
}
