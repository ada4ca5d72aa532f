//! One declaration for a setting spelled as one of a few names (a policy,
//! a mode): [`choice!`].
//!
//! The command line parses it (`FromStr`), configuration files and
//! `status` read and write it (serde), and both must use the same names.
//! The macro declares the enum with each variant's name next to it, so the
//! two cannot drift apart, and the parser's error lists the names.

/// Declares a `Copy` enum whose variants are spelled as the given names,
/// with `Default` (the variant marked `#[default]`), serde under those
/// names, a `NAMES` table and `FromStr`. An unknown name is an error that
/// names the setting and lists the names, through `parse` by default
/// (`unknown slow policy 'x' (queue|conflate)`), or through
/// `parse_listed` when given after the setting's description.
///
/// ```ignore
/// choice! {
///     /// What a lagging subscriber gets.
///     pub enum SlowPolicy("slow policy") {
///         /// Every value.
///         #[default]
///         Queue = "queue",
///         /// The newest value of each topic.
///         Conflate = "conflate",
///     }
/// }
/// ```
macro_rules! choice {
    (
        $(#[$attr:meta])*
        $vis:vis enum $Name:ident ($what:literal $(, $parse:ident)?) {
            $( $(#[$vattr:meta])* $Variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(
            Debug,
            Clone,
            Copy,
            Default,
            PartialEq,
            Eq,
            serde::Serialize,
            serde::Deserialize,
        )]
        $vis enum $Name {
            $( $(#[$vattr])* #[serde(rename = $text)] $Variant, )+
        }

        impl $Name {
            /// Every value with its name.
            pub const NAMES: &'static [(&'static str, $Name)] = &[$( ($text, $Name::$Variant) ),+];
        }

        impl ::std::str::FromStr for $Name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $crate::choice::choice!(@parse $($parse)?)(s, $what, Self::NAMES)
            }
        }
    };
    (@parse) => { $crate::choice::parse };
    (@parse $parse:ident) => { $crate::choice::$parse };
}

pub(crate) use choice;

/// Finds `s` among `choices` (name, value).
fn find<T: Copy>(s: &str, choices: &[(&str, T)]) -> Option<T> {
    choices.iter().find(|(name, _)| *name == s).map(|(_, v)| *v)
}

/// The names of `choices`, joined by `sep`.
fn names<T>(choices: &[(&str, T)], sep: &str) -> String {
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    names.join(sep)
}

/// Parses `s` as one of `choices`; the error names `what` was expected:
/// `unknown slow policy 'x' (queue|conflate)`.
pub(crate) fn parse<T: Copy>(s: &str, what: &str, choices: &[(&str, T)]) -> Result<T, String> {
    find(s, choices).ok_or_else(|| format!("unknown {what} '{s}' ({})", names(choices, "|")))
}

/// As [`parse`], with the error quoting `s` as Rust does and the names
/// listed with commas: `unknown replay mode "x" (all, opt-in)`.
#[cfg_attr(not(feature = "zmq"), allow(dead_code))] // The proxy's modes.
pub(crate) fn parse_listed<T: Copy>(
    s: &str,
    what: &str,
    choices: &[(&str, T)],
) -> Result<T, String> {
    find(s, choices).ok_or_else(|| format!("unknown {what} {s:?} ({})", names(choices, ", ")))
}

#[cfg(test)]
mod tests {
    choice! {
        /// A test setting.
        enum Mode("test mode") {
            /// The first.
            #[default]
            One = "one",
            /// The second.
            TwoWords = "two-words",
        }
    }

    choice! {
        /// The same, with the listed error.
        enum Listed("listed mode", parse_listed) {
            /// The only one.
            #[default]
            Only = "only",
            /// Another.
            Other = "other",
        }
    }

    #[test]
    fn names_parse_and_serialize_alike_and_errors_list_them() {
        assert_eq!(Mode::default(), Mode::One);
        for &(name, v) in Mode::NAMES {
            assert_eq!(name.parse::<Mode>(), Ok(v));
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<Mode>(&format!("\"{name}\"")).unwrap(),
                v
            );
        }
        assert_eq!(
            "two_words".parse::<Mode>(),
            Err("unknown test mode 'two_words' (one|two-words)".to_owned())
        );
        assert_eq!("other".parse::<Listed>(), Ok(Listed::Other));
        assert_eq!(
            "x\"".parse::<Listed>(),
            Err("unknown listed mode \"x\\\"\" (only, other)".to_owned())
        );
    }
}
