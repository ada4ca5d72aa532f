//! Endpoint names: who answers to a name now, and the mailbox of a name
//! whose client went away a moment ago.
//!
//! Plain state, as D-Bus's name registry: every operation runs to
//! completion, does no I/O, and returns what happened ([`Claimed`],
//! [`Released`], [`Hold`], [`Returned`]) for the router to act on
//! (close a replaced session, count a drop, tell a sender). The clock
//! comes in as an argument, so tests control it.
//!
//! A held name keeps what is routed to it for the hold grace, bounded
//! per name in count and bytes and by the bus's shared byte budget. A
//! copy keeps the clock of its first hold: re-registering without reading
//! (the copies go round a session that never writes them and come back)
//! does not extend its life.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hash::FastHash;
use super::SessionId;
use crate::delivery::Delivery;
use crate::outbox::Budget;
use crate::stats::HeldStats;

/// Bounds and timing of held names.
#[derive(Debug, Clone, Copy)]
pub struct HoldLimits {
    /// How long a name is held after its session went away.
    pub grace: Duration,
    /// Most messages held for one name.
    pub count: usize,
    /// Most bytes held for one name (a single message larger than this is
    /// still held when the mailbox is empty).
    pub bytes: usize,
}

/// Who answers to a name.
enum Slot {
    /// A connected session.
    Live(SessionId),
    /// Nobody right now: the session went away at `since`; messages wait.
    Held {
        /// When the session went away; the hold ends at `since + grace`.
        since: Instant,
        /// Messages routed to the name meanwhile, oldest first.
        queue: VecDeque<Delivery>,
        /// Their charge in bytes (also charged to the bus's budget).
        bytes: usize,
    },
}

/// What answers to a name now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A connected session.
    Live(SessionId),
    /// A held mailbox (possibly past its grace: see [`Names::open_answer`]).
    Held,
}

/// What claiming a name did.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The live session that answered to the name before: it must be told
    /// it was replaced, and closed.
    pub replaced: Option<SessionId>,
    /// What was held for the name, oldest first: replay it to the claimant.
    pub replay: VecDeque<Delivery>,
    /// Held copies that expired instead (count them as dropped).
    pub expired: u64,
}

/// What releasing a session's name did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The name is held for the grace period: what the session still had
    /// queued goes back to it ([`Names::give_back`]).
    Held,
    /// The name is gone (no grace configured, or the session no longer
    /// answered to it): what it still had queued is lost.
    Gone,
}

/// The outcome of offering a copy to a held mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Queued in the mailbox.
    Queued,
    /// The mailbox is at a bound (count, bytes, or the shared budget).
    Full,
    /// The grace has passed (or the name is not held): not queued.
    Closed,
}

/// Where copies given back for a name went.
#[derive(Debug)]
pub enum Returned {
    /// To the front of its held mailbox.
    Held,
    /// Nowhere yet: the name is live again, on this session; queue them
    /// there.
    Live(SessionId, VecDeque<Delivery>),
    /// Nowhere: nobody answers to the name (count them as dropped).
    Unknown(VecDeque<Delivery>),
}

/// The name registry. See the module docs.
pub struct Names {
    /// Every name, live or held.
    slots: HashMap<String, Slot, FastHash>,
    /// Bounds and grace of held names.
    limits: HoldLimits,
    /// The bus's byte budget, which held mailboxes are charged to.
    budget: Arc<Budget>,
}

impl Names {
    /// An empty registry charging held mailboxes to `budget`.
    pub fn new(limits: HoldLimits, budget: Arc<Budget>) -> Self {
        Names {
            slots: HashMap::default(),
            limits,
            budget,
        }
    }

    /// What answers to `name`, if anything.
    pub fn answer(&self, name: &str) -> Option<Answer> {
        self.slots.get(name).map(|slot| match slot {
            Slot::Live(id) => Answer::Live(*id),
            Slot::Held { .. } => Answer::Held,
        })
    }

    /// True when a message for `name` is taken now: a live session, or a
    /// name held within its grace. (Routing asks [`Names::open_answer`],
    /// which says who as well; this reads better in tests.)
    #[cfg(test)]
    pub fn is_open(&self, name: &str, now: Instant) -> bool {
        self.open_answer(name, now).is_some()
    }

    /// Who takes a message for `name` now: [`Names::answer`], but None
    /// for a name held past its grace too (one lookup where routing
    /// asked whether the name was open and then [`Names::answer`]).
    pub fn open_answer(&self, name: &str, now: Instant) -> Option<Answer> {
        match self.slots.get(name)? {
            Slot::Live(id) => Some(Answer::Live(*id)),
            Slot::Held { since, .. } => {
                (now.duration_since(*since) < self.limits.grace).then_some(Answer::Held)
            }
        }
    }

    /// The held names.
    #[cfg(test)]
    pub fn held(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Held { .. }))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The live names and their sessions, in no particular order.
    pub fn live(&self) -> impl Iterator<Item = (&str, SessionId)> + '_ {
        self.slots.iter().filter_map(|(name, slot)| match slot {
            Slot::Live(id) => Some((name.as_str(), *id)),
            Slot::Held { .. } => None,
        })
    }

    /// Makes `sid` answer to `name`. Takes the name from a live holder
    /// (returned, to be closed), and hands over, in order, what was held
    /// for it within the grace; copies first held longer ago than the
    /// grace expire.
    pub fn claim(&mut self, name: &str, sid: SessionId, now: Instant) -> Claimed {
        let mut claimed = Claimed::default();
        match self.slots.remove(name) {
            Some(Slot::Live(old)) if old != sid => claimed.replaced = Some(old),
            Some(Slot::Held {
                since,
                queue,
                bytes,
            }) => {
                self.budget.release(bytes);
                if now.duration_since(since) < self.limits.grace {
                    let grace = self.limits.grace;
                    let mut replay = queue;
                    let before = replay.len();
                    replay.retain(|d| d.held_at().map_or(true, |t| now.duration_since(t) < grace));
                    claimed.expired = (before - replay.len()) as u64;
                    claimed.replay = replay;
                } else {
                    claimed.expired = queue.len() as u64;
                }
            }
            _ => {}
        }
        self.slots.insert(name.to_owned(), Slot::Live(sid));
        claimed
    }

    /// The session `sid` went away: its name, if `sid` still answers to
    /// it, is held for the grace (or forgotten when there is none).
    pub fn release(&mut self, name: &str, sid: SessionId, now: Instant) -> Released {
        if !matches!(self.slots.get(name), Some(Slot::Live(id)) if *id == sid) {
            return Released::Gone;
        }
        if self.limits.grace.is_zero() {
            self.slots.remove(name);
            return Released::Gone;
        }
        self.slots.insert(
            name.to_owned(),
            Slot::Held {
                since: now,
                queue: VecDeque::new(),
                bytes: 0,
            },
        );
        Released::Held
    }

    /// Offers a copy to `name`'s held mailbox. With `force`, the mailbox's
    /// own bounds do not refuse it (its sender has waited already). The
    /// copy keeps no receipt: held counts as delivered for its sender.
    pub fn hold(&mut self, name: &str, d: &Delivery, force: bool, now: Instant) -> Hold {
        match self.slots.get_mut(name) {
            Some(slot) => offer_held(slot, &self.limits, &self.budget, d, d.charge(), force, now),
            None => Hold::Closed,
        }
    }

    /// Offers a copy to every held mailbox (a broadcast): each takes it
    /// if it is within its grace and has room, as [`Names::hold`] without
    /// `force`. Returns how many took it and how many did not. One pass
    /// over the names, no lookup or copy of a name per mailbox.
    pub fn hold_all(&mut self, d: &Delivery, now: Instant) -> (u64, u64) {
        let (mut queued, mut refused) = (0, 0);
        let mut charge = None;
        for slot in self.slots.values_mut() {
            if !matches!(slot, Slot::Held { .. }) {
                continue;
            }
            let charge = *charge.get_or_insert_with(|| d.charge());
            match offer_held(slot, &self.limits, &self.budget, d, charge, false, now) {
                Hold::Queued => queued += 1,
                Hold::Full | Hold::Closed => refused += 1,
            }
        }
        (queued, refused)
    }

    /// Gives back copies a gone session's writer could not write: they go
    /// to the front of the name's mailbox (they are older than anything
    /// routed there since), unbounded (they were accepted already).
    pub fn give_back(&mut self, name: &str, items: VecDeque<Delivery>, now: Instant) -> Returned {
        match self.slots.get_mut(name) {
            Some(Slot::Held { queue, bytes, .. }) => {
                for d in items.into_iter().rev() {
                    let c = d.charge();
                    *bytes += c;
                    self.budget.charge(c);
                    queue.push_front(d.without_ack().held(now));
                }
                Returned::Held
            }
            Some(Slot::Live(id)) => Returned::Live(*id, items),
            None => Returned::Unknown(items),
        }
    }

    /// Forgets `name` if it is held past its grace; returns how many
    /// copies it still held (dropped).
    pub fn expire(&mut self, name: &str, now: Instant) -> u64 {
        match self.slots.get(name) {
            Some(Slot::Held { since, .. }) if now.duration_since(*since) >= self.limits.grace => {}
            _ => return 0,
        }
        match self.slots.remove(name) {
            Some(Slot::Held { queue, bytes, .. }) => {
                self.budget.release(bytes);
                queue.len() as u64
            }
            _ => 0,
        }
    }

    /// Periodic upkeep: forgets names held past their grace and copies
    /// first held longer ago than the grace. Returns how many copies were
    /// dropped.
    pub fn sweep(&mut self, now: Instant) -> u64 {
        let grace = self.limits.grace;
        let mut dropped = 0u64;
        let mut freed = 0usize;
        self.slots.retain(|_, slot| match slot {
            Slot::Held {
                since,
                queue,
                bytes,
            } => {
                if now.duration_since(*since) >= grace {
                    dropped += queue.len() as u64;
                    freed += *bytes;
                    return false;
                }
                let expired =
                    |d: &Delivery| d.held_at().is_some_and(|t| now.duration_since(t) >= grace);
                if queue.iter().any(expired) {
                    let mut kept = VecDeque::with_capacity(queue.len());
                    for d in queue.drain(..) {
                        if expired(&d) {
                            dropped += 1;
                            freed += d.charge();
                            *bytes -= d.charge();
                        } else {
                            kept.push_back(d);
                        }
                    }
                    *queue = kept;
                }
                true
            }
            Slot::Live(_) => true,
        });
        self.budget.release(freed);
        dropped
    }

    /// The held names, sorted, for `status`.
    pub fn held_stats(&self, now: Instant) -> Vec<HeldStats> {
        let mut held: Vec<HeldStats> = self
            .slots
            .iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Held {
                    since,
                    queue,
                    bytes,
                } => Some(HeldStats {
                    name: name.clone(),
                    queued: queue.len(),
                    bytes: *bytes,
                    gone_ms: now.duration_since(*since).as_millis() as u64,
                }),
                Slot::Live(_) => None,
            })
            .collect();
        held.sort_by(|a, b| a.name.cmp(&b.name));
        held
    }
}

/// Offers a copy, charged `charge` bytes, to a held mailbox: refused
/// past the grace (or when `slot` is live), and when full unless `force`
/// (see [`Names::hold`]); queued without its receipt otherwise.
fn offer_held(
    slot: &mut Slot,
    limits: &HoldLimits,
    budget: &Budget,
    d: &Delivery,
    charge: usize,
    force: bool,
    now: Instant,
) -> Hold {
    let Slot::Held {
        since,
        queue,
        bytes,
    } = slot
    else {
        return Hold::Closed;
    };
    if now.duration_since(*since) >= limits.grace {
        return Hold::Closed;
    }
    let full = queue.len() >= limits.count
        || (bytes.saturating_add(charge) > limits.bytes && !queue.is_empty())
        || (budget.full() && !queue.is_empty());
    if full && !force {
        return Hold::Full;
    }
    queue.push_back(d.without_ack().held(now));
    *bytes = bytes.saturating_add(charge);
    budget.charge(charge);
    Hold::Queued
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const GRACE: Duration = Duration::from_secs(5);

    fn names(count: usize, bytes: usize, budget: usize) -> Names {
        let limits = HoldLimits {
            grace: GRACE,
            count,
            bytes,
        };
        Names::new(limits, Budget::new(budget))
    }

    /// A session `sid` claims `name` and goes away at `t`.
    fn came_and_went(n: &mut Names, name: &str, sid: SessionId, t: Instant) -> Released {
        n.claim(name, sid, t);
        n.release(name, sid, t)
    }

    fn copy(n: u8) -> Delivery {
        Delivery::frame(Bytes::from(vec![n; 36]))
    }

    fn first_bytes(q: &VecDeque<Delivery>) -> Vec<u8> {
        q.iter().map(|d| d.unix_frame()[0]).collect()
    }

    #[test]
    fn a_claim_replaces_the_live_holder_and_keeps_the_new_one() {
        let mut n = names(10, 1 << 20, 1 << 20);
        let t = Instant::now();
        assert!(n.claim("a", 1, t).replaced.is_none());
        assert_eq!(n.answer("a"), Some(Answer::Live(1)));
        let c = n.claim("a", 2, t);
        assert_eq!(c.replaced, Some(1));
        assert_eq!(n.answer("a"), Some(Answer::Live(2)));
        // The old session going away no longer touches the name.
        assert_eq!(n.release("a", 1, t), Released::Gone);
        assert_eq!(n.answer("a"), Some(Answer::Live(2)));
    }

    #[test]
    fn a_released_name_is_held_then_replayed_in_order_to_its_next_claimant() {
        let mut n = names(10, 1 << 20, 1 << 20);
        let t = Instant::now();
        assert_eq!(came_and_went(&mut n, "a", 1, t), Released::Held);
        assert!(n.is_open("a", t + Duration::from_secs(1)));
        for i in 0..3 {
            assert_eq!(n.hold("a", &copy(i), false, t), Hold::Queued);
        }
        // What the gone writer had not written goes in front.
        let back = VecDeque::from(vec![copy(7)]);
        assert!(matches!(n.give_back("a", back, t), Returned::Held));
        let c = n.claim("a", 2, t + Duration::from_secs(1));
        assert_eq!(first_bytes(&c.replay), vec![7, 0, 1, 2]);
        assert_eq!(c.expired, 0);
        assert!(
            n.budget.used() == 0,
            "the mailbox's bytes went back to the budget"
        );
    }

    #[test]
    fn a_mailbox_is_bounded_in_count_and_bytes_unless_forced() {
        let mut n = names(2, 1 << 20, 1 << 20);
        let t = Instant::now();
        came_and_went(&mut n, "a", 1, t);
        assert_eq!(n.hold("a", &copy(0), false, t), Hold::Queued);
        assert_eq!(n.hold("a", &copy(1), false, t), Hold::Queued);
        assert_eq!(n.hold("a", &copy(2), false, t), Hold::Full);
        assert_eq!(n.hold("a", &copy(2), true, t), Hold::Queued);

        let mut n = names(100, 150, 1 << 20);
        came_and_went(&mut n, "b", 1, t);
        // The first copy always fits; then the byte bound refuses.
        assert_eq!(n.hold("b", &copy(0), false, t), Hold::Queued);
        assert_eq!(n.hold("b", &copy(1), false, t), Hold::Full);
        assert_eq!(n.held_stats(t)[0].queued, 1);
    }

    #[test]
    fn the_grace_ends_the_hold_and_rereleasing_does_not_extend_a_copy() {
        let mut n = names(10, 1 << 20, 1 << 20);
        let t = Instant::now();
        came_and_went(&mut n, "a", 1, t);
        n.hold("a", &copy(0), false, t);
        // Claimed and released again 4 s later without reading: the copy
        // comes back with its first hold's clock.
        let t4 = t + Duration::from_secs(4);
        let c = n.claim("a", 2, t4);
        assert_eq!(c.replay.len(), 1);
        n.release("a", 2, t4);
        assert!(matches!(n.give_back("a", c.replay, t4), Returned::Held));
        // At 6 s the name is within its new grace, but the copy is not.
        let t6 = t + Duration::from_secs(6);
        assert_eq!(n.sweep(t6), 1);
        assert!(n.is_open("a", t6));
        assert_eq!(n.hold("a", &copy(1), false, t6), Hold::Queued);
        // Past the grace, the name itself goes.
        let t10 = t4 + GRACE;
        assert!(!n.is_open("a", t10));
        assert_eq!(n.hold("a", &copy(2), false, t10), Hold::Closed);
        assert_eq!(n.expire("a", t10), 1);
        assert_eq!(n.answer("a"), None);
        assert_eq!(n.budget.used(), 0);
    }

    #[test]
    fn without_a_grace_a_released_name_is_gone() {
        let limits = HoldLimits {
            grace: Duration::ZERO,
            count: 10,
            bytes: 1 << 20,
        };
        let mut n = Names::new(limits, Budget::new(1 << 20));
        let t = Instant::now();
        assert_eq!(came_and_went(&mut n, "a", 1, t), Released::Gone);
        assert!(matches!(
            n.give_back("a", VecDeque::from(vec![copy(0)]), t),
            Returned::Unknown(q) if q.len() == 1
        ));
    }

    #[test]
    fn live_lists_only_connected_names() {
        let mut n = names(10, 1 << 20, 1 << 20);
        let t = Instant::now();
        n.claim("a", 1, t);
        came_and_went(&mut n, "b", 2, t);
        let live: Vec<_> = n.live().collect();
        assert_eq!(live, vec![("a", 1)]);
        assert_eq!(n.held(), vec!["b".to_owned()]);
    }

    #[test]
    fn a_broadcast_copy_goes_to_each_held_mailbox_with_room_within_its_grace() {
        let mut n = names(2, 1 << 20, 1 << 20);
        let t = Instant::now();
        let t3 = t + Duration::from_secs(3);
        n.claim("live", 9, t);
        came_and_went(&mut n, "a", 1, t);
        came_and_went(&mut n, "b", 2, t3);
        assert_eq!(n.hold_all(&copy(0), t3), (2, 0));
        assert_eq!(n.hold("a", &copy(1), false, t3), Hold::Queued);
        // a is full (2 copies): only b takes the next one.
        assert_eq!(n.hold_all(&copy(2), t3), (1, 1));
        // Past a's grace (not b's): a refuses, and b is full now too.
        assert_eq!(n.hold_all(&copy(3), t + GRACE), (0, 2));
        let t6 = t + Duration::from_secs(6);
        let c = n.claim("b", 3, t6);
        assert_eq!(first_bytes(&c.replay), vec![0, 2]);
        // The charges went to the budget and back with the mailboxes.
        assert_eq!(n.expire("a", t6), 2);
        assert_eq!(n.budget.used(), 0);
    }
}
