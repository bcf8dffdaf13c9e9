//! Settings of connections, listeners and connectors.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tunnel_metrics::{NoopRecorder, Recorder};
use tunnel_proto::{Format, Limits, VersionRange, capability};

/// Settings every connection has, on both sides.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionConfig {
    /// Decoder limits; `max_message_size` also bounds WebSocket messages and frames.
    /// Default: 16 MiB messages, 64 headers.
    pub limits: Limits,
    /// How often to send a WebSocket ping. Default 15 s.
    pub ping_interval: Duration,
    /// How long past a ping interval to wait for any inbound traffic before the peer is
    /// declared dead: a peer is dead when nothing (data, ping or pong) arrived for
    /// `ping_interval + pong_timeout`; that is noticed at most half a `pong_timeout`
    /// later. Default 10 s.
    pub pong_timeout: Duration,
    /// Capacity of the outbound queue, in messages. When it is full, `send` waits up to
    /// `send_timeout` for room and `try_send` fails at once. Default 1024.
    pub outbound_queue: usize,
    /// How long `send` waits for room in a full outbound queue. Default 5 s.
    pub send_timeout: Duration,
    /// How long a graceful close may take to flush pending messages. Default 5 s.
    pub close_timeout: Duration,
    /// Read buffer per connection, allocated up front. Small keeps idle connections
    /// cheap. Default 4 KiB.
    pub read_buffer_size: usize,
    /// Outbound bytes buffered before a write to the socket (a flush always writes).
    /// Default 64 KiB.
    pub write_buffer_size: usize,
    /// Where connection metrics go. Default: nowhere.
    pub recorder: Arc<dyn Recorder>,
    /// The most a peer may send, per second, in messages and in encoded bytes (each
    /// with a burst of one second's worth). Over it the receiver stops reading from the
    /// connection until the budget refills: the peer is slowed through TCP
    /// back-pressure, and nothing it sent is dropped. Default: no limit.
    pub inbound_rate: Option<InboundRate>,
}

/// A per-connection inbound rate limit (see [`ConnectionConfig::inbound_rate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InboundRate {
    /// Messages per second.
    pub messages_per_second: f64,
    /// Encoded bytes per second.
    pub bytes_per_second: f64,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            limits: Limits::default(),
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(10),
            outbound_queue: 1024,
            send_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            read_buffer_size: 4 * 1024,
            write_buffer_size: 64 * 1024,
            recorder: Arc::new(NoopRecorder),
            inbound_rate: None,
        }
    }
}

macro_rules! setters {
    ($ty:ty { $($(#[$doc:meta])* $name:ident : $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $t) -> Self {
                    self.$name = value;
                    self
                }
            )*
        }
    };
}

setters!(ConnectionConfig {
    /// Sets [`ConnectionConfig::limits`].
    limits: Limits,
    /// Sets [`ConnectionConfig::ping_interval`].
    ping_interval: Duration,
    /// Sets [`ConnectionConfig::pong_timeout`].
    pong_timeout: Duration,
    /// Sets [`ConnectionConfig::outbound_queue`].
    outbound_queue: usize,
    /// Sets [`ConnectionConfig::send_timeout`].
    send_timeout: Duration,
    /// Sets [`ConnectionConfig::close_timeout`].
    close_timeout: Duration,
    /// Sets [`ConnectionConfig::read_buffer_size`].
    read_buffer_size: usize,
    /// Sets [`ConnectionConfig::write_buffer_size`].
    write_buffer_size: usize,
    /// Sets [`ConnectionConfig::recorder`].
    recorder: Arc<dyn Recorder>,
    /// Sets [`ConnectionConfig::inbound_rate`].
    inbound_rate: Option<InboundRate>,
});

impl ConnectionConfig {
    /// The dead-peer deadline: `ping_interval + pong_timeout`.
    pub fn dead_after(&self) -> Duration {
        self.ping_interval + self.pong_timeout
    }

    pub(crate) fn ws_config(&self) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_write_buffer_size(self.write_buffer_size + self.limits.max_message_size + 1024)
            .max_message_size(Some(self.limits.max_message_size))
            .max_frame_size(Some(self.limits.max_message_size))
    }
}

/// Settings of a hub's listener.
///
/// ```
/// use std::time::Duration;
/// use tunnel_transport::{ServerConfig, SharedToken};
///
/// let config = ServerConfig::new(SharedToken::new("s3cret"))
///     .allow_workspaces(["root:org"]) // agents of other workspaces are refused
///     .handshake_timeout(Duration::from_secs(5));
/// assert_eq!(config.allowed_workspaces, Some(vec!["root:org".to_string()]));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Per-connection settings.
    pub connection: ConnectionConfig,
    /// Decides who may connect.
    pub authenticator: Arc<dyn crate::Authenticator>,
    /// Deadline for the HTTP upgrade plus the protocol handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Protocol versions the hub speaks.
    pub versions: VersionRange,
    /// Capabilities the hub offers, in order of preference.
    pub capabilities: Vec<String>,
    /// Codecs the hub accepts. Default: both.
    pub formats: Vec<Format>,
    /// Completed connections waiting for `accept`; the handshakes of further agents wait
    /// while it is full, within their handshake timeout (then they are refused with
    /// `1013`). Default 1024.
    pub accept_queue: usize,
    /// Decides which session each connection belongs to. Default: none, every
    /// connection is a new session and `resume` is not offered.
    pub sessions: Option<Arc<dyn crate::SessionGrants>>,
    /// Most authenticated connections held at once: an agent whose upgrade
    /// authenticates over it is answered `503 Service Unavailable` with `Retry-After`.
    /// Connections that have not authenticated never take a place (they are bounded by
    /// [`ServerConfig::max_handshakes`]). Default 16,384; `None`: no limit.
    pub max_connections: Option<usize>,
    /// Most authenticated connections per workspace: `503` with `Retry-After` over it.
    /// Default: no limit.
    pub max_connections_per_workspace: Option<usize>,
    /// Most connections in their TLS handshake, HTTP upgrade or protocol handshake at
    /// once (each is also bounded by [`ServerConfig::handshake_timeout`]). At the bound a
    /// new connection evicts the oldest one that has not authenticated yet, so
    /// unauthenticated sockets can never keep an agent with a valid token out; only
    /// when all of them have authenticated does the listener wait. Default 1,024.
    pub max_handshakes: usize,
    /// Only agents of these workspaces are admitted (`403` for others), whatever the
    /// authenticator. Default: any workspace.
    pub allowed_workspaces: Option<Vec<String>>,
    /// Most bytes read from a connection before its protocol handshake completes (the
    /// HTTP upgrade request plus the `handshake` message): more closes it with `1009`.
    /// Default 64 KiB.
    pub max_handshake_bytes: usize,
    /// Bytes of partially received messages that all connections may hold together
    /// beyond 128 KiB each. A connection that needs more stops reading (TCP slows its
    /// peer) until others complete their messages; messages under 128 KiB never wait.
    /// Default 64 MiB.
    pub read_budget: usize,
    /// The `Retry-After` of a `503`. Default 5 s.
    pub retry_after: Duration,
    /// Most authenticated connections taken in per second (with one second of burst).
    /// Over it an agent's upgrade is answered and its handshake waits its turn, so
    /// after an outage agents come back at this rate however many there are;
    /// connections that do not authenticate are not counted. `None`: no limit (the
    /// default). A rate that is not positive and finite is refused by [`WsListener::bind`](crate::WsListener::bind).
    pub accept_rate: Option<f64>,
    /// TLS (`wss://`): agents must speak TLS to this listener. Default: none (`ws://`).
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("connection", &self.connection)
            .field("authenticator", &self.authenticator)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("versions", &self.versions)
            .field("capabilities", &self.capabilities)
            .field("formats", &self.formats)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_workspace",
                &self.max_connections_per_workspace,
            )
            .field("max_handshakes", &self.max_handshakes)
            .field("allowed_workspaces", &self.allowed_workspaces)
            .field("max_handshake_bytes", &self.max_handshake_bytes)
            .field("read_budget", &self.read_budget)
            .field("retry_after", &self.retry_after)
            .field("accept_rate", &self.accept_rate)
            .finish()
    }
}

impl ServerConfig {
    /// The admission rules every transport applies to a connecting agent, in order:
    /// its identity must be well formed (`400`), the authenticator must accept it
    /// (its status, `401` or `403`), and its workspace must be allowed (`403`).
    /// Refusals carry the status and a message for the agent.
    pub(crate) fn admit(
        &self,
        token: Option<&str>,
        workspace: &str,
        sync_target: &str,
    ) -> Result<crate::AgentId, (u16, String)> {
        let agent =
            crate::AgentId::parse(workspace, sync_target).map_err(|e| (400, e.to_string()))?;
        self.authenticator
            .authenticate(&crate::AuthRequest {
                token,
                agent: &agent,
            })
            .map_err(|e| (e.status(), e.to_string()))?;
        if let Some(allowed) = &self.allowed_workspaces
            && !allowed.contains(&agent.workspace)
        {
            return Err((
                403,
                format!(
                    "workspace {:?} is not admitted by this hub",
                    agent.workspace
                ),
            ));
        }
        Ok(agent)
    }

    /// The session registry's decision for `agent` (a new session without one), by
    /// `deadline` (the handshake's): a registry that does not answer in time fails.
    pub(crate) async fn open_session(
        &self,
        agent: &crate::AgentId,
        resume: Option<&crate::Resume>,
        deadline: tokio::time::Instant,
    ) -> Result<crate::SessionGrant, crate::GrantError> {
        let Some(grants) = &self.sessions else {
            return Ok(crate::SessionGrant::new_session());
        };
        tokio::time::timeout_at(deadline, grants.grant(agent, resume))
            .await
            .unwrap_or_else(|_| {
                Err(crate::GrantError(
                    "the session registry did not answer within the handshake timeout".into(),
                ))
            })
    }

    /// A listener configuration with the given authenticator and defaults otherwise.
    pub fn new(authenticator: impl crate::Authenticator) -> Self {
        ServerConfig {
            connection: ConnectionConfig::default(),
            authenticator: Arc::new(authenticator),
            handshake_timeout: Duration::from_secs(10),
            versions: VersionRange::SUPPORTED,
            capabilities: default_capabilities(),
            formats: Format::ALL.to_vec(),
            accept_queue: 1024,
            sessions: None,
            max_connections: Some(16_384),
            max_connections_per_workspace: None,
            max_handshakes: 1024,
            allowed_workspaces: None,
            max_handshake_bytes: 64 * 1024,
            read_budget: 64 * 1024 * 1024,
            retry_after: Duration::from_secs(5),
            accept_rate: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Sets [`ServerConfig::tls`] (see [`crate::tls::server_config`]).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// The URL scheme agents use for this listener: `wss` with TLS configured, else `ws`.
    pub fn scheme(&self) -> &'static str {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return "wss";
        }
        "ws"
    }

    /// Admits only agents of these workspaces ([`ServerConfig::allowed_workspaces`]).
    pub fn allow_workspaces<I, S>(mut self, workspaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_workspaces = Some(workspaces.into_iter().map(Into::into).collect());
        self
    }

    /// Grants sessions through `grants` (a hub's session registry), and offers the
    /// `resume` capability.
    pub fn sessions(mut self, grants: Arc<dyn crate::SessionGrants>) -> Self {
        self.sessions = Some(grants);
        if !self.capabilities.iter().any(|c| c == capability::RESUME) {
            self.capabilities.push(capability::RESUME.to_string());
        }
        self
    }
}

setters!(ServerConfig {
    /// Sets [`ServerConfig::connection`].
    connection: ConnectionConfig,
    /// Sets [`ServerConfig::handshake_timeout`].
    handshake_timeout: Duration,
    /// Sets [`ServerConfig::versions`].
    versions: VersionRange,
    /// Sets [`ServerConfig::capabilities`].
    capabilities: Vec<String>,
    /// Sets [`ServerConfig::formats`].
    formats: Vec<Format>,
    /// Sets [`ServerConfig::accept_queue`].
    accept_queue: usize,
    /// Sets [`ServerConfig::max_connections`].
    max_connections: Option<usize>,
    /// Sets [`ServerConfig::max_connections_per_workspace`].
    max_connections_per_workspace: Option<usize>,
    /// Sets [`ServerConfig::max_handshakes`].
    max_handshakes: usize,
    /// Sets [`ServerConfig::max_handshake_bytes`].
    max_handshake_bytes: usize,
    /// Sets [`ServerConfig::read_budget`].
    read_budget: usize,
    /// Sets [`ServerConfig::retry_after`].
    retry_after: Duration,
    /// Sets [`ServerConfig::accept_rate`].
    accept_rate: Option<f64>,
});

fn default_capabilities() -> Vec<String> {
    vec![
        capability::REPLIES.to_string(),
        capability::DEFLATE.to_string(),
        capability::TRACE_CONTEXT.to_string(),
    ]
}

/// A callback that supplies the bearer token when a connection is made.
pub type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Settings of an agent's connector.
///
/// ```
/// use std::time::Duration;
/// use tunnel_proto::Format;
/// use tunnel_transport::{AgentId, ClientConfig, WsConnector};
///
/// let config = ClientConfig::new(AgentId::new("root:org", "cluster-1"))
///     .token(Some("s3cret".into()))
///     .format(Format::Json) // text frames; MessagePack (binary) is the default
///     .connect_timeout(Duration::from_secs(5));
/// let connector = WsConnector::new(config); // hand it to `tunnel_router::Agent::start`
/// # drop(connector);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Per-connection settings.
    pub connection: ConnectionConfig,
    /// The identity to claim.
    pub agent: crate::AgentId,
    /// The bearer token, if any. Never logged.
    pub token: Option<String>,
    /// Asked for the bearer token on every connect (so a rotated token is picked up on
    /// the next reconnect); takes precedence over `token`. Default: none.
    pub token_source: Option<TokenSource>,
    /// The codec to ask for. Default MessagePack.
    pub format: Format,
    /// Deadline for TCP connect, upgrade and handshake together. Default 10 s.
    pub connect_timeout: Duration,
    /// Protocol versions the agent speaks.
    pub versions: VersionRange,
    /// Capabilities the agent offers.
    pub capabilities: Vec<String>,
    /// Metadata sent in the handshake.
    pub metadata: BTreeMap<String, String>,
    /// TLS for `wss://` URLs (see [`crate::tls::client_config`]). Default: none, and
    /// `wss://` fails with an error saying so.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// Sets [`ClientConfig::token_source`]: `source` is asked for the token on every
    /// connect.
    ///
    /// ```
    /// use std::sync::{Arc, RwLock};
    /// use tunnel_transport::{AgentId, ClientConfig};
    ///
    /// let current = Arc::new(RwLock::new("first-token".to_string()));
    /// let token = current.clone();
    /// let config = ClientConfig::new(AgentId::new("root:org", "cluster-1"))
    ///     .token_source(move || Some(token.read().unwrap().clone()));
    /// *current.write().unwrap() = "rotated-token".into(); // used from the next connect on
    /// assert_eq!(config.current_token().as_deref(), Some("rotated-token"));
    /// ```
    pub fn token_source(
        mut self,
        source: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.token_source = Some(Arc::new(source));
        self
    }

    /// Sets [`ClientConfig::tls`].
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// The token to present now: the source's answer, else `token`.
    pub fn current_token(&self) -> Option<String> {
        match &self.token_source {
            Some(source) => source(),
            None => self.token.clone(),
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("connection", &self.connection)
            .field("agent", &self.agent)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "token_source",
                &self.token_source.as_ref().map(|_| "<callback>"),
            )
            .field("format", &self.format)
            .field("connect_timeout", &self.connect_timeout)
            .field("versions", &self.versions)
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

impl ClientConfig {
    /// A connector configuration for `agent`, with defaults otherwise.
    pub fn new(agent: crate::AgentId) -> Self {
        ClientConfig {
            connection: ConnectionConfig::default(),
            agent,
            token: None,
            token_source: None,
            format: Format::MsgPack,
            connect_timeout: Duration::from_secs(10),
            versions: VersionRange::SUPPORTED,
            // Resume is used only with hubs that offer it (hubs with sessions).
            capabilities: vec![
                capability::REPLIES.to_string(),
                capability::RESUME.to_string(),
                capability::DEFLATE.to_string(),
                capability::TRACE_CONTEXT.to_string(),
            ],
            metadata: BTreeMap::new(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

setters!(ClientConfig {
    /// Sets [`ClientConfig::connection`].
    connection: ConnectionConfig,
    /// Sets [`ClientConfig::token`].
    token: Option<String>,
    /// Sets [`ClientConfig::format`].
    format: Format,
    /// Sets [`ClientConfig::connect_timeout`].
    connect_timeout: Duration,
    /// Sets [`ClientConfig::versions`].
    versions: VersionRange,
    /// Sets [`ClientConfig::capabilities`].
    capabilities: Vec<String>,
    /// Sets [`ClientConfig::metadata`].
    metadata: BTreeMap<String, String>,
});
