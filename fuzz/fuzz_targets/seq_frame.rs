//! The sequence frame of numbered envelopes (`transports/zmq/sequence.rs`)
//! and the frame walk the proxy uses to make their 4-frame form.
//!
//! Input: any bytes, read as a sequence frame's body and as a message's
//! wire form.
//!
//! Invariants:
//! - No panic.
//! - A frame `parse_seq_frame` accepts passes the proxy's cheap
//!   `looks_like_seq_frame`, and our own encoding of what it read
//!   (`SeqFramer::body`) reads back to the same origin and number.
//! - `frame_offsets::<5>` only answers with increasing header offsets
//!   inside the input and an end within it; clearing the MORE flag of the
//!   fourth frame then never reaches past the input.
#![no_main]

use hermes_bus::transports::zmq::sequence::{looks_like_seq_frame, parse_seq_frame, SeqFramer};
use hermes_bus::transports::zmq::zmtp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((origin, n)) = parse_seq_frame(data) {
        let ours = SeqFramer::new(&origin).body(n);
        assert!(looks_like_seq_frame(&ours));
        let (back, m) = parse_seq_frame(&ours).expect("our own frame parses");
        assert_eq!((back.as_ref(), m), (origin.as_ref(), n));
    }
    if let Some((at, end)) = zmtp::frame_offsets::<5>(data) {
        assert!(end <= data.len());
        assert!(at.windows(2).all(|w| w[0] < w[1]));
        assert!(at[4] < end);
        let mut four = data[..at[4]].to_vec();
        zmtp::clear_more(&mut four, at[3]);
    }
});
