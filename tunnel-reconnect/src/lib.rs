//! Reconnect policy for tunnel, as pure state machines.
//!
//! [`ExponentialBackoff`] computes how long to wait before each reconnect attempt:
//! exponential growth from a base to a cap, with *full jitter* (a uniformly random delay
//! between zero and the current ceiling) so that agents cut off together do not come
//! back together. Randomness is injected, so tests are deterministic.
//!
//! [`CircuitBreaker`] guards one endpoint: closed, open after consecutive failures,
//! half-open with a single probe after a cooldown.
//!
//! [`Redial`] puts them together with endpoint rotation, hub hints ([`Redirects`]),
//! drains and give-up rules: the whole reconnect policy of an agent, driven by an
//! async loop that dials and sleeps. Everything takes `now` as an argument.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use rand::SeedableRng;
//! use tunnel_reconnect::{Backoff, BackoffConfig, ExponentialBackoff};
//!
//! let config = BackoffConfig::default()
//!     .base(Duration::from_millis(100))
//!     .cap(Duration::from_secs(10));
//! let mut backoff = ExponentialBackoff::with_rng(config, rand::rngs::SmallRng::seed_from_u64(7))?;
//! let first = backoff.next_delay();
//! assert!(first <= Duration::from_millis(100));
//! let second = backoff.next_delay();
//! assert!(second <= Duration::from_millis(200));
//! # Ok::<(), tunnel_reconnect::InvalidBackoff>(())
//! ```

mod breaker;
mod redial;
mod redirect;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker, InvalidBreaker, Refused};
pub use redial::{
    Action, Disconnect, InvalidRedial, MAX_HINTED, MAX_HINTED_URL, MIN_PAUSE, Redial, RedialConfig,
    RedialEvent, WaitCause,
};
pub use redirect::Redirects;

use std::fmt;
use std::time::Duration;

use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, RngCore, SeedableRng};

/// Decides how long to wait before the next connection attempt.
pub trait Backoff: Send + fmt::Debug {
    /// The delay before the next attempt; each call counts as one more attempt.
    fn next_delay(&mut self) -> Duration;

    /// Starts over, as after a connection that stayed up long enough.
    fn reset(&mut self);
}

/// Settings of [`ExponentialBackoff`].
///
/// ```
/// use std::time::Duration;
/// use tunnel_reconnect::{Backoff, BackoffConfig, ExponentialBackoff};
///
/// let config = BackoffConfig::default().base(Duration::from_millis(100)).cap(Duration::from_secs(30));
/// let mut backoff = ExponentialBackoff::new(config)?;
/// // Full jitter: each delay is anywhere between zero and the current ceiling.
/// assert!(backoff.next_delay() <= Duration::from_millis(100));
/// assert!(backoff.next_delay() <= Duration::from_millis(200));
/// # Ok::<(), tunnel_reconnect::InvalidBackoff>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// Ceiling of the first delay. Default 200 ms.
    pub base: Duration,
    /// Largest ceiling. Default 30 s.
    pub cap: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
        }
    }
}

impl BackoffConfig {
    /// Sets [`BackoffConfig::base`].
    pub fn base(mut self, base: Duration) -> Self {
        self.base = base;
        self
    }

    /// Sets [`BackoffConfig::cap`].
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }
}

/// A [`BackoffConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBackoff {
    /// The base is zero.
    #[error("backoff base must be greater than zero")]
    ZeroBase,
    /// The cap is below the base.
    #[error("backoff cap {cap:?} is below the base {base:?}")]
    CapBelowBase {
        /// The base.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
}

/// Exponential backoff with full jitter: attempt `n` (from 0) waits a uniformly random
/// time in `[0, min(cap, base * 2^n)]`.
pub struct ExponentialBackoff<R = SmallRng> {
    config: BackoffConfig,
    attempt: u32,
    rng: R,
}

impl<R> fmt::Debug for ExponentialBackoff<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExponentialBackoff")
            .field("config", &self.config)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl ExponentialBackoff<SmallRng> {
    /// A backoff seeded from the operating system, so that processes differ.
    pub fn new(config: BackoffConfig) -> Result<Self, InvalidBackoff> {
        let mut os = StdRng::from_os_rng();
        Self::with_rng(config, SmallRng::seed_from_u64(os.next_u64()))
    }
}

impl<R: RngCore + Send> ExponentialBackoff<R> {
    /// A backoff drawing its jitter from `rng` (seed it for reproducible tests).
    pub fn with_rng(config: BackoffConfig, rng: R) -> Result<Self, InvalidBackoff> {
        if config.base.is_zero() {
            return Err(InvalidBackoff::ZeroBase);
        }
        if config.cap < config.base {
            return Err(InvalidBackoff::CapBelowBase {
                base: config.base,
                cap: config.cap,
            });
        }
        Ok(ExponentialBackoff {
            config,
            attempt: 0,
            rng,
        })
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.config
            .base
            .checked_mul(factor)
            .map_or(self.config.cap, |d| d.min(self.config.cap))
    }

    /// Attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl<R: RngCore + Send> Backoff for ExponentialBackoff<R> {
    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(seed: u64) -> ExponentialBackoff {
        let config = BackoffConfig::default()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(5));
        ExponentialBackoff::with_rng(config, SmallRng::seed_from_u64(seed)).expect("valid")
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = backoff(1);
        let ceilings: Vec<u128> = (0..10)
            .map(|_| {
                let c = b.ceiling().as_millis();
                b.next_delay();
                c
            })
            .collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn every_delay_is_within_its_ceiling() {
        let mut b = backoff(2);
        for _ in 0..200 {
            let ceiling = b.ceiling();
            assert!(b.next_delay() <= ceiling);
        }
        // Far past 2^31 attempts the ceiling stays at the cap.
        b.attempt = u32::MAX - 1;
        assert_eq!(b.ceiling(), Duration::from_secs(5));
        assert!(b.next_delay() <= Duration::from_secs(5));
    }

    #[test]
    fn same_seed_same_delays_different_seed_different_delays() {
        let run = |seed| {
            let mut b = backoff(seed);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn jitter_spreads_a_herd() {
        // 1,000 agents on their first attempt after an outage: full jitter spreads them
        // over the whole first ceiling instead of one instant.
        let delays: Vec<Duration> = (0..1000).map(|seed| backoff(seed).next_delay()).collect();
        let buckets = delays.iter().fold([0usize; 10], |mut acc, d| {
            acc[((d.as_micros() * 10 / 100_001) as usize).min(9)] += 1;
            acc
        });
        for (i, count) in buckets.iter().enumerate() {
            assert!(
                (50..=150).contains(count),
                "bucket {i} has {count}: {buckets:?}"
            );
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = backoff(3);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_millis(3200));
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let rng = || SmallRng::seed_from_u64(0);
        assert_eq!(
            ExponentialBackoff::with_rng(BackoffConfig::default().base(Duration::ZERO), rng())
                .unwrap_err(),
            InvalidBackoff::ZeroBase
        );
        assert!(matches!(
            ExponentialBackoff::with_rng(
                BackoffConfig::default()
                    .base(Duration::from_secs(2))
                    .cap(Duration::from_secs(1)),
                rng()
            ),
            Err(InvalidBackoff::CapBelowBase { .. })
        ));
    }
}
