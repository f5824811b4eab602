//! Reconnect delays: doubling from a first delay up to a cap, with "equal jitter" (half of
//! each delay fixed, half random), so that a node never hammers a Redis that is down and
//! the nodes of a tier that lost Redis together do not all come back in the same instant.

use std::time::Duration;

pub struct Backoff {
    first: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            attempt: 0,
        }
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt: within `[d/2, d]` where `d` doubles per attempt
    /// from `first` and never exceeds `cap`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .first
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        d / 2 + d.mul_f64(fastrand::f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(2000));
        for expected in [100, 200, 400, 800, 1600, 2000, 2000, 2000] {
            let d = b.next_delay();
            assert!(
                d >= ms(expected / 2) && d <= ms(expected),
                "{d:?} not within [{}ms, {expected}ms]",
                expected / 2
            );
        }
        // Far past the doubling range it stays capped.
        for _ in 0..100 {
            assert!(b.next_delay() <= ms(2000));
        }
        assert_eq!(b.attempts(), 108);
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }
}
