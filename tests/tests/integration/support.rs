//! Shared helpers: hubs, agents and raw WebSocket clients on loopback.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tower::{BoxError, service_fn};
use tunnel_proto::{CloseCode, Envelope, Format, MessageType};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::{Agent, AgentConfig, Hub, Inbound, Router};
use tunnel_transport::{
    AgentId, ClientConfig, ConnectionConfig, ServerConfig, SharedToken, WsConnector,
};

pub(crate) const TOKEN: &str = "test-token";
/// Upper bound for anything that should happen "soon" on loopback.
pub(crate) const SOON: Duration = Duration::from_secs(5);

/// A router that forwards every message (any type) into a channel.
pub(crate) fn collecting_router() -> (Router, mpsc::UnboundedReceiver<Inbound>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().fallback(service_fn(move |msg: Inbound| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(msg);
            Ok::<_, BoxError>(())
        }
    }));
    (router, rx)
}

pub(crate) fn server_config() -> ServerConfig {
    ServerConfig::new(SharedToken::new(TOKEN))
}

pub(crate) async fn hub(config: ServerConfig, router: Router) -> Hub {
    Hub::bind_with(
        "127.0.0.1:0",
        config,
        router,
        tunnel_router::HubConfig::default().without_sessions(),
    )
    .await
    .expect("bind hub")
}

pub(crate) fn client_config(agent: &AgentId, format: Format) -> ClientConfig {
    ClientConfig::new(agent.clone())
        .token(Some(TOKEN.into()))
        .format(format)
}

pub(crate) fn fast_backoff() -> BackoffConfig {
    BackoffConfig::default()
        .base(Duration::from_millis(20))
        .cap(Duration::from_millis(200))
}

pub(crate) fn agent(url: &str, config: ClientConfig, router: Router) -> Agent {
    Agent::start(
        WsConnector::new(config),
        AgentConfig::new(url).backoff(fast_backoff()),
        router,
    )
    .expect("valid backoff")
}

/// Connection settings with short keepalive for tests that exercise it.
pub(crate) fn quick_keepalive() -> ConnectionConfig {
    ConnectionConfig::default()
        .ping_interval(Duration::from_millis(100))
        .pong_timeout(Duration::from_millis(200))
}

pub(crate) async fn recv_soon<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(SOON, rx.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("channel closed")
}

/// Waits until `check` holds, polling every 10 ms, at most [`SOON`].
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) type RawWs = WebSocketStream<TcpStream>;

/// Opens a raw WebSocket to the hub with the given headers (no protocol handshake); a
/// header named twice is sent twice.
pub(crate) async fn raw_upgrade(url: &str, headers: &[(&str, &str)]) -> Result<RawWs, WsError> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    let addr = req
        .uri()
        .authority()
        .expect("authority")
        .as_str()
        .to_owned();
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    Ok(tokio_tungstenite::client_async(req, tcp).await?.0)
}

/// A raw, authenticated WebSocket with the given codec, before any handshake.
pub(crate) async fn raw_client(url: &str, agent: &AgentId, format: Format) -> RawWs {
    raw_upgrade(
        url,
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("x-workspace", &agent.workspace),
            ("x-synctarget", &agent.sync_target),
            ("sec-websocket-protocol", format.subprotocol()),
        ],
    )
    .await
    .expect("upgrade")
}

/// Encodes `env` and sends it as the codec's frame kind.
pub(crate) async fn send_raw(ws: &mut RawWs, format: Format, env: &Envelope) {
    let mut buf = Vec::new();
    format.codec().encode(env, &mut buf).expect("encode");
    let msg = match format {
        Format::Json => Message::Text(String::from_utf8(buf).expect("utf8").into()),
        _ => Message::Binary(buf.into()),
    };
    ws.send(msg).await.expect("send");
}

/// Reads until the server closes; returns the close code (or `None` if the socket
/// ended without a close frame) and any `close` envelope seen first.
pub(crate) async fn read_until_close(
    ws: &mut RawWs,
    format: Format,
) -> (Option<CloseCode>, Vec<Envelope>) {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(SOON, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame.map(|f| CloseCode(u16::from(f.code))),
                Ok(Message::Text(t)) => seen.push(decode(format, bytes::Bytes::from(t))),
                Ok(Message::Binary(b)) => seen.push(decode(format, b)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("server did not close in time");
    (result, seen)
}

fn decode(format: Format, frame: bytes::Bytes) -> Envelope {
    format
        .codec()
        .decode(&frame, &Default::default())
        .expect("server sent a decodable frame")
}

/// Reads frames until a message of type `kind` arrives (skipping others, such as
/// pings), at most [`SOON`].
pub(crate) async fn recv_raw_until(ws: &mut RawWs, format: Format, kind: MessageType) -> Envelope {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} in time"));
        let env = match msg {
            Some(Ok(Message::Text(t))) => decode(format, bytes::Bytes::from(t)),
            Some(Ok(Message::Binary(b))) => decode(format, b),
            Some(Ok(_)) => continue,
            other => panic!("connection ended before a {kind}: {other:?}"),
        };
        if env.kind == kind {
            return env;
        }
    }
}

/// A handshake envelope for `agent`.
pub(crate) fn handshake(agent: &AgentId, format: Format) -> Envelope {
    use tunnel_proto::messages::{Handshake, TypedMessage};
    Handshake::new(agent.workspace.clone(), agent.sync_target.clone())
        .to_envelope(0, 1, format)
        .expect("handshake")
}

/// Sends a handshake and waits for the ack.
pub(crate) async fn raw_handshake(ws: &mut RawWs, agent: &AgentId, format: Format) {
    send_raw(ws, format, &handshake(agent, format)).await;
    loop {
        let msg = tokio::time::timeout(SOON, ws.next())
            .await
            .expect("ack in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(
                    decode(format, bytes::Bytes::from(t)).kind,
                    MessageType::HandshakeAck
                );
                return;
            }
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(decode(format, b).kind, MessageType::HandshakeAck);
                return;
            }
            Some(Ok(_)) => {}
            other => panic!("no handshake ack: {other:?}"),
        }
    }
}

/// Binds a hub again on `addr` (a restart on the same port), retrying for a moment:
/// the old listener may still be closing, and in a test process full of sockets the
/// freed port can be briefly taken.
pub(crate) async fn rebind<F, Fut>(what: &str, mut bind: F) -> Hub
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Hub, tunnel_transport::AcceptError>>,
{
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match bind().await {
            Ok(hub) => return hub,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until the hub has registered `agent` (an agent sees its handshake reply a
/// moment before the hub's accept loop registers the connection) and returns its sender.
pub(crate) async fn registered(hub: &Hub, agent: &AgentId) -> tunnel_transport::ConnectionSender {
    hub.wait_for_agent(agent, SOON)
        .await
        .expect("the hub to register the agent");
    hub.sender(agent).expect("registered")
}

/// Waits until `agent` is no longer connected (it noticed a drop).
pub(crate) async fn wait_disconnected(agent: &tunnel_router::Agent) {
    use tunnel_router::ConnectionState;
    let mut state = agent.state();
    tokio::time::timeout(
        SOON,
        state.wait_for(|s| {
            !matches!(
                s,
                ConnectionState::Connected { .. } | ConnectionState::Resumed { .. }
            )
        }),
    )
    .await
    .expect("the agent noticed")
    .expect("state");
}

/// The HTTP status of a refused upgrade (panics if it was not refused over HTTP).
pub(crate) fn status_of(result: Result<RawWs, WsError>) -> u16 {
    match result {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

/// A hub with sessions (default settings) on an ephemeral loopback port.
pub(crate) async fn resumable(router: Router) -> Hub {
    Hub::bind("127.0.0.1:0", server_config(), router)
        .await
        .expect("bind")
}

/// A resumable hub with `router` and a healthy agent `ws/healthy` registered on it: the
/// fixture of the hostile-client tests. Returns the hub, its URL, the agent and its id.
pub(crate) async fn hub_with_healthy_agent(router: Router) -> (Hub, String, Agent, AgentId) {
    hub_with_healthy_agent_config(router, server_config()).await
}

/// [`hub_with_healthy_agent`] with the hub's `config`.
pub(crate) async fn hub_with_healthy_agent_config(
    router: Router,
    config: ServerConfig,
) -> (Hub, String, Agent, AgentId) {
    let hub = Hub::bind("127.0.0.1:0", config, router)
        .await
        .expect("bind");
    let url = hub.url().expect("url");
    let healthy_id = AgentId::new("ws", "healthy");
    let healthy = agent(
        &url,
        client_config(&healthy_id, Format::MsgPack),
        Router::new(),
    );
    registered(&hub, &healthy_id).await;
    (hub, url, healthy, healthy_id)
}

/// Offers 16 KiB events to `sender` (a client that never reads) until its bounded
/// outbound queue refuses one, letting the writer move what the socket takes now and
/// then; fails the test if 100,000 are accepted. Returns how many were accepted.
pub(crate) async fn fill_until_full(sender: &tunnel_transport::ConnectionSender) -> u64 {
    let payload = tunnel_proto::Payload::msgpack(&"x".repeat(16 * 1024)).expect("payload");
    let mut accepted = 0u64;
    for _ in 0..100_000 {
        let env = sender
            .envelope(MessageType::Event)
            .with_payload(payload.clone());
        match sender.try_send(&env) {
            Ok(()) => accepted += 1,
            Err(tunnel_transport::SendError::Full) => return accepted,
            Err(e) => panic!("unexpected {e}"),
        }
        if accepted.is_multiple_of(512) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    panic!("the outbound queue is bounded: {accepted} accepted without a stop")
}
