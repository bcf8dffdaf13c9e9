//! An agent's settings.

use super::*;

/// Settings of an [`Agent`].
///
/// ```
/// use std::time::Duration;
/// use tunnel_proto::MessageType;
/// use tunnel_reconnect::BackoffConfig;
/// use tunnel_router::{AgentConfig, FullPolicy, WhenFull};
///
/// // Two hubs in order of preference, a gentler backoff, and events that fail at once
/// // (instead of waiting) when the replay buffer is full.
/// let config = AgentConfig::with_endpoints(["wss://hub-a:7070/", "wss://hub-b:7070/"])
///     .backoff(BackoffConfig::default().base(Duration::from_millis(500)).cap(Duration::from_secs(60)))
///     .when_full(FullPolicy::default().set(MessageType::Event, WhenFull::Reject))
///     .request_timeout(Duration::from_secs(10));
/// assert_eq!(config.endpoints.len(), 2);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The hubs' URLs, in order of preference. The agent holds one connection and
    /// moves to the next endpoint when a connect fails or a hub drains (failover);
    /// an endpoint whose circuit breaker is open is skipped.
    pub endpoints: Vec<String>,
    /// Replacements of `endpoints` from discovery: each value sent replaces the list
    /// (the current connection stays until it ends). Default: none.
    pub endpoint_updates: Option<watch::Receiver<Vec<String>>>,
    /// Which endpoints named by a closing hub (`reconnect.endpoints`) the agent dials
    /// (before its own, which stay as the fallback). Default [`Redirects::Listed`]:
    /// only its own endpoints; a [`Pool`](crate::Pool) in spread mode pins each
    /// connection to its hub ([`Redirects::Never`]).
    pub redirects: Redirects,
    /// The longest wait a hub can impose (a `close` message's `reconnect.after_ms`, a
    /// `503`'s `Retry-After`): longer ones are cut to it. Default 60 s.
    pub max_hub_wait: Duration,
    /// How long, after a hub announces a drain, the agent lets what the connection
    /// carries finish (acknowledgements of sent messages, replies to sent requests)
    /// before moving. Default 10 s.
    pub drain_wait: Duration,
    /// Backoff between attempts (full jitter on every attempt, including the first
    /// after a drop).
    pub backoff: BackoffConfig,
    /// A connection that stayed up this long resets the backoff. Default 30 s.
    pub stable_after: Duration,
    /// The circuit breaker of each endpoint. Default: open after 5 consecutive failed
    /// connects, one probe after 10 s.
    pub breaker: BreakerConfig,
    /// Stop after this many consecutive failed connects: the agent then ends as after
    /// [`Agent::shutdown`] ([`ConnectionState::Closed`]). Default `None`: never.
    pub give_up_after: Option<u32>,
    /// Sequence numbers, acknowledgements and resume, used when the hub offers
    /// `resume`. `None` turns them off. Default: on, with [`SessionConfig::default`].
    pub session: Option<SessionConfig>,
    /// What `send` does while the replay buffer is full, per message type (see
    /// [`FullPolicy::default`]).
    pub when_full: FullPolicy,
    /// Where circuit breaker states and session resets are recorded. Default: nowhere.
    /// (Connection metrics go to the connector's own recorder.)
    pub recorder: Arc<dyn Recorder>,
    /// How long a request waits for its reply unless it says otherwise. Default 30 s.
    pub request_timeout: Duration,
    /// Requests that may wait for replies at once; more fail at once with
    /// [`Error::TooManyInFlight`]. Default 10,000.
    pub max_pending_requests: usize,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("endpoints", &self.endpoints)
            .field("redirects", &self.redirects)
            .field("max_hub_wait", &self.max_hub_wait)
            .field("drain_wait", &self.drain_wait)
            .field("backoff", &self.backoff)
            .field("stable_after", &self.stable_after)
            .field("breaker", &self.breaker)
            .field("session", &self.session)
            .field("when_full", &self.when_full)
            .field("request_timeout", &self.request_timeout)
            .field("max_pending_requests", &self.max_pending_requests)
            .finish()
    }
}

impl AgentConfig {
    /// Settings for connecting to `endpoint`, with defaults otherwise.
    pub fn new(endpoint: impl Into<String>) -> Self {
        AgentConfig::with_endpoints([endpoint.into()])
    }

    /// Settings for connecting to any of `endpoints` (failover, in order).
    pub fn with_endpoints(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        AgentConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            endpoint_updates: None,
            redirects: Redirects::Listed,
            max_hub_wait: Duration::from_secs(60),
            drain_wait: Duration::from_secs(10),
            backoff: BackoffConfig::default(),
            stable_after: Duration::from_secs(30),
            breaker: BreakerConfig::default(),
            give_up_after: None,
            session: Some(SessionConfig::default()),
            when_full: FullPolicy::default(),
            recorder: Arc::new(NoopRecorder),
            request_timeout: Duration::from_secs(30),
            max_pending_requests: 10_000,
        }
    }

    /// Sets [`AgentConfig::endpoint_updates`].
    pub fn endpoint_updates(mut self, updates: watch::Receiver<Vec<String>>) -> Self {
        self.endpoint_updates = Some(updates);
        self
    }

    /// Sets [`AgentConfig::redirects`].
    pub fn redirects(mut self, redirects: Redirects) -> Self {
        self.redirects = redirects;
        self
    }

    /// Sets [`AgentConfig::max_hub_wait`].
    pub fn max_hub_wait(mut self, wait: Duration) -> Self {
        self.max_hub_wait = wait;
        self
    }

    /// Sets [`AgentConfig::drain_wait`].
    pub fn drain_wait(mut self, wait: Duration) -> Self {
        self.drain_wait = wait;
        self
    }

    /// Sets [`AgentConfig::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`AgentConfig::recorder`].
    pub fn recorder(mut self, recorder: Arc<dyn Recorder>) -> Self {
        self.recorder = recorder;
        self
    }

    /// Sets [`AgentConfig::session`].
    pub fn session(mut self, session: Option<SessionConfig>) -> Self {
        self.session = session;
        self
    }

    /// Sets [`AgentConfig::when_full`].
    pub fn when_full(mut self, when_full: FullPolicy) -> Self {
        self.when_full = when_full;
        self
    }

    /// Sets [`AgentConfig::breaker`].
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Sets [`AgentConfig::backoff`].
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets [`AgentConfig::give_up_after`].
    pub fn give_up_after(mut self, failures: u32) -> Self {
        self.give_up_after = Some(failures);
        self
    }

    /// Sets [`AgentConfig::stable_after`].
    pub fn stable_after(mut self, stable_after: Duration) -> Self {
        self.stable_after = stable_after;
        self
    }
}
