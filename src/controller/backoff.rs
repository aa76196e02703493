//! Bounded, jittered exponential backoff per object, and jittered resyncs.

use rand::Rng;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Consecutive failures per object key; reset on success.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            failures: Mutex::default(),
        }
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("backoff lock");
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        jitter(exponential(self.base, self.max, *n))
    }

    pub fn reset(&self, key: &str) {
        self.failures.lock().expect("backoff lock").remove(key);
    }
}

/// `base * 2^(attempt-1)`, capped at `max`.
pub fn exponential(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
    base.saturating_mul(factor).min(max)
}

/// Spreads a delay by ±20% so that many objects do not retry in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.8..1.2);
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(exponential(b, m, 1), Duration::from_secs(1));
        assert_eq!(exponential(b, m, 4), Duration::from_secs(8));
        assert_eq!(exponential(b, m, 50), m);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }

    #[test]
    fn counts_per_key_and_resets() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(100));
        b.next_delay("a");
        b.next_delay("a");
        let third = b.next_delay("a");
        assert!(third >= Duration::from_millis(3200), "{third:?}");
        assert!(b.next_delay("b") <= Duration::from_millis(1200));
        b.reset("a");
        assert!(b.next_delay("a") <= Duration::from_millis(1200));
    }
}
