//! Framing: a 4-byte big-endian length N, then N bytes of UTF-8 JSON.
//!
//! Pure functions on byte buffers, so they are tested without sockets.

use std::sync::Mutex;

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

/// Frames from this size up to [`POOLED_MAX`] are read straight into a
/// buffer of their own, taken from a process-wide pool of recycled
/// buffers: no fresh allocation (and page faults) per frame, no frame
/// split off a shared read buffer that must then be reallocated.
pub const POOLED_MIN: usize = 16 * 1024;
/// Largest frame (header included) read into a pooled buffer; larger ones
/// grow a read buffer as their bytes arrive (a peer announcing a huge
/// frame and sending it slowly costs memory only as its bytes arrive).
pub const POOLED_MAX: usize = 1 << 20;
/// Pooled buffers are sized in steps of this.
const POOL_STEP: usize = 16 * 1024;
/// Most bytes of idle buffers the pool keeps; buffers given back past it
/// are freed.
const POOL_IDLE: usize = 8 << 20;

/// The idle buffers and their bytes.
static POOL: Mutex<(Vec<Vec<u8>>, usize)> = Mutex::new((Vec::new(), 0));

/// An empty buffer with room for at least `min` bytes, recycled when one
/// of a fitting size is idle (never zeroed: reads fill its spare room).
pub fn pool_take(min: usize) -> Vec<u8> {
    {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        let (free, idle) = &mut *pool;
        if let Some(i) = free
            .iter()
            .rposition(|b| b.capacity() >= min && b.capacity() <= 2 * min + POOL_STEP)
        {
            let b = free.swap_remove(i);
            *idle -= b.capacity();
            return b;
        }
    }
    Vec::with_capacity(min.div_ceil(POOL_STEP) * POOL_STEP)
}

/// Bytes of idle buffers the pool holds now, and its bound (for status).
pub fn pool_idle() -> (usize, usize) {
    let pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    (pool.1, POOL_IDLE)
}

/// Gives a buffer back to the pool (freed when the pool is full).
pub fn pool_give(mut b: Vec<u8>) {
    if b.capacity() == 0 {
        return;
    }
    b.clear();
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let (free, idle) = &mut *pool;
    if *idle + b.capacity() <= POOL_IDLE {
        *idle += b.capacity();
        free.push(b);
        return;
    }
    drop(pool);
    drop(b);
}

/// A pooled buffer shared as [`Bytes`]; it goes back to the pool when the
/// last copy is dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        pool_give(std::mem::take(&mut self.0));
    }
}

/// A pooled buffer as shared [`Bytes`] (no copy).
pub fn pooled_bytes(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Pooled(buf))
}

/// A copy of `frame` in a pooled buffer.
pub fn pooled_copy(frame: &[u8]) -> Bytes {
    let mut b = pool_take(frame.len());
    b.extend_from_slice(frame);
    pooled_bytes(b)
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
    fn pooled_buffers_come_back() {
        let a = pooled_copy(&[7u8; 40_000]);
        assert_eq!(a.len(), 40_000);
        assert!(a.iter().all(|&x| x == 7));
        let ptr = a.as_ptr();
        let b = a.clone();
        drop(a);
        drop(b);
        let again = pool_take(40_000);
        assert!(again.capacity() >= 40_000 && again.is_empty());
        // Another thread may have taken it meanwhile; usually the same one.
        let _ = ptr == again.as_ptr();
        pool_give(again);
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
