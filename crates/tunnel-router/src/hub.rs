//! The hub: accepts agents, keeps a registry of them, routes what they send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::ToSocketAddrs;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_proto::{CloseCode, Envelope, MessageType};
use tunnel_transport::{
    AcceptError, Acceptor, AgentId, ConnectionInfo, ConnectionSender, SendError, ServerConfig,
    WsListener,
};

use crate::router::Router;
use crate::session::{self, SessionEnd};

/// Why the hub could not send to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HubSendError {
    /// No agent with this identity is connected.
    #[error("agent {0} is not connected")]
    NotConnected(AgentId),
    /// The payload could not be encoded.
    #[error(transparent)]
    Encode(#[from] tunnel_proto::EncodeError),
    /// The connection refused the message.
    #[error(transparent)]
    Send(#[from] SendError),
}

#[derive(Debug)]
struct Inner {
    agents: RwLock<HashMap<AgentId, ConnectionSender>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    shutdown_timeout: Duration,
}

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
}

impl Hub {
    /// Listens for WebSocket agents on `addr`.
    pub async fn bind(
        addr: impl ToSocketAddrs,
        config: ServerConfig,
        router: Router,
    ) -> Result<Hub, AcceptError> {
        let listener = WsListener::bind(addr, config).await?;
        let local_addr = listener.local_addr();
        let mut hub = Hub::serve(listener, router);
        hub.local_addr = Some(local_addr);
        Ok(hub)
    }

    /// Serves agents from any transport's acceptor.
    pub fn serve(acceptor: impl Acceptor + 'static, router: Router) -> Hub {
        let inner = Arc::new(Inner {
            agents: RwLock::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            shutdown_timeout: Duration::from_secs(5),
        });
        inner
            .tasks
            .spawn(accept_loop(Box::new(acceptor), router, inner.clone()));
        Hub {
            inner,
            local_addr: None,
        }
    }

    /// The listening address, for a hub made with [`Hub::bind`].
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// `ws://<local_addr>/`, for a hub made with [`Hub::bind`].
    pub fn url(&self) -> Option<String> {
        self.local_addr.map(|a| format!("ws://{a}/"))
    }

    /// The connected agents.
    pub fn agents(&self) -> Vec<ConnectionInfo> {
        self.read_agents()
            .values()
            .map(|s| s.info().clone())
            .collect()
    }

    /// The sending handle of a connected agent.
    pub fn sender(&self, agent: &AgentId) -> Option<ConnectionSender> {
        self.read_agents().get(agent).cloned()
    }

    fn read_agents(&self) -> std::sync::RwLockReadGuard<'_, HashMap<AgentId, ConnectionSender>> {
        self.inner.agents.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a message of `kind` with `payload` to `agent`.
    pub async fn send<T: serde::Serialize + ?Sized>(
        &self,
        agent: &AgentId,
        kind: MessageType,
        payload: &T,
    ) -> Result<(), HubSendError> {
        let sender = self
            .sender(agent)
            .ok_or_else(|| HubSendError::NotConnected(agent.clone()))?;
        let env = sender.envelope(kind).with_payload(sender.payload(payload)?);
        Ok(sender.send(&env).await?)
    }

    /// Sends a prepared envelope to `agent`.
    pub async fn send_envelope(&self, agent: &AgentId, env: &Envelope) -> Result<(), HubSendError> {
        let sender = self
            .sender(agent)
            .ok_or_else(|| HubSendError::NotConnected(agent.clone()))?;
        Ok(sender.send(env).await?)
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

async fn accept_loop(mut acceptor: Box<dyn Acceptor>, router: Router, inner: Arc<Inner>) {
    loop {
        let conn = tokio::select! {
            () = inner.shutdown.cancelled() => break,
            conn = acceptor.accept() => conn,
        };
        let Ok(conn) = conn else {
            break;
        };
        let (sender, receiver) = conn.split();
        let agent = sender.info().agent.clone();
        let replaced = inner
            .agents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(agent.clone(), sender.clone());
        if let Some(old) = replaced {
            tracing::info!(%agent, "newer connection replaces the registered one");
            inner.tasks.spawn(async move {
                old.close(CloseCode::SESSION_REPLACED, "a newer connection took over")
                    .await;
            });
        }
        tracing::info!(%agent, session = %sender.info().session_id, "agent connected");
        let mut router = router.clone();
        let inner2 = inner.clone();
        inner.tasks.spawn(async move {
            let mut hint = None;
            let session = session::run(receiver, sender.clone(), &mut router, &mut hint);
            tokio::pin!(session);
            let end = tokio::select! {
                end = &mut session => end,
                () = inner2.shutdown.cancelled() => {
                    // Keep reading while closing, so the agent's close reply is seen.
                    let close = sender.close(CloseCode::GOING_AWAY, "hub shutting down");
                    tokio::join!(session, close).0
                }
            };
            match end {
                SessionEnd::Closed => {
                    tracing::info!(agent = %sender.info().agent, reason = %sender.close_reason().map(|r| r.to_string()).unwrap_or_default(), "agent disconnected");
                }
                SessionEnd::Failed(e) => {
                    tracing::info!(agent = %sender.info().agent, error = %e, "agent connection failed");
                }
            }
            let mut agents = inner2.agents.write().unwrap_or_else(|e| e.into_inner());
            if agents
                .get(&sender.info().agent)
                .is_some_and(|s| s.info().id == sender.info().id)
            {
                agents.remove(&sender.info().agent);
            }
        });
    }
    // Dropping the acceptor stops the listener.
}
