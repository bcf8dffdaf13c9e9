//! The hub side: a TCP listener that upgrades, authenticates and handshakes agents.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_proto::messages::TypedMessage;
use tunnel_proto::{CloseCode, Envelope, Format};

use super::burst::{BurstReader, MessagesDone, OverCap, ReadBudget};
use super::pump::{data_message, send_close, spawn_connection};
use super::{HEADER_SYNC_TARGET, HEADER_WORKSPACE};
use crate::admission::{AcceptPace, Admission, Admitted, HandshakeSlot, Handshakes};
use crate::auth::AgentId;
use crate::config::ServerConfig;
use crate::connection::{Connection, ConnectionInfo, next_connection_id, unix_millis};
use crate::error::AcceptError;

/// Accepts agents over WebSocket.
///
/// Binding spawns an accept loop; each TCP connection is upgraded, authenticated and
/// handshaken in its own task under the handshake timeout, and only then handed to
/// [`Acceptor::accept`](crate::Acceptor::accept). Agents that fail any step never reach `accept`.
#[derive(Debug)]
pub struct WsListener {
    ready: mpsc::Receiver<Connection>,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl WsListener {
    /// Binds `addr` and starts accepting.
    pub async fn bind(addr: impl ToSocketAddrs, config: ServerConfig) -> Result<Self, AcceptError> {
        if let Some(rate) = config.accept_rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(AcceptError::Config(format!(
                "accept_rate must be a positive number of connections per second, not {rate}"
            )));
        }
        if config.max_connections == Some(0) || config.max_connections_per_workspace == Some(0) {
            return Err(AcceptError::Config(
                "a connection limit of 0 would refuse every agent".into(),
            ));
        }
        if config
            .allowed_workspaces
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            return Err(AcceptError::Config(
                "allowed_workspaces is empty: no agent could connect".into(),
            ));
        }
        // Sets up the timestamp clock now rather than on the first message.
        crate::unix_millis();
        let listener = listen(addr).await.map_err(|source| AcceptError::Bind {
            addr: "listen address".into(),
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| AcceptError::Bind {
            addr: "listen address".into(),
            source,
        })?;
        let (tx, ready) = mpsc::channel(config.accept_queue.max(1));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let listening = Listening {
            admission: Admission::new(config.max_connections, config.max_connections_per_workspace),
            handshakes: Handshakes::new(config.max_handshakes),
            pace: AcceptPace::new(config.accept_rate, Instant::now()).map(Mutex::new),
            budget: ReadBudget::new(config.read_budget),
            ready: tx,
            config,
        };
        tasks.spawn(accept_loop(
            listener,
            Arc::new(listening),
            shutdown.clone(),
            tasks.clone(),
        ));
        Ok(WsListener {
            ready,
            local_addr,
            shutdown,
            tasks,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting: closes the listening socket and abandons handshakes in progress.
    /// Established connections are not affected.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for WsListener {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[async_trait::async_trait]
impl crate::Acceptor for WsListener {
    async fn accept(&mut self) -> Result<Connection, AcceptError> {
        tokio::select! {
            // What was queued before a stop is still handed over.
            biased;
            conn = self.ready.recv() => conn.ok_or(AcceptError::Closed),
            () = self.shutdown.cancelled() => Err(AcceptError::Closed),
        }
    }

    async fn stop(&mut self) {
        // Handshake tasks queue their connection in the same poll that finishes the
        // acknowledgement (see `handshake`): once they all ended, the queue is final.
        self.shutdown().await;
    }
}

/// The listen backlog asked for: connections the kernel completes while the hub is
/// accepting yet. Linux caps it at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the first address of `addr` that works, with [`LISTEN_BACKLOG`] (tokio's
/// `TcpListener::bind` asks for 1024, which a reconnect storm overflows: the excess
/// SYNs are dropped and those agents retry only after a one-second SYN timeout).
async fn listen(addr: impl ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let bound = socket.and_then(|socket| {
            // As tokio's `TcpListener::bind` does: on Windows it would let a second
            // listener take the same port.
            #[cfg(not(windows))]
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        });
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}

/// What the accept loop shares with every connection's handshake task.
#[derive(Debug)]
struct Listening {
    config: ServerConfig,
    admission: Arc<Admission>,
    handshakes: Arc<Handshakes>,
    pace: Option<Mutex<AcceptPace>>,
    budget: ReadBudget,
    ready: mpsc::Sender<Connection>,
}

async fn accept_loop(
    listener: TcpListener,
    listening: Arc<Listening>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let mut spare = Spare::open();
    loop {
        // Waits only while every connection in progress has authenticated.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = listening.handshakes.room() => {}
        }
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Some((slot, evicted)) = listening.handshakes.register(&shutdown) else {
                    // Everyone in progress authenticated meanwhile: this one waits
                    // for nothing, it is told to come back.
                    let _ = tcp
                        .try_write(over_capacity_response(listening.config.retry_after).as_bytes());
                    continue;
                };
                if evicted {
                    listening
                        .config
                        .connection
                        .recorder
                        .handshake_failed("evicted");
                }
                let _ = tcp.set_nodelay(true);
                let listening = listening.clone();
                // The handshake is boxed so that it is freed when it ends: the task's own
                // allocation can outlive it, because the socket's registration keeps the
                // waker of the last task that read from it (this one) until the idle
                // connection is read again (heaptrack: 3.2 KB per idle connection).
                // One token stops it: evicted, or the listener shutting down.
                let stop = slot.evicted.clone();
                let handshake = Box::pin(serve(tcp, peer, listening, slot));
                tasks.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = handshake => {}
                    }
                });
            }
            Err(e) if is_out_of_descriptors(&e) => {
                // The backlog holds connections nobody can take: shed one with the
                // descriptor kept spare for this, so that agents are told at once
                // (503) instead of timing out, and existing connections go on.
                if !spare.shed(&listener, listening.config.retry_after) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                listening
                    .config
                    .connection
                    .recorder
                    .handshake_failed("out_of_descriptors");
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23) on Linux and the BSDs.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// A file descriptor held in reserve: given up to accept (and refuse) one connection
/// when the process has run out of descriptors, then taken again.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Self {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// Accepts one waiting connection with the spare descriptor, answers it `503` and
    /// closes it. Returns whether one was shed.
    fn shed(&mut self, listener: &TcpListener, retry_after: std::time::Duration) -> bool {
        use futures_util::FutureExt as _;
        if self.0.take().is_none() {
            *self = Spare::open();
            return false;
        }
        let shed = match listener.accept().now_or_never() {
            Some(Ok((tcp, _))) => {
                let response = over_capacity_response(retry_after);
                let _ = tcp.try_write(response.as_bytes());
                true
            }
            _ => false,
        };
        *self = Spare::open();
        shed
    }
}

/// `503` with `Retry-After` for a connection refused before its upgrade was read.
fn over_capacity_response(retry_after: std::time::Duration) -> String {
    let body = "the hub is at its connection limit\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        retry_after.as_secs().max(1),
        body.len()
    )
}

/// An HTTP refusal of the upgrade.
type Refusal = (StatusCode, String);

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    (status, message.into())
}

fn error_response((status, message): Refusal) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(message));
    *resp.status_mut() = status;
    resp
}

/// The value of a header that must appear at most once.
fn single_header<'a>(req: &'a Request, name: &str) -> Result<Option<&'a str>, Refusal> {
    let mut values = req.headers().get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the {name} header must appear at most once"),
        ));
    }
    first
        .map(|v| {
            v.to_str().map(str::trim).map_err(|_| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    format!("the {name} header is not visible ASCII"),
                )
            })
        })
        .transpose()
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Checks the upgrade request; on success returns the identity and codec.
fn check_upgrade(req: &Request, config: &ServerConfig) -> Result<(AgentId, Format), Refusal> {
    let format = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(Format::from_subprotocol)
        .find(|f| config.formats.contains(f))
        .ok_or_else(|| {
            let names: Vec<_> = config.formats.iter().map(|f| f.subprotocol()).collect();
            refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "Sec-WebSocket-Protocol must offer one of: {}",
                    names.join(", ")
                ),
            )
        })?;
    let token = single_header(req, header::AUTHORIZATION.as_str())?.and_then(bearer_token);
    let workspace = single_header(req, HEADER_WORKSPACE)?.filter(|s| !s.is_empty());
    let sync_target = single_header(req, HEADER_SYNC_TARGET)?.filter(|s| !s.is_empty());
    let (Some(workspace), Some(sync_target)) = (workspace, sync_target) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the {HEADER_WORKSPACE} and {HEADER_SYNC_TARGET} headers are required"),
        ));
    };
    let agent = config
        .admit(token, workspace, sync_target)
        .map_err(|(status, message)| {
            refuse(
                StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED),
                message,
            )
        })?;
    Ok((agent, format))
}

/// `503` with `Retry-After`, as an upgrade refusal.
fn over_capacity(config: &ServerConfig, message: &str) -> ErrorResponse {
    let mut refusal = error_response(refuse(StatusCode::SERVICE_UNAVAILABLE, message));
    if let Ok(value) = HeaderValue::from_str(&config.retry_after.as_secs().max(1).to_string()) {
        refusal.headers_mut().insert(header::RETRY_AFTER, value);
    }
    refusal
}

async fn serve(tcp: TcpStream, peer: SocketAddr, listening: Arc<Listening>, slot: HandshakeSlot) {
    let deadline = Instant::now() + listening.config.handshake_timeout;
    #[cfg(feature = "tls")]
    if let Some(tls) = listening.config.tls.clone() {
        // Boxed: the TLS handshake's state is large, and inline it would make every
        // connection's (plain or not) handshake task that large too.
        Box::pin(serve_tls(tcp, tls, peer, listening, slot, deadline)).await;
        return;
    }
    serve_stream(tcp, peer, listening, slot, deadline, |_: &str| true).await;
}

/// [`serve`] for a TLS listener: the TLS handshake, then the upgrade over it.
#[cfg(feature = "tls")]
async fn serve_tls(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
    listening: Arc<Listening>,
    slot: HandshakeSlot,
    deadline: Instant,
) {
    let recorder = &listening.config.connection.recorder;
    let accepted =
        tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(tls).accept(tcp)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            recorder.handshake_failed("tls");
            tracing::debug!(%peer, error = ?e.to_string(), "TLS handshake failed");
            return;
        }
        Err(_) => {
            recorder.handshake_failed("upgrade_timeout");
            return;
        }
    };
    let client_cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| cert.clone().into_owned());
    let names = move |sync_target: &str| {
        client_cert
            .as_ref()
            .is_none_or(|cert| crate::tls::certificate_names(cert, sync_target))
    };
    serve_stream(stream, peer, listening, slot, deadline, names).await;
}

/// Upgrades `stream` and runs the handshake. `identity_ok` says whether the transport's
/// own proof of identity (a TLS client certificate) allows the claimed sync target.
// The callback's error type is tungstenite's HTTP response.
#[allow(clippy::result_large_err)]
async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    listening: Arc<Listening>,
    slot: HandshakeSlot,
    deadline: Instant,
    identity_ok: impl Fn(&str) -> bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = &listening.config;
    let recorder = config.connection.recorder.clone();
    let mut upgrade: Option<(AgentId, Format, Admitted, Option<Instant>)> = None;
    // Set when the callback refused (and counted) the upgrade.
    let mut refused = false;
    let callback = |req: &Request, mut resp: Response| {
        refused = true;
        let (agent, format) = check_upgrade(req, config).map_err(|refusal| {
            tracing::debug!(%peer, status = %refusal.0, reason = ?refusal.1, "refused upgrade");
            recorder.handshake_failed(match refusal.0.as_u16() {
                401 => "unauthorized",
                403 => "forbidden",
                _ => "bad_upgrade",
            });
            error_response(refusal)
        })?;
        if !identity_ok(&agent.sync_target) {
            tracing::debug!(%peer, agent = ?agent.to_string(), "refused: the client certificate does not name the sync target");
            recorder.handshake_failed("forbidden");
            return Err(error_response(refuse(
                StatusCode::FORBIDDEN,
                "the client certificate does not name this sync target",
            )));
        }
        // Authenticated: no longer evictable, and now it may take an agent's place.
        slot.authenticated();
        let Some(mut admitted) = listening.admission.admit() else {
            tracing::debug!(%peer, "refused: connection limit reached");
            recorder.handshake_failed("over_capacity");
            return Err(over_capacity(config, "the hub is at its connection limit"));
        };
        if !listening
            .admission
            .admit_workspace(&mut admitted, &agent.workspace)
        {
            tracing::debug!(%peer, workspace = ?agent.workspace, "refused: workspace connection limit reached");
            recorder.handshake_failed("over_capacity");
            return Err(over_capacity(
                config,
                "the workspace is at its connection limit",
            ));
        }
        // Over the accept rate, the handshake waits its turn; a turn further away
        // than half the handshake timeout is not given: come back later (503).
        let mut turn = None;
        if let Some(pace) = &listening.pace {
            let now = Instant::now();
            let mut pace = pace.lock().unwrap_or_else(|e| e.into_inner());
            let at = pace.next_at(now);
            let wait = at.saturating_duration_since(now);
            if wait > config.handshake_timeout / 2 {
                drop(pace);
                recorder.handshake_failed("over_rate");
                let mut refusal =
                    over_capacity(config, "the hub is taking agents in at its accept rate");
                if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                    refusal.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return Err(refusal);
            }
            pace.accepted(at);
            turn = Some(at);
        }
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(format.subprotocol()),
        );
        upgrade = Some((agent, format, admitted, turn));
        refused = false;
        Ok(resp)
    };
    let reader = BurstReader::new(stream).cap(config.max_handshake_bytes);
    let ws = match tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(
            reader,
            callback,
            Some(config.connection.ws_config()),
        ),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            if !refused {
                recorder.handshake_failed("upgrade");
            }
            tracing::debug!(%peer, error = ?e.to_string(), "upgrade failed");
            return;
        }
        Err(_) => {
            recorder.handshake_failed("upgrade_timeout");
            tracing::debug!(%peer, "upgrade timed out");
            return;
        }
    };
    let Some((agent, format, admitted, turn)) = upgrade else {
        return;
    };
    let deadline = match turn {
        Some(at) if at > Instant::now() => {
            tokio::time::sleep_until(at).await;
            // The wait was the hub's: the agent gets a full handshake timeout after it.
            deadline.max(at + config.handshake_timeout)
        }
        _ => deadline,
    };
    match handshake(ws, peer, agent, format, &listening, deadline, admitted).await {
        Ok(()) => drop(slot),
        Err(reason) => {
            recorder.handshake_failed(reason);
        }
    }
}

/// Reads the agent's handshake and answers it. On failure the connection is closed with
/// the documented code and the failure reason (a metric label) is returned.
async fn handshake<S>(
    mut ws: WebSocketStream<BurstReader<S>>,
    peer: SocketAddr,
    agent: AgentId,
    format: Format,
    listening: &Listening,
    deadline: Instant,
    admitted: Admitted,
) -> Result<(), &'static str>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = &listening.config;
    let codec = format.codec();
    let limits = &config.connection.limits;
    let first = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                reject(
                    &mut ws,
                    format,
                    CloseCode::HANDSHAKE_TIMEOUT,
                    "no handshake within the handshake timeout",
                    None,
                )
                .await;
                return Err("handshake_timeout");
            }
            Ok(Some(Err(WsError::Io(e)))) if e.get_ref().is_some_and(|e| e.is::<OverCap>()) => {
                let reason = format!(
                    "more than {} bytes before the handshake",
                    config.max_handshake_bytes
                );
                reject(&mut ws, format, CloseCode::MESSAGE_TOO_BIG, &reason, None).await;
                return Err("handshake_too_big");
            }
            Ok(Some(Err(WsError::Capacity(e)))) => {
                reject(
                    &mut ws,
                    format,
                    CloseCode::MESSAGE_TOO_BIG,
                    &e.to_string(),
                    None,
                )
                .await;
                return Err("handshake_too_big");
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Err("closed"),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
            Ok(Some(Ok(msg @ (Message::Text(_) | Message::Binary(_))))) => break msg,
        }
    };
    let (frame, kind) = match first {
        Message::Text(t) => (bytes::Bytes::from(t), tunnel_proto::FrameKind::Text),
        Message::Binary(b) => (b, tunnel_proto::FrameKind::Binary),
        _ => return Err("closed"),
    };
    if kind != codec.frame_kind() {
        reject(
            &mut ws,
            format,
            CloseCode::UNSUPPORTED_DATA,
            "frame kind does not match the codec",
            None,
        )
        .await;
        return Err("wrong_frame_kind");
    }
    let env = match codec.decode(&frame, limits) {
        Ok(env) => env,
        Err(e) => {
            reject(&mut ws, format, e.close_code(), &e.to_string(), None).await;
            return Err("malformed");
        }
    };
    let agreed = tunnel_proto::handshake::read_hello(&env).and_then(|hello| {
        let agreed = tunnel_proto::handshake::agree(
            &hello,
            agent.authenticated(),
            config.versions,
            &config.capabilities,
            Some(env.id),
        )?;
        Ok((hello, agreed))
    });
    let (hello, agreed) = match agreed {
        Ok(agreed) => agreed,
        Err(refusal) => {
            reject(
                &mut ws,
                format,
                refusal.code,
                &refusal.reason,
                refusal.correlation,
            )
            .await;
            return Err(refusal.label);
        }
    };
    let granted = config
        .open_session(&agent, hello.resume.as_ref(), deadline)
        .await;
    let grant = match granted {
        Ok(grant) => grant,
        Err(e) => {
            tracing::warn!(%agent, error = %e, "no session could be granted");
            reject(
                &mut ws,
                format,
                CloseCode::TRY_AGAIN_LATER,
                &e.to_string(),
                Some(env.id),
            )
            .await;
            return Err("session_store");
        }
    };
    // Room in the accept queue is taken before the acknowledgement goes out, so that
    // the connection is queued in the same poll that finishes sending it, without an
    // await between: a listener stopping (a drain) either abandons a handshake whose
    // acknowledgement the agent does not have, or finds its connection queued.
    let permit = match tokio::time::timeout_at(deadline, listening.ready.reserve()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err("closed"),
        Err(_) => {
            reject(
                &mut ws,
                format,
                CloseCode::TRY_AGAIN_LATER,
                "the hub is not taking connections in",
                Some(env.id),
            )
            .await;
            return Err("accept_queue_full");
        }
    };
    let ack = agreed.ack(&grant.session_id, grant.resumed, grant.last_received);
    let reply = match ack.to_envelope(0, unix_millis(), format) {
        Ok(reply) => reply.with_correlation(env.id),
        Err(_) => return Err("internal"),
    };
    if send_envelope(&mut ws, format, &reply).await.is_err() {
        return Err("closed");
    }
    let info = ConnectionInfo {
        id: next_connection_id(),
        agent,
        session_id: grant.session_id,
        resumed: grant.resumed,
        peer_last_received: agreed.peer_last_received(grant.resumed),
        session_lease: grant.lease,
        version: agreed.version,
        capabilities: agreed.capabilities,
        format,
        peer_addr: Some(peer),
        connected_at: std::time::SystemTime::now(),
    };
    tracing::debug!(%peer, agent = ?info.agent.to_string(), session = ?info.session_id, "agent connected");
    // From now on messages of any size up to the limit, within the shared budget.
    let done = MessagesDone::default();
    let reader = ws.get_mut();
    reader.uncap();
    reader.set_budget(&listening.budget, done.clone());
    permit.send(spawn_connection(
        ws,
        info,
        &config.connection,
        Some(admitted),
        Some(done),
    ));
    Ok(())
}

pub(crate) async fn send_envelope<S>(
    ws: &mut WebSocketStream<S>,
    format: Format,
    env: &Envelope,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    format
        .codec()
        .encode(env, &mut buf)
        .map_err(|e| e.to_string())?;
    let msg = data_message(format.codec().frame_kind(), buf.into())?;
    ws.send(msg).await.map_err(|e| e.to_string())
}

/// Sends a `close` message and a close frame, then waits briefly for the peer's close.
async fn reject<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<BurstReader<S>>,
    format: Format,
    code: CloseCode,
    reason: &str,
    correlation: Option<u64>,
) {
    tracing::debug!(%code, reason = %tunnel_proto::text::Untrusted(reason), "rejecting handshake");
    let _ = send_close(ws, format, code, reason, correlation).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
