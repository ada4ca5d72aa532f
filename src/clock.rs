//! The wall clock and the ids the bus stamps on what it sends: one place
//! that generates them, so everything else takes them as arguments (and
//! tests can pass their own).

use std::time::{SystemTime, UNIX_EPOCH};

/// Float Unix seconds now (the `ts` of the Unix protocol and of an
/// envelope).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A fresh message or session id: a random UUID in its hyphenated form,
/// as the reference clients make them.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
