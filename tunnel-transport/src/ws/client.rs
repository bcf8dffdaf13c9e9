//! The agent side: dials a hub, upgrades, and performs the handshake.

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tunnel_proto::messages::{Close, Handshake, HandshakeAck, TypedMessage};
use tunnel_proto::{CloseCode, FrameKind, MessageType};

use super::burst::BurstReader;
use super::pump::spawn_connection;
use super::server::send_envelope;
use super::{HEADER_SYNC_TARGET, HEADER_WORKSPACE};
use crate::config::ClientConfig;
use crate::connection::{Connection, ConnectionInfo, next_connection_id, unix_millis};
use crate::error::ConnectError;

/// Dials hubs over WebSocket (`ws://host:port/path`).
///
/// ```no_run
/// use tunnel_transport::{AgentId, ClientConfig, Connector, WsConnector};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ClientConfig::new(AgentId::new("root:org", "cluster-1")).token(Some("s3cret".into()));
/// let mut conn = WsConnector::new(config).connect("ws://127.0.0.1:7070/").await?;
/// println!("session {}", conn.info().session_id);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WsConnector {
    config: ClientConfig,
}

impl WsConnector {
    /// A connector with these settings.
    pub fn new(config: ClientConfig) -> Self {
        // Sets up the timestamp clock now rather than on the first message.
        crate::unix_millis();
        WsConnector { config }
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }
}

fn invalid(url: &str, reason: impl Into<String>) -> ConnectError {
    ConnectError::InvalidEndpoint {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

fn header_value(url: &str, name: &str, value: &str) -> Result<HeaderValue, ConnectError> {
    HeaderValue::from_str(value)
        .map_err(|_| invalid(url, format!("{name} is not a valid header value")))
}

/// Whether `host` is a loopback name or address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[async_trait::async_trait]
impl crate::Connector for WsConnector {
    async fn connect_with(
        &self,
        url: &str,
        resume: Option<crate::Resume>,
    ) -> Result<Connection, ConnectError> {
        let config = &self.config;
        let deadline = Instant::now() + config.connect_timeout;
        let timed_out = || ConnectError::Timeout(config.connect_timeout);
        let mut request = url
            .into_client_request()
            .map_err(|e| invalid(url, e.to_string()))?;
        match request.uri().scheme_str() {
            Some("ws") => {}
            #[cfg(feature = "tls")]
            Some("wss") => {}
            #[cfg(not(feature = "tls"))]
            Some("wss") => {
                return Err(invalid(
                    url,
                    "wss:// needs TLS, which this build does not include (feature `tls`)",
                ));
            }
            other => return Err(invalid(url, format!("unsupported scheme {other:?}"))),
        }
        let host = request
            .uri()
            .host()
            .ok_or_else(|| invalid(url, "no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let secure = request.uri().scheme_str() == Some("wss");
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        if !secure && !is_loopback(&host) {
            tracing::warn!(%url, "plain ws:// to a non-loopback address: traffic and tokens are not encrypted");
        }
        let headers = request.headers_mut();
        if let Some(token) = &config.current_token() {
            headers.insert(
                header::AUTHORIZATION,
                header_value(url, "token", &format!("Bearer {token}"))?,
            );
        }
        headers.insert(
            HEADER_WORKSPACE,
            header_value(url, "workspace", &config.agent.workspace)?,
        );
        headers.insert(
            HEADER_SYNC_TARGET,
            header_value(url, "sync target", &config.agent.sync_target)?,
        );
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(config.format.subprotocol()),
        );

        let unreachable = |reason: String| ConnectError::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let peer_addr = tcp.peer_addr().ok();
        match request.uri().scheme_str() {
            #[cfg(feature = "tls")]
            Some("wss") => {
                let tls = config
                    .tls
                    .clone()
                    .ok_or_else(|| invalid(url, "wss:// needs ClientConfig::tls (trust roots)"))?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| invalid(url, format!("bad TLS server name: {e}")))?;
                let stream = tokio::time::timeout_at(
                    deadline,
                    tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
                )
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
                upgrade(stream, request, url, config, resume, deadline, peer_addr).await
            }
            _ => upgrade(tcp, request, url, config, resume, deadline, peer_addr).await,
        }
    }
}

/// Upgrades `stream` to a WebSocket and runs the protocol handshake.
async fn upgrade<S>(
    stream: S,
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    url: &str,
    config: &ClientConfig,
    resume: Option<crate::Resume>,
    deadline: Instant,
    peer_addr: Option<std::net::SocketAddr>,
) -> Result<Connection, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timed_out = || ConnectError::Timeout(config.connect_timeout);
    let unreachable = |reason: String| ConnectError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let (mut ws, response) = tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::client_async_with_config(
            request,
            BurstReader::new(stream),
            Some(config.connection.ws_config()),
        ),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(|e| match e {
        WsError::Http(resp) => ConnectError::Refused {
            status: resp.status().as_u16(),
            body: resp
                .body()
                .as_ref()
                .map(|b| {
                    let body = String::from_utf8_lossy(b);
                    tunnel_proto::text::truncate(&body, tunnel_proto::text::MAX_KEPT).to_owned()
                })
                .unwrap_or_default(),
            // Seconds only (the HTTP-date form is not used by hubs), capped at an hour.
            retry_after: resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|secs| std::time::Duration::from_secs(secs.min(3600))),
        },
        other => unreachable(other.to_string()),
    })?;
    let selected = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    if selected.and_then(tunnel_proto::Format::from_subprotocol) != Some(config.format) {
        return Err(ConnectError::NoCodec(selected.map(str::to_owned)));
    }

    let format = config.format;
    let mut hello = Handshake::new(
        config.agent.workspace.clone(),
        config.agent.sync_target.clone(),
    );
    hello.versions = config.versions;
    hello.capabilities = config.capabilities.clone();
    hello.metadata = config.metadata.clone();
    hello.resume = resume;
    let hello_env = hello
        .to_envelope(0, unix_millis(), format)
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    send_envelope(&mut ws, format, &hello_env)
        .await
        .map_err(unreachable)?;

    let codec = format.codec();
    let ack = loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(timed_out()),
            Ok(None) => {
                return Err(ConnectError::Handshake("hub closed the connection".into()));
            }
            Ok(Some(Err(e))) => return Err(unreachable(e.to_string())),
            Ok(Some(Ok(msg))) => msg,
        };
        let frame = match msg {
            Message::Text(t) if codec.frame_kind() == FrameKind::Text => bytes::Bytes::from(t),
            Message::Binary(b) if codec.frame_kind() == FrameKind::Binary => b,
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (CloseCode(u16::from(f.code)), f.reason.as_str().to_owned()))
                    .unwrap_or((CloseCode(1005), String::new()));
                return Err(ConnectError::Closed { code, reason });
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            _ => {
                return Err(ConnectError::Handshake(
                    "hub sent a frame of the wrong kind".into(),
                ));
            }
        };
        let env = codec
            .decode(&frame, &config.connection.limits)
            .map_err(|e| ConnectError::Handshake(e.to_string()))?;
        match env.kind {
            MessageType::HandshakeAck => {
                break HandshakeAck::from_envelope(&env)
                    .map_err(|e| ConnectError::Handshake(e.to_string()))?;
            }
            MessageType::Close => {
                let close = Close::from_envelope(&env)
                    .map_err(|e| ConnectError::Handshake(e.to_string()))?;
                return Err(ConnectError::Closed {
                    code: CloseCode(close.code),
                    reason: tunnel_proto::text::truncate(
                        &close.reason,
                        tunnel_proto::text::MAX_KEPT,
                    )
                    .to_owned(),
                });
            }
            other => {
                return Err(ConnectError::Handshake(format!(
                    "expected handshake_ack, got {other}"
                )));
            }
        }
    };
    let ack = tunnel_proto::handshake::check_ack(ack, &hello).map_err(ConnectError::Handshake)?;
    let info = ConnectionInfo {
        id: next_connection_id(),
        agent: config.agent.clone(),
        session_id: ack.session_id,
        resumed: ack.resumed,
        peer_last_received: ack.peer_last_received,
        session_lease: 0,
        version: ack.version,
        capabilities: ack.capabilities,
        format,
        peer_addr,
        connected_at: std::time::SystemTime::now(),
    };
    Ok(spawn_connection(ws, info, &config.connection, None, None))
}
