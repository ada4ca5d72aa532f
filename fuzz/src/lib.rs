//! Helpers shared by the fuzz targets.

/// Splits `len` bytes into consecutive chunk lengths (each at least 1),
/// chosen by `seed`: every byte at a time, small random chunks, large
/// random chunks, or all at once. Deterministic, so a crash replays.
pub fn chunk_lengths(seed: u8, len: usize) -> Vec<usize> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed).wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let max = match seed % 4 {
        0 => 1,
        1 => 8,
        2 => 300,
        _ => usize::MAX,
    };
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = if max == usize::MAX {
            left
        } else {
            1 + (next() as usize) % max
        };
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// Splits `data` into its chunks (see [`chunk_lengths`]).
pub fn chunks(seed: u8, data: &[u8]) -> Vec<&[u8]> {
    let mut rest = data;
    chunk_lengths(seed, data.len())
        .into_iter()
        .map(|n| {
            let (a, b) = rest.split_at(n);
            rest = b;
            a
        })
        .collect()
}
