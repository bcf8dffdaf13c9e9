//! Authentication of agents during the WebSocket upgrade.

use std::fmt;

use subtle::ConstantTimeEq;

/// Who an agent is: a sync target within a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId {
    /// The workspace.
    pub workspace: String,
    /// The sync target within the workspace.
    pub sync_target: String,
}

impl AgentId {
    /// An agent id.
    pub fn new(workspace: impl Into<String>, sync_target: impl Into<String>) -> Self {
        AgentId {
            workspace: workspace.into(),
            sync_target: sync_target.into(),
        }
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.workspace, self.sync_target)
    }
}

/// What an agent presented in its upgrade request.
#[derive(Clone, Copy)]
pub struct AuthRequest<'a> {
    /// The bearer token from `Authorization`, if any.
    pub token: Option<&'a str>,
    /// The claimed identity from `X-Workspace` and `X-SyncTarget`.
    pub agent: &'a AgentId,
}

impl fmt::Debug for AuthRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("token", &self.token.map(|_| "<redacted>"))
            .field("agent", &self.agent)
            .finish()
    }
}

/// Why an agent was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential or a wrong one: HTTP 401.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A valid credential that may not claim this identity: HTTP 403.
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl AuthError {
    /// The HTTP status the upgrade is refused with.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Unauthorized(_) => 401,
            AuthError::Forbidden(_) => 403,
        }
    }
}

/// Decides whether an agent may connect. Called before the WebSocket upgrade completes,
/// so a refused agent never gets a session.
pub trait Authenticator: Send + Sync + fmt::Debug + 'static {
    /// Accepts or refuses the request.
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<(), AuthError>;
}

/// One shared bearer token for every agent, optionally restricted to some workspaces.
///
/// The token is compared in constant time.
///
/// ```
/// use tunnel_transport::{AgentId, AuthRequest, Authenticator, SharedToken};
///
/// let auth = SharedToken::new("s3cret").allow_workspaces(["root:org"]);
/// let agent = AgentId::new("root:org", "cluster-1");
/// assert!(auth.authenticate(&AuthRequest { token: Some("s3cret"), agent: &agent }).is_ok());
/// assert_eq!(auth.authenticate(&AuthRequest { token: Some("nope"), agent: &agent }).unwrap_err().status(), 401);
/// let other = AgentId::new("root:other", "cluster-1");
/// assert_eq!(auth.authenticate(&AuthRequest { token: Some("s3cret"), agent: &other }).unwrap_err().status(), 403);
/// ```
#[derive(Clone)]
pub struct SharedToken {
    token: Vec<u8>,
    workspaces: Option<Vec<String>>,
}

impl fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedToken")
            .field("token", &"<redacted>")
            .field("workspaces", &self.workspaces)
            .finish()
    }
}

impl SharedToken {
    /// Accepts any agent that presents `token`.
    pub fn new(token: impl Into<String>) -> Self {
        SharedToken {
            token: token.into().into_bytes(),
            workspaces: None,
        }
    }

    /// Restricts the identities the token may claim to these workspaces.
    pub fn allow_workspaces<I, S>(mut self, workspaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.workspaces = Some(workspaces.into_iter().map(Into::into).collect());
        self
    }
}

impl Authenticator for SharedToken {
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<(), AuthError> {
        let Some(token) = request.token else {
            return Err(AuthError::Unauthorized("missing bearer token".into()));
        };
        if !bool::from(token.as_bytes().ct_eq(&self.token)) {
            return Err(AuthError::Unauthorized("invalid token".into()));
        }
        if let Some(allowed) = &self.workspaces
            && !allowed.contains(&request.agent.workspace)
        {
            return Err(AuthError::Forbidden(format!(
                "token may not claim workspace {}",
                request.agent.workspace
            )));
        }
        Ok(())
    }
}

/// Accepts everyone. For tests and loopback demos only.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _: &AuthRequest<'_>) -> Result<(), AuthError> {
        Ok(())
    }
}
