//! What a session promises for each message it accepts, and what it does when its
//! replay buffer is full.

use std::time::Duration;

use crate::{Envelope, MessageType, Payload};

/// The error codes of a failed `reply` (PROTOCOL.md, section 4.2).
pub mod error_code {
    /// The handler returned an error; `message` is its text.
    pub const HANDLER_ERROR: &str = "handler_error";
    /// No handler is routed for the request's type.
    pub const NO_HANDLER: &str = "no_handler";
    /// The request could not be read (for example its compressed payload was invalid or
    /// inflated past the limit).
    pub const BAD_REQUEST: &str = "bad_request";
}

/// Whether a failed reply's code says its message was refused, not handled
/// (PROTOCOL.md, section 4.2): such a message is never sent again, and its receipt
/// fails with [`Undelivered::Rejected`].
pub fn is_rejection(code: &str) -> bool {
    code == error_code::BAD_REQUEST || code == error_code::NO_HANDLER
}

/// What a message counts for in the replay buffer's byte bound: its payload and a
/// fixed 64 bytes for the envelope.
pub fn held_size(env: &Envelope) -> usize {
    64 + env.payload.as_ref().map_or(0, Payload::len)
}

/// The resource a `status` message is about (group, version, resource, namespace,
/// name), as the key [`WhenFull::KeepLatest`] conflates by; `None` for other types
/// and unreadable payloads.
pub fn conflation_key(env: &Envelope) -> Option<String> {
    if env.kind != MessageType::Status {
        return None;
    }
    let status: crate::messages::Status = env.payload.as_ref()?.decode().ok()?;
    Some(format!(
        "{}/{}/{}/{}/{}",
        status.gvr.group,
        status.gvr.version,
        status.gvr.resource,
        status.namespace.unwrap_or_default(),
        status.name
    ))
}

/// Why a message accepted by `send` was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Undelivered {
    /// The session was reset (the peer lost it, or it could not be resumed).
    #[error("session reset: {0}")]
    Reset(String),
    /// The message stayed unacknowledged longer than the replay buffer keeps messages.
    #[error("expired before the peer acknowledged it")]
    Expired,
    /// The session was shut down first.
    #[error("shut down before the peer acknowledged it")]
    ShutDown,
    /// The peer received the message but can never accept it (its payload is corrupt
    /// or too large, or nothing handles its type): it answered with this error, and
    /// the message is not sent again.
    #[error("rejected by the peer: {code}: {}", crate::text::Untrusted(message))]
    Rejected {
        /// The error code (`bad_request`, `no_handler`).
        code: String,
        /// The peer's explanation, at most 1 KiB.
        message: String,
    },
    /// The connection does not acknowledge messages (session resume was not
    /// negotiated): the message was queued, and nothing more is known.
    #[error("delivery is not tracked on this connection")]
    Untracked,
}

/// What `send` does when the replay buffer is full (or, for [`WhenFull::KeepLatest`],
/// also before it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Fail at once with a full-buffer error.
    Reject,
    /// Wait up to this long for acknowledgements to make room, then fail.
    Wait(Duration),
    /// For `status` messages, when the buffer is full: a status for a resource (group,
    /// version, resource, namespace, name) whose latest status is still waiting to be
    /// sent (not yet handed to any connection, for example while disconnected) replaces
    /// it in place instead of waiting. The replaced message's receipt resolves with the
    /// newer one's outcome. Otherwise, as [`WhenFull::Wait`] with this duration.
    KeepLatest(Duration),
}

/// What `send` does when the replay buffer is full, per message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullPolicy {
    /// For types without their own entry. Default: wait up to 5 s.
    pub default: WhenFull,
    /// Per type. Default: `status` keeps only the latest per resource
    /// ([`WhenFull::KeepLatest`], waiting up to 5 s when there is none to replace).
    pub by_type: Vec<(MessageType, WhenFull)>,
}

impl Default for FullPolicy {
    fn default() -> Self {
        let wait = Duration::from_secs(5);
        FullPolicy {
            default: WhenFull::Wait(wait),
            by_type: vec![(MessageType::Status, WhenFull::KeepLatest(wait))],
        }
    }
}

impl FullPolicy {
    /// The policy for messages of `kind`.
    pub fn for_type(&self, kind: &MessageType) -> WhenFull {
        self.by_type
            .iter()
            .find(|(k, _)| k == kind)
            .map_or(self.default, |(_, p)| *p)
    }

    /// Sets the policy for `kind`.
    pub fn set(mut self, kind: MessageType, policy: WhenFull) -> Self {
        self.by_type.retain(|(k, _)| *k != kind);
        self.by_type.push((kind, policy));
        self
    }
}
