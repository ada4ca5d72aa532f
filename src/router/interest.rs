//! Interest: which topic prefixes the router's sessions want, as a stream
//! of changes for a transport that can ask its own sources for less (the
//! ZeroMQ proxy subscribes its publishers to exactly this, so they filter
//! at the source).
//!
//! The topic index ([`super::topics::TopicIndex`]) counts, per prefix, the
//! sessions that want it; only the transitions are changes: the first
//! session to want a prefix ([`InterestChange::Added`]) and the last one
//! to stop ([`InterestChange::Removed`]). A transport's own sink session
//! relays topics onward (to its own peers) and is no demand: its
//! subscriptions are not counted.
//!
//! Changes are recorded only while someone watches ([`InterestLog::watch`])
//! and are taken out after each router decision (the bus does this under
//! the router lock, in order), so what is pending is at most one
//! operation's worth: bounded by the subscription limits of one session.

/// One change of the union of prefixes the sessions want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterestChange {
    /// Some session wants this prefix now; none did before.
    Added(Box<str>),
    /// No session wants this prefix any more.
    Removed(Box<str>),
}

impl InterestChange {
    /// The prefix that changed.
    pub fn prefix(&self) -> &str {
        match self {
            InterestChange::Added(p) | InterestChange::Removed(p) => p,
        }
    }
}

/// The changes not yet taken, while someone watches.
#[derive(Debug, Default)]
pub struct InterestLog {
    /// Whether changes are recorded (someone watches).
    watching: bool,
    /// Changes in the order they happened.
    pending: Vec<InterestChange>,
    /// Their prefix bytes (for status; bounded as the module docs say).
    pending_bytes: usize,
}

impl InterestLog {
    /// Starts recording changes.
    pub fn watch(&mut self) {
        self.watching = true;
    }

    /// Stops recording and forgets what was pending.
    pub fn unwatch(&mut self) {
        self.watching = false;
        self.pending = Vec::new();
        self.pending_bytes = 0;
    }

    /// Whether changes are recorded.
    pub fn is_watched(&self) -> bool {
        self.watching
    }

    /// Records a change (when watched).
    pub fn push(&mut self, change: InterestChange) {
        if self.watching {
            self.pending_bytes += change.prefix().len();
            self.pending.push(change);
        }
    }

    /// Whether changes wait to be taken.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Moves the pending changes, in order, to the end of `out`.
    pub fn take(&mut self, out: &mut Vec<InterestChange>) {
        out.append(&mut self.pending);
        self.pending_bytes = 0;
    }

    /// Bytes of the prefixes pending.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
}
