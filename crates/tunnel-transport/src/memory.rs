//! An in-memory transport: connections over channels, for tests and embedding.
//!
//! It carries encoded frames exactly like the WebSocket transport (so codecs, limits
//! and metrics behave the same) but has no sockets, no HTTP upgrade and no keepalive
//! pings. [`listener`] returns a connector and an acceptor wired to each other.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tunnel_proto::messages::Handshake;
use tunnel_proto::{FrameKind, handshake};

use crate::config::{ClientConfig, ServerConfig};
use crate::connection::{
    Connection, ConnectionInfo, Incoming, Outgoing, Shared, next_connection_id,
};
use crate::error::{AcceptError, ConnectError};

/// Creates a connected in-memory connector and acceptor.
///
/// ```
/// use tunnel_transport::{AgentId, AllowAll, ClientConfig, Connector, Acceptor, ServerConfig, memory};
///
/// # tokio_test_block_on(async {
/// let (connector, mut acceptor) = memory::listener(
///     ClientConfig::new(AgentId::new("ws", "a")),
///     ServerConfig::new(AllowAll),
/// );
/// let agent = connector.connect("memory").await.unwrap();
/// let hub = acceptor.accept().await.unwrap();
/// assert_eq!(agent.info().session_id, hub.info().session_id);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
pub fn listener(client: ClientConfig, server: ServerConfig) -> (MemoryConnector, MemoryAcceptor) {
    let (tx, rx) = mpsc::channel(server.accept_queue.max(1));
    (
        MemoryConnector {
            client,
            server: Arc::new(server),
            to_acceptor: tx,
        },
        MemoryAcceptor { incoming: rx },
    )
}

/// The agent side of [`listener`].
#[derive(Debug, Clone)]
pub struct MemoryConnector {
    client: ClientConfig,
    server: Arc<ServerConfig>,
    to_acceptor: mpsc::Sender<Connection>,
}

/// The hub side of [`listener`].
#[derive(Debug)]
pub struct MemoryAcceptor {
    incoming: mpsc::Receiver<Connection>,
}

#[async_trait::async_trait]
impl crate::Connector for MemoryConnector {
    async fn connect_with(
        &self,
        _endpoint: &str,
        resume: Option<crate::Resume>,
    ) -> Result<Connection, ConnectError> {
        let (client, server) = (&self.client, &*self.server);
        let refused = |status: u16, body: String| ConnectError::Refused {
            status,
            body,
            retry_after: None,
        };
        if !server.formats.contains(&client.format) {
            return Err(refused(400, "codec not accepted".into()));
        }
        // The same rules as a WebSocket hub's upgrade and handshake, without the
        // frames: admission, agreement, the store's decision, the agent's checks.
        let agent = server
            .admit(
                client.token.as_deref(),
                &client.agent.workspace,
                &client.agent.sync_target,
            )
            .map_err(|(status, body)| refused(status, body))?;
        let mut hello = Handshake::new(agent.workspace.clone(), agent.sync_target.clone());
        hello.versions = client.versions;
        hello.capabilities = client.capabilities.clone();
        hello.metadata = client.metadata.clone();
        hello.resume = resume;
        let agreed = handshake::agree(
            &hello,
            agent.authenticated(),
            server.versions,
            &server.capabilities,
            None,
        )
        .map_err(|refusal| ConnectError::Closed {
            code: refusal.code,
            reason: refusal.reason,
        })?;
        let grant = server.open_session(&agent, hello.resume.as_ref());
        let hub_knows = agreed.peer_last_received(grant.resumed);
        let ack = agreed.ack(&grant.session_id, grant.resumed, grant.last_received);
        let accepted = handshake::check_ack(ack, &hello).map_err(ConnectError::Handshake)?;
        // Each side learns what the other has received.
        let peers_last = (accepted.peer_last_received, hub_knows);
        let info = ConnectionInfo {
            id: 0,
            agent,
            session_id: accepted.session_id,
            resumed: accepted.resumed,
            peer_last_received: None,
            session_lease: grant.lease,
            version: accepted.version,
            capabilities: accepted.capabilities,
            format: client.format,
            peer_addr: None,
            connected_at: std::time::SystemTime::now(),
        };
        let (agent_side, hub_side) = pair(info, peers_last, client, server);
        self.to_acceptor
            .send(hub_side)
            .await
            .map_err(|_| ConnectError::Unreachable {
                url: "memory".into(),
                reason: "acceptor dropped".into(),
            })?;
        Ok(agent_side)
    }
}

#[async_trait::async_trait]
impl crate::Acceptor for MemoryAcceptor {
    async fn accept(&mut self) -> Result<Connection, AcceptError> {
        self.incoming.recv().await.ok_or(AcceptError::Closed)
    }
}

fn pair(
    info: ConnectionInfo,
    (hub_received, agent_received): (Option<u64>, Option<u64>),
    client: &ClientConfig,
    server: &ServerConfig,
) -> (Connection, Connection) {
    let mut agent_info = info.clone();
    agent_info.id = next_connection_id();
    agent_info.peer_last_received = hub_received;
    let mut hub_info = info;
    hub_info.id = next_connection_id();
    hub_info.peer_last_received = agent_received;
    let agent = Shared::new(agent_info, &client.connection);
    let hub = Shared::new(hub_info, &server.connection);
    // No writer task: frames go straight into the peer's queue.
    agent.writer_done.cancel();
    hub.writer_done.cancel();
    let (to_hub, hub_rx) = mpsc::channel(server.connection.outbound_queue.max(1));
    let (to_agent, agent_rx) = mpsc::channel(client.connection.outbound_queue.max(1));
    let kind = client.format.codec().frame_kind();
    let agent_frames = MemFrames::new(agent_rx, kind, hub.clone());
    let hub_frames = MemFrames::new(hub_rx, kind, agent.clone());
    (
        Connection::new(agent, to_hub, Box::pin(agent_frames)),
        Connection::new(hub, to_agent, Box::pin(hub_frames)),
    )
}

/// Frames from the peer's sender; ends when the peer's connection is over.
struct MemFrames {
    rx: mpsc::Receiver<Outgoing>,
    kind: FrameKind,
    peer: Arc<Shared>,
    peer_gone: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl MemFrames {
    fn new(rx: mpsc::Receiver<Outgoing>, kind: FrameKind, peer: Arc<Shared>) -> Self {
        MemFrames {
            rx,
            kind,
            peer_gone: Box::pin(peer.shutdown.clone().cancelled_owned()),
            peer,
            done: false,
        }
    }
}

impl Stream for MemFrames {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Outgoing::Data(bytes, _))) => {
                return Poll::Ready(Some(Incoming::Data(bytes, self.kind)));
            }
            Poll::Ready(Some(Outgoing::Close(code, reason))) => {
                Incoming::Closed(Some((code, reason)))
            }
            Poll::Ready(None) => Incoming::Closed(None),
            Poll::Pending => {
                if self.peer_gone.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Incoming::Closed(self.peer.final_close_frame())
            }
        };
        self.done = true;
        Poll::Ready(Some(item))
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use crate::{Acceptor, AgentId, AllowAll, ConnectionConfig, Connector, InboundRate};
    use tunnel_proto::MessageType;

    #[tokio::test(start_paused = true)]
    async fn an_inbound_rate_slows_the_reader_and_drops_nothing() {
        let limited = ConnectionConfig::default().inbound_rate(Some(InboundRate {
            messages_per_second: 100.0,
            bytes_per_second: 1e9,
        }));
        let (connector, mut acceptor) = listener(
            ClientConfig::new(AgentId::new("ws", "fast")),
            ServerConfig::new(AllowAll).connection(limited),
        );
        let agent = connector.connect("memory").await.expect("connect");
        let mut hub = acceptor.accept().await.expect("accept");
        let sender = agent.sender().clone();
        for n in 0..300u64 {
            let env = sender.envelope(MessageType::Event).with_seq(n + 1);
            sender.send(&env).await.expect("queued");
        }
        let started = tokio::time::Instant::now();
        for n in 0..300u64 {
            let env = hub.recv().await.expect("recv").expect("message");
            assert_eq!(env.seq, Some(n + 1), "in order, none dropped");
        }
        let took = started.elapsed().as_secs_f64();
        // A burst of 100, then 200 more at 100 per second.
        assert!((1.9..2.5).contains(&took), "took {took:.2} s");
    }
}
