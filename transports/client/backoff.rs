//! [`Backoff`]: the delays between a client's reconnect attempts.
//!
//! Plain state: it never reads the clock and never sleeps, so a test steps
//! it and checks every delay. The caller sleeps for what [`Backoff::next`]
//! returns, and calls [`Backoff::reset`] once a connection is made.

use std::time::Duration;

/// Reconnect delays growing geometrically from `initial` by `factor` up to
/// `max`, optionally shortened at random by up to a fraction (`jitter`), so
/// many clients cut off at once do not all come back at the same instant.
///
/// Without jitter the delays are `initial`, `initial × factor`,
/// `initial × factor²`, … each capped at `max` (a first delay above `max`
/// is kept as given, as the clients always did).
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// The first delay, and the delay after [`Backoff::reset`].
    initial: Duration,
    /// What each delay is multiplied by for the next (at least 1).
    factor: f64,
    /// The largest delay growth reaches.
    max: Duration,
    /// Fraction of a delay (0 to 1) that may be taken off at random.
    jitter: f64,
    /// The delay the next call of `next` starts from.
    current: Duration,
    /// State of the jitter's generator (splitmix64).
    seed: u64,
}

impl Backoff {
    /// Delays from `initial`, times `factor` each time (values below 1, or
    /// not finite, count as 1: delays never shrink), capped at `max`.
    pub fn new(initial: Duration, factor: f64, max: Duration) -> Backoff {
        let factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        Backoff {
            initial,
            factor,
            max,
            jitter: 0.0,
            current: initial,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// The same delays, each shortened by a random part of at most
    /// `fraction` of it (clamped to 0..=1; 0 turns jitter off). The
    /// generator is seeded from the OS.
    pub fn with_jitter(self, fraction: f64) -> Backoff {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        self.with_jitter_seeded(fraction, a ^ b)
    }

    /// [`Backoff::with_jitter`] with a given seed (reproducible, for tests).
    pub fn with_jitter_seeded(mut self, fraction: f64, seed: u64) -> Backoff {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self.seed = seed;
        self
    }

    /// The first delay.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The growth factor.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The cap of growth.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The delay to wait before the next attempt; the one after it grows.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let delay = self.current;
        self.current = self.grown(delay);
        if self.jitter > 0.0 {
            let cut = delay.mul_f64(self.jitter * self.unit());
            delay.saturating_sub(cut)
        } else {
            delay
        }
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// `delay` times the factor, capped at `max` (no overflow: a delay
    /// that cannot grow further stays at the cap).
    fn grown(&self, delay: Duration) -> Duration {
        if delay >= self.max {
            // Never past the cap (a first delay above it was used once).
            return self.max;
        }
        let factor = self.factor;
        if factor == factor.trunc() && factor <= u32::MAX as f64 {
            // Whole factors (2, as libzmq) multiply exactly.
            delay
                .checked_mul(factor as u32)
                .map_or(self.max, |d| d.min(self.max))
        } else {
            Duration::try_from_secs_f64(delay.as_secs_f64() * factor)
                .map_or(self.max, |d| d.min(self.max))
        }
    }

    /// A uniform number in [0, 1) from the generator (splitmix64).
    fn unit(&mut self) -> f64 {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn take(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map(|_| b.next()).collect()
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 2.0, 2000 * MS);
        assert_eq!(
            take(&mut b, 7),
            [100, 200, 400, 800, 1600, 2000, 2000].map(|m| m * MS)
        );
    }

    #[test]
    fn grows_by_a_fractional_factor_like_the_unix_client() {
        // The old loop: delay = delay.mul_f64(1.5).min(max).
        let mut b = Backoff::new(Duration::from_secs(1), 1.5, Duration::from_secs(30));
        let mut old = Duration::from_secs(1);
        for _ in 0..20 {
            assert_eq!(b.next(), old);
            old = old.mul_f64(1.5).min(Duration::from_secs(30));
        }
        assert_eq!(b.next(), Duration::from_secs(30));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(10 * MS, 3.0, Duration::from_secs(1));
        take(&mut b, 4);
        b.reset();
        assert_eq!(take(&mut b, 2), [10 * MS, 30 * MS]);
    }

    #[test]
    fn an_initial_delay_above_the_cap_is_kept_once() {
        let mut b = Backoff::new(5 * MS, 2.0, 2 * MS);
        assert_eq!(take(&mut b, 3), [5 * MS, 2 * MS, 2 * MS]);
    }

    #[test]
    fn factors_below_one_or_not_finite_never_shrink() {
        for f in [0.5, 0.0, -2.0, f64::NAN, f64::INFINITY] {
            let mut b = Backoff::new(10 * MS, f, Duration::from_secs(1));
            assert_eq!(b.factor(), 1.0);
            assert_eq!(take(&mut b, 3), [10 * MS; 3]);
        }
    }

    #[test]
    fn huge_delays_saturate_at_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 4), 1000.0, Duration::MAX);
        b.next();
        assert_eq!(b.next(), Duration::MAX);
        assert_eq!(b.next(), Duration::MAX);
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let base = Backoff::new(100 * MS, 2.0, Duration::from_secs(2));
        let mut plain = base.clone();
        let mut jittered = base.with_jitter_seeded(0.25, 7);
        let mut some_shorter = false;
        for _ in 0..50 {
            let (p, j) = (plain.next(), jittered.next());
            assert!(j <= p && j >= p.mul_f64(0.75), "{j:?} vs {p:?}");
            some_shorter |= j < p;
        }
        assert!(some_shorter);
        // The growth itself is not jittered.
        jittered.reset();
        assert!(jittered.next() <= 100 * MS);
    }

    #[test]
    fn jitter_is_clamped() {
        let mut b = Backoff::new(100 * MS, 1.0, Duration::from_secs(1)).with_jitter_seeded(9.0, 1);
        for _ in 0..20 {
            assert!(b.next() <= 100 * MS);
        }
        let mut off = Backoff::new(100 * MS, 1.0, Duration::from_secs(1)).with_jitter(f64::NAN);
        assert_eq!(off.next(), 100 * MS);
    }
}
