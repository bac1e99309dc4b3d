//! Exponential backoff with jitter, computed from pgmq's read_ct.

use std::time::Duration;

use crate::config::RetryPolicy;

// The numbers live in config (below every layer); the arithmetic lives here.
impl RetryPolicy {
    /// The delay before attempt `attempt + 1`: `base * 2^(attempt-1)`, capped,
    /// with "equal jitter" (half fixed, half random) so jobs that failed
    /// together do not come back together.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
        let full = self
            .base
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.cap);
        let half = full / 2;
        half + half.mul_f64(crate::domain::random_unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: 5,
        };
        for attempt in 1..=10 {
            let full = Duration::from_millis(100 * 2u64.pow(attempt as u32 - 1))
                .min(Duration::from_secs(2));
            for _ in 0..50 {
                let d = p.backoff(attempt);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let p = RetryPolicy::default();
        let delays: std::collections::HashSet<Duration> = (0..20).map(|_| p.backoff(3)).collect();
        assert!(delays.len() > 10, "jitter should vary: {delays:?}");
    }
}
