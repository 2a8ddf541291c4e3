//! Restart delays: exponential with jitter, reset once a child has stayed up long enough.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// A run at least this long counts as healthy: the next failure starts over at `initial`.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            reset_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    failures: u32,
    rng: SystemRandom,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            failures: 0,
            rng: SystemRandom::new(),
        }
    }

    /// Failures since the last healthy run.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a run that ended after `uptime` and returns how long to wait before the next.
    pub fn on_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.policy.reset_after {
            self.failures = 0;
        }
        let base = self.base_delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        self.jitter(base)
    }

    fn base_delay(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(20)).unwrap_or(u32::MAX);
        self.policy
            .initial
            .checked_mul(factor)
            .unwrap_or(self.policy.max)
            .min(self.policy.max)
    }

    /// Spreads the delay over [0.75, 1.25) of itself (never past `max`), so that children that
    /// failed together do not all come back in the same instant.
    fn jitter(&self, d: Duration) -> Duration {
        let mut b = [0u8; 2];
        let r = if self.rng.fill(&mut b).is_ok() {
            u16::from_le_bytes(b) as f64 / 65536.0
        } else {
            0.5
        };
        d.mul_f64(0.75 + r * 0.5).min(self.policy.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets_after_a_healthy_run() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let short = Duration::from_secs(1);
        let delays: Vec<Duration> = (0..9).map(|_| b.on_exit(short)).collect();
        let expect = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for (d, e) in delays.iter().zip(expect) {
            let e = Duration::from_secs(e);
            assert!(
                *d >= e.mul_f64(0.75) && *d <= e.mul_f64(1.25).min(Duration::from_secs(60)),
                "{d:?} not within jitter of {e:?}"
            );
        }
        assert_eq!(b.failures(), 9);
        let d = b.on_exit(Duration::from_secs(301));
        assert!(d <= Duration::from_millis(1250), "{d:?}");
        assert_eq!(b.failures(), 1);
    }
}
