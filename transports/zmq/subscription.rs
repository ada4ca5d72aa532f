//! What a subscriber's subscription bytes mean to the proxy.
//!
//! ZeroMQ matches a subscription as a prefix of a message's first frame,
//! and a hermes topic frame is a JSON string (`"RAW/x"`, quote first). Our
//! `Receiver` and a libzmq SUB that knows this subscribe with the quoted
//! form (`"RAW/`); the reference `Receiver` subscribes with the bare topic
//! (`RAW/`), which matches no topic frame, so through a plain proxy it
//! receives nothing unless it subscribes to everything.
//!
//! By default the proxy reads a subscription that is not empty and does
//! not start with `"` as a prefix of the topic's *text* too: its quoted
//! form, escaped exactly as topic frames are (Python's `json.dumps` with
//! `ensure_ascii`: `\"`, `\\`, `\n`..., `\uXXXX` for every non-ASCII
//! character), without the closing quote, is held beside the bytes as
//! sent. Both are matched, counted against the per-peer limits and
//! forwarded upstream (so publishers filter at the source): a libzmq peer
//! that used raw topics gets exactly what it got, and a peer that meant
//! the topic's text gets its envelopes. Bytes that are not UTF-8 are kept
//! as they are. With `strict` (`--strict-subscriptions`) every
//! subscription has only libzmq's raw byte-prefix meaning.
//!
//! A libzmq `SUB` socket also filters what it *receives* by its own
//! subscriptions: the reference `Receiver` (a `SUB` subscribed to `RAW/`)
//! drops every JSON topic frame (`"RAW/x"`) itself, whatever the proxy
//! sends it (tests/zmq_subscriptions.rs shows it). The quoted form reaches
//! subscribers that do not filter on their side (an `XSUB`, a raw ZMTP
//! peer) and the publishers' source filtering.

use std::borrow::Cow;

use super::envelope::write_ascii_json_str;

/// The prefix of topic frames that subscription `sub` stands for: `sub`
/// itself when strict, empty, already quoted, or not UTF-8; otherwise the
/// quoted, escaped form of its text (and `true`: it was bare, and the hub
/// holds its bytes as well).
pub(super) fn normalize(sub: &[u8], strict: bool) -> (Cow<'_, [u8]>, bool) {
    if strict || sub.is_empty() || sub[0] == b'"' {
        return (Cow::Borrowed(sub), false);
    }
    match std::str::from_utf8(sub) {
        Ok(text) => {
            let mut out = Vec::with_capacity(sub.len() + 1);
            write_ascii_json_str(text, false, &mut out);
            (Cow::Owned(out), true)
        }
        Err(_) => (Cow::Borrowed(sub), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transports::zmq::envelope::topic_frame;

    fn norm(s: &[u8]) -> Vec<u8> {
        normalize(s, false).0.into_owned()
    }

    #[test]
    fn a_bare_prefix_becomes_the_quoted_prefix_of_its_topic_frames() {
        assert_eq!(norm(b"RAW/"), b"\"RAW/");
        assert!(normalize(b"RAW/", false).1);
        // Every bare prefix of a topic's text is a byte prefix of its
        // frame, whatever needs escaping (quote, backslash, control and
        // non-ASCII characters, surrogate pairs).
        for topic in [
            "RAW/x",
            "a\"b/c",
            "back\\slash",
            "tab\there",
            "new\nline",
            "pynodé/1",
            "emoji😀/x",
            "del\u{7f}x",
        ] {
            let frame = topic_frame(topic);
            for (i, _) in topic.char_indices().skip(1) {
                let p = norm(&topic.as_bytes()[..i]);
                assert!(
                    frame.starts_with(&p),
                    "{topic:?}: prefix {:?} -> {:?} not a prefix of {:?}",
                    &topic[..i],
                    String::from_utf8_lossy(&p),
                    String::from_utf8_lossy(&frame)
                );
            }
            assert!(frame.starts_with(&norm(topic.as_bytes())));
            // And not of another topic's frame.
            assert!(!topic_frame("zzz").starts_with(&norm(topic.as_bytes())));
        }
    }

    #[test]
    fn quoted_empty_strict_and_non_utf8_subscriptions_keep_their_bytes() {
        assert_eq!(norm(b"\"RAW/"), b"\"RAW/");
        assert!(!normalize(b"\"RAW/", false).1);
        assert_eq!(norm(b""), b"");
        assert_eq!(norm(b"\xff\xfe"), b"\xff\xfe");
        assert_eq!(normalize(b"RAW/", true).0.as_ref(), b"RAW/");
        assert!(!normalize(b"RAW/", true).1);
    }
}
