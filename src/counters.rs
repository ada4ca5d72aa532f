//! One declaration for a set of counters and its snapshot: [`counters!`].
//!
//! Every component that counts (the hook engine, the ZeroMQ clients and
//! proxy) keeps relaxed atomic tallies that it bumps on its hot path, and
//! hands out a plain copy for `status` and tests. The macro declares both
//! structs from one list of fields, and the `snapshot` method that copies
//! one into the other, so a counter cannot be added to one and forgotten
//! in the other.

/// Declares a struct of live counters (one `AtomicU64` per field, with the
/// struct's visibility) and a plain snapshot struct (one `pub u64` per
/// field, with the attributes and derives given), plus
/// `fn snapshot(&self) -> Snapshot` on the live struct.
///
/// Fields after a `;` exist only in the snapshot: the caller fills them in
/// after `snapshot()`, which sets them to their default.
///
/// ```ignore
/// counters! {
///     /// Live counters.
///     pub(crate) struct Counters;
///     /// A copy of the counters.
///     #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
///     pub struct Stats {
///         /// Messages sent.
///         sent,
///         /// Messages dropped.
///         dropped;
///         /// The queue's capacity (not a counter).
///         capacity: u64,
///     }
/// }
/// ```
macro_rules! counters {
    (
        $(#[$cattr:meta])*
        $cvis:vis struct $Counters:ident;
        $(#[$sattr:meta])*
        $svis:vis struct $Snapshot:ident {
            $( $(#[$fattr:meta])* $field:ident ),+ $(,)?
            $( ; $( $(#[$xattr:meta])* $xfield:ident : $xty:ty ),* $(,)? )?
        }
    ) => {
        $(#[$cattr])*
        #[derive(Debug, Default)]
        $cvis struct $Counters {
            $(
                #[doc = concat!("See [`", stringify!($Snapshot), "::", stringify!($field), "`].")]
                $cvis $field: ::std::sync::atomic::AtomicU64,
            )+
        }

        $(#[$sattr])*
        $svis struct $Snapshot {
            $( $(#[$fattr])* pub $field: u64, )+
            $($( $(#[$xattr])* pub $xfield: $xty, )*)?
        }

        impl $Counters {
            /// A plain copy of every counter (fields that are not
            /// counters are left at their default).
            #[allow(dead_code)]
            $cvis fn snapshot(&self) -> $Snapshot {
                $Snapshot {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )+
                    $($( $xfield: ::std::default::Default::default(), )*)?
                }
            }
        }
    };
}

pub(crate) use counters;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    counters! {
        /// Test counters.
        struct Live;
        /// Their copy.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct Copy {
            /// A.
            a,
            /// B.
            b;
            /// Not a counter.
            names: Vec<String>,
        }
    }

    counters! {
        struct Plain;
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct PlainCopy { x, y, }
    }

    #[test]
    fn a_snapshot_copies_every_counter_and_defaults_the_rest() {
        let live = Live::default();
        live.a.fetch_add(3, Ordering::Relaxed);
        live.b.fetch_add(5, Ordering::Relaxed);
        assert_eq!(
            live.snapshot(),
            Copy {
                a: 3,
                b: 5,
                names: Vec::new()
            }
        );
        let plain = Plain::default();
        plain.y.fetch_add(1, Ordering::Relaxed);
        assert_eq!(plain.snapshot(), PlainCopy { x: 0, y: 1 });
    }
}
