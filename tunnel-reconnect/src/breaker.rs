//! A circuit breaker per endpoint, as a pure state machine.
//!
//! Closed: attempts go through; `failure_threshold` consecutive failures open it.
//! Open: attempts are refused until `cooldown` has passed. Half-open: exactly one probe
//! goes through; its success closes the breaker, its failure opens it again. Time is
//! passed in (`now`), so tests need no clock.

use std::time::{Duration, Instant};

/// Settings of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// How long an open breaker refuses attempts before allowing one probe. Default 10 s.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Sets [`BreakerConfig::failure_threshold`].
    pub fn failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures;
        self
    }

    /// Sets [`BreakerConfig::cooldown`].
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }
}

/// A [`BreakerConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBreaker {
    /// A threshold of zero would never let an attempt through.
    #[error("circuit breaker failure_threshold must be at least 1")]
    ZeroThreshold,
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Attempts go through; `failures` consecutive ones have failed so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Attempts are refused until `until`.
    Open {
        /// When one probe will be allowed.
        until: Instant,
    },
    /// One probe is allowed (or under way); its outcome decides.
    HalfOpen {
        /// Whether the probe has been handed out.
        probing: bool,
    },
}

/// An attempt was refused because the breaker is open (or its probe is under way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open until {retry_at:?}")]
pub struct Refused {
    /// The earliest time an attempt may be allowed (for a busy half-open breaker: now).
    pub retry_at: Instant,
}

/// A circuit breaker for one endpoint.
///
/// ```
/// use std::time::{Duration, Instant};
/// use tunnel_reconnect::{BreakerConfig, BreakerState, CircuitBreaker};
///
/// let mut breaker = CircuitBreaker::new(
///     BreakerConfig::default().failure_threshold(2).cooldown(Duration::from_secs(5)),
/// )?;
/// let t0 = Instant::now();
/// breaker.try_acquire(t0)?;
/// breaker.on_failure(t0);
/// breaker.try_acquire(t0)?;
/// breaker.on_failure(t0);
/// assert!(breaker.try_acquire(t0).is_err()); // open
/// let later = t0 + Duration::from_secs(5);
/// breaker.try_acquire(later)?; // the single half-open probe
/// breaker.on_success();
/// assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Result<Self, InvalidBreaker> {
        if config.failure_threshold == 0 {
            return Err(InvalidBreaker::ZeroThreshold);
        }
        Ok(CircuitBreaker {
            config,
            state: BreakerState::Closed { failures: 0 },
        })
    }

    /// The state as last updated (an open breaker whose cooldown has passed still reads
    /// `Open` until the next [`CircuitBreaker::try_acquire`]).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Asks to make an attempt at `now`. In the half-open state only the first caller
    /// gets through; it must report the outcome with `on_success` or `on_failure`.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Refused> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now < until => Err(Refused { retry_at: until }),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                Ok(())
            }
            BreakerState::HalfOpen { probing: true } => Err(Refused { retry_at: now }),
        }
    }

    /// The attempt succeeded: the breaker closes and forgets earlier failures.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// The attempt failed at `now`.
    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.config.failure_threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            // The threshold is reached, or the half-open probe failed.
            _ => BreakerState::Open {
                until: now + self.config.cooldown,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            BreakerConfig::default()
                .failure_threshold(threshold)
                .cooldown(Duration::from_secs(10)),
        )
        .expect("valid")
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut b = breaker(3);
        b.on_failure(t);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(), BreakerState::Closed { failures: 2 });
        assert!(b.try_acquire(t).is_ok());
        b.on_failure(t);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t + Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn open_refuses_until_the_cooldown_then_allows_one_probe() {
        let t = Instant::now();
        let mut b = breaker(1);
        b.on_failure(t);
        let refused = b.try_acquire(t + Duration::from_secs(9)).expect_err("open");
        assert_eq!(refused.retry_at, t + Duration::from_secs(10));
        let later = t + Duration::from_secs(10);
        assert!(b.try_acquire(later).is_ok(), "the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: true });
        assert!(b.try_acquire(later).is_err(), "only one probe at a time");
    }

    #[test]
    fn a_failed_probe_reopens_a_successful_one_closes() {
        let t = Instant::now();
        let mut b = breaker(1);
        b.on_failure(t);
        let probe_at = t + Duration::from_secs(10);
        b.try_acquire(probe_at).expect("probe");
        b.on_failure(probe_at);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: probe_at + Duration::from_secs(10)
            }
        );
        let next = probe_at + Duration::from_secs(10);
        b.try_acquire(next).expect("probe");
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert!(b.try_acquire(next).is_ok());
    }

    #[test]
    fn zero_threshold_is_invalid() {
        assert_eq!(
            CircuitBreaker::new(BreakerConfig::default().failure_threshold(0)).unwrap_err(),
            InvalidBreaker::ZeroThreshold
        );
    }
}
