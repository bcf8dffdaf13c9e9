//! Token buckets: the one rate limiter of the transport, behind the inbound rate of a
//! connection ([`InboundBudget`]) and the accept rate of a listener
//! ([`crate::admission::AcceptPace`]). Time is passed in (tokio's clock).

use std::time::Duration;

use tokio::time::Instant;

/// Tokens refilled at `per_second`, holding at most `burst` seconds' worth (at least
/// one token). Spending may go into debt; the debt is how long to wait.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    per_second: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket. `per_second` must be positive and finite (callers check).
    pub(crate) fn new(per_second: f64, burst: Duration, now: Instant) -> Self {
        let capacity = (per_second * burst.as_secs_f64()).max(1.0);
        TokenBucket {
            per_second,
            capacity,
            tokens: capacity,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = self.refilled.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
    }

    /// Spends `amount` at `now`; returns how long until the balance is back to zero
    /// (`None`: it is not negative).
    pub(crate) fn spend(&mut self, amount: f64, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.tokens -= amount;
        self.debt()
    }

    /// When `amount` could be spent without debt (`now` or later).
    pub(crate) fn available_at(&mut self, amount: f64, now: Instant) -> Instant {
        self.refill(now);
        let missing = amount - self.tokens;
        if missing <= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64((missing / self.per_second).min(3_600.0))
        }
    }

    fn debt(&self) -> Option<Duration> {
        (self.tokens < 0.0)
            .then(|| Duration::from_secs_f64((-self.tokens / self.per_second).min(60.0)))
    }
}

/// A connection's inbound rate: a bucket of messages and one of bytes, each holding
/// one second's worth.
#[derive(Debug)]
pub(crate) struct InboundBudget {
    messages: TokenBucket,
    bytes: TokenBucket,
}

impl InboundBudget {
    pub(crate) fn new(rate: crate::config::InboundRate, now: Instant) -> Self {
        let second = Duration::from_secs(1);
        InboundBudget {
            messages: TokenBucket::new(rate.messages_per_second, second, now),
            bytes: TokenBucket::new(rate.bytes_per_second, second, now),
        }
    }

    /// Spends one message of `bytes`; returns how long to wait before reading more
    /// (at most a minute).
    pub(crate) fn spend(&mut self, bytes: usize, now: Instant) -> Option<Duration> {
        let messages = self.messages.spend(1.0, now);
        let bytes = self.bytes.spend(bytes as f64, now);
        messages.max(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_paces() {
        let t = Instant::now();
        let mut bucket = TokenBucket::new(10.0, Duration::from_secs(1), t);
        for _ in 0..10 {
            assert_eq!(bucket.spend(1.0, t), None);
        }
        assert_eq!(bucket.available_at(1.0, t), t + Duration::from_millis(100));
        assert_eq!(bucket.spend(1.0, t), Some(Duration::from_millis(100)));
        // Refilled with time, never beyond its capacity.
        let later = t + Duration::from_secs(60);
        assert_eq!(bucket.available_at(10.0, later), later);
        assert_eq!(
            bucket.available_at(11.0, later),
            later + Duration::from_millis(100)
        );
    }

    #[test]
    fn a_slow_bucket_still_holds_one_token() {
        let t = Instant::now();
        let mut bucket = TokenBucket::new(0.5, Duration::from_secs(1), t);
        assert_eq!(bucket.spend(1.0, t), None);
        assert_eq!(bucket.available_at(1.0, t), t + Duration::from_secs(2));
    }

    #[test]
    fn the_inbound_budget_waits_for_the_scarcer_unit() {
        let t = Instant::now();
        let rate = crate::config::InboundRate {
            messages_per_second: 100.0,
            bytes_per_second: 1_000.0,
        };
        let mut budget = InboundBudget::new(rate, t);
        assert_eq!(budget.spend(1_000, t), None);
        assert_eq!(budget.spend(500, t), Some(Duration::from_millis(500)));
    }
}
