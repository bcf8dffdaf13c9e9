//! The agent: stays connected to a hub, redialing with jittered backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_metrics::{CircuitState, NoopRecorder, Recorder};
use tunnel_proto::session::SessionConfig;
use tunnel_proto::{CloseCode, Envelope, MessageType, capability};
use tunnel_reconnect::{
    Action, Backoff, BackoffConfig, BreakerConfig, BreakerState, Disconnect, ExponentialBackoff,
    InvalidBackoff, InvalidBreaker, InvalidRedial, Redial, RedialConfig, RedialEvent, Redirects,
    WaitCause,
};
use tunnel_transport::{ConnectionInfo, ConnectionSender, Connector, Resume, SendError};

use crate::reliable::{FullPolicy, Receipt, Reliable, ReliableSendError, TrySend};
use crate::request::{Pending, Request, RequestError, Response, Ticket};
use crate::router::Router;
use crate::session::{self, SessionEnd};

/// Where an agent's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Dialing the hub.
    Connecting,
    /// Connected, with this session id.
    Connected {
        /// The session id the hub assigned.
        session_id: String,
    },
    /// Connected again and the earlier session continues: nothing was lost.
    Resumed {
        /// The session id.
        session_id: String,
    },
    /// Connected, but the earlier session could not be resumed (see
    /// [`SessionEvent::Reset`]).
    Reset {
        /// Why.
        reason: String,
    },
    /// Waiting before the next attempt.
    Backoff {
        /// When the next attempt starts.
        until: Instant,
    },
    /// The endpoint's circuit breaker is open after repeated failures: no attempt is
    /// made on it until `until`.
    CircuitOpen {
        /// The endpoint.
        endpoint: String,
        /// When one probe attempt will be allowed.
        until: Instant,
    },
    /// Shut down; no more attempts.
    Closed,
}

/// Why an agent could not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentSendError {
    /// The agent is between connections. (Buffering while disconnected arrives with
    /// session resume.)
    #[error("not connected to the hub")]
    NotConnected,
    /// The payload could not be encoded.
    #[error(transparent)]
    Encode(#[from] tunnel_proto::EncodeError),
    /// The connection refused the message.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The session did not accept the message (buffer full, shut down).
    #[error(transparent)]
    Session(#[from] ReliableSendError),
}

/// Settings of an [`Agent`].
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
    /// [`RequestError::TooManyInFlight`]. Default 10,000.
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

#[derive(Debug)]
struct Inner {
    state: watch::Sender<ConnectionState>,
    current: watch::Sender<Option<ConnectionSender>>,
    /// Whether the last connection used JSON (for [`Agent::format`] between connections).
    json: AtomicBool,
    reconnects: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Exactly-once delivery across reconnects, when the hub resumes sessions.
    reliable: Option<Arc<Reliable>>,
    /// Whether the current connection carries the session (the hub granted `resume`).
    resumable: AtomicBool,
    when_full: FullPolicy,
    events: broadcast::Sender<SessionEvent>,
    pending: Arc<Pending>,
    request_timeout: Duration,
}

/// Something the application must know about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The session could not be resumed: messages not yet acknowledged were failed (their
    /// receipts say so) and the peer may have lost state. Resynchronize. `epoch` counts
    /// resets.
    Reset {
        /// Why.
        reason: String,
        /// How many resets this agent has seen.
        epoch: u64,
    },
}

/// An agent: keeps one connection to a hub, redials when it drops, hands what the hub
/// sends to a [`Router`].
///
/// Every redial waits a fully jittered exponential backoff, and never less than a
/// closing hub asked for (`close` message, `reconnect.after_ms`); a hint with
/// `endpoints` replaces the endpoints the agent dials. Each endpoint has a circuit
/// breaker: after repeated failed connects it is skipped until one probe is allowed
/// ([`ConnectionState::CircuitOpen`]).
///
/// ```no_run
/// use tunnel_router::{Agent, AgentConfig, Router};
/// use tunnel_transport::{AgentId, ClientConfig, WsConnector};
/// use tunnel_proto::{MessageType, messages::Event};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let connector = WsConnector::new(ClientConfig::new(AgentId::new("root:org", "cluster-1")));
/// let agent = Agent::start(connector, AgentConfig::new("ws://127.0.0.1:7070/"), Router::new())?;
/// agent.wait_connected(std::time::Duration::from_secs(5)).await?;
/// agent.send(MessageType::Event, &Event {
///     event_type: "Normal".into(), reason: "Started".into(), message: String::new(), regarding: None,
/// }).await?;
/// agent.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// An [`AgentConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidAgentConfig {
    /// The backoff settings.
    #[error(transparent)]
    Backoff(#[from] InvalidBackoff),
    /// The circuit breaker settings.
    #[error(transparent)]
    Breaker(#[from] InvalidBreaker),
    /// No endpoint to connect to.
    #[error("no endpoints given")]
    NoEndpoints,
    /// The other reconnect settings.
    #[error(transparent)]
    Redial(InvalidRedial),
}

impl From<InvalidRedial> for InvalidAgentConfig {
    fn from(e: InvalidRedial) -> Self {
        match e {
            InvalidRedial::NoEndpoints => InvalidAgentConfig::NoEndpoints,
            InvalidRedial::Breaker(e) => InvalidAgentConfig::Breaker(e),
            e => InvalidAgentConfig::Redial(e),
        }
    }
}

/// The agent did not connect in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not connected within {0:?}")]
pub struct ConnectTimeout(pub Duration);

impl Agent {
    /// Starts connecting through `connector` and keeps reconnecting until
    /// [`Agent::shutdown`].
    pub fn start(
        connector: impl Connector + 'static,
        config: AgentConfig,
        router: Router,
    ) -> Result<Agent, InvalidAgentConfig> {
        let backoff = ExponentialBackoff::new(config.backoff)?;
        Self::start_with_backoff(connector, config, router, Box::new(backoff))
    }

    /// Like [`Agent::start`] with a backoff of your own (for example seeded, in tests).
    pub fn start_with_backoff(
        connector: impl Connector + 'static,
        config: AgentConfig,
        router: Router,
        backoff: Box<dyn Backoff>,
    ) -> Result<Agent, InvalidAgentConfig> {
        let mut redial_config = RedialConfig::new(config.endpoints.clone());
        redial_config.redirects = config.redirects.clone();
        redial_config.max_hub_wait = config.max_hub_wait;
        redial_config.stable_after = config.stable_after;
        redial_config.breaker = config.breaker;
        redial_config.drain_wait = config.drain_wait;
        redial_config.give_up_after = config.give_up_after;
        let redial = Redial::new(redial_config, backoff)?;
        let inner = Arc::new(Inner {
            state: watch::Sender::new(ConnectionState::Connecting),
            current: watch::Sender::new(None),
            json: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            reliable: config
                .session
                .clone()
                .map(|session| Reliable::new(session, config.recorder.clone())),
            resumable: AtomicBool::new(false),
            when_full: config.when_full.clone(),
            events: broadcast::channel(16).0,
            pending: Arc::new(Pending::new(
                config.max_pending_requests,
                config.recorder.clone(),
            )),
            request_timeout: config.request_timeout,
        });
        if let Some(reliable) = inner.reliable.clone() {
            let shutdown = inner.shutdown.clone();
            inner.tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = tick.tick() => reliable.expire(),
                    }
                }
            });
        }
        inner.tasks.spawn(supervise(
            Box::new(connector),
            config.endpoint_updates,
            redial,
            router,
            config.recorder,
            inner.clone(),
        ));
        Ok(Agent { inner })
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.subscribe()
    }

    /// The current connection's sender, if connected.
    pub fn sender(&self) -> Option<ConnectionSender> {
        self.inner.current.borrow().clone()
    }

    /// Whether the agent has a connection it hands messages to (not while it is
    /// between connections or moving off a draining hub).
    pub fn is_connected(&self) -> bool {
        self.inner
            .current
            .borrow()
            .as_ref()
            .is_some_and(|s| !s.is_closed())
    }

    /// Watches the current connection (changes when it comes and goes).
    pub(crate) fn connection_watch(&self) -> watch::Receiver<Option<ConnectionSender>> {
        self.inner.current.subscribe()
    }

    /// How many times the agent has connected again after losing a connection.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Waits until connected, at most `timeout`.
    pub async fn wait_connected(
        &self,
        timeout: Duration,
    ) -> Result<ConnectionInfo, ConnectTimeout> {
        let mut current = self.inner.current.subscribe();
        let connected = tokio::time::timeout(
            timeout,
            current.wait_for(|c| c.as_ref().is_some_and(|s| !s.is_closed())),
        )
        .await
        .map_err(|_| ConnectTimeout(timeout))?;
        match connected {
            Ok(sender) => sender
                .as_ref()
                .map(|s| s.info().clone())
                .ok_or(ConnectTimeout(timeout)),
            Err(_) => Err(ConnectTimeout(timeout)),
        }
    }

    /// Sends a message of `kind` with `payload` (see [`Agent::send_envelope`]).
    pub async fn send<T: serde::Serialize + ?Sized>(
        &self,
        kind: MessageType,
        payload: &T,
    ) -> Result<Receipt, AgentSendError> {
        let payload = tunnel_proto::Payload::encode(self.format(), payload)?;
        let mut env = Box::new(Envelope::new(0, kind, tunnel_transport::unix_millis()));
        env.payload = Some(payload);
        self.send_envelope(env).await
    }

    /// Sends `env` (its id is assigned here). Pass it boxed where you can: it is handed
    /// on by value to the session, and a box moves for a pointer's cost.
    ///
    /// With a resumable session (the hub offers `resume`, the default on both sides when
    /// the hub has sessions), the message is held until the hub acknowledges it, is
    /// replayed after reconnects, and is accepted even while disconnected, up to the
    /// replay buffer's bounds ([`AgentConfig::when_full`] says what happens when they
    /// are reached). The receipt resolves when the hub has it, or with the reason it
    /// never will. Without one, the message goes on the current connection (failing with
    /// [`AgentSendError::NotConnected`] between connections) and the receipt says it is
    /// untracked.
    pub async fn send_envelope(
        &self,
        env: impl Into<Box<Envelope>>,
    ) -> Result<Receipt, AgentSendError> {
        let mut env = env.into();
        env.id = tunnel_transport::next_message_id();
        self.transmit(env).await
    }

    /// Sends a one-way message or a request (see [`Request`]). A request's response is
    /// the hub's reply; it fails with [`RequestError::Remote`] when the hub's handler
    /// failed, [`RequestError::Timeout`] past its deadline (a reply arriving later is
    /// discarded and counted in [`Agent::late_replies`]), and [`RequestError::Lost`]
    /// when the reply can no longer come (the connection ended without a resumable
    /// session, or the session was reset). Dropping the future stops the wait.
    ///
    /// With a resumable session a request survives reconnects: it is replayed if
    /// needed, and so is the hub's reply.
    pub async fn call(&self, request: Request) -> Result<Response, RequestError> {
        match self.begin(request)?.now() {
            Ok(response) => {
                // A caller sending in a loop never waits here: yield now and then.
                tokio::task::consume_budget().await;
                response
            }
            // Boxed: the waiting paths' futures are large and rarely needed.
            Err(started) => Box::pin(started.finish()).await,
        }
    }

    /// Hands `request` over as far as it can go without waiting: stamps it, registers a
    /// request's reply, and gives the message to the session or connection if there is
    /// room. Calls are thus sent in the order they are made, unless one has to wait.
    fn begin(&self, request: Request) -> Result<Started, RequestError> {
        let timeout = request.timeout_or(self.inner.request_timeout);
        let env = self.stamp(request.envelope);
        // Registered before sending: the reply may arrive before the send returns.
        let reply = if env.expects_reply() {
            Some((self.inner.pending.register(env.id, None)?, timeout))
        } else {
            None
        };
        Ok(Started {
            transmit: self.try_transmit(env),
            reply,
        })
    }

    /// Gives `env` its id and send time.
    fn stamp(&self, mut env: Box<Envelope>) -> Box<Envelope> {
        env.timestamp = tunnel_transport::unix_millis();
        env.id = tunnel_transport::next_message_id();
        env
    }

    /// A tower [`Service`](tower::Service) sending through this agent (see
    /// [`Agent::call`]), to compose with layers.
    pub fn client(&self) -> AgentClient {
        AgentClient {
            agent: self.clone(),
        }
    }

    /// Replies that arrived after their request stopped waiting.
    pub fn late_replies(&self) -> u64 {
        self.inner.pending.late()
    }

    /// Requests waiting for their reply.
    pub fn requests_in_flight(&self) -> usize {
        self.inner.pending.len()
    }

    async fn transmit(&self, env: Box<Envelope>) -> Result<Receipt, AgentSendError> {
        match self.try_transmit(env) {
            Transmit::Done(receipt) => {
                // A producer that never has to wait would starve the tasks on its thread
                // (among them the reader of the hub's acks): yield now and then.
                tokio::task::consume_budget().await;
                Ok(receipt)
            }
            Transmit::Failed(e) => Err(e),
            // Boxed: the waiting paths' futures are large and rarely needed, and inline
            // they would be moved around on every send.
            waiting => Box::pin(waiting.finish()).await,
        }
    }

    /// As much of [`Agent::transmit`] as can be done without waiting.
    fn try_transmit(&self, mut env: Box<Envelope>) -> Transmit {
        if env.content_encoding().is_some() {
            session::fit_encoding(&mut env, self.sender().as_ref());
        }
        let current = if self.inner.resumable.load(Ordering::Acquire) {
            None
        } else {
            self.sender()
        };
        // With a resumable session, and between connections when sessions are on, the
        // session holds the message; otherwise it goes on the current connection.
        if let Some(reliable) = &self.inner.reliable
            && current.is_none()
        {
            let policy = self.inner.when_full.for_type(&env.kind);
            return match reliable.try_send(env, &policy) {
                TrySend::Held(receipt) => Transmit::Done(receipt),
                TrySend::Failed(e) => Transmit::Failed(e.into()),
                waiting => Transmit::Session(reliable.clone(), waiting),
            };
        }
        let Some(sender) = current else {
            return Transmit::Failed(AgentSendError::NotConnected);
        };
        match sender.try_send(&env) {
            Ok(()) => Transmit::Done(Receipt::untracked()),
            Err(SendError::Full) => Transmit::Queue(sender, env),
            Err(e) => Transmit::Failed(e.into()),
        }
    }

    /// The payload format of the agent's connections: the current one's, else the last
    /// one's (MessagePack before the first). Encode payloads in it
    /// ([`Request::send_as`]) and they go on the wire as they are; a payload in the
    /// other format is transcoded for every send.
    pub fn format(&self) -> tunnel_proto::Format {
        match self.sender() {
            Some(sender) => sender.info().format,
            None if self.inner.json.load(Ordering::Relaxed) => tunnel_proto::Format::Json,
            None => tunnel_proto::Format::MsgPack,
        }
    }

    /// Messages and bytes held until the hub acknowledges them (`None` without
    /// sessions).
    pub fn held(&self) -> Option<(usize, usize)> {
        self.inner.reliable.as_ref().map(|reliable| reliable.held())
    }

    /// Session events (resets), as they happen. A slow subscriber may miss events beyond
    /// the last 16 and then sees a lag error.
    pub fn session_events(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    /// Closes the connection gracefully and stops reconnecting.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// The reconnect loop: a driver of [`Redial`], which decides where and when to dial.
/// This loop dials, attaches each connection to the session, runs it, and reports
/// how it ended.
async fn supervise(
    connector: Box<dyn Connector>,
    mut updates: Option<watch::Receiver<Vec<String>>>,
    mut redial: Redial,
    mut router: Router,
    recorder: Arc<dyn Recorder>,
    inner: Arc<Inner>,
) {
    let mut session_id: Option<String> = None;
    loop {
        if let Some(updates) = updates.as_mut()
            && updates.has_changed().unwrap_or(false)
        {
            let fresh = updates.borrow_and_update().clone();
            if redial.set_endpoints(fresh.clone()) {
                tracing::info!(endpoints = ?fresh, "endpoints changed");
            } else {
                tracing::warn!("ignoring an empty endpoint list from discovery");
            }
        }
        let step = match redial.poll(Instant::now().into_std()) {
            Action::Dial(endpoint) => Ok(endpoint.to_owned()),
            Action::Wait { until, cause } => Err(Some((Instant::from_std(until), cause))),
            Action::Connected | Action::GiveUp => Err(None),
        };
        report(&mut redial, &*recorder);
        let endpoint = match step {
            Ok(endpoint) => endpoint,
            Err(Some((until, cause))) => {
                inner.state.send_replace(match cause {
                    WaitCause::Backoff => ConnectionState::Backoff { until },
                    WaitCause::CircuitOpen { endpoint, until } => {
                        tracing::debug!(%endpoint, "circuit open, not dialing");
                        ConnectionState::CircuitOpen {
                            endpoint,
                            until: Instant::from_std(until),
                        }
                    }
                });
                tokio::select! {
                    () = inner.shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            Err(None) => {
                tracing::warn!("giving up: too many failed connects in a row");
                break;
            }
        };
        inner.state.send_replace(ConnectionState::Connecting);
        let resume = match (&inner.reliable, &session_id) {
            (Some(reliable), Some(id)) => Some(Resume {
                session_id: id.clone(),
                last_received: reliable.last_received(),
            }),
            _ => None,
        };
        let attempt = tokio::select! {
            () = inner.shutdown.cancelled() => break,
            r = connector.connect_with(&endpoint, resume) => r,
        };
        let conn = match attempt {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(%endpoint, error = %tunnel_proto::text::Untrusted(&e.to_string()), "connect failed");
                let retry_after = match &e {
                    tunnel_transport::ConnectError::Refused { retry_after, .. } => *retry_after,
                    _ => None,
                };
                redial.on_connect_failed(Instant::now().into_std(), retry_after);
                continue;
            }
        };
        if redial.on_connected(Instant::now().into_std()) {
            inner.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        report(&mut redial, &*recorder);
        let mut hint = None;
        let (sender, receiver) = conn.split();
        let info = sender.info().clone();
        tracing::info!(session = %tunnel_proto::text::Untrusted(&info.session_id), resumed = info.resumed, %endpoint, "connected");
        let reliable = inner
            .reliable
            .as_ref()
            .filter(|_| info.has_capability(capability::RESUME));
        let state = match reliable {
            Some(reliable) => {
                let reset = Box::pin(reliable.attach(
                    sender.clone(),
                    info.resumed,
                    info.peer_last_received,
                ))
                .await;
                session_id = Some(info.session_id.clone());
                match reset {
                    Some(crate::reliable::Reset {
                        reason,
                        carried,
                        epoch,
                    }) => {
                        recorder.session_reset();
                        tracing::warn!(%reason, epoch, "session reset");
                        inner.pending.reset(None, &carried, "the session was reset");
                        let _ = inner.events.send(SessionEvent::Reset {
                            reason: reason.clone(),
                            epoch,
                        });
                        ConnectionState::Reset { reason }
                    }
                    None if info.resumed => ConnectionState::Resumed {
                        session_id: info.session_id.clone(),
                    },
                    None => ConnectionState::Connected {
                        session_id: info.session_id.clone(),
                    },
                }
            }
            None => {
                if let Some(reliable) = &inner.reliable {
                    // Held messages cannot be delivered without resume.
                    reliable.fail_held("the hub does not resume sessions");
                }
                ConnectionState::Connected {
                    session_id: info.session_id.clone(),
                }
            }
        };
        inner.resumable.store(reliable.is_some(), Ordering::Release);
        inner.state.send_replace(state);
        inner.json.store(
            sender.info().format == tunnel_proto::Format::Json,
            Ordering::Relaxed,
        );
        inner.current.send_replace(Some(sender.clone()));
        let link = session::Link::new(reliable, &inner.pending, &*recorder, true);
        let (end, stopping) = {
            let session = session::run(receiver, sender.clone(), &mut router, &mut hint, &link);
            tokio::pin!(session);
            tokio::select! {
                end = &mut session => (end, false),
                () = inner.shutdown.cancelled() => {
                    let close = sender.close(CloseCode::NORMAL, "agent shutting down");
                    (tokio::join!(session, close).0, true)
                }
                () = link.drain_notice.notified() => {
                    let deadline = Instant::from_std(redial.on_drain(Instant::now().into_std()));
                    let end = move_off(&inner, &sender, reliable, session.as_mut(), deadline).await;
                    (end, false)
                }
            }
        };
        inner.current.send_replace(None);
        inner.resumable.store(false, Ordering::Release);
        match reliable {
            Some(reliable) => {
                reliable.detach(&sender);
            }
            // Without a session, replies cannot outlive the connection.
            None => inner
                .pending
                .fail_all("the connection ended before the reply"),
        }
        let how = match end {
            SessionEnd::Closed => {
                tracing::info!(reason = %tunnel_proto::text::Untrusted(&sender.close_reason().map(|r| r.to_string()).unwrap_or_default()), "connection closed");
                Disconnect::closed()
            }
            SessionEnd::Failed(e) => {
                tracing::warn!(error = %tunnel_proto::text::Untrusted(&e.to_string()), "connection failed");
                Disconnect::dropped()
            }
        };
        if stopping {
            break;
        }
        let how = match hint {
            Some(hint) => how.with_hint(hint.after_ms.map(Duration::from_millis), hint.endpoints),
            None => how,
        };
        redial.on_disconnected(Instant::now().into_std(), how);
    }
    inner.current.send_replace(None);
    if let Some(reliable) = &inner.reliable {
        reliable.shut_down(crate::Undelivered::ShutDown);
    }
    inner.pending.fail_all("the agent shut down");
    inner.state.send_replace(ConnectionState::Closed);
}

/// Hands what the redial machine reports to the recorder and the log.
fn report(redial: &mut Redial, recorder: &dyn Recorder) {
    while let Some(event) = redial.poll_event() {
        match event {
            RedialEvent::Circuit { endpoint, state } => {
                report_circuit(recorder, &endpoint, state);
            }
            RedialEvent::Redialing { reason } => recorder.reconnect_attempt(reason),
            RedialEvent::Redirected { endpoints } => {
                tracing::info!(endpoints = ?endpoints, "hub pointed to other endpoints");
            }
            RedialEvent::RedirectRefused { refused } => {
                let shown: Vec<_> = refused
                    .iter()
                    .take(4)
                    .map(|u| tunnel_proto::text::Untrusted(u).to_string())
                    .collect();
                tracing::warn!(refused = ?shown, count = refused.len(), "not following the hub to endpoints this agent's configuration does not allow");
            }
            _ => {}
        }
    }
}

/// Moves off a connection whose hub announced a drain: hands no new message to it
/// (they are held for the next connection), lets it finish what it carries (the hub
/// acknowledges what was sent, answers requests already sent) until `deadline`,
/// then closes it. When nothing it carried is left unacknowledged, the next
/// connection continues the session's numbering instead of resetting it.
async fn move_off(
    inner: &Inner,
    sender: &ConnectionSender,
    reliable: Option<&Arc<Reliable>>,
    mut session: std::pin::Pin<&mut impl std::future::Future<Output = SessionEnd>>,
    deadline: Instant,
) -> SessionEnd {
    tracing::info!(connection = sender.info().id, "hub is draining: moving");
    inner.current.send_replace(None);
    if let Some(reliable) = reliable {
        reliable.detach(sender);
    }
    let asked = inner.pending.ids();
    let finished = async {
        // A short poll: drains are rare, and this keeps the common paths free of
        // extra notifications.
        let done = || reliable.is_none_or(|r| r.quiet()) && !inner.pending.any_of(&asked);
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        end = session.as_mut() => return end,
        done = tokio::time::timeout_at(deadline, finished) => {
            if done.is_err() {
                tracing::warn!("the draining hub did not finish within the drain wait");
            }
        }
    }
    if let Some(reliable) = reliable
        && reliable.end_for_handover()
    {
        tracing::debug!("everything acknowledged: the session continues on the next hub");
    }
    let close = sender.close(CloseCode::NORMAL, "moving off a draining hub");
    tokio::join!(session, close).0
}

fn report_circuit(recorder: &dyn Recorder, endpoint: &str, state: BreakerState) {
    recorder.circuit_state(
        endpoint,
        match state {
            BreakerState::Closed { .. } => CircuitState::Closed,
            BreakerState::HalfOpen { .. } => CircuitState::HalfOpen,
            BreakerState::Open { .. } => CircuitState::Open,
        },
    );
}

impl From<AgentSendError> for RequestError {
    fn from(e: AgentSendError) -> Self {
        match e {
            AgentSendError::NotConnected => RequestError::NotConnected,
            AgentSendError::Session(e) => RequestError::Session(e),
            other => RequestError::Send(other.to_string()),
        }
    }
}

/// Where [`Agent::try_transmit`] left a message.
enum Transmit {
    /// Held by the session or queued on the connection.
    Done(Receipt),
    /// Held with the connection's queue full (a backlog to drain), or the replay
    /// buffer full (wait for room as the policy says).
    Session(Arc<Reliable>, TrySend),
    /// No session, and the connection's queue is full: wait for room on it.
    Queue(ConnectionSender, Box<Envelope>),
    /// Refused.
    Failed(AgentSendError),
}

/// A call after [`Agent::begin`]: what its message still needs, and a request's reply.
struct Started {
    transmit: Transmit,
    /// A request's reply ticket and deadline.
    reply: Option<(Ticket, Duration)>,
}

impl Started {
    /// The response, if nothing is left to wait for; else the call back.
    fn now(self) -> Result<Result<Response, RequestError>, Started> {
        match (self.transmit, self.reply) {
            (Transmit::Done(receipt), None) => Ok(Ok(Response::Accepted(receipt))),
            (Transmit::Failed(e), _) => Ok(Err(e.into())),
            (transmit, reply) => Err(Started { transmit, reply }),
        }
    }

    /// Waits for the send to finish and, for a request, for the reply.
    async fn finish(self) -> Result<Response, RequestError> {
        let receipt = self.transmit.finish().await?;
        match self.reply {
            None => Ok(Response::Accepted(receipt)),
            Some((ticket, timeout)) => Ok(Response::Reply(ticket.wait(timeout).await?)),
        }
    }
}

impl Transmit {
    /// Waits for whatever the message still needs.
    async fn finish(self) -> Result<Receipt, AgentSendError> {
        match self {
            Transmit::Done(receipt) => Ok(receipt),
            Transmit::Session(reliable, waiting) => Ok(waiting.finish(&reliable).await?),
            Transmit::Queue(sender, env) => {
                sender.send(&env).await?;
                Ok(Receipt::untracked())
            }
            Transmit::Failed(e) => Err(e),
        }
    }
}

/// A tower [`Service`](tower::Service) that sends [`Request`]s through an [`Agent`]
/// (from [`Agent::client`]). Always ready: back-pressure comes from the session's
/// replay buffer policy, and a concurrency limit is tower's `ConcurrencyLimitLayer`.
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tunnel_proto::{MessageType, messages::Command};
/// use tunnel_router::layer::timeout::TimeoutLayer;
/// use tunnel_router::{Agent, Request};
///
/// # async fn run(agent: Agent) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let mut client = ServiceBuilder::new()
///     .layer(TimeoutLayer::new(Duration::from_secs(5)))
///     .concurrency_limit(64)
///     .service(agent.client());
/// let reply = client.ready().await?.call(Request::call(MessageType::Command, &Command::new("sync"))?).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AgentClient {
    agent: Agent,
}

impl AgentClient {
    /// The agent this client sends through.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }
}

impl tower::Service<Request> for AgentClient {
    type Response = Response;
    type Error = RequestError;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), RequestError>> {
        std::task::Poll::Ready(Ok(()))
    }

    /// The message is handed to the session (or connection) here, as [`Agent::call`]
    /// would, when there is room at once: calls go on the wire in the order they are
    /// made, and dropping the future afterwards does not take a message back (a
    /// request's future then only waits for the reply). A message that has to wait for
    /// room (a full replay buffer, or without sessions a full connection queue) is sent
    /// when its future is polled, and messages from later calls may overtake it: where
    /// order matters under back-pressure, await each call before making the next. When
    /// the connection's queue is full, the future also sends the session's backlog;
    /// dropped unpolled, that waits for the next send or reconnect.
    fn call(&mut self, request: Request) -> ResponseFuture {
        if !request.expects_reply() {
            // The common case, kept short: a one-way message has no reply to register.
            // (Going through `begin` and `Started` instead costs 2% of the full stack's
            // throughput, measured.)
            let env = self.agent.stamp(request.envelope);
            return match self.agent.try_transmit(env) {
                Transmit::Done(receipt) => ResponseFuture::ready(Ok(Response::Accepted(receipt))),
                Transmit::Failed(e) => ResponseFuture::ready(Err(e.into())),
                waiting => {
                    ResponseFuture::boxed(
                        async move { Ok(Response::Accepted(waiting.finish().await?)) },
                    )
                }
            };
        }
        match self.agent.begin(request).map(Started::now) {
            Err(e) => ResponseFuture::ready(Err(e)),
            Ok(Ok(response)) => ResponseFuture::ready(response),
            Ok(Err(started)) => ResponseFuture::boxed(started.finish()),
        }
    }
}

/// The future of [`AgentClient`]'s (and [`PoolClient`](crate::PoolClient)'s) `call`: the
/// response, at once when the message could be sent without waiting.
pub struct ResponseFuture {
    state: ResponseState,
}

enum ResponseState {
    Ready(Option<Result<Response, RequestError>>),
    Waiting(futures_util::future::BoxFuture<'static, Result<Response, RequestError>>),
}

impl ResponseFuture {
    pub(crate) fn ready(result: Result<Response, RequestError>) -> Self {
        ResponseFuture {
            state: ResponseState::Ready(Some(result)),
        }
    }

    pub(crate) fn boxed(
        future: impl std::future::Future<Output = Result<Response, RequestError>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            state: ResponseState::Waiting(Box::pin(future)),
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            ResponseState::Ready(_) => "ready",
            ResponseState::Waiting(_) => "waiting",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response, RequestError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.get_mut().state {
            ResponseState::Waiting(future) => future.as_mut().poll(cx),
            ResponseState::Ready(result) => {
                // A caller sending in a loop never waits here: spend the task's budget
                // so that it still yields to the other tasks on its thread now and then.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                coop.made_progress();
                std::task::Poll::Ready(
                    result
                        .take()
                        .unwrap_or(Err(RequestError::Send("polled after completion".into()))),
                )
            }
        }
    }
}
