//! Framing: a 4-byte big-endian length N, then N bytes of UTF-8 JSON.
//!
//! Pure functions on byte buffers, so they are tested without sockets.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest payload either side accepts: 10 MiB, as the reference.
pub const MAX_FRAME: usize = 10 * 1024 * 1024;

/// A length header the stream cannot recover from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces more than the maximum; the stream cannot be
    /// resynchronised, so the connection must close.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
}

/// Takes one complete frame's payload off the front of `buf`, if a whole
/// frame is there. Reserves room for the rest of a partial frame.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// The payload length of the complete frame at the front of `buf`, if a
/// whole frame is there (the caller reads `buf[4..4 + len]`, then
/// advances past it). Nothing is copied or split off.
pub fn peek(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((buf.len() >= 4 + len).then_some(len))
}

/// The whole length (header included) of the frame whose header is at
/// the front of `buf`, once the header is there.
pub fn announced(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..4)?;
    Some(4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
}

/// One frame around a JSON payload.
pub fn encode(json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(json);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_and_waits_for_partial_ones() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&encode(b"{\"a\":1}"));
        buf.extend_from_slice(&encode(b"{}")[..3]);
        assert_eq!(
            decode(&mut buf, MAX_FRAME).unwrap().unwrap(),
            &b"{\"a\":1}"[..]
        );
        assert_eq!(decode(&mut buf, MAX_FRAME).unwrap(), None);
        buf.extend_from_slice(&encode(b"{}")[3..]);
        assert_eq!(decode(&mut buf, MAX_FRAME).unwrap().unwrap(), &b"{}"[..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn peek_sees_only_whole_frames() {
        let f = encode(b"{}");
        assert_eq!(announced(&f[..3]), None);
        assert_eq!(announced(&f[..4]), Some(6));
        assert_eq!(peek(&f[..5], MAX_FRAME), Ok(None));
        assert_eq!(peek(&f, MAX_FRAME), Ok(Some(2)));
        let mut big = BytesMut::new();
        big.put_u32((MAX_FRAME + 1) as u32);
        assert!(peek(&big, MAX_FRAME).is_err());
    }

    #[test]
    fn refuses_oversized_header_before_reading_it() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME + 1) as u32);
        assert_eq!(
            decode(&mut buf, MAX_FRAME),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME as u32);
        assert_eq!(decode(&mut buf, MAX_FRAME), Ok(None));
    }
}
