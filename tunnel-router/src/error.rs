//! The router's one error type: why a message was not sent, or a request got no usable
//! reply. What a receipt reports after a message was accepted is
//! [`Undelivered`](crate::Undelivered), not this.

use std::time::Duration;

use tunnel_proto::ErrorBody;
use tunnel_proto::session::Bound;

/// Why [`Agent::send`](crate::Agent::send), [`Agent::call`](crate::Agent::call),
/// [`Hub::send`](crate::Hub::send), [`Hub::call`](crate::Hub::call) or a client
/// [`Service`](tower::Service) failed. Each variant says what the caller should do.
///
/// ```
/// use tunnel_router::Error;
///
/// fn retry_later(e: &Error) -> bool {
///     matches!(e, Error::NotConnected | Error::Full(_) | Error::Connection(_) | Error::Timeout(_))
/// }
/// assert!(retry_later(&Error::NotConnected));
/// assert!(!retry_later(&Error::ShutDown));
/// assert_eq!(Error::NotConnected.kind(), "not_connected");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection to send on, and no session to hold the message for the next one
    /// (an agent without sessions between connections, or a hub asked to send to an
    /// agent it does not hold). Wait for the connection
    /// ([`Agent::wait_connected`](crate::Agent::wait_connected),
    /// [`Hub::wait_for_agent`](crate::Hub::wait_for_agent)) and send again.
    #[error("not connected")]
    NotConnected,
    /// The payload could not be encoded. The value (or its `Serialize`) is at fault:
    /// sending it again fails the same way.
    #[error("the payload could not be encoded: {0}")]
    Encode(#[source] tunnel_proto::EncodeError),
    /// The connection refused the message: it closed, or its outbound queue stayed
    /// full. Without a session the message is gone; send it again once reconnected.
    #[error("the connection refused the message: {0}")]
    Connection(#[source] tunnel_transport::SendError),
    /// The session's replay buffer reached this bound (the peer is slow or away longer
    /// than the buffer covers) and the message type's [`WhenFull`](crate::WhenFull)
    /// policy is to fail. Back off until earlier receipts resolve, then send again.
    #[error("replay buffer full ({0:?} bound)")]
    Full(Bound),
    /// The agent or hub is shutting down. Stop sending.
    #[error("shut down")]
    ShutDown,
    /// A request got no reply within its deadline. The peer may still have acted on it;
    /// a reply arriving later is discarded and counted. Retry only if the request is
    /// safe to repeat.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer's handler failed; its error as the reply carried it (`code` is one of
    /// [`error_code`](crate::error_code) or the peer's own). Handle it as the
    /// application's error.
    #[error("the peer answered with an error: {} ({})", .0.message, .0.code)]
    Remote(ErrorBody),
    /// The reply can no longer arrive: the connection ended without a resumable
    /// session, or the session was reset (the reason). As with a timeout, the peer may
    /// have acted on the request.
    #[error("the reply was lost: {0}")]
    Lost(String),
    /// Too many requests are waiting for replies (the bound of the pending table).
    /// Wait for some to finish.
    #[error("too many requests in flight (limit {0})")]
    TooManyInFlight(usize),
    /// The reply's payload did not decode into the type asked for: the two sides
    /// disagree on the message's shape.
    #[error("the reply did not decode: {0}")]
    BadReply(#[source] tunnel_proto::DecodeError),
    /// [`Response::decode`](crate::Response::decode) on a one-way message's response,
    /// which has no reply.
    #[error("a one-way message has no reply")]
    NoReply,
}

impl Error {
    /// A short label for metrics and logs: `not_connected`, `timeout`, `remote`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotConnected => "not_connected",
            Error::Encode(_) => "encode",
            Error::Connection(_) => "connection",
            Error::Full(_) => "full",
            Error::ShutDown => "shut_down",
            Error::Timeout(_) => "timeout",
            Error::Remote(_) => "remote",
            Error::Lost(_) => "lost",
            Error::TooManyInFlight(_) => "too_many_in_flight",
            Error::BadReply(_) => "bad_reply",
            Error::NoReply => "no_reply",
        }
    }
}

impl From<tunnel_proto::EncodeError> for Error {
    fn from(e: tunnel_proto::EncodeError) -> Self {
        Error::Encode(e)
    }
}

impl From<tunnel_transport::SendError> for Error {
    fn from(e: tunnel_transport::SendError) -> Self {
        match e {
            // An envelope that does not encode is the payload's fault, not the link's.
            tunnel_transport::SendError::Encode(e) => Error::Encode(e),
            other => Error::Connection(other),
        }
    }
}

/// What a handler returns as its error when it cannot take a message now because what
/// stands behind it is down (a hub that stores every message in NATS, say): the message
/// is not acknowledged, the connection closes with `1013 try_again_later`, and the
/// sender's session replays it on its next connection. Any other handler error counts
/// the message as handled (a failed reply for a request).
///
/// ```
/// use tower::{BoxError, service_fn};
/// use tunnel_router::{Inbound, Unavailable};
///
/// let store_down = true;
/// let handler = service_fn(move |_msg: Inbound| async move {
///     if store_down {
///         return Err::<(), BoxError>(Unavailable::new("the store is down").into());
///     }
///     Ok(())
/// });
/// # drop(handler);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unavailable: {reason}")]
pub struct Unavailable {
    reason: String,
}

impl Unavailable {
    /// Unavailable for `reason` (sent to the peer in the close frame, truncated to fit).
    pub fn new(reason: impl Into<String>) -> Self {
        Unavailable {
            reason: reason.into(),
        }
    }

    /// Why.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// What a handler returns as its error for a message it can never take, however often
/// it is sent (a hub that stores every message in NATS, one larger than NATS takes):
/// the message is refused as one this side cannot read is (PROTOCOL.md, section 4.2).
/// It counts as received, so the sender's session does not replay it; the sender gets
/// a failed reply with code `bad_request` and `reason` (its receipt fails with
/// `Undelivered::Rejected`, a request with [`Error::Remote`]), and the connection
/// stays up. For a message that can be taken later, return [`Unavailable`].
///
/// ```
/// use tower::{BoxError, service_fn};
/// use tunnel_router::{Inbound, Refused};
///
/// let handler = service_fn(|msg: Inbound| async move {
///     if msg.envelope.payload.as_ref().is_some_and(|p| p.len() > 1024) {
///         return Err::<(), BoxError>(Refused::new("larger than 1 KiB").into());
///     }
///     Ok(())
/// });
/// # drop(handler);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused: {reason}")]
pub struct Refused {
    reason: String,
}

impl Refused {
    /// Refused for `reason` (sent to the peer in the failed reply).
    pub fn new(reason: impl Into<String>) -> Self {
        Refused {
            reason: reason.into(),
        }
    }

    /// Why.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
