//! The hub side: a TCP listener that upgrades, authenticates and handshakes agents.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_proto::messages::{Close, Handshake, HandshakeAck, TypedMessage};
use tunnel_proto::{
    CloseCode, Envelope, Format, MessageType, negotiate_capabilities, negotiate_version,
};

use super::burst::BurstReader;
use super::pump::{close_message, data_message, spawn_connection};
use super::{HEADER_SYNC_TARGET, HEADER_WORKSPACE};
use crate::admission::{Admission, Admitted};
use crate::auth::{AgentId, AuthRequest};
use crate::config::ServerConfig;
use crate::connection::{Connection, ConnectionInfo, next_connection_id, unix_millis};
use crate::error::AcceptError;
use crate::sessions::SessionGrant;

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
        tasks.spawn(accept_loop(
            listener,
            Arc::new(config),
            tx,
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
            conn = self.ready.recv() => conn.ok_or(AcceptError::Closed),
            () = self.shutdown.cancelled() => Err(AcceptError::Closed),
        }
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

async fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    ready: mpsc::Sender<Connection>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let admission = Admission::new(config.max_connections, config.max_connections_per_workspace);
    let mut pace = crate::admission::AcceptPace::new(config.accept_rate, Instant::now());
    loop {
        if let Some(pace) = &pace
            && let now = Instant::now()
            && let at = pace.next_at(now)
            && at > now
        {
            // Over the accept rate: leave the next connection in the backlog a while.
            // (Only then: even an elapsed timer costs a timer tick, about 1 ms.)
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(at) => {}
            }
        }
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                if let Some(pace) = &mut pace {
                    pace.accepted(Instant::now());
                }
                let Some(admitted) = admission.admit() else {
                    // Full: answer from a small fixed buffer, nothing per connection.
                    config.connection.recorder.handshake_failed("over_capacity");
                    tracing::debug!(%peer, "refused: connection limit reached");
                    tasks.spawn(over_capacity(tcp, config.retry_after));
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let config = config.clone();
                let ready = ready.clone();
                let shutdown = shutdown.clone();
                let admission = admission.clone();
                // The handshake is boxed so that it is freed when it ends: the task's own
                // allocation can outlive it, because the socket's registration keeps the
                // waker of the last task that read from it (this one) until the idle
                // connection is read again (heaptrack: 3.2 KB per idle connection).
                let handshake = Box::pin(serve(tcp, peer, config, ready, admission, admitted));
                tasks.spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = handshake => {}
                    }
                });
            }
            Err(e) => {
                // Usually out of file descriptors: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers a connection over the limit with `503` and `Retry-After`, and closes it.
async fn over_capacity(mut tcp: TcpStream, retry_after: std::time::Duration) {
    use tokio::io::AsyncWriteExt;
    let body = "the hub is at its connection limit\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        retry_after.as_secs().max(1),
        body.len()
    );
    let write = async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
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

fn header_str<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
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
    let token = header_str(req, header::AUTHORIZATION.as_str()).and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim)
    });
    let (Some(workspace), Some(sync_target)) = (
        header_str(req, HEADER_WORKSPACE).filter(|s| !s.is_empty()),
        header_str(req, HEADER_SYNC_TARGET).filter(|s| !s.is_empty()),
    ) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the {HEADER_WORKSPACE} and {HEADER_SYNC_TARGET} headers are required"),
        ));
    };
    let agent = AgentId::new(workspace, sync_target);
    config
        .authenticator
        .authenticate(&AuthRequest {
            token,
            agent: &agent,
        })
        .map_err(|e| {
            refuse(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED),
                e.to_string(),
            )
        })?;
    Ok((agent, format))
}

// The callback's error type is tungstenite's HTTP response.
#[allow(clippy::result_large_err)]
async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    ready: mpsc::Sender<Connection>,
    admission: Arc<Admission>,
    admitted: Admitted,
) {
    let deadline = Instant::now() + config.handshake_timeout;
    #[cfg(feature = "tls")]
    if let Some(tls) = config.tls.clone() {
        // Boxed: the TLS handshake's state is large, and inline it would make every
        // connection's (plain or not) handshake task that large too.
        Box::pin(serve_tls(
            tcp, tls, peer, config, ready, admission, admitted, deadline,
        ))
        .await;
        return;
    }
    serve_stream(
        tcp,
        peer,
        config,
        ready,
        admission,
        admitted,
        deadline,
        |_: &str| true,
    )
    .await;
}

/// [`serve`] for a TLS listener: the TLS handshake, then the upgrade over it.
#[cfg(feature = "tls")]
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    ready: mpsc::Sender<Connection>,
    admission: Arc<Admission>,
    admitted: Admitted,
    deadline: Instant,
) {
    let accepted =
        tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(tls).accept(tcp)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            config.connection.recorder.handshake_failed("tls");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            config
                .connection
                .recorder
                .handshake_failed("upgrade_timeout");
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
    serve_stream(
        stream, peer, config, ready, admission, admitted, deadline, names,
    )
    .await;
}

/// Upgrades `stream` and runs the handshake. `identity_ok` says whether the transport's
/// own proof of identity (a TLS client certificate) allows the claimed sync target.
#[allow(clippy::too_many_arguments, clippy::result_large_err)]
async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    ready: mpsc::Sender<Connection>,
    admission: Arc<Admission>,
    mut admitted: Admitted,
    deadline: Instant,
    identity_ok: impl Fn(&str) -> bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let recorder = config.connection.recorder.clone();
    let mut upgrade: Option<(AgentId, Format)> = None;
    let callback = |req: &Request, mut resp: Response| {
        let (agent, format) = check_upgrade(req, &config).map_err(|refusal| {
            tracing::debug!(%peer, status = %refusal.0, reason = %refusal.1, "refused upgrade");
            error_response(refusal)
        })?;
        if !identity_ok(&agent.sync_target) {
            tracing::debug!(%peer, %agent, "refused: the client certificate does not name the sync target");
            return Err(error_response(refuse(
                StatusCode::FORBIDDEN,
                "the client certificate does not name this sync target",
            )));
        }
        if !admission.admit_workspace(&mut admitted, &agent.workspace) {
            tracing::debug!(%peer, workspace = %agent.workspace, "refused: workspace connection limit reached");
            recorder.handshake_failed("over_capacity");
            let mut refusal = error_response(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the workspace is at its connection limit",
            ));
            if let Ok(value) =
                HeaderValue::from_str(&config.retry_after.as_secs().max(1).to_string())
            {
                refusal.headers_mut().insert(header::RETRY_AFTER, value);
            }
            return Err(refusal);
        }
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(format.subprotocol()),
        );
        upgrade = Some((agent, format));
        Ok(resp)
    };
    let ws = match tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(
            BurstReader::new(stream),
            callback,
            Some(config.connection.ws_config()),
        ),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            recorder.handshake_failed("upgrade");
            tracing::debug!(%peer, error = %e, "upgrade failed");
            return;
        }
        Err(_) => {
            recorder.handshake_failed("upgrade_timeout");
            tracing::debug!(%peer, "upgrade timed out");
            return;
        }
    };
    let Some((agent, format)) = upgrade else {
        return;
    };
    match handshake(ws, peer, agent, format, &config, deadline, admitted).await {
        Ok(conn) => {
            let _ = ready.send(conn).await;
        }
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
    config: &ServerConfig,
    deadline: Instant,
    admitted: Admitted,
) -> Result<Connection, &'static str>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
    if env.kind != MessageType::Handshake {
        reject(
            &mut ws,
            format,
            CloseCode::HANDSHAKE_REQUIRED,
            &format!("expected handshake, got {}", env.kind),
            None,
        )
        .await;
        return Err("handshake_required");
    }
    let hs = match Handshake::from_envelope(&env) {
        Ok(hs) => hs,
        Err(e) => {
            reject(
                &mut ws,
                format,
                CloseCode::BAD_HANDSHAKE,
                &e.to_string(),
                None,
            )
            .await;
            return Err("bad_handshake");
        }
    };
    if hs.workspace != agent.workspace || hs.sync_target != agent.sync_target {
        let reason = format!(
            "handshake claims {}/{} but the upgrade authenticated {agent}",
            hs.workspace, hs.sync_target
        );
        reject(&mut ws, format, CloseCode::BAD_HANDSHAKE, &reason, None).await;
        return Err("identity_mismatch");
    }
    let version = match negotiate_version(config.versions, hs.versions) {
        Ok(v) => v,
        Err(e) => {
            reject(
                &mut ws,
                format,
                CloseCode::VERSION_MISMATCH,
                &e.to_string(),
                Some(env.id),
            )
            .await;
            return Err("version_mismatch");
        }
    };
    let capabilities = negotiate_capabilities(&config.capabilities, &hs.capabilities);
    let grant = match &config.sessions {
        Some(store) => store.open(&agent, hs.resume.as_ref()),
        None => SessionGrant::new_session(),
    };
    let ack = HandshakeAck {
        version,
        session_id: grant.session_id.clone(),
        capabilities: capabilities.clone(),
        resumed: grant.resumed,
        last_received: grant.last_received,
    };
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
        peer_last_received: hs.resume.filter(|_| grant.resumed).map(|r| r.last_received),
        version,
        capabilities,
        format,
        peer_addr: Some(peer),
        connected_at: std::time::SystemTime::now(),
    };
    tracing::debug!(%peer, agent = %info.agent, session = %info.session_id, "agent connected");
    Ok(spawn_connection(
        ws,
        info,
        &config.connection,
        Some(admitted),
    ))
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
    tracing::debug!(%code, reason, "rejecting handshake");
    let close = Close {
        code: code.as_u16(),
        reason: reason.to_owned(),
        reconnect: None,
    };
    if let Ok(mut env) = close.to_envelope(0, unix_millis(), format) {
        env.correlation = correlation;
        let _ = send_envelope(ws, format, &env).await;
    }
    let _ = ws.send(close_message(code, reason)).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
