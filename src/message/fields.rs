//! The fields of a [`BusMessage`](super::BusMessage): key and value texts,
//! kept as spans of the source frame where possible, in a small vector
//! that needs no allocation for the usual message.

/// A key or value: a range of the source frame, or text of its own.
#[derive(Debug, Clone)]
pub(super) enum Text {
    /// `src[start..end]`; for a key, the text between its quotes (only
    /// keys without escapes are kept this way).
    Span(u32, u32),
    /// A key (unescaped) or a value (JSON text) set or decoded later.
    Owned(Box<str>),
}

/// The fields of a message: up to eight in place (no allocation for the
/// usual message), more in a vector.
#[derive(Debug, Clone)]
pub(super) struct Fields {
    /// The first fields, in place.
    inline: [(Text, Text); INLINE],
    /// How many of `inline` are used (0 once spilled).
    len: usize,
    /// All the fields, once there were more than `INLINE`.
    spill: Vec<(Text, Text)>,
}

const INLINE: usize = 8;
const EMPTY: (Text, Text) = (Text::Span(0, 0), Text::Span(0, 0));

impl Default for Fields {
    fn default() -> Self {
        Fields {
            inline: [EMPTY; INLINE],
            len: 0,
            spill: Vec::new(),
        }
    }
}

impl std::ops::Deref for Fields {
    type Target = [(Text, Text)];
    fn deref(&self) -> &Self::Target {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }
}

impl std::ops::DerefMut for Fields {
    fn deref_mut(&mut self) -> &mut Self::Target {
        if self.spill.is_empty() {
            &mut self.inline[..self.len]
        } else {
            &mut self.spill
        }
    }
}

impl Fields {
    pub(super) fn push(&mut self, f: (Text, Text)) {
        if self.spill.is_empty() {
            if self.len < INLINE {
                self.inline[self.len] = f;
                self.len += 1;
                return;
            }
            self.spill.reserve(2 * INLINE);
            for x in &mut self.inline[..self.len] {
                self.spill.push(std::mem::replace(x, EMPTY));
            }
            self.len = 0;
        }
        self.spill.push(f);
    }

    pub(super) fn remove(&mut self, i: usize) -> (Text, Text) {
        if !self.spill.is_empty() {
            return self.spill.remove(i);
        }
        let f = std::mem::replace(&mut self.inline[i], EMPTY);
        self.inline[i..self.len].rotate_left(1);
        self.len -= 1;
        f
    }
}
