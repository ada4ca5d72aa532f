//! The bounded queue of wire bytes between whoever produces them and the
//! one writer task of a connection: [`crate::bounded::Bounded`] over
//! `Bytes` (items and bytes bounded, pushes that never wait, async waits
//! for room and items, a progress clock).

use bytes::Bytes;

pub use crate::bounded::Pushed;

/// A bounded queue of wire bytes with one consumer.
pub type WireQueue = crate::bounded::Bounded<Bytes>;
