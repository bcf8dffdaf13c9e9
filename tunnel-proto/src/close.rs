//! WebSocket close codes used by the protocol.

use std::fmt;

/// A WebSocket close code (RFC 6455 section 7.4) as used by tunnel.
///
/// Codes below 4000 are the standard ones; 4000 to 4099 are tunnel's own. A peer must
/// treat an unknown code in 4000..=4999 like [`CloseCode::PROTOCOL_ERROR`] for logging
/// and still honour the reconnect hint of the `close` message if one was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure, the session is over.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (hub shutting down or draining). Reconnect.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: protocol error (for example a message other than `handshake` first).
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: unsupported data (a binary frame on a text codec or the reverse).
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1007: a frame could not be decoded (invalid JSON or MessagePack, bad field).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy violation (limits other than size, rate limits).
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: a message exceeded `max_message_size` (before or after decompression).
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: internal error on the closing side.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1013: try again later: the hub could not decide the connection's session (its
    /// session store failed). The agent keeps its session and reconnects after its
    /// backoff, asking to resume again.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 4000: the handshake did not arrive within the handshake timeout.
    pub const HANDSHAKE_TIMEOUT: CloseCode = CloseCode(4000);
    /// 4001: a message arrived before the handshake completed.
    pub const HANDSHAKE_REQUIRED: CloseCode = CloseCode(4001);
    /// 4002: no common protocol version.
    pub const VERSION_MISMATCH: CloseCode = CloseCode(4002);
    /// 4003: the handshake payload is invalid (missing identity, identity differs
    /// from the authenticated one).
    pub const BAD_HANDSHAKE: CloseCode = CloseCode(4003);
    /// 4004: a newer connection for the same agent took over this session.
    pub const SESSION_REPLACED: CloseCode = CloseCode(4004);
    /// 4005: the peer stopped answering keepalive pings.
    pub const DEAD_PEER: CloseCode = CloseCode(4005);

    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        self.0
    }

    /// A short name for logs, or `"unknown"`.
    pub fn name(self) -> &'static str {
        match self.0 {
            1000 => "normal",
            1001 => "going_away",
            1002 => "protocol_error",
            1003 => "unsupported_data",
            1007 => "invalid_payload",
            1008 => "policy_violation",
            1009 => "message_too_big",
            1011 => "internal_error",
            1013 => "try_again_later",
            4000 => "handshake_timeout",
            4001 => "handshake_required",
            4002 => "version_mismatch",
            4003 => "bad_handshake",
            4004 => "session_replaced",
            4005 => "dead_peer",
            _ => "unknown",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}
