//! Which session a new connection belongs to: the hook a hub uses to resume sessions.

use std::fmt;

use tunnel_proto::messages::Resume;

use crate::AgentId;

/// What a [`SessionGrants`] decided for one handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionGrant {
    /// The session id sent to the agent.
    pub session_id: String,
    /// Whether the agent's earlier session continues (false: a new session; if the
    /// agent asked to resume, it must treat this as a reset).
    pub resumed: bool,
    /// When resumed: the highest sequence number the hub received in order.
    pub last_received: Option<u64>,
    /// Orders the connections granted one session: a higher lease is a later grant,
    /// and supersedes the connections of lower ones (two connections resuming one
    /// session at once never both carry it). 0 from stores that do not count.
    pub lease: u64,
}

impl SessionGrant {
    /// A new session with a fresh random id.
    pub fn new_session() -> Self {
        Self::fresh(new_session_id())
    }

    /// A new session with the given id.
    pub fn fresh(session_id: impl Into<String>) -> Self {
        SessionGrant {
            session_id: session_id.into(),
            resumed: false,
            last_received: None,
            lease: 0,
        }
    }

    /// The earlier session `session_id` continues; the hub has received up to
    /// `last_received`.
    pub fn resumed(session_id: impl Into<String>, last_received: u64) -> Self {
        SessionGrant {
            session_id: session_id.into(),
            resumed: true,
            last_received: Some(last_received),
            lease: 0,
        }
    }

    /// Sets [`SessionGrant::lease`].
    pub fn with_lease(mut self, lease: u64) -> Self {
        self.lease = lease;
        self
    }
}

/// A fresh, unguessable session id (128 random bits, hex).
pub fn new_session_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Why no session could be granted (the store behind the decision failed): the
/// handshake is refused with `1013 try_again_later`, and the agent tries again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no session could be granted: {0}")]
pub struct GrantError(pub String);

/// Decides, during each handshake, which session the connection belongs to: a hub's
/// session registry. Called with the authenticated identity and the agent's resume
/// request, if any, before the `handshake_ack` is sent; past the handshake's deadline
/// the handshake is refused with `1013` as for an error.
#[async_trait::async_trait]
pub trait SessionGrants: Send + Sync + fmt::Debug + 'static {
    /// The session for this connection.
    async fn grant(
        &self,
        agent: &AgentId,
        resume: Option<&Resume>,
    ) -> Result<SessionGrant, GrantError>;
}
