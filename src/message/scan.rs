//! A JSON scanner for the top-level object of a payload: it validates the
//! whole text (RFC 8259, as serde_json does: no comments, no trailing
//! commas, no control characters in strings, any nesting depth) and
//! records each member's key and value as spans, without building
//! anything. It only ever answers "valid, here are the spans" or "not
//! sure"; the caller then asks serde_json.
//!
//! It checks UTF-8 in the same pass: outside strings the grammar admits
//! ASCII only, and a string's content (between ASCII quotes, so valid on
//! its own in any valid text) is checked only when a byte of it is not
//! ASCII (with `simdutf8`). So an accepted payload is valid UTF-8; a
//! refused one is looked at again by the caller (bad UTF-8 or bad JSON).
//!
//! Large payloads are mostly string bytes; those are checked 64 bytes at
//! a time with AVX2 where the CPU has it (detected at run time), else 16
//! at a time with SSE2 (part of every x86-64), else 8 at a time in a
//! `u64`. Nesting is tracked on a stack of bytes (the first levels in
//! place), never by recursion.

use super::fallback::{KeyIndex, INDEX_FROM};
use super::fields::{Fields, Text};

/// Records the members of the object in the payload `s` into `fields`
/// (spans offset by the 4-byte header; `fields` starts empty); returns
/// whether a key repeated, or None when `s` is not a valid JSON object in
/// valid UTF-8 or nests deeper than `max_depth` (the top-level object is
/// depth 1); then `too_deep` says which, and `fields` holds whatever was
/// recorded before the fault.
pub(super) fn object_into(
    s: &[u8],
    fields: &mut Fields,
    max_depth: usize,
    too_deep: &mut bool,
) -> Option<bool> {
    let mut out = Out {
        fields,
        seen: 0,
        repeated: false,
    };
    let mut index = None;
    let mut stack = Stack::new();
    let mut i = ws(s, 0);
    if s.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(s, i + 1);
    if s.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if s.get(i) != Some(&b'"') {
                return None;
            }
            let (ke, escaped) = string_end(s, i + 1)?;
            let (ks, kend) = (i + 1, ke);
            i = ws(s, ke + 1);
            if s.get(i) != Some(&b':') {
                return None;
            }
            i = ws(s, i + 1);
            let vs = i;
            i = value(s, i, &mut stack, max_depth, too_deep)?;
            let key = if escaped {
                // Rare: decode the key (serde_json knows every escape).
                let k: String = serde_json::from_slice(&s[ks - 1..kend + 1]).ok()?;
                Text::Owned(k.into_boxed_str())
            } else {
                Text::Span((ks + 4) as u32, (kend + 4) as u32)
            };
            push(
                &mut out,
                s,
                key,
                Text::Span((vs + 4) as u32, (i + 4) as u32),
                &mut index,
            );
            i = ws(s, i);
            match s.get(i) {
                Some(b',') => i = ws(s, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (ws(s, i) == s.len()).then_some(out.repeated)
}

/// [`object_into`] a fresh set of fields.
#[cfg(test)]
pub(super) fn object(
    text: &str,
    max_depth: usize,
    too_deep: &mut bool,
) -> Option<super::fallback::Spans> {
    let mut fields = Fields::default();
    let repeated = object_into(text.as_bytes(), &mut fields, max_depth, too_deep)?;
    Some(super::fallback::Spans { fields, repeated })
}

/// Where [`object_into`] records members.
struct Out<'f> {
    fields: &'f mut Fields,
    /// A filter of the keys seen so far.
    seen: u64,
    repeated: bool,
}

/// Adds a member; a repeated key replaces the earlier value in place.
/// Small objects are searched directly; past [`INDEX_FROM`] keys a
/// hash index keeps a payload of very many keys linear in time.
fn push(out: &mut Out<'_>, text: &[u8], key: Text, value: Text, index: &mut Option<KeyIndex>) {
    if index.is_none() && out.fields.len() >= INDEX_FROM {
        let mut m = KeyIndex::with_capacity(2 * out.fields.len());
        for (i, (k, _)) in out.fields.iter().enumerate() {
            m.insert(key_bytes(text, k).to_vec(), i);
        }
        *index = Some(m);
    }
    if let Some(m) = index {
        let name = key_bytes(text, &key).to_vec();
        match m.get(&name) {
            Some(&i) => {
                out.fields[i].1 = value;
                out.repeated = true;
            }
            None => {
                m.insert(name, out.fields.len());
                out.fields.push((key, value));
            }
        }
        return;
    }
    let name = key_bytes(text, &key);
    // A 64-bit filter of the keys seen: a key whose bit is not set
    // cannot be a repeat, so the usual message compares no keys.
    let bit = key_bit(name);
    let seen = out.seen & bit != 0;
    out.seen |= bit;
    if !seen {
        out.fields.push((key, value));
        return;
    }
    let dup = out.fields.iter().position(|(k, _)| {
        let other = key_bytes(text, k);
        // Length and first byte first: most keys differ there.
        other.len() == name.len() && other.first() == name.first() && other == name
    });
    match dup {
        Some(i) => {
            out.fields[i].1 = value;
            out.repeated = true;
        }
        None => out.fields.push((key, value)),
    }
}

/// A key's bit in the filter of keys seen: the first and last bytes and
/// the length, mixed by a multiplicative hash (its top 6 bits), so the
/// keys of the usual message (`type`, `to`, `from`, `id`, `ts`, `body`)
/// each get their own bit and never compare.
#[inline]
fn key_bit(name: &[u8]) -> u64 {
    let (f, l) = (
        u64::from(name.first().copied().unwrap_or(0)),
        u64::from(name.last().copied().unwrap_or(0)),
    );
    let h = f | l << 8 | (name.len() as u64) << 16;
    1u64 << (h.wrapping_mul(0xc4ce_b9fe_1a85_ec53) >> 58)
}

fn key_bytes<'a>(text: &'a [u8], k: &'a Text) -> &'a [u8] {
    match k {
        Text::Span(a, b) => text.get(*a as usize - 4..*b as usize - 4).unwrap_or(b""),
        Text::Owned(o) => o.as_bytes(),
    }
}

#[inline]
fn ws(s: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = s.get(i) {
        i += 1;
    }
    i
}

/// The open containers of [`value`]: `{` or `[` per level, the first
/// [`Stack::INLINE`] levels in place (no allocation for the usual
/// payload), deeper ones in a vector (any depth, bounded by the text).
struct Stack {
    inline: [u8; Stack::INLINE],
    deep: Vec<u8>,
    depth: usize,
}

impl Stack {
    const INLINE: usize = 32;

    fn new() -> Self {
        Stack {
            inline: [0; Stack::INLINE],
            deep: Vec::new(),
            depth: 0,
        }
    }

    #[inline]
    fn push(&mut self, open: u8) {
        if self.depth < Stack::INLINE {
            self.inline[self.depth] = open;
        } else {
            self.deep.push(open);
        }
        self.depth += 1;
    }

    #[inline]
    fn top(&self) -> Option<u8> {
        match self.depth {
            0 => None,
            d if d <= Stack::INLINE => Some(self.inline[d - 1]),
            _ => self.deep.last().copied(),
        }
    }

    #[inline]
    fn pop(&mut self) {
        if self.depth > Stack::INLINE {
            self.deep.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

/// Validates one value starting at `i` (no leading whitespace), a
/// member of the top-level object; returns the index just past it.
/// Nesting is tracked on `stack` (empty on entry and on a successful
/// return), not by recursion, so depth costs no native stack; a container
/// deeper than `max_depth` sets `too_deep`.
fn value(
    s: &[u8],
    mut i: usize,
    stack: &mut Stack,
    max_depth: usize,
    too_deep: &mut bool,
) -> Option<usize> {
    loop {
        let c = *s.get(i)?;
        match c {
            b'{' | b'[' => {
                // A container opens at depth 2 + what is open (the
                // top-level object is depth 1).
                if stack.depth + 2 > max_depth {
                    *too_deep = true;
                    return None;
                }
                let close = if c == b'{' { b'}' } else { b']' };
                i = ws(s, i + 1);
                if s.get(i) == Some(&close) {
                    i += 1;
                } else {
                    stack.push(c);
                    i = element(s, i, c)?;
                    continue;
                }
            }
            b'"' => i = string_end(s, i + 1)?.0 + 1,
            b't' => i = literal(s, i, b"true")?,
            b'f' => i = literal(s, i, b"false")?,
            b'n' => i = literal(s, i, b"null")?,
            b'-' | b'0'..=b'9' => i = number(s, i)?,
            _ => return None,
        }
        // A value is complete: close containers or move to the next
        // element.
        loop {
            let Some(open) = stack.top() else {
                return Some(i);
            };
            i = ws(s, i);
            match (open, *s.get(i)?) {
                (_, b',') => {
                    i = element(s, ws(s, i + 1), open)?;
                    break;
                }
                (b'[', b']') | (b'{', b'}') => {
                    i += 1;
                    stack.pop();
                }
                _ => return None,
            }
        }
    }
}

/// Where the next element of a container opened by `open` starts at `i`:
/// the value itself in an array, after its key in an object.
#[inline]
fn element(s: &[u8], i: usize, open: u8) -> Option<usize> {
    if open == b'{' {
        member_key(s, i)
    } else {
        Some(i)
    }
}

/// `"key"` `:` and the whitespace after it; returns where the value
/// starts.
#[inline]
fn member_key(s: &[u8], i: usize) -> Option<usize> {
    if s.get(i) != Some(&b'"') {
        return None;
    }
    let (end, _) = string_end(s, i + 1)?;
    let i = ws(s, end + 1);
    if s.get(i) != Some(&b':') {
        return None;
    }
    Some(ws(s, i + 1))
}

#[inline]
fn literal(s: &[u8], i: usize, lit: &[u8]) -> Option<usize> {
    (s.get(i..i + lit.len())? == lit).then_some(i + lit.len())
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
#[inline]
fn number(s: &[u8], mut i: usize) -> Option<usize> {
    #[inline]
    fn digits(s: &[u8], mut i: usize) -> Option<usize> {
        let start = i;
        while let Some(b'0'..=b'9') = s.get(i) {
            i += 1;
        }
        (i > start).then_some(i)
    }
    if s.get(i) == Some(&b'-') {
        i += 1;
    }
    match s.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(s, i)?,
        _ => return None,
    }
    if s.get(i) == Some(&b'.') {
        i = digits(s, i + 1)?;
    }
    if let Some(b'e' | b'E') = s.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = s.get(i) {
            i += 1;
        }
        i = digits(s, i)?;
    }
    // serde_json refuses a digit right after a leading zero ("01").
    match s.get(i) {
        Some(b'0'..=b'9') => None,
        _ => Some(i),
    }
}

/// From just after an opening quote: the index of the closing quote,
/// and whether the string had escapes. Refuses control characters, bad
/// escapes and content that is not UTF-8.
#[inline(always)]
fn string_end(s: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut high = false;
    let mut i = start;
    loop {
        let (n, h) = run(s.get(i..).unwrap_or_default());
        i += n;
        high |= h;
        match *s.get(i)? {
            b'"' => {
                // Only a string with a non-ASCII byte needs a UTF-8 check.
                if high && simdutf8::basic::from_utf8(&s[start..i]).is_err() {
                    return None;
                }
                return Some((i, escaped));
            }
            b'\\' => {
                escaped = true;
                match *s.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                    b'u' => {
                        let hex = s.get(i + 2..i + 6)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        i += 6;
                    }
                    _ => return None,
                }
            }
            _ => return None, // a control character
        }
    }
}

/// Length of the leading run of bytes that need no attention in a
/// string: not `"`, not `\`, not a control character (below 0x20).
#[cfg(test)]
fn plain_run(s: &[u8]) -> usize {
    run(s).0
}

/// [`plain_run`], and whether a byte of the run is not ASCII.
///
/// The first 16 bytes are looked at in place (most strings end there);
/// a longer run goes on 64 bytes at a time with AVX2 when the CPU has it,
/// else 16 at a time with SSE2.
#[inline]
fn run(s: &[u8]) -> (usize, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if s.len() < 16 {
            return run_swar(s);
        }
        let (m, h) = x86::masks16(s, 0);
        if m != 0 {
            let n = m.trailing_zeros();
            return (n as usize, h & ((1 << n) - 1) != 0);
        }
        let (n, high) = if s.len() >= 16 + 64 && x86::has_avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { x86::run_avx2(&s[16..]) }
        } else {
            x86::run_sse2(&s[16..])
        };
        (16 + n, high || h != 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        run_swar(s)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8,
        _mm256_movemask_epi8, _mm256_or_si256, _mm256_set1_epi8, _mm256_setzero_si256,
        _mm256_testz_si256, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8,
        _mm_or_si128, _mm_set1_epi8,
    };

    /// True when the CPU has AVX2 (std caches the answer).
    #[inline]
    pub(super) fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// Masks of the bytes of `s[i..i + 16]` (bit k for byte i + k): those
    /// that end a plain run, and those that are not ASCII. `s` must have
    /// those 16 bytes.
    #[inline]
    pub(super) fn masks16(s: &[u8], i: usize) -> (u32, u32) {
        let Some(chunk) = s.get(i..i + 16) else {
            // Not reached by the callers; the portable answer.
            let rest = &s[i.min(s.len())..];
            let (n, high) = super::run_swar(rest);
            return (if n < rest.len() { 1 << n } else { 0 }, u32::from(high));
        };
        // SAFETY: `chunk` is 16 readable bytes; SSE2 is part of the
        // x86-64 baseline, so every x86-64 CPU has it.
        unsafe {
            let x = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            let q = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8));
            let b = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8));
            // x <= 0x1f (unsigned) exactly when min(x, 0x1f) == x.
            let c = _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(0x1f)), x);
            let special = _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(q, b), c)) as u32;
            (special, _mm_movemask_epi8(x) as u32)
        }
    }

    /// [`super::run`] 16 bytes at a time; the last partial block is looked
    /// at through the last 16 bytes of `s` (overlapping).
    #[inline]
    pub(super) fn run_sse2(s: &[u8]) -> (usize, bool) {
        let mut i = 0;
        let mut high = 0;
        while i + 16 <= s.len() {
            let (m, h) = masks16(s, i);
            if m != 0 {
                let n = m.trailing_zeros();
                return (i + n as usize, high | (h & ((1 << n) - 1)) != 0);
            }
            high |= h;
            i += 16;
        }
        if i == s.len() {
            return (i, high != 0);
        }
        if s.len() >= 16 {
            // Bytes before `i` were looked at already.
            let from = s.len() - 16;
            let (m, h) = masks16(s, from);
            let (m, h) = (m >> (i - from), h >> (i - from));
            if m != 0 {
                let n = m.trailing_zeros();
                return (i + n as usize, high | (h & ((1 << n) - 1)) != 0);
            }
            return (s.len(), high | h != 0);
        }
        super::run_swar(s)
    }

    /// [`super::run`] 64 bytes at a time with AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn run_avx2(s: &[u8]) -> (usize, bool) {
        let quote = _mm256_set1_epi8(b'"' as i8);
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let ctrl_max = _mm256_set1_epi8(0x1f);
        // The bytes of the run so far, or'ed: a high bit means non-ASCII.
        let mut seen = _mm256_setzero_si256();
        let p = s.as_ptr();
        let mut i = 0;
        while i + 64 <= s.len() {
            // In bounds: i + 64 <= s.len().
            let a = _mm256_loadu_si256(p.add(i).cast::<__m256i>());
            let b = _mm256_loadu_si256(p.add(i + 32).cast::<__m256i>());
            let ma = _mm256_or_si256(
                _mm256_or_si256(_mm256_cmpeq_epi8(a, quote), _mm256_cmpeq_epi8(a, backslash)),
                _mm256_cmpeq_epi8(_mm256_min_epu8(a, ctrl_max), a),
            );
            let mb = _mm256_or_si256(
                _mm256_or_si256(_mm256_cmpeq_epi8(b, quote), _mm256_cmpeq_epi8(b, backslash)),
                _mm256_cmpeq_epi8(_mm256_min_epu8(b, ctrl_max), b),
            );
            let m = _mm256_or_si256(ma, mb);
            if _mm256_testz_si256(m, m) == 0 {
                let special = _mm256_movemask_epi8(ma) as u32 as u64
                    | (_mm256_movemask_epi8(mb) as u32 as u64) << 32;
                let hi = _mm256_movemask_epi8(a) as u32 as u64
                    | (_mm256_movemask_epi8(b) as u32 as u64) << 32;
                let n = special.trailing_zeros();
                let high = _mm256_movemask_epi8(seen) != 0 || hi & ((1 << n) - 1) != 0;
                return (i + n as usize, high);
            }
            seen = _mm256_or_si256(seen, _mm256_or_si256(a, b));
            i += 64;
        }
        let (n, high) = run_sse2(&s[i..]);
        (i + n, high || _mm256_movemask_epi8(seen) != 0)
    }
}

/// [`run`], eight bytes at a time.
#[inline]
fn run_swar(s: &[u8]) -> (usize, bool) {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    let mut i = 0;
    let mut high = 0;
    while i + 8 <= s.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        let x = u64::from_le_bytes(w);
        // High bit set in each byte that is < 0x20, == '"' or == '\\'
        // (exact: no false positives from borrows, since each test is
        // masked with !x or the xor'ed value).
        let ctrl = x.wrapping_sub(ONES * 0x20) & !x;
        let q = x ^ (ONES * u64::from(b'"'));
        let q = q.wrapping_sub(ONES) & !q;
        let b = x ^ (ONES * u64::from(b'\\'));
        let b = b.wrapping_sub(ONES) & !b;
        let m = (ctrl | q | b) & HIGH;
        if m != 0 {
            // The lowest flagged byte is exact; later ones may not be,
            // which does not matter.
            let n = m.trailing_zeros() / 8;
            let before = (1u64 << (8 * n)) - 1;
            return (i + n as usize, (high | (x & HIGH & before)) != 0);
        }
        high |= x & HIGH;
        i += 8;
    }
    while i < s.len() && !matches!(s[i], b'"' | b'\\' | 0..=0x1f) {
        high |= u64::from(s[i] & 0x80);
        i += 1;
    }
    (i, high != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usual_keys_each_have_their_own_filter_bit() {
        let keys: [&[u8]; 6] = [b"type", b"to", b"from", b"id", b"ts", b"body"];
        let all = keys.iter().fold(0u64, |acc, k| acc | key_bit(k));
        assert_eq!(all.count_ones(), 6);
    }

    /// Valid for the scanner exactly when serde_json reads it as an
    /// object.
    fn agrees(text: &str) {
        // What the serde path accepts: an object of raw values
        // (numbers are not range-checked, escapes only in keys decoded).
        let serde_ok = serde_json::from_str::<
            std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>,
        >(text)
        .is_ok();
        let ours = object(text, usize::MAX, &mut false);
        assert_eq!(
            ours.is_some(),
            serde_ok,
            "scanner and serde_json disagree on {text:?}"
        );
    }

    #[test]
    fn matches_serde_json_on_edge_cases() {
        let cases = [
            r#"{}"#,
            r#" { } "#,
            r#"{"a":1}"#,
            r#"{"a":-0}"#,
            r#"{"a":-}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1.5e}"#,
            r#"{"a":1.5e+3}"#,
            r#"{"a":1E-3}"#,
            r#"{"a":-1.25e10}"#,
            r#"{"a":1,}"#,
            r#"{,"a":1}"#,
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{"a":[1,2,[3,{"b":null}]]}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[,1]}"#,
            r#"{"a":[}"#,
            r#"{"a":{"b":{"c":{}}}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":tru}"#,
            r#"{"a":truex}"#,
            r#"{"a":true,"b":false,"c":null}"#,
            r#"{"a":"x\"y"}"#,
            r#"{"a":"\u00e9\ud83d\ude00"}"#,
            r#"{"a":"\u00g9"}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\/\b\f\n\r\t"}"#,
            "{\"a\":\"tab\there\"}",
            "{\"a\":\"nl\nhere\"}",
            "{\"a\":\"del\u{7f}ok\"}",
            r#"{"a":"é ü 😀"}"#,
            r#"{"a":1} x"#,
            r#"{"a":1}}"#,
            r#"{"a":1"#,
            r#"{"a"#,
            r#"{"#,
            r#"[1]"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1 "c":2}}"#,
            r#"{"t\u0079pe":"m"}"#,
            r#"{"a":"unterminated}"#,
            "{\"a\":1}\n\t ",
            r#"{"a":[[[[[[[[[[]]]]]]]]]]}"#,
            r#"{"a":[[[[[[[[[[]]]]]]]]]}"#,
            r#"{"a":NaN}"#,
            r#"{"a":1e400}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":-9223372036854775809}"#,
            r#"{"a" : [ 1 , { } ] , "b" : "" }"#,
            "{\"aaaaaaaaaaaaaaaaaaaaaaaa\":\"bbbbbbbbbbbbbbbb\\\"cccccccc\"}",
            r#"{"a":"\"#,
            r#"{"a":"\u12"}"#,
        ];
        for c in cases {
            agrees(c);
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(300), "]".repeat(300));
        assert!(
            object(&deep, usize::MAX, &mut false).is_some(),
            "any depth, like serde_json's raw values"
        );
    }

    #[test]
    fn matches_serde_json_on_mutations() {
        // Every single-byte deletion and a few substitutions of a rich
        // document: the scanner must agree with serde_json each time.
        let doc = r#"{"type":"message","to":"b","n":-12.5e-3,"body":{"x":[1,true,null,"\u00e9\n"],"y":{}},"z":[]}"#;
        agrees(doc);
        for i in 0..doc.len() {
            if !doc.is_char_boundary(i) || !doc.is_char_boundary(i + 1) {
                continue;
            }
            agrees(&format!("{}{}", &doc[..i], &doc[i + 1..]));
            for sub in ["\"", "\\", ",", "}", "]", "0", " ", "\u{1}", "x", "-", "."] {
                agrees(&format!("{}{}{}", &doc[..i], sub, &doc[i + 1..]));
            }
        }
    }

    #[test]
    fn plain_run_stops_at_the_first_special_byte() {
        for len in 0..70 {
            for pos in 0..=len {
                for special in [b'"', b'\\', 0u8, 0x1f, b'\n'] {
                    let mut v = vec![b'a'; len];
                    v.extend_from_slice("é\u{7f}".as_bytes());
                    if pos < len {
                        v[pos] = special;
                    }
                    let want = if pos < len { pos } else { v.len() };
                    assert_eq!(plain_run(&v), want, "len {len} pos {pos} byte {special}");
                }
            }
        }
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let text = r#" {"a" : [1, 2] , "b":"x" ,"a":3} "#;
        let sp = object(text, usize::MAX, &mut false).unwrap();
        assert!(sp.repeated);
        assert_eq!(sp.fields.len(), 2);
        fn at<'a>(text: &'a str, t: &'a Text) -> &'a str {
            match t {
                Text::Span(a, b) => &text[*a as usize - 4..*b as usize - 4],
                Text::Owned(o) => o,
            }
        }
        assert_eq!(at(text, &sp.fields[0].0), "a");
        assert_eq!(at(text, &sp.fields[0].1), "3");
        assert_eq!(at(text, &sp.fields[1].0), "b");
        assert_eq!(at(text, &sp.fields[1].1), r#""x""#);
    }
}

/// The fast path against serde_json (the fallback, and the reference) on
/// generated, mutated and hand-picked payloads: the same accept / reject,
/// and for accepted payloads the same top-level fields (decoded key, raw
/// value text, last value of a repeated key in the place of its first)
/// and the same "a key repeated" flag.
/// Byte sequences that are not UTF-8 anywhere they stand: a byte never
/// used, sequences cut short (2, 3, 4 bytes), a surrogate, an overlong
/// form, a code point past U+10FFFF, a lone continuation byte.
#[cfg(test)]
pub(super) const BAD_UTF8: [&[u8]; 8] = [
    b"\xff",
    b"\xc3",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xf0\x9f\x98",
];

#[cfg(test)]
mod differential {
    use super::super::fallback::{serde_spans, Spans};
    use super::*;

    /// xorshift64*: a fixed sequence, so a failure is reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            v[self.below(v.len())]
        }
    }

    fn fields(text: &str, sp: &Spans) -> Vec<(String, String)> {
        let at = |t: &Text| match t {
            Text::Span(a, b) => text[*a as usize - 4..*b as usize - 4].to_string(),
            Text::Owned(o) => o.to_string(),
        };
        sp.fields.iter().map(|(k, v)| (at(k), at(v))).collect()
    }

    /// Asserts the scanner and serde_json agree on `text`; returns whether
    /// it was accepted.
    fn check(text: &str) -> bool {
        let ours = object(text, usize::MAX, &mut false);
        let reference = serde_spans(text);
        match (&ours, &reference) {
            (Some(a), Ok(b)) => {
                assert_eq!(
                    fields(text, a),
                    fields(text, b),
                    "fields differ on {text:?}"
                );
                assert_eq!(a.repeated, b.repeated, "repeat flag differs on {text:?}");
                true
            }
            (None, Err(_)) => false,
            (a, b) => panic!(
                "scanner {} but serde_json {} on {text:?}",
                if a.is_some() { "accepts" } else { "refuses" },
                if b.is_ok() { "accepts" } else { "refuses" },
            ),
        }
    }

    fn gen_ws(r: &mut Rng, out: &mut String) {
        if r.below(4) == 0 {
            for _ in 0..r.below(3) + 1 {
                out.push(r.pick(&[' ', '\n', '\t', '\r']));
            }
        }
    }

    /// A string literal (quotes included): plain runs of any length
    /// (across the 16- and 64-byte blocks), escapes, non-ASCII text.
    fn gen_string(r: &mut Rng, out: &mut String) {
        out.push('"');
        let parts = r.below(4);
        for _ in 0..parts {
            match r.below(8) {
                0 => {
                    let e = r.pick(&[
                        "\\\"",
                        "\\\\",
                        "\\/",
                        "\\b",
                        "\\f",
                        "\\n",
                        "\\r",
                        "\\t",
                        "\\u00e9",
                        "\\u0000",
                        "\\uD83D\\uDE00",
                        "\\ud800",
                        "\\udc00x",
                        "\\uABCD",
                    ]);
                    out.push_str(e);
                }
                1 => out.push_str(r.pick(&["é", "ü€", "😀", "\u{7f}", "日本"])),
                2 => {
                    let n = r.pick(&[15, 16, 17, 31, 32, 33, 63, 64, 65, 79, 80, 81, 127, 128]);
                    out.extend(std::iter::repeat('x').take(n));
                }
                _ => {
                    let n = r.below(12);
                    for _ in 0..n {
                        out.push((b'a' + r.below(26) as u8) as char);
                    }
                }
            }
        }
        out.push('"');
    }

    fn gen_number(r: &mut Rng, out: &mut String) {
        out.push_str(r.pick(&[
            "0",
            "-0",
            "1",
            "-1",
            "12",
            "1.5",
            "-0.25",
            "1e3",
            "1E+3",
            "2.5e-3",
            "1e400",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789.000001",
            "0.0",
        ]));
    }

    /// A valid JSON value, at most `depth` levels deep.
    fn gen_value(r: &mut Rng, out: &mut String, depth: usize) {
        let kind = if depth == 0 { r.below(4) } else { r.below(7) };
        match kind {
            0 => gen_string(r, out),
            1 => gen_number(r, out),
            2 => out.push_str(r.pick(&["true", "false", "null"])),
            3 => gen_string(r, out),
            4 | 5 => gen_object(r, out, depth - 1),
            _ => gen_list(r, out, ('[', ']'), 4, |r, out| gen_value(r, out, depth - 1)),
        }
    }

    /// An object whose values are at most `depth` levels deep.
    fn gen_object(r: &mut Rng, out: &mut String, depth: usize) {
        gen_list(r, out, ('{', '}'), 6, |r, out| {
            match r.below(6) {
                // Keys that repeat, known keys, escaped keys.
                0 => out.push_str(r.pick(&[
                    "\"type\"",
                    "\"to\"",
                    "\"a\"",
                    "\"t\\u0079pe\"",
                    "\"\\u00e9\"",
                    "\"\"",
                ])),
                _ => gen_string(r, out),
            }
            gen_ws(r, out);
            out.push(':');
            gen_ws(r, out);
            gen_value(r, out, depth);
        });
    }

    /// `open`, fewer than `max` elements written by `element` (commas and
    /// whitespace around them), `close`.
    fn gen_list(
        r: &mut Rng,
        out: &mut String,
        (open, close): (char, char),
        max: usize,
        element: impl Fn(&mut Rng, &mut String),
    ) {
        out.push(open);
        gen_ws(r, out);
        for i in 0..r.below(max) {
            if i > 0 {
                out.push(',');
                gen_ws(r, out);
            }
            element(r, out);
            gen_ws(r, out);
        }
        out.push(close);
    }

    /// A payload: mostly a valid object, sometimes another value.
    fn payload(r: &mut Rng) -> String {
        let mut out = String::new();
        gen_ws(r, &mut out);
        if r.below(10) == 0 {
            gen_value(r, &mut out, 3);
        } else {
            gen_object(r, &mut out, 3);
        }
        gen_ws(r, &mut out);
        out
    }

    /// One small change of `text` (kept UTF-8): a byte deleted, inserted
    /// or replaced, or the text cut short.
    fn mutate(r: &mut Rng, text: &str) -> String {
        let specials = [
            "\"", "\\", ",", ":", "{", "}", "[", "]", "0", "-", ".", "e", " ", "\u{1}", "\u{1f}",
            "\n", "x", "t", "n", "é", "u",
        ];
        let mut at = r.below(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mut next = (at + 1).min(text.len());
        while !text.is_char_boundary(next) {
            next += 1;
        }
        match r.below(4) {
            0 => format!("{}{}", &text[..at], &text[next..]),
            1 => format!("{}{}{}", &text[..at], r.pick(&specials), &text[at..]),
            2 => format!("{}{}{}", &text[..at], r.pick(&specials), &text[next..]),
            _ => text[..at].to_string(),
        }
    }

    #[test]
    fn generated_payloads_agree_with_serde_json() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..4000 {
            let text = payload(&mut r);
            let mut cur = text.clone();
            for _ in 0..6 {
                if check(&cur) {
                    accepted += 1;
                } else {
                    refused += 1;
                }
                cur = mutate(&mut r, &cur);
            }
        }
        // Both sides were exercised.
        assert!(accepted > 3000 && refused > 3000, "{accepted} {refused}");
    }

    #[test]
    fn large_payloads_agree_with_serde_json() {
        // A long string (the shape of a large frame) with one special byte
        // or escape at every position near the block edges, and a large
        // token-dense body.
        let base = "x".repeat(300);
        for pos in (0..300).filter(|p| p % 64 < 3 || p % 64 > 60 || p % 16 == 15) {
            for special in [
                "\"", "\\", "\\n", "\\u00e9", "\u{1}", "\u{1f}", "\u{7f}", "é",
            ] {
                let s = format!("{}{}{}", &base[..pos], special, &base[pos..]);
                check(&format!(
                    "{{\"type\":\"message\",\"body\":{{\"pad\":\"{s}\"}}}}"
                ));
                check(&format!("{{\"k\":\"{s}\"}}"));
                check(&format!("{{\"{s}\":1}}"));
            }
        }
        let mut r = Rng(7);
        let mut big = String::from("{\"rows\":[");
        while big.len() < 64 * 1024 {
            gen_value(&mut r, &mut big, 2);
            big.push(',');
        }
        big.push_str("0]}");
        assert!(check(&big));
        for _ in 0..200 {
            check(&mutate(&mut r, &big));
        }
    }

    #[test]
    fn hand_picked_payloads_agree_with_serde_json() {
        let cases = [
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"b":2,"a":3,"b":4}"#,
            r#"{"t\u0079pe":"m","type":"n"}"#,
            r#"{"\ud800":1}"#,
            r#"{"\ud83d\ude00":1}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"":""}"#,
            r#"{"a":{"a":{"a":1}},"a":[]}"#,
            "{\"a\":1}\u{0}",
            "\u{feff}{\"a\":1}",
            "{\"a\":1}\u{a0}",
            r#"{"a":-}"#,
            r#"{"a":-01}"#,
            r#"{"a":1e+}"#,
            r#"{"a":[1,2,]}"#,
            r#"{"a":[[]],}"#,
            r#"{"a":nul}"#,
            r#"{"a":null,"b":true,"c":false}"#,
            r#"{"a":"\u00E9\u00e9"}"#,
            r#"{"a":"\U00e9"}"#,
        ];
        for c in cases {
            check(c);
        }
        // Deep nesting, balanced and not, far past serde_json's recursion
        // limit: no crash, same answer.
        for depth in [1, 63, 64, 65, 200, 10_000] {
            let ok = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
            assert!(check(&ok));
            let objs = format!(
                "{{\"a\":{}1{}}}",
                "{\"b\":".repeat(depth),
                "}".repeat(depth)
            );
            assert!(check(&objs));
            check(&format!(
                "{{\"a\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth - 1)
            ));
            check(&format!(
                "{{\"a\":{}{}}}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            ));
        }
    }

    #[test]
    fn every_plain_run_path_agrees() {
        // The AVX2, SSE2 and eight-bytes-at-a-time paths on the same
        // input give the same run, and see a non-ASCII byte in it exactly
        // when there is one.
        let mut r = Rng(3);
        for _ in 0..5000 {
            let len = r.below(300);
            let mut v: Vec<u8> = (0..len).map(|_| b'a' + r.below(26) as u8).collect();
            for _ in 0..r.below(4) {
                if len > 0 {
                    let at = r.below(len);
                    v[at] = r.pick(&[b'"', b'\\', 0, 0x1f, b'\n', 0x7f, 0x80, 0xc3, 0xff, b' ']);
                }
            }
            let n = v
                .iter()
                .position(|b| matches!(b, b'"' | b'\\' | 0..=0x1f))
                .unwrap_or(v.len());
            let want = (n, v[..n].iter().any(|b| *b >= 0x80));
            assert_eq!(run(&v), want, "{v:?}");
            assert_eq!(plain_run(&v), n);
            assert_eq!(run_swar(&v), want, "{v:?}");
            #[cfg(target_arch = "x86_64")]
            {
                assert_eq!(x86::run_sse2(&v), want, "{v:?}");
                if x86::has_avx2() {
                    // SAFETY: the CPU has AVX2.
                    assert_eq!(unsafe { x86::run_avx2(&v) }, want, "{v:?}");
                }
            }
        }
    }

    /// Byte-level changes that break UTF-8 too: the scanner accepts
    /// exactly what is UTF-8 and accepted by serde_json.
    #[test]
    fn invalid_utf8_is_refused_where_serde_json_would_be_asked() {
        let mut r = Rng(11);
        for _ in 0..3000 {
            let text = payload(&mut r);
            let mut v = text.into_bytes();
            let at = r.below(v.len() + 1);
            if r.below(2) == 0 {
                v.splice(at..at, r.pick(&BAD_UTF8).iter().copied());
            } else if at < v.len() {
                v[at] = r.pick(&[0x80u8, 0xbf, 0xc2, 0xe0, 0xed, 0xf0, 0xf5, 0xff]);
            }
            let mut fields = Fields::default();
            let ours = object_into(&v, &mut fields, usize::MAX, &mut false).is_some();
            match std::str::from_utf8(&v) {
                Ok(text) => assert_eq!(ours, check(text), "{v:?}"),
                Err(_) => assert!(!ours, "scanner accepts invalid UTF-8: {v:?}"),
            }
        }
    }
}
