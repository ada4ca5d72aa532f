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

/// Where the router's ids and wall-clock times come from: the real clock
/// and random UUIDs by default; a test passes its own, so what the bus
/// stamps is known in advance.
#[derive(Debug, Clone, Copy)]
pub struct Stamps {
    /// A fresh message or session id.
    pub id: fn() -> String,
    /// Float Unix seconds now.
    pub unix_now: fn() -> f64,
}

impl Default for Stamps {
    fn default() -> Self {
        Stamps {
            id: new_id,
            unix_now,
        }
    }
}
