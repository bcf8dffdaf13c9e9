//! The hub: accepts agents, keeps a registry of them, routes what they send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::ToSocketAddrs;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_proto::messages::{Close, ReconnectHint, TypedMessage};
use tunnel_proto::{CloseCode, Envelope, MessageType, capability};
use tunnel_transport::{
    AcceptError, Acceptor, AgentId, ConnectionInfo, ConnectionSender, ServerConfig, WsListener,
};

use crate::Error;
use crate::delivery::Receipt;
use crate::registry::{HubSessions, SessionRegistry, Store};
use crate::request::{Pending, Request, Response};
use crate::router::Router;
use tunnel_proto::session::Held;

/// How often a hub with sessions expires old messages and ends sessions past their
/// grace period.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
use crate::connection_loop::{self, Fit, SessionEnd};

#[derive(Debug)]
struct Inner {
    agents: RwLock<HashMap<AgentId, ConnectionSender>>,
    shutdown: CancellationToken,
    /// Cancelled to stop accepting (a drain); a child of `shutdown`.
    accepting: CancellationToken,
    tasks: TaskTracker,
    shutdown_timeout: Duration,
    request_timeout: Duration,
    sessions: Option<Arc<Store>>,
    pending: Arc<Pending>,
    recorder: Arc<dyn tunnel_metrics::Recorder>,
    /// Woken whenever an agent is registered.
    joined: tokio::sync::Notify,
    /// Cancelled once the accept loop took in its last connection.
    accept_stopped: CancellationToken,
    /// Agents coming and going, for [`Hub::events`].
    events: tokio::sync::broadcast::Sender<HubEvent>,
}

/// An agent connecting to or leaving a hub ([`Hub::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HubEvent {
    /// `agent`'s connection `connection` is registered: the hub sends to it from now on.
    Connected {
        /// Who.
        agent: AgentId,
        /// The connection's id ([`ConnectionInfo::id`]).
        connection: u64,
    },
    /// That connection ended (a newer one of the same agent may already be
    /// registered: compare `connection`).
    Disconnected {
        /// Who.
        agent: AgentId,
        /// The connection's id.
        connection: u64,
    },
}

/// Events a slow [`Hub::events`] subscriber may fall behind by before it sees a lag
/// error (and should read [`Hub::agents`] afresh).
const EVENTS_BUFFERED: usize = 1024;

/// One connected agent as a hub sees it ([`Hub::agent_statuses`], `/agents`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct AgentStatus {
    /// The agent's workspace.
    pub workspace: String,
    /// The agent's sync target.
    pub sync_target: String,
    /// Its session id.
    pub session_id: String,
    /// The connection's number within the hub process.
    pub connection_id: u64,
    /// The codec: `json` or `msgpack`.
    pub codec: String,
    /// The agent's socket address.
    pub peer_addr: Option<String>,
    /// Whether this connection resumed an earlier session.
    pub resumed: bool,
    /// When the connection was established, in milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
    /// How long it has been up, in seconds.
    pub connected_for_s: f64,
    /// Messages received from the agent on this connection (control messages too).
    pub messages_in: u64,
    /// Messages sent to the agent on this connection.
    pub messages_out: u64,
    /// Encoded bytes received.
    pub bytes_in: u64,
    /// Encoded bytes sent.
    pub bytes_out: u64,
    /// The last keepalive round trip, in microseconds.
    pub rtt_us: Option<u64>,
    /// Messages to the agent held for replay (sent or queued, not yet acknowledged).
    pub replay_messages: usize,
    /// Bytes held for replay.
    pub replay_bytes: usize,
}

/// How a hub drains (see [`Hub::drain`]).
///
/// ```no_run
/// # async fn f(hub: tunnel_router::Hub) {
/// use std::time::Duration;
/// use tunnel_router::Drain;
///
/// // Agents get 15 s to finish what is in flight, and are pointed at another hub.
/// let drain = Drain::default()
///     .timeout(Duration::from_secs(15))
///     .endpoints(vec!["wss://hub-b:7070/".into()]);
/// hub.drain(drain).await;
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Drain {
    /// Agents wait at least this long before dialing again. Default 0.
    pub after: Duration,
    /// Where agents should go instead (alternate hubs). Default: their own lists.
    pub endpoints: Vec<String>,
    /// How long agents get to finish and leave before the hub closes anyway.
    /// Default 15 s.
    pub timeout: Duration,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            after: Duration::ZERO,
            endpoints: Vec::new(),
            timeout: Duration::from_secs(15),
        }
    }
}

impl Drain {
    /// Sets [`Drain::after`].
    pub fn after(mut self, after: Duration) -> Self {
        self.after = after;
        self
    }

    /// Sets [`Drain::endpoints`].
    pub fn endpoints(mut self, endpoints: Vec<String>) -> Self {
        self.endpoints = endpoints;
        self
    }

    /// Sets [`Drain::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How long [`Hub::call`] waits for a reply unless the request says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of a [`Hub`] that do not belong to its transport.
///
/// ```
/// use std::time::Duration;
/// use tunnel_router::{Hub, HubConfig, HubSessions, Router, SessionRegistry};
/// use tunnel_transport::{AgentId, AllowAll, ClientConfig, ServerConfig, memory};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// // Sessions over any transport: the registry decides each handshake's session.
/// let sessions = SessionRegistry::new(HubSessions::default());
/// let (connector, acceptor) = memory::listener(
///     ClientConfig::new(AgentId::new("root:org", "cluster-1")),
///     ServerConfig::new(AllowAll).sessions(sessions.hook()),
/// );
/// let config = HubConfig::default()
///     .sessions(sessions)
///     .request_timeout(Duration::from_secs(5));
/// let hub = Hub::serve_with(acceptor, Router::new(), config);
/// assert_eq!(hub.sessions(), 0);
/// hub.shutdown().await;
/// # });
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// Session resume: the registry the transport's handshakes consult (see
    /// [`SessionRegistry`]). Default: a registry with [`HubSessions::default`], so
    /// that what an agent sends survives its reconnects, as the agent's own default
    /// expects; `None` ([`HubConfig::without_sessions`]) leaves connections without a
    /// session (no numbering, acks or replay: a message in flight at a disconnect is
    /// lost), for peers that speak the transport alone.
    pub sessions: Option<SessionRegistry>,
    /// How long a request to an agent waits for its reply unless it says otherwise.
    /// Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// Requests to agents that may wait for replies at once; more fail at once with
    /// [`Error::TooManyInFlight`]. Default 100,000.
    pub max_pending_requests: usize,
    /// How long [`Hub::shutdown`] waits for connections to close. Default 5 s.
    pub shutdown_timeout: Duration,
    /// Where the hub's request and session metrics go. Default: nowhere (a hub made
    /// with [`Hub::bind`] uses its transport's recorder).
    pub recorder: Option<Arc<dyn tunnel_metrics::Recorder>>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            sessions: Some(SessionRegistry::new(HubSessions::default())),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_pending_requests: MAX_PENDING_REQUESTS,
            shutdown_timeout: Duration::from_secs(5),
            recorder: None,
        }
    }
}

impl HubConfig {
    /// Sets [`HubConfig::sessions`].
    pub fn sessions(mut self, sessions: SessionRegistry) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// No sessions: see [`HubConfig::sessions`].
    pub fn without_sessions(mut self) -> Self {
        self.sessions = None;
        self
    }

    /// Sets [`HubConfig::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`HubConfig::max_pending_requests`].
    pub fn max_pending_requests(mut self, max: usize) -> Self {
        self.max_pending_requests = max.max(1);
        self
    }

    /// Sets [`HubConfig::shutdown_timeout`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Sets [`HubConfig::recorder`].
    pub fn recorder(mut self, recorder: Arc<dyn tunnel_metrics::Recorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }
}
/// Requests a hub may have waiting for replies at once.
const MAX_PENDING_REQUESTS: usize = 100_000;

/// A hub: accepts agents, keeps them in a registry keyed by [`AgentId`], hands what
/// they send to a [`Router`], and sends to any of them.
///
/// When an agent connects while an earlier connection with the same identity is still
/// registered, the newer connection takes its place and the older one is closed with
/// `4004 session_replaced`.
///
/// ```
/// use tunnel_router::{Hub, Router};
/// use tunnel_transport::{AllowAll, ServerConfig};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let hub = Hub::bind("127.0.0.1:0", ServerConfig::new(AllowAll), Router::new()).await?;
/// println!("agents connect to {}", hub.url().unwrap());
/// assert!(hub.agents().is_empty());
/// hub.shutdown().await;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    local_addr: Option<SocketAddr>,
    scheme: &'static str,
}

impl Hub {
    /// Listens for WebSocket agents on `addr`, with resumable sessions
    /// ([`HubConfig::default`]).
    pub async fn bind(
        addr: impl ToSocketAddrs,
        config: ServerConfig,
        router: Router,
    ) -> Result<Hub, AcceptError> {
        Hub::bind_with(addr, config, router, HubConfig::default()).await
    }

    /// Listens for WebSocket agents on `addr`, with the hub's own settings: with
    /// [`HubConfig::sessions`], the listener's handshakes consult its registry.
    pub async fn bind_with(
        addr: impl ToSocketAddrs,
        server: ServerConfig,
        router: Router,
        mut config: HubConfig,
    ) -> Result<Hub, AcceptError> {
        let recorder = config
            .recorder
            .get_or_insert_with(|| server.connection.recorder.clone())
            .clone();
        let scheme = server.scheme();
        let server = match &mut config.sessions {
            Some(sessions) => {
                sessions.set_recorder(recorder);
                server.sessions(sessions.hook())
            }
            None => server,
        };
        let listener = WsListener::bind(addr, server).await?;
        let local_addr = listener.local_addr();
        let mut hub = Hub::start(Box::new(listener), router, config);
        hub.local_addr = Some(local_addr);
        hub.scheme = scheme;
        Ok(hub)
    }

    /// Serves agents from any transport's acceptor, without sessions: the acceptor was
    /// configured before the hub, so its handshakes cannot consult the hub's registry.
    /// For sessions over another transport, see [`Hub::serve_with`].
    pub fn serve(acceptor: impl Acceptor + 'static, router: Router) -> Hub {
        Hub::serve_with(acceptor, router, HubConfig::default().without_sessions())
    }

    /// Serves agents from any transport's acceptor, with the hub's own settings. With
    /// [`HubConfig::sessions`], the acceptor's [`ServerConfig`] must consult the same
    /// registry ([`SessionRegistry::hook`]), so that handshakes resume its sessions.
    pub fn serve_with(
        acceptor: impl Acceptor + 'static,
        router: Router,
        mut config: HubConfig,
    ) -> Hub {
        if let (Some(sessions), Some(recorder)) = (&mut config.sessions, &config.recorder) {
            sessions.set_recorder(recorder.clone());
        }
        Hub::start(Box::new(acceptor), router, config)
    }

    fn start(acceptor: Box<dyn Acceptor>, router: Router, config: HubConfig) -> Hub {
        let recorder = config
            .recorder
            .unwrap_or_else(|| Arc::new(tunnel_metrics::NoopRecorder));
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            agents: RwLock::new(HashMap::new()),
            accepting: shutdown.child_token(),
            shutdown,
            tasks: TaskTracker::new(),
            shutdown_timeout: config.shutdown_timeout,
            request_timeout: config.request_timeout,
            sessions: config.sessions.map(|s| s.store()),
            pending: Arc::new(Pending::new(config.max_pending_requests, recorder.clone())),
            recorder,
            joined: tokio::sync::Notify::new(),
            accept_stopped: CancellationToken::new(),
            events: tokio::sync::broadcast::channel(EVENTS_BUFFERED).0,
        });
        inner
            .tasks
            .spawn(accept_loop(acceptor, router, inner.clone()));
        if let Some(store) = inner.sessions.clone() {
            let shutdown = inner.shutdown.clone();
            inner.tasks.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = tick.tick() => store.sweep().await,
                    }
                }
                store.close_all().await;
            });
        }
        Hub {
            inner,
            local_addr: None,
            scheme: "ws",
        }
    }

    /// Agents connecting and leaving, from now on (those connected already are in
    /// [`Hub::agents`]). At most 1,024 events wait for a slow subscriber; past that it
    /// gets `RecvError::Lagged` and should read [`Hub::agents`] afresh.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<HubEvent> {
        self.inner.events.subscribe()
    }

    /// The listening address, for a hub made with [`Hub::bind`].
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// `ws://<local_addr>/` (`wss://` with TLS), for a hub made with [`Hub::bind`].
    pub fn url(&self) -> Option<String> {
        self.local_addr.map(|a| format!("{}://{a}/", self.scheme))
    }

    /// The connected agents.
    pub fn agents(&self) -> Vec<ConnectionInfo> {
        self.read_agents()
            .values()
            .map(|s| s.info().clone())
            .collect()
    }

    /// What each connected agent's connection has carried, for status pages (the
    /// admin server's `/agents`), sorted by identity.
    pub fn agent_statuses(&self) -> Vec<AgentStatus> {
        let senders: Vec<ConnectionSender> = self.read_agents().values().cloned().collect();
        let now = std::time::SystemTime::now();
        let mut statuses: Vec<AgentStatus> = senders
            .iter()
            .map(|sender| {
                let info = sender.info();
                let stats = sender.stats();
                let held = self
                    .inner
                    .sessions
                    .as_ref()
                    .and_then(|store| store.of_agent(&info.agent))
                    .map_or_else(Held::default, |reliable| reliable.held());
                let (replay_messages, replay_bytes) = (held.messages, held.bytes);
                let since = info
                    .connected_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                AgentStatus {
                    workspace: info.agent.workspace.clone(),
                    sync_target: info.agent.sync_target.clone(),
                    session_id: info.session_id.clone(),
                    connection_id: info.id,
                    codec: info.format.name().to_owned(),
                    peer_addr: info.peer_addr.map(|a| a.to_string()),
                    resumed: info.resumed,
                    connected_at_ms: u64::try_from(since.as_millis()).unwrap_or(u64::MAX),
                    connected_for_s: now
                        .duration_since(info.connected_at)
                        .unwrap_or_default()
                        .as_secs_f64(),
                    messages_in: stats.messages_in,
                    messages_out: stats.messages_out,
                    bytes_in: stats.bytes_in,
                    bytes_out: stats.bytes_out,
                    rtt_us: stats
                        .rtt
                        .map(|rtt| u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX)),
                    replay_messages,
                    replay_bytes,
                }
            })
            .collect();
        statuses
            .sort_by(|a, b| (&a.workspace, &a.sync_target).cmp(&(&b.workspace, &b.sync_target)));
        statuses
    }

    /// Whether the hub accepts new agents (false once it drains or shuts down).
    pub fn is_accepting(&self) -> bool {
        !self.inner.accepting.is_cancelled()
    }

    /// Waits until `agent` is registered (connected), at most `timeout`. An agent sees
    /// the hub's handshake answer a moment before the hub has registered it, so code
    /// that starts an agent and then sends to it from the hub waits here first.
    pub async fn wait_for_agent(
        &self,
        agent: &AgentId,
        timeout: Duration,
    ) -> Result<ConnectionInfo, crate::ConnectTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let joined = self.inner.joined.notified();
            tokio::pin!(joined);
            joined.as_mut().enable();
            if let Some(sender) = self.sender(agent) {
                return Ok(sender.info().clone());
            }
            if tokio::time::timeout_at(deadline, joined).await.is_err() {
                return Err(crate::ConnectTimeout(timeout));
            }
        }
    }

    /// The sending handle of a connected agent.
    pub fn sender(&self, agent: &AgentId) -> Option<ConnectionSender> {
        self.read_agents().get(agent).cloned()
    }

    fn read_agents(&self) -> std::sync::RwLockReadGuard<'_, HashMap<AgentId, ConnectionSender>> {
        self.inner.agents.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a message of `kind` with `payload` to `agent` (see [`Hub::send_envelope`]).
    pub async fn send<T: serde::Serialize + ?Sized>(
        &self,
        agent: &AgentId,
        kind: MessageType,
        payload: &T,
    ) -> Result<Receipt, Error> {
        let format = self
            .sender(agent)
            .map_or(tunnel_proto::Format::MsgPack, |s| s.info().format);
        let payload = tunnel_proto::Payload::encode(format, payload)?;
        let mut env = Box::new(Envelope::new(0, kind, tunnel_transport::unix_millis()));
        env.payload = Some(payload);
        self.send_envelope(agent, env).await
    }

    /// Sends `env` to `agent` (its id is assigned here). Pass it boxed where you can:
    /// it is handed on by value to the session, and a box moves for a pointer's cost.
    ///
    /// On a hub with sessions ([`HubConfig::sessions`]) the message goes into the
    /// agent's session: held until acknowledged, replayed after a reconnect, accepted
    /// while the agent is within its grace period; the receipt tells the outcome.
    /// Otherwise it goes on the agent's current connection and the receipt is untracked.
    pub async fn send_envelope(
        &self,
        agent: &AgentId,
        env: impl Into<Box<Envelope>>,
    ) -> Result<Receipt, Error> {
        let mut env = env.into();
        env.id = tunnel_transport::next_message_id();
        self.transmit(agent, env).await
    }

    /// Sends a one-way message or a request to `agent` (see [`Request`]); a request's
    /// response is the agent's reply. Only `agent` can answer it. It fails like
    /// [`Agent::call`](crate::Agent::call): a remote error, a timeout (default
    /// [`HubConfig::request_timeout`]; a later reply is discarded and counted in
    /// [`Hub::late_replies`]), or a lost reply (the agent's connection ended without a
    /// resumable session, or its session was reset).
    pub async fn call(&self, agent: &AgentId, request: Request) -> Result<Response, Error> {
        let timeout = request.timeout_or(self.inner.request_timeout);
        let mut env = request.envelope;
        env.timestamp = tunnel_transport::unix_millis();
        env.id = tunnel_transport::next_message_id();
        if !env.expects_reply() {
            return Ok(Response::Accepted(self.transmit(agent, env).await?));
        }
        let ticket = self.inner.pending.register(env.id, Some(agent.clone()))?;
        self.transmit(agent, env).await?;
        Ok(Response::Reply(ticket.wait(timeout).await?))
    }

    /// Sends a message of `kind` with `payload` to every connected agent, each as by
    /// [`Hub::send`]; returns each agent's outcome.
    pub async fn broadcast<T: serde::Serialize + ?Sized>(
        &self,
        kind: MessageType,
        payload: &T,
    ) -> Vec<(AgentId, Result<Receipt, Error>)> {
        let agents: Vec<AgentId> = self.read_agents().keys().cloned().collect();
        let mut outcomes = Vec::with_capacity(agents.len());
        for agent in agents {
            let outcome = self.send(&agent, kind.clone(), payload).await;
            outcomes.push((agent, outcome));
        }
        outcomes
    }

    /// A tower [`Service`](tower::Service) sending [`Request`]s to `agent`.
    pub fn client(&self, agent: AgentId) -> HubClient {
        HubClient {
            hub: self.clone(),
            agent,
        }
    }

    /// Replies that arrived after their request stopped waiting.
    pub fn late_replies(&self) -> u64 {
        self.inner.pending.late()
    }

    async fn transmit(&self, agent: &AgentId, mut env: Box<Envelope>) -> Result<Receipt, Error> {
        let sender = self.sender(agent);
        let session = self
            .inner
            .sessions
            .as_ref()
            .and_then(|s| Some((s, s.of_agent(agent)?)));
        let fit = match (&sender, &session) {
            (Some(sender), _) => Some(Fit::of(sender)),
            (None, Some((_, reliable))) => reliable.fit(),
            (None, None) => None,
        };
        connection_loop::fit_payload(&mut env, fit)?;
        if let Some((store, reliable)) = session {
            let policy = store.when_full().for_type(&env.kind);
            return reliable.send(env, policy).await;
        }
        let sender = sender.ok_or(Error::NotConnected)?;
        sender.send(&env).await?;
        Ok(Receipt::untracked())
    }

    /// For `agent`'s session if it was restored from a
    /// [`SessionStore`](crate::SessionStore) (saved by another hub, or by this one
    /// before it restarted): the messages with header `header` it held, sent and not
    /// acknowledged, when it was restored, oldest first, each with a receipt for its
    /// outcome (already `Ok` if the agent's resume acknowledged it). Nobody else waits
    /// for them: the hub that sent them let go of the session. Taken once; empty for a
    /// session that was not restored, and without sessions.
    ///
    /// A hub that forwards messages from elsewhere learns here, when an agent
    /// resumes, which of them the session already carried.
    pub fn take_restored(&self, agent: &AgentId, header: &str) -> Vec<crate::Unacked> {
        self.inner
            .sessions
            .as_ref()
            .and_then(|s| s.of_agent(agent))
            .map(|r| r.take_restored(header))
            .unwrap_or_default()
    }

    /// Sends `env` to `agent`'s session `session` *staged*: numbered and held (the
    /// receipt names its sequence number), it goes to no connection, and nothing sent
    /// after it does, until [`Hub::release`] covers it. A hub that must record where a
    /// message went before the agent can have it (a cluster hub, before a crash can
    /// hide that the agent has it) records it under
    /// [`Receipt::seq`](crate::Receipt::seq) in between. Fails with
    /// [`Error::NotConnected`] when that is not the agent's session here, and with
    /// [`Error::Full`] at once when its buffer has no room.
    ///
    /// `still_ours` is asked once the session's copy here has been found, just before
    /// the message is staged in it; `false` stages nothing (`NotConnected`). A caller
    /// whose own hold on the session can be replaced (a
    /// [`SessionStore`](crate::SessionStore) whose `take` starts a new copy, which this
    /// hub registers only after `take` returned) checks its hold there: when it says
    /// yes, the copy found is the one it holds, never one registered after a take
    /// that replaced it.
    pub async fn send_staged(
        &self,
        agent: &AgentId,
        session: &str,
        env: impl Into<Box<Envelope>>,
        still_ours: impl FnOnce() -> bool,
    ) -> Result<Receipt, Error> {
        let mut env = env.into();
        env.id = tunnel_transport::next_message_id();
        let driver = self
            .session_driver(agent, session)
            .ok_or(Error::NotConnected)?;
        let fit = self
            .sender(agent)
            .map(|s| Fit::of(&s))
            .or_else(|| driver.fit());
        connection_loop::fit_payload(&mut env, fit)?;
        if !still_ours() {
            return Err(Error::NotConnected);
        }
        driver.send_staged(env)
    }

    /// Releases the staged messages of `agent`'s session `session` numbered up to
    /// `through` (see [`Hub::send_staged`]): they and what waited behind them go out,
    /// in order. Nothing happens if that is not the agent's session here.
    pub async fn release(&self, agent: &AgentId, session: &str, through: u64) {
        if let Some(reliable) = self.session_driver(agent, session) {
            reliable.release(through).await;
        }
    }

    /// Ends the hold of `agent`'s session `session` after it resumed from a store's
    /// open numbering (`SessionSnapshot::hold_resumed`): what is not staged goes out;
    /// staged messages stay staged until [`Hub::release`]. Nothing happens if there is
    /// no hold (any more), or that is not the agent's session here.
    pub async fn release_resumed(&self, agent: &AgentId, session: &str) {
        if let Some(reliable) = self.session_driver(agent, session) {
            reliable.release_resumed().await;
        }
    }

    fn session_driver(
        &self,
        agent: &AgentId,
        session: &str,
    ) -> Option<Arc<crate::delivery::Reliable>> {
        let (id, reliable) = self.inner.sessions.as_ref()?.session_of(agent)?;
        (id == session).then_some(reliable)
    }

    /// `agent`'s session on this hub, if it has one.
    pub fn session_of(&self, agent: &AgentId) -> Option<HeldSession> {
        let (id, reliable) = self.inner.sessions.as_ref()?.session_of(agent)?;
        Some(HeldSession {
            id,
            acked: reliable.acked(),
            attached: reliable.is_attached(),
            resumed_open_at: reliable.resumed_open_at(),
        })
    }

    /// Sessions held (connected agents plus those within their grace period); 0
    /// without sessions.
    pub fn sessions(&self) -> usize {
        self.inner.sessions.as_ref().map_or(0, |s| s.len())
    }

    /// Drains the hub before it goes away: stops accepting, tells every agent to move
    /// (a `close` message with code `1001` and a reconnect hint: wait at least
    /// `drain.after`, and go to `drain.endpoints` if given), keeps serving them while
    /// they finish what is in flight and close their connections, and then, at the
    /// latest after `drain.timeout`, shuts down as [`Hub::shutdown`] does.
    ///
    /// An agent that moves with everything it sent acknowledged continues its session
    /// on the next hub without a reset.
    pub async fn drain(&self, drain: Drain) {
        self.inner.accepting.cancel();
        // Connections that finished their handshake are taken in first, so that they
        // hear of the drain too.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.inner.accept_stopped.cancelled(),
        )
        .await;
        let senders: Vec<ConnectionSender> = self.read_agents().values().cloned().collect();
        tracing::info!(agents = senders.len(), "draining");
        let close = Close {
            code: CloseCode::GOING_AWAY.0,
            reason: "hub draining".into(),
            reconnect: Some(ReconnectHint {
                after_ms: Some(u64::try_from(drain.after.as_millis()).unwrap_or(u64::MAX)),
                endpoints: drain.endpoints.clone(),
            }),
        };
        for sender in senders {
            match close.to_envelope(
                sender.next_id(),
                tunnel_transport::unix_millis(),
                sender.info().format,
            ) {
                Ok(env) => {
                    if let Err(e) = sender.send(&env).await {
                        tracing::debug!(agent = %sender.info().agent, error = %e, "could not announce the drain");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not encode the drain notice"),
            }
        }
        let gone = async {
            while !self.read_agents().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(drain.timeout, gone).await.is_err() {
            tracing::warn!(
                remaining = self.read_agents().len(),
                "agents still connected at the end of the drain"
            );
        }
        self.shutdown().await;
    }

    /// Stops accepting, closes every agent's connection with `1001 going_away` (after
    /// flushing what was queued), and waits for the hub's tasks, at most the shutdown
    /// timeout (5 s).
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(self.inner.shutdown_timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("hub tasks did not finish within the shutdown timeout");
        }
    }
}

/// An agent's session on a hub (see [`Hub::session_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldSession {
    /// Its id.
    pub id: String,
    /// The highest sequence number the agent acknowledged (or reported on resuming).
    pub acked: u64,
    /// Whether a connection carries it now (its resume, if any, has been applied).
    pub attached: bool,
    /// For a session restored with an open numbering (see
    /// `SessionSnapshot::open_tail`): what the agent's resume reported having, where
    /// the numbering went on.
    pub resumed_open_at: Option<u64>,
}

async fn accept_loop(mut acceptor: Box<dyn Acceptor>, router: Router, inner: Arc<Inner>) {
    let mut stopped = false;
    loop {
        let conn = if stopped {
            // Connections whose handshake finished are still taken in (and then
            // drained like the others), not dropped with the acceptor.
            use futures_util::FutureExt as _;
            acceptor.accept().now_or_never()
        } else {
            tokio::select! {
                () = inner.accepting.cancelled() => {
                    acceptor.stop().await;
                    stopped = true;
                    continue;
                }
                conn = acceptor.accept() => Some(conn),
            }
        };
        let Some(Ok(conn)) = conn else {
            break;
        };
        let (sender, mut receiver) = conn.split();
        let agent = sender.info().agent.clone();
        let replaced = {
            let mut agents = inner.agents.write().unwrap_or_else(|e| e.into_inner());
            // Handshakes finish in any order: the connection granted later (the
            // higher lease) is the newer, whichever reaches this point first.
            if agents
                .get(&agent)
                .is_some_and(|current| current.info().session_lease > sender.info().session_lease)
            {
                drop(agents);
                tracing::info!(%agent, "an older connection arrived after a newer one: closed");
                sender.abort_with(CloseCode::SESSION_REPLACED, "a newer connection took over");
                drop(receiver);
                continue;
            }
            agents.insert(agent.clone(), sender.clone())
        };
        inner.joined.notify_waiters();
        let _ = inner.events.send(HubEvent::Connected {
            agent: agent.clone(),
            connection: sender.info().id,
        });
        if let Some(old) = replaced {
            tracing::info!(%agent, "newer connection replaces the registered one");
            if inner.sessions.is_some() {
                // The newer connection carries the session on: end the older at once
                // (anything it had not delivered is replayed on the newer).
                old.abort_with(CloseCode::SESSION_REPLACED, "a newer connection took over");
            } else {
                inner.tasks.spawn(async move {
                    old.close(CloseCode::SESSION_REPLACED, "a newer connection took over")
                        .await;
                });
            }
        }
        tracing::info!(%agent, session = %sender.info().session_id, resumed = sender.info().resumed, "agent connected");
        let mut router = router.clone();
        let inner2 = inner.clone();
        let reliable = inner
            .sessions
            .as_ref()
            .filter(|_| sender.info().has_capability(capability::RESUME))
            .and_then(|store| store.get(&sender.info().session_id));
        inner.tasks.spawn(async move {
            if let Some(reliable) = &reliable {
                let info = sender.info();
                // Boxed: a replay's futures would otherwise make every connection's task
                // larger, sessions or not.
                let attach = Box::pin(reliable.attach(sender.clone(), info.resumed, info.peer_last_received));
                let reset = attach.await;
                if reliable.carried_by(&sender)
                    && let Some(store) = &inner2.sessions
                {
                    store.set_connected(&info.session_id, true);
                }
                let restart = reset.is_err();
                if restart {
                    // The agent resumed a session this hub had to reset: its next
                    // connection starts a new one, which continues from the reset.
                    if let Some(store) = &inner2.sessions {
                        store.restart(&info.session_id);
                    }
                    // Nobody reads this connection yet: end it at once, with the code.
                    sender.abort_with(CloseCode::NORMAL, "session reset: starting a new session");
                }
                if let Some(crate::delivery::Reset { reason, carried, .. }) = reset.unwrap_or_else(Some) {
                    inner2.pending.reset(Some(&info.agent), &carried, "the session was reset");
                    if let Some(store) = &inner2.sessions {
                        store.recorder().session_reset();
                    }
                    tracing::info!(agent = %info.agent, %reason, "session reset");
                }
            }
            // Deliver only once an older connection of the same session has stopped.
            let _reader = match &reliable {
                Some(reliable) => Some(reliable.reader.lock().await),
                None => None,
            };
            let mut hint = None;
            let link = connection_loop::Link::new(
                reliable.as_ref(),
                &inner2.pending,
                &*inner2.recorder,
                false,
            );
            let end = {
                let session = connection_loop::run(&mut receiver, sender.clone(), &mut router, &mut hint, &link);
                tokio::pin!(session);
                tokio::select! {
                    end = &mut session => end,
                    () = inner2.shutdown.cancelled() => {
                        // Keep reading while closing, so the agent's close reply is seen.
                        // Boxed, as the attach: only a shutdown needs it.
                        let close = Box::pin(sender.close(CloseCode::GOING_AWAY, "hub shutting down"));
                        tokio::join!(session, close).0
                    }
                }
            };
            // Nothing more is read from this connection.
            drop(receiver);
            match end {
                SessionEnd::Closed => {
                    tracing::info!(agent = %sender.info().agent, reason = %tunnel_proto::text::Untrusted(&sender.close_reason().map(|r| r.to_string()).unwrap_or_default()), "agent disconnected");
                }
                SessionEnd::Failed(e) => {
                    tracing::info!(agent = %sender.info().agent, error = %tunnel_proto::text::Untrusted(&e.to_string()), "agent connection failed");
                }
            }
            if let Some(reliable) = &reliable
                && reliable.detach(&sender)
                && let Some(store) = &inner2.sessions
            {
                Box::pin(store.detached(&sender.info().agent, &sender.info().session_id, reliable))
                    .await;
            }
            let mut agents = inner2.agents.write().unwrap_or_else(|e| e.into_inner());
            if agents
                .get(&sender.info().agent)
                .is_some_and(|s| s.info().id == sender.info().id)
            {
                agents.remove(&sender.info().agent);
                let _ = inner2.events.send(HubEvent::Disconnected {
                    agent: sender.info().agent.clone(),
                    connection: sender.info().id,
                });
                if reliable.is_none() {
                    // Without a session, replies cannot outlive the connection.
                    inner2.pending.peer_gone(&sender.info().agent, "the connection ended before the reply");
                }
            }
        });
    }
    inner.accept_stopped.cancel();
    // Dropping the acceptor stops the listener.
}

/// A tower [`Service`](tower::Service) that sends [`Request`]s to one agent through a
/// [`Hub`] (from [`Hub::client`]).
#[derive(Debug, Clone)]
pub struct HubClient {
    hub: Hub,
    agent: AgentId,
}

impl tower::Service<Request> for HubClient {
    type Response = Response;
    type Error = Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Response, Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (hub, agent) = (self.hub.clone(), self.agent.clone());
        Box::pin(async move { hub.call(&agent, request).await })
    }
}
