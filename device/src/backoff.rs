//! Reconnection delays: exponential backoff with full jitter, so a fleet that lost its gateway at one instant does
//! not come back at one instant.

use std::time::Duration;

/// Exponential backoff with full jitter: the n-th delay since the last success is uniform in
/// `[0, min(max, initial × 2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    ceiling: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// `initial` is the first ceiling; each failure doubles it up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max, ceiling: initial.min(max), rng: fastrand::Rng::new() }
    }

    /// The same, with a seeded random source (for tests).
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff { rng: fastrand::Rng::with_seed(seed), ..Backoff::new(initial, max) }
    }

    /// The delay before the next attempt; the ceiling then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = u64::try_from(self.ceiling.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(self.rng.u64(0..=ceiling));
        self.ceiling = (self.ceiling * 2).min(self.max);
        delay
    }

    /// A connection succeeded: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.ceiling = self.initial.min(self.max);
    }
}

impl Default for Backoff {
    /// 1 s doubling to 60 s.
    fn default() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_ceiling_and_reset() {
        let mut backoff = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(2), 7);
        let mut ceiling = Duration::from_millis(100);
        let mut delays = Vec::new();
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "{delay:?} over {ceiling:?}");
            delays.push(delay);
            ceiling = (ceiling * 2).min(Duration::from_secs(2));
        }
        // jittered: not all the same
        assert!(delays.windows(2).any(|w| w[0] != w[1]), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
