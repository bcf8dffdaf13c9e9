//! An in-memory transport: connections over channels, for tests and embedding.
//!
//! It carries encoded frames exactly like the WebSocket transport (so codecs, limits
//! and metrics behave the same) but has no sockets, no HTTP upgrade and no keepalive
//! pings. [`listener`] returns a connector and an acceptor wired to each other;
//! [`listener_with_faults`] adds a [`Faults`] handle that cuts connections, refuses
//! new ones, stalls one direction and adds latency, for simulation tests (with
//! tokio's paused clock, every delay is simulated).

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
    let (mut connector, acceptor) = listener_with_faults(client, server, Faults::default());
    connector.faults = None;
    (connector, acceptor)
}

/// [`listener`], with its connections subject to `faults`.
pub fn listener_with_faults(
    client: ClientConfig,
    server: ServerConfig,
    faults: Faults,
) -> (MemoryConnector, MemoryAcceptor) {
    let (tx, rx) = mpsc::channel(server.accept_queue.max(1));
    (
        MemoryConnector {
            client,
            server: Arc::new(server),
            to_acceptor: tx,
            faults: Some(faults),
        },
        MemoryAcceptor { incoming: rx },
    )
}

/// A direction of the memory connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Agent to hub.
    ToHub,
    /// Hub to agent.
    ToAgent,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToHub => 0,
            Direction::ToAgent => 1,
        }
    }
}

#[derive(Debug)]
struct FaultState {
    refuse: std::sync::atomic::AtomicBool,
    /// Per direction: frames are held back (not lost) while set.
    stalled: [tokio::sync::watch::Sender<bool>; 2],
    /// Added to every frame's delivery, per direction.
    latency: [std::sync::Mutex<std::time::Duration>; 2],
    /// Both ends of every live connection, to cut them.
    live: std::sync::Mutex<Vec<(std::sync::Weak<Shared>, std::sync::Weak<Shared>)>>,
}

impl Default for FaultState {
    fn default() -> Self {
        FaultState {
            refuse: Default::default(),
            stalled: [
                tokio::sync::watch::Sender::new(false),
                tokio::sync::watch::Sender::new(false),
            ],
            latency: Default::default(),
            live: Default::default(),
        }
    }
}

/// Faults for the connections of a [`listener_with_faults`], set from a test. Clones
/// control the same connections.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<FaultState>);

impl Faults {
    /// Drops every live connection at once, both ends, as a failed network does:
    /// frames in flight are lost. Returns how many were cut.
    pub fn cut_all(&self) -> usize {
        let live = std::mem::take(&mut *self.0.live.lock().unwrap_or_else(|e| e.into_inner()));
        let mut cut = 0;
        for (agent, hub) in live {
            let ends: Vec<_> = [agent.upgrade(), hub.upgrade()]
                .into_iter()
                .flatten()
                .collect();
            if !ends.is_empty() {
                cut += 1;
            }
            for end in ends {
                end.end(crate::CloseReason::Io("connection cut".into()));
            }
        }
        cut
    }

    /// While set, new connections fail as unreachable (a partition).
    pub fn refuse(&self, refuse: bool) {
        self.0
            .refuse
            .store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// While set, frames in `direction` are held back (not lost): a one-way stall.
    pub fn stall(&self, direction: Direction, stalled: bool) {
        self.0.stalled[direction.index()].send_replace(stalled);
    }

    /// Delays every frame in `direction` by `latency` from now on.
    pub fn latency(&self, direction: Direction, latency: std::time::Duration) {
        *self.0.latency[direction.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = latency;
    }

    fn latency_of(&self, direction: Direction) -> std::time::Duration {
        *self.0.latency[direction.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, agent: &Arc<Shared>, hub: &Arc<Shared>) {
        let mut live = self.0.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(a, h)| a.strong_count() > 0 || h.strong_count() > 0);
        live.push((Arc::downgrade(agent), Arc::downgrade(hub)));
    }
}

/// The agent side of [`listener`].
#[derive(Debug, Clone)]
pub struct MemoryConnector {
    client: ClientConfig,
    server: Arc<ServerConfig>,
    to_acceptor: mpsc::Sender<Connection>,
    faults: Option<Faults>,
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
        if self
            .faults
            .as_ref()
            .is_some_and(|f| f.0.refuse.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(ConnectError::Unreachable {
                url: "memory".into(),
                reason: "refused by the fault controller".into(),
            });
        }
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
        let deadline = tokio::time::Instant::now() + server.handshake_timeout;
        let grant = server
            .open_session(&agent, hello.resume.as_ref(), deadline)
            .await
            .map_err(|e| ConnectError::Closed {
                code: tunnel_proto::CloseCode::TRY_AGAIN_LATER,
                reason: e.to_string(),
            })?;
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
        let (agent_side, hub_side) = pair(info, peers_last, client, server, self.faults.as_ref());
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

    async fn stop(&mut self) {
        // A connector's send fails from now on; what it queued before stays.
        self.incoming.close();
    }
}

fn pair(
    info: ConnectionInfo,
    (hub_received, agent_received): (Option<u64>, Option<u64>),
    client: &ClientConfig,
    server: &ServerConfig,
    faults: Option<&Faults>,
) -> (Connection, Connection) {
    let mut agent_info = info.clone();
    agent_info.id = next_connection_id();
    agent_info.peer_last_received = hub_received;
    // Leases order one hub's grants; an agent moving between hubs must not compare
    // them (as over WebSocket, where the agent never learns them).
    agent_info.session_lease = 0;
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
    if let Some(faults) = faults {
        faults.register(&agent, &hub);
    }
    let agent_frames = MemFrames::new(
        agent_rx,
        kind,
        hub.clone(),
        faults.cloned(),
        Direction::ToAgent,
    );
    let hub_frames = MemFrames::new(
        hub_rx,
        kind,
        agent.clone(),
        faults.cloned(),
        Direction::ToHub,
    );
    (
        Connection::new(agent, to_hub, Box::pin(agent_frames)),
        Connection::new(hub, to_agent, Box::pin(hub_frames)),
    )
}

/// Frames from the peer's sender, delayed and held back as the faults say; ends
/// when the peer's connection is over.
struct MemFrames {
    rx: mpsc::Receiver<Outgoing>,
    kind: FrameKind,
    peer: Arc<Shared>,
    peer_gone: Pin<Box<WaitForCancellationFutureOwned>>,
    /// `None`: frames go straight through.
    faults: Option<Faults>,
    direction: Direction,
    /// Frames taken from the peer, with when each may be delivered.
    in_flight: std::collections::VecDeque<(Incoming, tokio::time::Instant)>,
    /// Armed while the front frame is not yet due.
    due: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set while the direction is stalled: resolves when the stall lifts.
    unstall: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// A close is queued in `in_flight`: nothing more is taken from the peer.
    closing: bool,
    done: bool,
}

impl MemFrames {
    fn new(
        rx: mpsc::Receiver<Outgoing>,
        kind: FrameKind,
        peer: Arc<Shared>,
        faults: Option<Faults>,
        direction: Direction,
    ) -> Self {
        MemFrames {
            rx,
            kind,
            peer_gone: Box::pin(peer.shutdown.clone().cancelled_owned()),
            peer,
            faults,
            direction,
            in_flight: std::collections::VecDeque::new(),
            due: None,
            unstall: None,
            closing: false,
            done: false,
        }
    }

    /// The next frame that may be delivered now, if any; arms the wake-ups otherwise.
    fn poll_due(&mut self, cx: &mut Context<'_>, faults: &Faults) -> Option<Incoming> {
        let stalled = &faults.0.stalled[self.direction.index()];
        if *stalled.borrow() {
            let unstall = self.unstall.get_or_insert_with(|| {
                let mut rx = stalled.subscribe();
                Box::pin(async move {
                    let _ = rx.wait_for(|s| !*s).await;
                })
            });
            if unstall.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
        self.unstall = None;
        let (_, at) = self.in_flight.front()?;
        if *at > tokio::time::Instant::now() {
            let at = *at;
            let due = self
                .due
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            due.as_mut().reset(at);
            if due.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
        self.in_flight.pop_front().map(|(frame, _)| frame)
    }
}

impl Stream for MemFrames {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Some(faults) = self.faults.clone() else {
            return self.poll_plain(cx);
        };
        // Take everything the peer sent so far: its latency runs from now.
        let at = tokio::time::Instant::now() + faults.latency_of(self.direction);
        let mut closed = self.closing;
        while !closed {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Outgoing::Data(bytes, _))) => {
                    let kind = self.kind;
                    self.in_flight.push_back((Incoming::Data(bytes, kind), at));
                }
                Poll::Ready(Some(Outgoing::Close(code, reason))) => {
                    self.in_flight
                        .push_back((Incoming::Closed(Some((code, reason))), at));
                    closed = true;
                    self.closing = true;
                }
                Poll::Ready(None) => {
                    closed = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !closed && self.peer_gone.as_mut().poll(cx).is_ready() {
            match self.peer.final_close_frame() {
                // An orderly close: what it sent first still arrives.
                Some(frame) => {
                    self.in_flight
                        .push_back((Incoming::Closed(Some(frame)), at));
                    closed = true;
                }
                // Cut or failed: what was in flight is lost.
                None => {
                    self.in_flight.clear();
                    self.done = true;
                    return Poll::Ready(Some(Incoming::Closed(None)));
                }
            }
        }
        if closed
            && !self.closing
            && !self
                .in_flight
                .iter()
                .any(|(f, _)| matches!(f, Incoming::Closed(_)))
        {
            self.in_flight.push_back((Incoming::Closed(None), at));
        }
        self.closing = closed;
        match self.poll_due(cx, &faults) {
            Some(frame) => {
                if matches!(frame, Incoming::Closed(_)) {
                    self.done = true;
                }
                Poll::Ready(Some(frame))
            }
            None => Poll::Pending,
        }
    }
}

impl MemFrames {
    /// Without faults: straight from the peer's queue.
    fn poll_plain(&mut self, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
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
