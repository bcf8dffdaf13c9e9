//! The transport layer of tunnel.
//!
//! - [`Connection`]: an established, handshaken connection to a peer, split into a
//!   cloneable [`ConnectionSender`] and a [`ConnectionReceiver`]. It is the same type
//!   whatever carries it.
//! - [`Connector`] (agent side: dial an endpoint) and [`Acceptor`] (hub side: yield
//!   authenticated connections), implemented over WebSocket ([`WsConnector`],
//!   [`WsListener`]) and in memory ([`memory`]).
//! - [`Authenticator`]: decides who may connect, before the WebSocket upgrade completes.
//!
//! # The WebSocket transport
//! The upgrade carries `Authorization: Bearer <token>`, `X-SyncTarget` and
//! `X-Workspace`; `Sec-WebSocket-Protocol` selects the codec. After the upgrade the agent
//! sends `handshake` and the hub answers `handshake_ack` with a session id (PROTOCOL.md,
//! section 5). Each connection then has one writer task, which batches queued frames
//! (feed, then flush when the queue is momentarily empty) and sends keepalive pings; the
//! read side runs in whichever task calls [`ConnectionReceiver::recv`].
//!
//! Bounds: the outbound queue holds [`ConnectionConfig::outbound_queue`] messages
//! (`send` waits up to `send_timeout` for room, `try_send` fails at once); messages and
//! frames are limited to `limits.max_message_size` (16 MiB by default); the read
//! buffer is 4 KiB so an idle connection stays small.
//!
//! # Example
//! ```
//! use tunnel_transport::{AgentId, AllowAll, Acceptor, ClientConfig, Connector, ServerConfig, WsConnector, WsListener};
//! use tunnel_proto::{CloseCode, MessageType};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut listener = WsListener::bind("127.0.0.1:0", ServerConfig::new(AllowAll)).await?;
//! let url = format!("ws://{}/", listener.local_addr());
//! let agent = WsConnector::new(ClientConfig::new(AgentId::new("root:org", "cluster-1")));
//! let (client, server) = tokio::join!(agent.connect(&url), listener.accept());
//! let (client, mut server) = (client?, server?);
//!
//! client.send(&client.sender().envelope(MessageType::Ping)).await?;
//! let got = server.recv().await?.expect("a message");
//! assert_eq!(got.kind, MessageType::Ping);
//! assert_eq!(server.info().agent, AgentId::new("root:org", "cluster-1"));
//! // Closing flushes what was queued, sends a `close` message and the close frame,
//! // and waits for the peer's close reply.
//! let read_to_end = async {
//!     let close = server.recv().await?.expect("the close message");
//!     Ok::<_, tunnel_transport::RecvError>((close.kind, server.recv().await?.is_none()))
//! };
//! let ((), end) = tokio::join!(client.close(CloseCode::NORMAL, "bye"), read_to_end);
//! assert_eq!(end?, (MessageType::Close, true));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod admission;
mod auth;
mod config;
mod connection;
mod error;
#[cfg(feature = "fault")]
pub mod fault;
mod grants;
pub mod memory;
mod rate;
#[cfg(feature = "tls")]
pub mod tls;
mod ws;

pub use auth::{
    AgentId, AllowAll, AuthError, AuthRequest, Authenticator, InvalidIdentity, MAX_IDENTITY_LEN,
    SharedToken, TokenFile, TokenFileError,
};
pub use config::{ClientConfig, ConnectionConfig, InboundRate, ServerConfig, TokenSource};
pub use connection::{
    Connection, ConnectionInfo, ConnectionReceiver, ConnectionSender, ConnectionStats,
    next_message_id, unix_millis,
};
pub use error::{AcceptError, CloseReason, ConnectError, RecvError, SendError};
pub use grants::{GrantError, SessionGrant, SessionGrants, new_session_id};
pub use tunnel_proto::messages::Resume;
pub use ws::{HEADER_SYNC_TARGET, HEADER_WORKSPACE, WsConnector, WsListener};

/// Dials an endpoint and returns an established connection (agent side).
#[async_trait::async_trait]
pub trait Connector: Send + Sync + std::fmt::Debug {
    /// Connects to `endpoint` (a URL for the WebSocket transport), performing the
    /// upgrade and the protocol handshake, for a new session.
    async fn connect(&self, endpoint: &str) -> Result<Connection, ConnectError> {
        self.connect_with(endpoint, None).await
    }

    /// Connects, asking in the handshake to resume an earlier session. Whether the hub
    /// agreed is in [`ConnectionInfo::resumed`].
    async fn connect_with(
        &self,
        endpoint: &str,
        resume: Option<Resume>,
    ) -> Result<Connection, ConnectError>;
}

/// Yields authenticated, handshaken connections (hub side).
#[async_trait::async_trait]
pub trait Acceptor: Send + std::fmt::Debug {
    /// The next connection; [`AcceptError::Closed`] once the acceptor is shut down.
    async fn accept(&mut self) -> Result<Connection, AcceptError>;

    /// Stops taking connections in, for a drain: handshakes in progress are abandoned
    /// unless their acknowledgement has gone out, and when this returns every
    /// connection an agent was told is established waits in the queue, where
    /// [`accept`](Acceptor::accept) yields it (then [`AcceptError::Closed`]). No agent
    /// is acknowledged and then dropped unheard.
    ///
    /// The default does nothing: what is queued is what was accepted.
    async fn stop(&mut self) {}
}
