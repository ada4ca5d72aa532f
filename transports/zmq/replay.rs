//! Replaying the last values to one subscriber: the plain-state half (the
//! subscriber's connection task drives it, chunk by chunk, and does the
//! waiting).
//!
//! - **Only to the subscriber that subscribed.** A replay pushes into that
//!   peer's own queue; nobody else holding the prefix sees it.
//! - **Never older after newer.** The peer is in the index (it gets live
//!   traffic) before the replay takes the cache's mark; dispatch updates
//!   the cache before it queues a message to anyone, and a chunk is read
//!   and queued under the cache lock. So a value stored after the mark
//!   reaches the peer live and is skipped here; a value replayed here was
//!   the newest when queued, and any newer one is queued after it. (A
//!   value stored just before the mark whose live copy was being queued
//!   at that moment can arrive twice, the same value both times.)
//! - **No duplicates for what the peer gets already.** Only a prefix the
//!   peer did not hold is replayed (a repeated subscribe replays nothing),
//!   and topics that another prefix it holds matches are skipped: those
//!   reach it live.
//! - **Bounded work per lock.** A chunk visits at most [`REPLAY_CHUNK`]
//!   topics; the connection task yields between chunks.
//! - **Queue bounds hold.** A full queue ends the chunk; the task waits for
//!   room while the peer makes progress, and a peer stuck for the
//!   slow-consumer timeout gets the rest dropped and counted
//!   (`replay_dropped`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

use super::hub::{Forms, Hub, PeerSubs, SubPeer};
use super::queue::Pushed;
use super::zmtp::RawMessage;
use crate::last_value::{LastValues, Scan, Taken};

/// Most cached topics one replay chunk visits under the cache lock.
pub(super) const REPLAY_CHUNK: usize = 256;

/// One subscriber's replay of one new prefix.
#[derive(Debug)]
pub(super) struct Replay {
    /// The prefix, as matched.
    prefix: Bytes,
    /// Where it stands in the cache.
    scan: Scan,
    /// The peer was found stuck: what does not fit is dropped and counted
    /// instead of waited for.
    pub(super) drop_when_full: bool,
}

/// What a chunk ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing left (or the peer is gone).
    Done,
    /// More to replay: yield, then the next chunk.
    More,
    /// The peer's queue is full: wait for room, then the next chunk.
    Full,
}

impl Hub {
    /// Starts replaying to a peer that just got `prefix` (see
    /// `Applied::added`); None without a cache. Call it after the peer is
    /// in the index, which `apply_sub_change` did.
    pub(super) fn replay_start(&self, prefix: Bytes) -> Option<Replay> {
        let mark = self.cache()?.mark();
        Some(Replay {
            scan: LastValues::<super::hub::Kept>::scan(&prefix, mark),
            prefix,
            drop_when_full: false,
        })
    }

    /// Queues the next chunk of `r` to `peer` (whose subscriptions are
    /// `subs`), at `now`, under the cache lock.
    pub(super) fn replay_chunk(
        &self,
        peer: &SubPeer,
        subs: &PeerSubs,
        r: &mut Replay,
        now: Instant,
    ) -> Step {
        let Some(cache) = self.cache() else {
            return Step::Done;
        };
        let (mut sent, mut dropped, mut conflated) = (0u64, 0u64, 0u64);
        let (mut full, mut closed) = (false, false);
        let prefix = &r.prefix;
        let drop_when_full = r.drop_when_full;
        let stats = &self.stats;
        cache.next_chunk(&mut r.scan, REPLAY_CHUNK, |topic, kept| {
            if subs.covers_other(topic, prefix) {
                return Taken::Yes;
            }
            let msg = RawMessage {
                wire: kept.wire.clone(),
                frames: kept.frames,
            };
            // The form this peer takes (JSON data, without the sequence
            // frame), as dispatch makes it; one that cannot be made never
            // reached such a peer live either.
            let Some(form) = Forms::new(&msg, kept.numbered).for_peer(peer, stats) else {
                return Taken::Yes;
            };
            // A conflating peer's queue keys by topic, as dispatch does: a
            // newer live value then takes this one's place.
            let pushed = if peer.conflate {
                let (pushed, old) = peer.queue.push_by_key(form);
                if old.is_some() {
                    conflated += 1;
                }
                pushed
            } else {
                peer.queue.push_at(form, now)
            };
            match pushed {
                Pushed::Ok => {
                    sent += 1;
                    Taken::Yes
                }
                Pushed::Full if drop_when_full => {
                    dropped += 1;
                    Taken::Yes
                }
                Pushed::Full => {
                    full = true;
                    Taken::No
                }
                Pushed::Closed => {
                    closed = true;
                    Taken::No
                }
            }
        });
        drop(cache);
        let st = &self.stats;
        st.replayed.fetch_add(sent, Ordering::Relaxed);
        st.replay_dropped.fetch_add(dropped, Ordering::Relaxed);
        st.conflated.fetch_add(conflated, Ordering::Relaxed);
        if closed {
            r.scan.finish();
            Step::Done
        } else if full {
            Step::Full
        } else if r.scan.is_done() {
            Step::Done
        } else {
            Step::More
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use bytes::BytesMut;

    use super::*;
    use crate::last_value::LastValueLimits;
    use crate::transports::zmq::envelope::topic_frame;
    use crate::transports::zmq::hub::{Applied, Side};
    use crate::transports::zmq::proxy::ProxyConfig;
    use crate::transports::zmq::stats::ProxyStats;
    use crate::transports::zmq::zmtp::{self, SubChange};

    fn hub(limits: LastValueLimits) -> Hub {
        Hub::new(
            ProxyConfig {
                last_value: Some(limits),
                ..ProxyConfig::default()
            },
            Arc::new(ProxyStats::default()),
        )
    }

    fn peer(items: usize) -> Arc<SubPeer> {
        Arc::new(SubPeer::new(items, 1 << 20, false, false, Side::Backend))
    }

    fn sub(h: &Hub, p: &Arc<SubPeer>, s: &mut PeerSubs, prefix: &str) -> Applied {
        h.apply_sub_change(
            p,
            s,
            SubChange::Subscribe(Bytes::copy_from_slice(prefix.as_bytes())),
        )
    }

    /// An envelope of `topic` whose data is `n`.
    fn env(topic: &str, n: u64) -> RawMessage {
        let t = topic_frame(topic);
        let d = n.to_string();
        let mut out = BytesMut::new();
        zmtp::put_message(&mut out, &[&t[..], b"\"o\"", d.as_bytes(), b"1.0"]);
        RawMessage {
            wire: out.freeze(),
            frames: 4,
        }
    }

    /// (topic, n) of every envelope `peer`'s writer would take now.
    fn drain(peer: &SubPeer) -> Vec<(String, u64)> {
        let mut b = VecDeque::new();
        peer.queue.take_all(&mut b);
        b.into_iter()
            .map(|wire| {
                let m = RawMessage { wire, frames: 4 };
                let [t, _, d, _] = m.frames_n::<4>().expect("4 frames");
                let topic: String = serde_json::from_slice(t).expect("topic");
                let n: u64 = serde_json::from_slice(d).expect("data");
                (topic, n)
            })
            .collect()
    }

    /// Runs a whole replay with no waiting (the queue must have room).
    fn replay_all(h: &Hub, p: &Arc<SubPeer>, s: &PeerSubs, a: Applied) {
        let Some(prefix) = a.added else { return };
        let mut r = h.replay_start(prefix).expect("cache on");
        let mut rounds = 0;
        while h.replay_chunk(p, s, &mut r, Instant::now()) != Step::Done {
            rounds += 1;
            assert!(rounds < 10_000);
        }
    }

    #[test]
    fn a_new_subscriber_alone_gets_the_newest_value_of_each_matching_topic() {
        let h = hub(LastValueLimits::default());
        let now = Instant::now();
        let (old, late) = (peer(100), peer(100));
        let (mut so, mut sl) = (PeerSubs::default(), PeerSubs::default());
        sub(&h, &old, &mut so, "\"A/");
        for (t, n) in [("A/1", 1), ("A/2", 2), ("A/1", 3), ("B/1", 4)] {
            h.dispatch(&env(t, n), now, None, false);
        }
        assert_eq!(drain(&old).len(), 3);
        // A bare subscription (the reference Receiver's), replayed in key
        // order; B/1 does not match; the other holder of A/ gets nothing.
        let a = sub(&h, &late, &mut sl, "A/");
        assert_eq!(a.added.as_deref(), Some(&b"\"A/"[..]));
        replay_all(&h, &late, &sl, a);
        assert_eq!(drain(&late), [("A/1".into(), 3), ("A/2".into(), 2)]);
        assert!(drain(&old).is_empty());
        let st = h.stats.snapshot();
        assert_eq!((st.replayed, st.cached_topics), (2, 3));
        assert_eq!(st.bare_subscriptions, 1);
        // Live traffic follows.
        h.dispatch(&env("A/2", 5), now, None, false);
        assert_eq!(drain(&late), [("A/2".into(), 5)]);
    }

    #[test]
    fn a_held_or_covered_prefix_replays_nothing_twice() {
        let h = hub(LastValueLimits::default());
        let now = Instant::now();
        for (t, n) in [("A/1", 1), ("A/2", 2), ("B/1", 3)] {
            h.dispatch(&env(t, n), now, None, false);
        }
        let p = peer(100);
        let mut s = PeerSubs::default();
        let a = sub(&h, &p, &mut s, "A/");
        replay_all(&h, &p, &s, a);
        assert_eq!(drain(&p).len(), 2);
        // The same prefix again (bare or quoted): already held, no replay.
        assert_eq!(sub(&h, &p, &mut s, "A/").added, None);
        assert_eq!(sub(&h, &p, &mut s, "\"A/").added, None);
        // A narrower prefix is new, but A/ covers its topics: nothing.
        let a = sub(&h, &p, &mut s, "A/1");
        assert!(a.added.is_some());
        replay_all(&h, &p, &s, a);
        assert!(drain(&p).is_empty());
        // Everything: only what A/ does not cover.
        let a = sub(&h, &p, &mut s, "");
        replay_all(&h, &p, &s, a);
        assert_eq!(drain(&p), [("B/1".into(), 3)]);
        assert_eq!(h.stats.snapshot().replayed, 3);
    }

    #[test]
    fn a_replay_in_chunks_never_puts_an_older_value_after_a_newer_one() {
        let h = hub(LastValueLimits::default());
        let now = Instant::now();
        let n = 3 * REPLAY_CHUNK as u64;
        for i in 0..n {
            h.dispatch(&env(&format!("T/{i:05}"), i * 10), now, None, false);
        }
        let p = peer(100_000);
        let mut s = PeerSubs::default();
        let a = sub(&h, &p, &mut s, "T/");
        let mut r = h.replay_start(a.added.expect("new")).expect("cache");
        assert_eq!(h.replay_chunk(&p, &s, &mut r, now), Step::More);
        // Between chunks, live values: one topic already replayed, one
        // still ahead of the cursor, and a new one.
        let (behind, ahead) = (5, n - 5);
        h.dispatch(
            &env(&format!("T/{behind:05}"), behind * 10 + 1),
            now,
            None,
            false,
        );
        h.dispatch(
            &env(&format!("T/{ahead:05}"), ahead * 10 + 1),
            now,
            None,
            false,
        );
        h.dispatch(&env("T/new", 7), now, None, false);
        while h.replay_chunk(&p, &s, &mut r, now) != Step::Done {}
        let got = drain(&p);
        let mut last: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for (t, v) in &got {
            last.entry(t.clone()).or_default().push(*v);
        }
        for (t, vs) in &last {
            assert!(vs.windows(2).all(|w| w[0] < w[1]), "{t}: {vs:?}");
        }
        assert_eq!(
            last[&format!("T/{behind:05}")],
            [behind * 10, behind * 10 + 1]
        );
        // Updated after the mark: only the live copy, never the replay.
        assert_eq!(last[&format!("T/{ahead:05}")], [ahead * 10 + 1]);
        assert_eq!(last["T/new"], [7]);
        assert_eq!(last.len() as u64, n + 1);
        assert_eq!(h.stats.snapshot().replayed, n - 1);
    }

    #[test]
    fn a_full_queue_pauses_the_replay_and_a_stuck_one_drops_and_counts() {
        let h = hub(LastValueLimits::default());
        let now = Instant::now();
        for i in 0..10u64 {
            h.dispatch(&env(&format!("T/{i}"), i), now, None, false);
        }
        let p = peer(4);
        let mut s = PeerSubs::default();
        let a = sub(&h, &p, &mut s, "T/");
        let mut r = h.replay_start(a.added.expect("new")).expect("cache");
        assert_eq!(h.replay_chunk(&p, &s, &mut r, now), Step::Full);
        let first = drain(&p);
        assert_eq!(first.len(), 4);
        // Room again: it goes on where it stopped.
        assert_eq!(h.replay_chunk(&p, &s, &mut r, now), Step::Full);
        let second = drain(&p);
        assert_eq!(second[0], ("T/4".into(), 4));
        // Stuck: the rest is dropped and counted, not waited for.
        r.drop_when_full = true;
        assert_eq!(h.replay_chunk(&p, &s, &mut r, now), Step::Done);
        let st = h.stats.snapshot();
        assert_eq!((st.replayed, st.replay_dropped), (10, 0));
        let mut r = {
            let a = sub(&h, &p, &mut s, "");
            h.replay_start(a.added.expect("new")).expect("cache")
        };
        // Everything is covered by T/ except nothing: a no-op replay.
        assert_eq!(h.replay_chunk(&p, &s, &mut r, now), Step::Done);
        let q = peer(2);
        let mut sq = PeerSubs::default();
        let a = sub(&h, &q, &mut sq, "T/");
        let mut r = h.replay_start(a.added.expect("new")).expect("cache");
        r.drop_when_full = true;
        assert_eq!(h.replay_chunk(&q, &sq, &mut r, now), Step::Done);
        assert_eq!(drain(&q).len(), 2);
        assert_eq!(h.stats.snapshot().replay_dropped, 8);
    }

    #[test]
    fn the_cache_stays_within_its_byte_bound_and_counts_evictions() {
        let max_bytes = 8 * 1024;
        let h = hub(LastValueLimits {
            max_topics: 1_000_000,
            max_bytes,
        });
        let now = Instant::now();
        for i in 0..1000u64 {
            h.dispatch(&env(&format!("T/{i:04}"), i), now, None, false);
            assert!(h.stats.snapshot().cached_bytes <= max_bytes as u64);
        }
        let st = h.stats.snapshot();
        assert!(st.cache_evictions > 900, "{st:?}");
        assert_eq!(st.cached_topics + st.cache_evictions, 1000);
        // What is left is the newest topics.
        let p = peer(10_000);
        let mut s = PeerSubs::default();
        let a = sub(&h, &p, &mut s, "");
        replay_all(&h, &p, &s, a);
        let got = drain(&p);
        assert_eq!(got.len() as u64, st.cached_topics);
        assert_eq!(got.last(), Some(&("T/0999".into(), 999)));
        // Messages that are not envelopes are not kept.
        let mut out = BytesMut::new();
        zmtp::put_message(&mut out, &[&b"plain"[..], b"x"]);
        h.dispatch(
            &RawMessage {
                wire: out.freeze(),
                frames: 2,
            },
            now,
            None,
            false,
        );
        assert_eq!(h.stats.snapshot().cached_topics, st.cached_topics);
    }
}
