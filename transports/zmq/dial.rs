//! The one dial-and-handshake path of the ZeroMQ clients: connect to an
//! endpoint, then the ZMTP NULL handshake, each bounded by
//! [`CONNECT_TIMEOUT`](super::CONNECT_TIMEOUT).

use std::sync::Arc;

use super::endpoint::{self, Endpoint, ReadHalf, WriteHalf};
use super::heartbeat::HeartbeatConfig;
use super::heartbeat_task::{control_queue, Beat};
use super::queue::WireQueue;
use super::zmtp::{self, FrameReader, PeerInfo, SocketType, ZmtpError};
use super::CONNECT_TIMEOUT;
use crate::codec::Codec;
use crate::transports::client::Disconnect;

/// A connection whose handshake is done.
pub struct Dialed {
    /// The read half, for `reader.fill`.
    pub r: ReadHalf,
    /// The write half.
    pub w: WriteHalf,
    /// The frame reader, holding whatever arrived after the handshake.
    pub reader: FrameReader,
    /// The peer's READY.
    pub info: PeerInfo,
}

impl Dialed {
    /// Splits the connection for serving: its halves and parser, and a
    /// fresh control queue with the heartbeat that feeds it (`cfg`; PINGs
    /// only to a peer that takes them).
    pub(crate) fn serve_parts(
        self,
        cfg: &HeartbeatConfig,
    ) -> (ReadHalf, WriteHalf, FrameReader, Arc<WireQueue>, Beat) {
        let control = control_queue();
        let beat = Beat::new(cfg, self.info.takes_pings(), control.clone());
        (self.r, self.w, self.reader, control, beat)
    }
}

/// Connects to `ep` as a `ours` socket, accepting messages up to `max_msg`
/// bytes, and tells the peer in READY that we accept MessagePack data when
/// `codec` is MessagePack, and that we speak numbered envelopes when `seq`.
pub async fn dial(
    ep: &Endpoint,
    ours: SocketType,
    codec: Codec,
    seq: bool,
    max_msg: usize,
) -> Result<Dialed, ZmtpError> {
    dial_with(ep, ours, codec, seq, max_msg, &[]).await
}

/// [`dial`], with `extra` READY properties after ours.
pub async fn dial_with(
    ep: &Endpoint,
    ours: SocketType,
    codec: Codec,
    seq: bool,
    max_msg: usize,
    extra: &[(&str, &[u8])],
) -> Result<Dialed, ZmtpError> {
    let mut props: Vec<(&str, &[u8])> = Vec::with_capacity(2 + extra.len());
    if codec == Codec::MsgPack {
        props.push((zmtp::CODEC_PROPERTY, b"msgpack"));
    }
    if seq {
        props.push((zmtp::SEQ_PROPERTY, b"1"));
    }
    props.extend_from_slice(extra);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, endpoint::connect(ep))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let (mut r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(max_msg);
    let info = zmtp::handshake(&mut r, &mut w, &mut reader, ours, &props, CONNECT_TIMEOUT).await?;
    Ok(Dialed { r, w, reader, info })
}

impl From<ZmtpError> for Disconnect {
    fn from(e: ZmtpError) -> Disconnect {
        match e {
            ZmtpError::Closed => Disconnect::PeerClosed,
            ZmtpError::Io(e) => e.into(),
            ZmtpError::HeartbeatExpired(why) => Disconnect::Silent(why.to_string()),
            other => Disconnect::Protocol(other.to_string()),
        }
    }
}
