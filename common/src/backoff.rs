//! Reconnect backoff: exponential with jitter, so that a fleet of agents that lost the center at
//! the same instant does not reconnect in lockstep (1 s × 1.6 up to 120 s, ±20 % by default).

use std::time::Duration;

use rand::RngExt;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    factor: f64,
    max: Duration,
    jitter: f64,
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), 1.6, Duration::from_secs(120), 0.2)
    }
}

impl Backoff {
    pub fn new(initial: Duration, factor: f64, max: Duration, jitter: f64) -> Self {
        Self { initial, factor, max, jitter, current: initial }
    }

    /// The next delay to wait, with jitter applied; grows the base delay for the time after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = self.max.min(base.mul_f64(self.factor));
        let spread = rand::rng().random_range(-self.jitter..=self.jitter);
        base.mul_f64(1.0 + spread)
    }

    /// Back to the initial delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_within_jitter() {
        let mut b = Backoff::default();
        let mut base = 1.0_f64;
        for _ in 0..30 {
            let d = b.next_delay().as_secs_f64();
            assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9, "{d} vs base {base}");
            base = (base * 1.6).min(120.0);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::default().next_delay().as_micros());
        }
        assert!(seen.len() > 10, "jitter should spread the first delay");
    }
}
