//! Errors of the transport layer.

use std::time::Duration;

use tunnel_proto::{CloseCode, DecodeError, EncodeError};

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// We closed it with this code and reason.
    Local(CloseCode, String),
    /// The peer closed it with this code and reason.
    Remote(CloseCode, String),
    /// The peer stopped answering keepalive pings.
    DeadPeer,
    /// The socket failed.
    Io(String),
    /// The peer broke the protocol; we closed with this code.
    Protocol(CloseCode, String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Local(code, reason) => write!(f, "closed locally with {code}: {reason}"),
            CloseReason::Remote(code, reason) => write!(f, "closed by peer with {code}: {reason}"),
            CloseReason::DeadPeer => f.write_str("peer stopped answering keepalive pings"),
            CloseReason::Io(e) => write!(f, "connection failed: {e}"),
            CloseReason::Protocol(code, reason) => {
                write!(f, "peer broke the protocol ({code}): {reason}")
            }
        }
    }
}

/// A message could not be queued for sending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed; nothing more can be sent on it.
    #[error("connection closed")]
    Closed,
    /// The outbound queue stayed full for the whole send timeout.
    #[error("outbound queue full for {0:?}")]
    Timeout(Duration),
    /// The outbound queue is full right now (from `try_send`).
    #[error("outbound queue full")]
    Full,
    /// The envelope could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// A connection failed while receiving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer sent something that does not decode; the connection was closed with
    /// [`DecodeError::close_code`].
    #[error("bad message from peer: {0}")]
    Decode(#[from] DecodeError),
    /// A frame of the wrong kind (binary on a text codec or the reverse); closed with 1003.
    #[error("peer sent a {got} frame on a {expected} connection")]
    WrongFrameKind {
        /// The kind the codec uses.
        expected: &'static str,
        /// The kind that arrived.
        got: &'static str,
    },
    /// Nothing arrived within the keepalive deadline.
    #[error("peer stopped answering keepalive pings")]
    DeadPeer,
    /// The socket failed.
    #[error("connection failed: {0}")]
    Io(String),
}

/// Dialing a hub failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The endpoint URL is not usable.
    #[error("invalid endpoint {url}: {reason}")]
    InvalidEndpoint {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TCP connect or the WebSocket upgrade failed at the network level.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The hub refused the upgrade with this HTTP status (401, 403, 400, 503...).
    #[error("hub refused the connection with HTTP {status}: {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The response body, if any.
        body: String,
        /// How long the hub asked the agent to wait (`Retry-After`, with `503`).
        retry_after: Option<std::time::Duration>,
    },
    /// The hub selected no codec or one we did not offer.
    #[error("hub selected no usable codec (subprotocol {0:?})")]
    NoCodec(Option<String>),
    /// The protocol handshake failed (timeout, close, bad reply).
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The hub closed the connection during the handshake.
    #[error("hub closed the connection during the handshake with {code}: {reason}")]
    Closed {
        /// The close code.
        code: CloseCode,
        /// The reason.
        reason: String,
    },
    /// No step finished within the connect timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::InvalidEndpoint { .. } => "invalid_endpoint",
            ConnectError::Unreachable { .. } => "unreachable",
            ConnectError::Refused { status: 401, .. } => "unauthorized",
            ConnectError::Refused { status: 403, .. } => "forbidden",
            ConnectError::Refused { .. } => "refused",
            ConnectError::NoCodec(_) => "no_codec",
            ConnectError::Handshake(_) => "handshake",
            ConnectError::Closed { .. } => "closed",
            ConnectError::Timeout(_) => "timeout",
        }
    }
}

/// Accepting connections failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The listener is shut down.
    #[error("listener closed")]
    Closed,
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A setting cannot take effect.
    #[error("invalid listener setting: {0}")]
    Config(String),
}
