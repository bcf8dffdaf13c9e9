//! The tunnel router: [`Hub`], [`Agent`], and a [`Router`] that dispatches inbound
//! messages by type to tower `Service`s.
//!
//! A [`Hub`] accepts agents (over WebSocket with [`Hub::bind`], or any transport's
//! acceptor with [`Hub::serve`]), keeps them in a registry keyed by
//! [`AgentId`](tunnel_transport::AgentId), and can send to any of them. An [`Agent`]
//! keeps one connection to a hub and redials with jittered exponential backoff when it
//! drops. On both sides, each connection's inbound messages go through a [`Router`],
//! one at a time and in order.
//!
//! # Which crate to depend on
//!
//! | you are writing | depend on |
//! |---|---|
//! | an agent or a hub in Rust (most users) | `tunnel-router`, plus `tunnel-transport` for `ClientConfig`/`ServerConfig` and `tunnel-proto` for message types |
//! | a client or server in another runtime, or your own IO | `tunnel-proto` alone: envelope, codecs, handshake rules, the session state machine |
//! | a server or client on the raw connection, without routing or sessions | `tunnel-transport` |
//! | your own reconnect loop | `tunnel-reconnect` (backoff, breaker, the `Redial` machine) |
//! | metrics export | `tunnel-metrics` (the `Recorder` trait; `otel`, `prometheus` features) |
//! | a check of a hub written in another language | `tunnel-conformance` (or `tunnel conformance`) |
//!
//! Errors: sending and calling fail with [`Error`], whose variants say what the caller
//! should do; an accepted message's [`Receipt`] resolves to `Ok` or an [`Undelivered`]
//! reason.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use tokio::sync::mpsc;
//! use tower::{BoxError, service_fn};
//! use tunnel_proto::{MessageType, messages::Command};
//! use tunnel_router::{Agent, AgentConfig, Hub, Inbound, Router};
//! use tunnel_transport::{AgentId, ClientConfig, ServerConfig, SharedToken, WsConnector};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let (tx, mut commands) = mpsc::channel(8);
//! let on_command = service_fn(move |msg: Inbound| {
//!     let tx = tx.clone();
//!     async move { tx.send(msg.envelope.decode_payload::<Command>()?).await?; Ok::<_, BoxError>(()) }
//! });
//! let hub = Hub::bind("127.0.0.1:0", ServerConfig::new(SharedToken::new("t0k3n")), Router::new()).await?;
//! let id = AgentId::new("root:org", "cluster-1");
//! let connector = WsConnector::new(ClientConfig::new(id.clone()).token(Some("t0k3n".into())));
//! let agent = Agent::start(connector, AgentConfig::new(hub.url().unwrap()),
//!     Router::new().route(MessageType::Command, on_command))?;
//! hub.wait_for_agent(&id, Duration::from_secs(5)).await?;
//!
//! hub.send(&id, MessageType::Command, &Command::new("restart")).await?;
//! assert_eq!(commands.recv().await.unwrap().name, "restart");
//! agent.shutdown().await;
//! hub.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#[cfg(feature = "admin")]
pub mod admin;
mod agent;
mod connection_loop;
mod delivery;
mod error;
mod hub;
pub mod layer;
mod pool;
mod registry;
mod request;
mod router;
mod store;

pub use agent::{
    Agent, AgentClient, AgentConfig, ConnectTimeout, ConnectionState, InvalidAgentConfig,
    ResponseFuture, SessionEvent,
};
pub use delivery::{FullPolicy, Held, Receipt, Unacked, Undelivered, WhenFull};
pub use error::{Error, Refused, Unavailable};
pub use hub::{
    AgentStatus, DEFAULT_REQUEST_TIMEOUT, Drain, HeldSession, Hub, HubClient, HubConfig, HubEvent,
};
pub use pool::{Pool, PoolClient, PoolMode, Readiness};
pub use registry::{HubSessions, SessionRegistry};
pub use request::{Request, Response, error_code};
pub use router::{AckLater, Dispatched, Handler, Inbound, IntoReply, Router};
pub use store::{MemoryStore, SessionStore, StoreError};
pub use tunnel_reconnect::Redirects;

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
