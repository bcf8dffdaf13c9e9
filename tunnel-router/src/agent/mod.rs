//! The agent: stays connected to a hub, redialing with jittered backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

use crate::Error;
use crate::connection_loop::{self, Fit, SessionEnd};
use crate::delivery::{FullPolicy, Receipt, Reliable, TrySend};
use crate::request::{Pending, Request, Response, Ticket};
use crate::router::Router;
use tunnel_proto::session::Held;

mod client;
mod config;
mod driver;

pub use client::{AgentClient, ResponseFuture};
pub use config::AgentConfig;
use driver::supervise;

/// Where an agent's connection stands ([`Agent::state`], a `watch` receiver).
///
/// ```no_run
/// # async fn f(agent: tunnel_router::Agent) {
/// use tunnel_router::ConnectionState;
///
/// let mut state = agent.state();
/// while state.changed().await.is_ok() {
///     match &*state.borrow() {
///         ConnectionState::Resumed { .. } => println!("back, nothing lost"),
///         ConnectionState::Reset { .. } => println!("back with a new session: resync"),
///         ConnectionState::Closed => break,
///         other => println!("{other:?}"),
///     }
/// }
/// # }
/// ```
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

#[derive(Debug)]
struct Inner {
    state: watch::Sender<ConnectionState>,
    current: watch::Sender<Option<ConnectionSender>>,
    /// Whether the last connection used JSON (for [`Agent::format`] between connections).
    json: AtomicBool,
    /// The last connection's message size limit (0 before the first): with `json`, what
    /// tells most messages fit it without looking at the connection.
    max_message_size: AtomicUsize,
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
            max_message_size: AtomicUsize::new(0),
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
    ) -> Result<Receipt, Error> {
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
    /// [`Error::NotConnected`] between connections) and the receipt says it is
    /// untracked.
    pub async fn send_envelope(&self, env: impl Into<Box<Envelope>>) -> Result<Receipt, Error> {
        let mut env = env.into();
        env.id = tunnel_transport::next_message_id();
        self.transmit(env).await
    }

    /// Sends a one-way message or a request (see [`Request`]). A request's response is
    /// the hub's reply; it fails with [`Error::Remote`] when the hub's handler
    /// failed, [`Error::Timeout`] past its deadline (a reply arriving later is
    /// discarded and counted in [`Agent::late_replies`]), and [`Error::Lost`]
    /// when the reply can no longer come (the connection ended without a resumable
    /// session, or the session was reset). Dropping the future stops the wait.
    ///
    /// With a resumable session a request survives reconnects: it is replayed if
    /// needed, and so is the hub's reply.
    pub async fn call(&self, request: Request) -> Result<Response, Error> {
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
    fn begin(&self, request: Request) -> Result<Started, Error> {
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

    async fn transmit(&self, env: Box<Envelope>) -> Result<Receipt, Error> {
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
        // Every message passes here: one in the last connection's format, uncompressed
        // and with an envelope bound within its size limit, is taken to fit without a
        // look at the connection (the format comes from the agent's configuration; one
        // that changed meanwhile is transcoded when written); else the connection is
        // asked under the borrow, and the rare work of fitting done outside it (between
        // connections, the session's last connection is asked instead).
        let fits = env.content_encoding().is_none()
            && env
                .encoded_len_bound(self.cached_format())
                .is_some_and(|b| b <= self.inner.max_message_size.load(Ordering::Relaxed));
        if !fits {
            // The borrow ends before the session's lock is taken.
            let current = self.inner.current.borrow().as_ref().map(Fit::of);
            let fit = current.or_else(|| self.inner.reliable.as_ref().and_then(|r| r.fit()));
            if let Err(e) = connection_loop::fit_payload(&mut env, fit) {
                return Transmit::Failed(e.into());
            }
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
                TrySend::Failed(e) => Transmit::Failed(e),
                waiting => Transmit::Session(reliable.clone(), waiting),
            };
        }
        let Some(sender) = current else {
            return Transmit::Failed(Error::NotConnected);
        };
        match sender.try_send(&env) {
            Ok(()) => Transmit::Done(Receipt::untracked()),
            Err(SendError::Full) => Transmit::Queue(sender, env),
            Err(e) => Transmit::Failed(e.into()),
        }
    }

    /// The last connection's format, without looking at the connection.
    fn cached_format(&self) -> tunnel_proto::Format {
        if self.inner.json.load(Ordering::Relaxed) {
            tunnel_proto::Format::Json
        } else {
            tunnel_proto::Format::MsgPack
        }
    }

    /// The payload format of the agent's connections: the current one's, else the last
    /// one's (MessagePack before the first). Encode payloads in it
    /// ([`Request::encoded`]) and they go on the wire as they are; a payload in the
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
    pub fn held(&self) -> Option<Held> {
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
    Failed(Error),
}

/// A call after [`Agent::begin`]: what its message still needs, and a request's reply.
struct Started {
    transmit: Transmit,
    /// A request's reply ticket and deadline.
    reply: Option<(Ticket, Duration)>,
}

impl Started {
    /// The response, if nothing is left to wait for; else the call back.
    fn now(self) -> Result<Result<Response, Error>, Started> {
        match (self.transmit, self.reply) {
            (Transmit::Done(receipt), None) => Ok(Ok(Response::Accepted(receipt))),
            (Transmit::Failed(e), _) => Ok(Err(e)),
            (transmit, reply) => Err(Started { transmit, reply }),
        }
    }

    /// Waits for the send to finish and, for a request, for the reply.
    async fn finish(self) -> Result<Response, Error> {
        let receipt = self.transmit.finish().await?;
        match self.reply {
            None => Ok(Response::Accepted(receipt)),
            Some((ticket, timeout)) => Ok(Response::Reply(ticket.wait(timeout).await?)),
        }
    }
}

impl Transmit {
    /// Waits for whatever the message still needs.
    async fn finish(self) -> Result<Receipt, Error> {
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
