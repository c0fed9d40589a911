//! The one backoff policy of every retry loop in Flotilla: exponential from a base,
//! capped, with an optional jitter. Callers keep their own attempt counters and stop
//! conditions; this says only how long to wait before retry `n`.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a delay is spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the ceiling.
    None,
    /// Uniform in `[ceiling / 2, ceiling)`: spreads a herd, keeps most of the wait.
    Half,
    /// Uniform in `[0, ceiling]` ("full jitter"): for contention, where the point is
    /// to stop retrying in step.
    Full,
}

/// Exponential backoff: `base · 2^retry`, capped at `max`, then jittered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry.
    pub base: Duration,
    /// The largest ceiling.
    pub max: Duration,
    /// How the delay is spread under the ceiling.
    pub jitter: Jitter,
}

impl Backoff {
    /// Doubling from `base` up to `max`, without jitter.
    pub const fn exponential(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: Jitter::None,
        }
    }

    /// The same policy with `jitter`.
    pub const fn with_jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// The ceiling before retry `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `retry`, with `unit` in `[0, 1)` choosing within the
    /// jitter's range (deterministic, for tests).
    pub fn delay_with(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(retry);
        let unit = unit.clamp(0.0, 1.0);
        match self.jitter {
            Jitter::None => ceiling,
            Jitter::Half => ceiling.mul_f64(0.5 + 0.5 * unit),
            Jitter::Full => ceiling.mul_f64(unit),
        }
    }

    /// The delay before retry `retry`, jittered at random.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, random_unit())
    }
}

/// A number in `[0, 1)` from the process's random hasher keys (no RNG dependency).
pub fn random_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_from_the_base_and_stops_at_the_cap() {
        let b = Backoff::exponential(MS(50), Duration::from_secs(1));
        let got: Vec<Duration> = (0..7).map(|r| b.delay(r)).collect();
        assert_eq!(
            got,
            [
                MS(50),
                MS(100),
                MS(200),
                MS(400),
                MS(800),
                MS(1000),
                MS(1000)
            ]
        );
        assert_eq!(b.delay(u32::MAX), MS(1000));
    }

    #[test]
    fn jitter_stays_in_its_range() {
        let half = Backoff::exponential(MS(100), MS(1000)).with_jitter(Jitter::Half);
        assert_eq!(half.delay_with(0, 0.0), MS(50));
        assert_eq!(half.delay_with(4, 0.0), MS(500));
        let full = half.with_jitter(Jitter::Full);
        assert_eq!(full.delay_with(2, 0.0), Duration::ZERO);
        assert_eq!(full.delay_with(2, 0.5), MS(200));
        for r in 0..10 {
            let d = full.delay(r);
            assert!(d <= full.ceiling(r));
            let d = half.delay(r);
            assert!(d >= half.ceiling(r) / 2 && d <= half.ceiling(r));
        }
        let units: Vec<f64> = (0..100).map(|_| random_unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(units.windows(2).any(|w| w[0] != w[1]));
    }
}
