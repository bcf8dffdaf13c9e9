//! When and where to dial next, as a pure state machine.
//!
//! [`Redial`] holds every decision of an agent's reconnect loop: which endpoint to
//! dial (rotation, each endpoint's [`CircuitBreaker`]), how long to wait between
//! attempts ([`Backoff`], never less than a hub asked for), when a connection counts
//! as stable (the backoff starts over), where a closing hub's hint may send the agent
//! ([`Redirects`]), how long a drain may take, and when to give up. The driver dials,
//! reports each outcome (`on_*`), and sleeps until the machine's next deadline; it
//! decides nothing itself. Time is always passed in.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use rand::SeedableRng;
//! use tunnel_reconnect::{
//!     Action, BackoffConfig, Disconnect, ExponentialBackoff, Redial, RedialConfig,
//! };
//!
//! let backoff = ExponentialBackoff::with_rng(BackoffConfig::default(), rand::rngs::SmallRng::seed_from_u64(1))?;
//! let mut redial = Redial::new(RedialConfig::new(["ws://127.0.0.1:7070/"]), Box::new(backoff))?;
//! let now = Instant::now();
//! let Action::Dial(endpoint) = redial.poll(now) else { unreachable!() };
//! assert_eq!(endpoint, "ws://127.0.0.1:7070/");
//! redial.on_connected(now);
//! // The connection drops a minute later: the next attempt waits a jittered backoff.
//! let later = now + Duration::from_secs(60);
//! redial.on_disconnected(later, Disconnect::dropped());
//! assert!(matches!(redial.poll(later), Action::Wait { .. } | Action::Dial(_)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::{Backoff, BreakerConfig, BreakerState, CircuitBreaker, InvalidBreaker, Redirects};

/// Most endpoints of a hub's hint that are looked at.
pub const MAX_HINTED: usize = 16;

/// Longest endpoint URL of a hub's hint that is looked at.
pub const MAX_HINTED_URL: usize = 2048;

/// Shortest pause between skipping an endpoint whose circuit is open and trying the
/// next one.
pub const MIN_PAUSE: Duration = Duration::from_millis(10);

/// Settings of a [`Redial`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedialConfig {
    /// The endpoints, in order of preference. At least one.
    pub endpoints: Vec<String>,
    /// Which endpoints named by a closing hub are followed. Default [`Redirects::Listed`].
    pub redirects: Redirects,
    /// The longest wait a hub can impose (`after_ms` of a hint, a refusal's
    /// `Retry-After`); longer ones are cut to it. Default 60 s.
    pub max_hub_wait: Duration,
    /// A connection that stayed up this long starts the backoff over. Default 30 s.
    pub stable_after: Duration,
    /// Each endpoint's circuit breaker.
    pub breaker: BreakerConfig,
    /// How long a drain may take before the connection is closed. Default 10 s.
    pub drain_wait: Duration,
    /// Give up after this many consecutive failed connects (`None`: never, the
    /// default). A connection that was established resets the count.
    pub give_up_after: Option<u32>,
}

impl RedialConfig {
    /// Defaults, with these endpoints.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        RedialConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            redirects: Redirects::Listed,
            max_hub_wait: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            breaker: BreakerConfig::default(),
            drain_wait: Duration::from_secs(10),
            give_up_after: None,
        }
    }
}

/// A [`RedialConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRedial {
    /// No endpoint to dial.
    #[error("no endpoints given")]
    NoEndpoints,
    /// The circuit breaker settings.
    #[error(transparent)]
    Breaker(#[from] InvalidBreaker),
    /// A `give_up_after` of zero would never dial.
    #[error("give_up_after must be at least 1")]
    ZeroGiveUp,
}

/// What the driver should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'a> {
    /// Dial this endpoint, then report [`Redial::on_connected`] or
    /// [`Redial::on_connect_failed`].
    Dial(&'a str),
    /// Sleep until `until` (or until something changes), then poll again.
    Wait {
        /// When to poll again.
        until: Instant,
        /// Why.
        cause: WaitCause,
    },
    /// Connected: nothing to do until [`Redial::on_disconnected`].
    Connected,
    /// Stop: too many consecutive failed connects (see [`RedialConfig::give_up_after`]).
    GiveUp,
}

/// Why the driver waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitCause {
    /// Backoff between attempts (or a wait a hub asked for).
    Backoff,
    /// The endpoint's circuit breaker is open.
    CircuitOpen {
        /// The endpoint.
        endpoint: String,
        /// When it allows one probe.
        until: Instant,
    },
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Whether it ended in an orderly close (otherwise it failed).
    pub closed: bool,
    /// The hub's hint from its `close` message: wait at least this long.
    pub after: Option<Duration>,
    /// The hub's hint: endpoints to dial instead (checked against
    /// [`RedialConfig::redirects`]).
    pub endpoints: Vec<String>,
    /// Whether a hint arrived at all (a hint without endpoints after a drain moves the
    /// agent to its next endpoint).
    pub hinted: bool,
}

impl Disconnect {
    /// The connection failed without a word from the hub.
    pub fn dropped() -> Self {
        Disconnect::default()
    }

    /// The connection closed in an orderly way.
    pub fn closed() -> Self {
        Disconnect {
            closed: true,
            ..Disconnect::default()
        }
    }

    /// Adds the hub's hint (`after_ms`, `endpoints`).
    pub fn with_hint(mut self, after: Option<Duration>, endpoints: Vec<String>) -> Self {
        self.hinted = true;
        self.after = after;
        self.endpoints = endpoints;
        self
    }
}

/// Something the driver reports (metrics, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedialEvent {
    /// An endpoint's breaker was consulted or changed.
    Circuit {
        /// The endpoint.
        endpoint: String,
        /// Its state now.
        state: BreakerState,
    },
    /// A redial is scheduled, for this reason (`connect_failed`, `closed`, `dropped`,
    /// `drained`).
    Redialing {
        /// The reason, a fixed label.
        reason: &'static str,
    },
    /// A hub's hint changed the endpoints dialed.
    Redirected {
        /// The endpoints now dialed, in order.
        endpoints: Vec<String>,
    },
    /// A hub's hint named endpoints the configuration does not allow.
    RedirectRefused {
        /// The refused endpoints (at most [`MAX_HINTED`]).
        refused: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting until the instant, then dial.
    Waiting {
        until: Instant,
        cause: WaitCause,
    },
    /// Dialing `current`; with `current` empty, about to choose an endpoint.
    Dialing,
    Connected {
        since: Instant,
        drained: bool,
    },
    GaveUp,
}

/// The reconnect loop's decisions for one agent connection.
#[derive(Debug)]
pub struct Redial {
    config: RedialConfig,
    /// The endpoints dialed now: the configured ones, or a hint's.
    endpoints: Vec<String>,
    breakers: HashMap<String, CircuitBreaker>,
    new_breaker: CircuitBreaker,
    backoff: Box<dyn Backoff>,
    next: usize,
    phase: Phase,
    /// The endpoint of the attempt or connection under way.
    current: String,
    /// Consecutive failed connects.
    failures: u32,
    connected_before: bool,
    events: VecDeque<RedialEvent>,
}

impl Redial {
    /// A machine ready to dial the first endpoint at once.
    pub fn new(config: RedialConfig, backoff: Box<dyn Backoff>) -> Result<Self, InvalidRedial> {
        if config.endpoints.is_empty() {
            return Err(InvalidRedial::NoEndpoints);
        }
        if config.give_up_after == Some(0) {
            return Err(InvalidRedial::ZeroGiveUp);
        }
        let new_breaker = CircuitBreaker::new(config.breaker)?;
        Ok(Redial {
            endpoints: config.endpoints.clone(),
            config,
            breakers: HashMap::new(),
            new_breaker,
            backoff,
            next: 0,
            phase: Phase::Dialing,
            current: String::new(),
            failures: 0,
            connected_before: false,
            events: VecDeque::new(),
        })
    }

    /// What to do at `now`. Dialing hands out the endpoint once; poll again after
    /// reporting the attempt's outcome.
    pub fn poll(&mut self, now: Instant) -> Action<'_> {
        match &self.phase {
            Phase::GaveUp => return Action::GiveUp,
            Phase::Connected { .. } => return Action::Connected,
            Phase::Waiting { until, cause } if now < *until => {
                return Action::Wait {
                    until: *until,
                    cause: cause.clone(),
                };
            }
            Phase::Dialing if !self.current.is_empty() => {
                return Action::Dial(&self.current);
            }
            Phase::Waiting { .. } | Phase::Dialing => {}
        }
        let endpoint = self.endpoints[self.next % self.endpoints.len()].clone();
        let breaker = self
            .breakers
            .entry(endpoint.clone())
            .or_insert_with(|| self.new_breaker.clone());
        let acquired = breaker.try_acquire(now);
        let state = breaker.state();
        self.events.push_back(RedialEvent::Circuit {
            endpoint: endpoint.clone(),
            state,
        });
        if let Err(refused) = acquired {
            self.next += 1;
            // With other endpoints, try the next one soon; with one, wait for the probe.
            let until = if self.endpoints.len() == 1 {
                refused.retry_at
            } else {
                now + MIN_PAUSE
            };
            let cause = WaitCause::CircuitOpen {
                endpoint,
                until: refused.retry_at,
            };
            self.phase = Phase::Waiting {
                until,
                cause: cause.clone(),
            };
            return Action::Wait { until, cause };
        }
        self.phase = Phase::Dialing;
        self.current = endpoint;
        Action::Dial(&self.current)
    }

    /// When the machine next wants to be polled (`None` while dialing or connected).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// The next thing to report, if any.
    pub fn poll_event(&mut self) -> Option<RedialEvent> {
        self.events.pop_front()
    }

    /// The attempt connected at `now`. Returns whether this is a reconnect (the
    /// agent was connected before).
    pub fn on_connected(&mut self, now: Instant) -> bool {
        if let Some(breaker) = self.breakers.get_mut(&self.current) {
            breaker.on_success();
            self.events.push_back(RedialEvent::Circuit {
                endpoint: self.current.clone(),
                state: breaker.state(),
            });
        }
        self.failures = 0;
        self.phase = Phase::Connected {
            since: now,
            drained: false,
        };
        std::mem::replace(&mut self.connected_before, true)
    }

    /// The attempt failed at `now`; `retry_after` is how long the hub asked the agent
    /// to stay away (a `503`'s `Retry-After`), honoured when there is no other
    /// endpoint to try.
    pub fn on_connect_failed(&mut self, now: Instant, retry_after: Option<Duration>) {
        if let Some(breaker) = self.breakers.get_mut(&self.current) {
            breaker.on_failure(now);
            self.events.push_back(RedialEvent::Circuit {
                endpoint: self.current.clone(),
                state: breaker.state(),
            });
        }
        self.failures = self.failures.saturating_add(1);
        let not_before = retry_after
            .filter(|_| self.endpoints.len() == 1)
            .and_then(|wait| now.checked_add(wait.min(self.config.max_hub_wait)));
        self.next += 1;
        if self
            .config
            .give_up_after
            .is_some_and(|limit| self.failures >= limit)
        {
            self.phase = Phase::GaveUp;
            return;
        }
        self.schedule(now, "connect_failed", not_before);
    }

    /// The hub announced a drain at `now`: the connection should finish what it
    /// carries and be closed by the deadline returned.
    pub fn on_drain(&mut self, now: Instant) -> Instant {
        if let Phase::Connected { drained, .. } = &mut self.phase {
            *drained = true;
        }
        now + self.config.drain_wait
    }

    /// The connection ended at `now`, as `how` says.
    pub fn on_disconnected(&mut self, now: Instant, how: Disconnect) {
        let (since, drained) = match self.phase {
            Phase::Connected { since, drained } => (since, drained),
            _ => (now, false),
        };
        if now.saturating_duration_since(since) >= self.config.stable_after {
            self.backoff.reset();
        }
        let reason = match (drained, how.closed) {
            (true, _) => "drained",
            (false, true) => "closed",
            (false, false) => "dropped",
        };
        let not_before = how
            .after
            .and_then(|after| now.checked_add(after.min(self.config.max_hub_wait)));
        if how.hinted {
            self.follow_hint(&how.endpoints, drained);
        }
        self.schedule(now, reason, not_before);
    }

    /// Full jitter on every attempt, never sooner than `not_before`.
    fn schedule(&mut self, now: Instant, reason: &'static str, not_before: Option<Instant>) {
        let mut until = now + self.backoff.next_delay();
        if let Some(not_before) = not_before {
            until = until.max(not_before);
        }
        self.events.push_back(RedialEvent::Redialing { reason });
        self.current.clear();
        self.phase = Phase::Waiting {
            until,
            cause: WaitCause::Backoff,
        };
    }

    fn follow_hint(&mut self, endpoints: &[String], drained: bool) {
        // A hint names a few hubs: the rest of a long list, and URLs longer than a
        // hub's URL can be, are not looked at.
        let hinted: Vec<String> = endpoints
            .iter()
            .take(MAX_HINTED)
            .filter(|url| url.len() <= MAX_HINTED_URL)
            .cloned()
            .collect();
        let (dial, refused) =
            self.config
                .redirects
                .follow(&self.config.endpoints, &self.current, &hinted);
        let followed = refused.len() < hinted.len();
        if !refused.is_empty() {
            self.events
                .push_back(RedialEvent::RedirectRefused { refused });
        }
        if followed {
            self.events.push_back(RedialEvent::Redirected {
                endpoints: dial.clone(),
            });
            self.set_dialed(dial);
        } else if drained {
            // The drained hub is going away: try the next endpoint first.
            self.next += 1;
        }
    }

    /// Replaces the configured endpoints (from discovery); the current connection is
    /// not affected. An empty list is refused (and returned `false`).
    pub fn set_endpoints(&mut self, endpoints: Vec<String>) -> bool {
        if endpoints.is_empty() {
            return false;
        }
        self.config.endpoints = endpoints.clone();
        self.set_dialed(endpoints);
        true
    }

    fn set_dialed(&mut self, endpoints: Vec<String>) {
        self.breakers.retain(|e, _| endpoints.contains(e));
        self.endpoints = endpoints;
        self.next = 0;
    }

    /// The endpoints dialed now, in order.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint of the attempt or connection under way (empty between attempts).
    pub fn current(&self) -> &str {
        &self.current
    }

    /// How many endpoints have a breaker (at most the endpoints dialed).
    pub fn breakers(&self) -> usize {
        self.breakers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backoff whose delays are given, so tests read the schedule directly.
    #[derive(Debug)]
    struct Fixed {
        delay: Duration,
        resets: std::sync::Arc<std::sync::atomic::AtomicU32>,
        attempts: u32,
    }

    impl Backoff for Fixed {
        fn next_delay(&mut self) -> Duration {
            self.attempts += 1;
            self.delay * self.attempts
        }
        fn reset(&mut self) {
            self.attempts = 0;
            self.resets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn machine(config: RedialConfig) -> (Redial, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        let resets = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let backoff = Fixed {
            delay: 100 * MS,
            resets: resets.clone(),
            attempts: 0,
        };
        (
            Redial::new(config, Box::new(backoff)).expect("valid"),
            resets,
        )
    }

    fn dial(redial: &mut Redial, now: Instant) -> String {
        match redial.poll(now) {
            Action::Dial(e) => e.to_owned(),
            other => panic!("expected a dial, got {other:?}"),
        }
    }

    fn wait(redial: &mut Redial, now: Instant) -> (Instant, WaitCause) {
        match redial.poll(now) {
            Action::Wait { until, cause } => (until, cause),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_first_attempt_is_at_once_and_failures_rotate_endpoints() {
        let (mut r, _) = machine(RedialConfig::new(["ws://a/", "ws://b/"]));
        let t = Instant::now();
        assert_eq!(dial(&mut r, t), "ws://a/");
        // Polling again while dialing hands out the same attempt.
        assert_eq!(dial(&mut r, t), "ws://a/");
        r.on_connect_failed(t, None);
        let (until, cause) = wait(&mut r, t);
        assert_eq!((until, cause), (t + 100 * MS, WaitCause::Backoff));
        assert_eq!(dial(&mut r, until), "ws://b/");
        r.on_connect_failed(until, None);
        let (until, _) = wait(&mut r, until);
        assert_eq!(dial(&mut r, until), "ws://a/", "round robin");
        let events: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
        assert!(events.contains(&RedialEvent::Redialing {
            reason: "connect_failed"
        }));
    }

    #[test]
    fn an_open_circuit_is_skipped_or_waited_for() {
        let config = RedialConfig {
            breaker: BreakerConfig::default()
                .failure_threshold(1)
                .cooldown(Duration::from_secs(10)),
            ..RedialConfig::new(["ws://a/", "ws://b/"])
        };
        let (mut r, _) = machine(config);
        let t = Instant::now();
        dial(&mut r, t);
        r.on_connect_failed(t, None); // a opens
        let (until, _) = wait(&mut r, t);
        dial(&mut r, until); // b
        r.on_connect_failed(until, None); // b opens
        let (until, _) = wait(&mut r, until);
        // a is open: skipped after a short pause, then b is open too.
        let (next, cause) = wait(&mut r, until);
        assert_eq!(next, until + MIN_PAUSE);
        assert!(
            matches!(cause, WaitCause::CircuitOpen { ref endpoint, .. } if endpoint == "ws://a/")
        );
        // With a single endpoint, the wait lasts until the probe.
        let config = RedialConfig {
            breaker: BreakerConfig::default()
                .failure_threshold(1)
                .cooldown(Duration::from_secs(10)),
            ..RedialConfig::new(["ws://a/"])
        };
        let (mut r, _) = machine(config);
        dial(&mut r, t);
        r.on_connect_failed(t, None);
        let (until, _) = wait(&mut r, t);
        let (probe_at, _) = wait(&mut r, until);
        assert_eq!(probe_at, t + Duration::from_secs(10));
        assert_eq!(dial(&mut r, probe_at), "ws://a/", "the half-open probe");
    }

    #[test]
    fn a_hub_that_asks_for_a_wait_gets_it_within_the_bound() {
        let config = RedialConfig {
            max_hub_wait: Duration::from_secs(5),
            ..RedialConfig::new(["ws://a/"])
        };
        let (mut r, _) = machine(config);
        let t = Instant::now();
        dial(&mut r, t);
        r.on_connect_failed(t, Some(Duration::from_secs(2)));
        assert_eq!(wait(&mut r, t).0, t + Duration::from_secs(2));
        dial(&mut r, t + Duration::from_secs(2));
        r.on_connect_failed(t, Some(Duration::from_secs(3600)));
        assert_eq!(
            wait(&mut r, t).0,
            t + Duration::from_secs(5),
            "cut to the bound"
        );
        // Connected, then closed with a hint: after_ms is a floor too.
        dial(&mut r, t + Duration::from_secs(5));
        r.on_connected(t);
        r.on_disconnected(
            t,
            Disconnect::closed().with_hint(Some(Duration::from_secs(4)), vec![]),
        );
        assert_eq!(wait(&mut r, t).0, t + Duration::from_secs(4));
        // With several endpoints a refusal's Retry-After is not waited for: the next is tried.
        let (mut r, _) = machine(RedialConfig::new(["ws://a/", "ws://b/"]));
        dial(&mut r, t);
        r.on_connect_failed(t, Some(Duration::from_secs(30)));
        assert_eq!(wait(&mut r, t).0, t + 100 * MS);
    }

    #[test]
    fn a_stable_connection_starts_the_backoff_over() {
        let (mut r, resets) = machine(RedialConfig::new(["ws://a/"]));
        let t = Instant::now();
        dial(&mut r, t);
        assert!(
            !r.on_connected(t),
            "the first connection is not a reconnect"
        );
        r.on_disconnected(t + Duration::from_secs(1), Disconnect::dropped());
        assert_eq!(resets.load(std::sync::atomic::Ordering::Relaxed), 0);
        let (until, _) = wait(&mut r, t + Duration::from_secs(1));
        dial(&mut r, until);
        assert!(r.on_connected(until), "a reconnect");
        r.on_disconnected(until + Duration::from_secs(30), Disconnect::dropped());
        assert_eq!(resets.load(std::sync::atomic::Ordering::Relaxed), 1);
        let (next, _) = wait(&mut r, until + Duration::from_secs(30));
        assert_eq!(
            next,
            until + Duration::from_secs(30) + 100 * MS,
            "first step again"
        );
    }

    #[test]
    fn hints_move_the_agent_only_where_allowed() {
        let (mut r, _) = machine(RedialConfig::new(["ws://a/", "ws://b/"]));
        let t = Instant::now();
        dial(&mut r, t);
        r.on_connected(t);
        r.on_disconnected(
            t,
            Disconnect::closed().with_hint(None, urls(&["ws://b/", "ws://evil/"])),
        );
        assert_eq!(r.endpoints(), urls(&["ws://b/", "ws://a/"]));
        let events: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
        assert!(events.contains(&RedialEvent::RedirectRefused {
            refused: urls(&["ws://evil/"])
        }));
        let (until, _) = wait(&mut r, t);
        assert_eq!(dial(&mut r, until), "ws://b/");
        // Only the first MAX_HINTED entries, and none too long, are looked at.
        r.on_connected(until);
        let mut long = vec!["ws://evil/".to_owned(); MAX_HINTED];
        long.push("ws://a/".into());
        r.on_disconnected(until, Disconnect::closed().with_hint(None, long));
        assert_eq!(r.endpoints(), urls(&["ws://b/", "ws://a/"]), "unchanged");
        // A drain without a usable hint moves to the next endpoint.
        let (until, _) = wait(&mut r, until);
        assert_eq!(dial(&mut r, until), "ws://b/");
        r.on_connected(until);
        let deadline = r.on_drain(until);
        assert_eq!(deadline, until + Duration::from_secs(10));
        r.on_disconnected(until, Disconnect::closed().with_hint(None, vec![]));
        let events: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
        assert!(events.contains(&RedialEvent::Redialing { reason: "drained" }));
        let (until, _) = wait(&mut r, until);
        assert_eq!(dial(&mut r, until), "ws://a/");
    }

    #[test]
    fn discovery_replaces_the_endpoints_and_prunes_breakers() {
        let (mut r, _) = machine(RedialConfig::new(["ws://a/", "ws://b/"]));
        let t = Instant::now();
        dial(&mut r, t);
        r.on_connect_failed(t, None);
        assert_eq!(r.breakers(), 1);
        assert!(!r.set_endpoints(vec![]), "an empty list is refused");
        assert!(r.set_endpoints(urls(&["ws://c/"])));
        assert_eq!(r.breakers(), 0);
        let (until, _) = wait(&mut r, t);
        assert_eq!(dial(&mut r, until), "ws://c/");
    }

    #[test]
    fn it_gives_up_after_the_configured_failures_only() {
        let config = RedialConfig {
            give_up_after: Some(2),
            ..RedialConfig::new(["ws://a/"])
        };
        let (mut r, _) = machine(config);
        let t = Instant::now();
        dial(&mut r, t);
        r.on_connect_failed(t, None);
        let (until, _) = wait(&mut r, t);
        dial(&mut r, until);
        r.on_connected(until); // resets the count
        r.on_disconnected(until, Disconnect::dropped());
        let (until, _) = wait(&mut r, until);
        dial(&mut r, until);
        r.on_connect_failed(until, None);
        let (until, _) = wait(&mut r, until);
        dial(&mut r, until);
        r.on_connect_failed(until, None);
        assert_eq!(r.poll(until), Action::GiveUp);
        assert!(matches!(
            Redial::new(
                RedialConfig {
                    give_up_after: Some(0),
                    ..RedialConfig::new(["ws://a/"])
                },
                Box::new(crate::ExponentialBackoff::new(Default::default()).expect("valid"))
            ),
            Err(InvalidRedial::ZeroGiveUp)
        ));
        assert!(matches!(
            Redial::new(
                RedialConfig::new(Vec::<String>::new()),
                Box::new(crate::ExponentialBackoff::new(Default::default()).expect("valid"))
            ),
            Err(InvalidRedial::NoEndpoints)
        ));
    }
}
