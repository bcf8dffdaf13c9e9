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

pub use tunnel_proto::handshake::{InvalidIdentity, MAX_IDENTITY_LEN};

impl AgentId {
    /// An agent id.
    pub fn new(workspace: impl Into<String>, sync_target: impl Into<String>) -> Self {
        AgentId {
            workspace: workspace.into(),
            sync_target: sync_target.into(),
        }
    }

    /// An agent id claimed by a peer: each part 1 to [`MAX_IDENTITY_LEN`] bytes of
    /// visible ASCII (no spaces or control characters), so that identities are safe
    /// as log fields, metric attributes and map keys.
    ///
    /// ```
    /// use tunnel_transport::AgentId;
    /// assert!(AgentId::parse("root:org", "cluster-1").is_ok());
    /// assert!(AgentId::parse("root:org", "cluster 1").is_err());
    /// assert!(AgentId::parse("", "cluster-1").is_err());
    /// ```
    pub fn parse(workspace: &str, sync_target: &str) -> Result<Self, InvalidIdentity> {
        tunnel_proto::handshake::check_identity(workspace, sync_target)?;
        Ok(AgentId::new(workspace, sync_target))
    }

    /// The identity as the handshake rules see it.
    pub fn authenticated(&self) -> tunnel_proto::handshake::Authenticated<'_> {
        tunnel_proto::handshake::Authenticated {
            workspace: &self.workspace,
            sync_target: &self.sync_target,
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

/// A shared authenticator (for example a [`TokenFile`] the application reloads).
impl<A: Authenticator + ?Sized> Authenticator for std::sync::Arc<A> {
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<(), AuthError> {
        (**self).authenticate(request)
    }
}

/// Tokens from a file, each allowed to claim certain identities; reloadable.
///
/// The file is UTF-8 text, one grant per line: a token, a workspace, and optionally
/// the sync targets it may claim there, separated by whitespace. `*` as the workspace
/// or as a sync target matches any; no sync target means any. A token may have several
/// lines. Blank lines and lines starting with `#` are ignored.
///
/// ```text
/// # token                     workspace        sync targets
/// 5b1d0c1f5e2a4c07b0b4d0b1    root:org:team    cluster-1 cluster-2
/// 9a8e7f6d5c4b3a29184756ab    root:org:ops     *
/// ```
///
/// A request without a known token is `401`; a known token claiming an identity it
/// was not given is `403`. Tokens are compared in constant time, every grant checked.
/// [`TokenFile::reload`] swaps in the file's current contents (for example on
/// `SIGHUP`); a file that does not parse leaves the previous grants in place.
pub struct TokenFile {
    path: std::path::PathBuf,
    grants: std::sync::RwLock<std::sync::Arc<Vec<Grant>>>,
}

struct Grant {
    token: Vec<u8>,
    workspace: String,
    /// Empty: any sync target.
    sync_targets: Vec<String>,
}

impl Grant {
    fn allows(&self, agent: &AgentId) -> bool {
        (self.workspace == "*" || self.workspace == agent.workspace)
            && (self.sync_targets.is_empty()
                || self
                    .sync_targets
                    .iter()
                    .any(|t| t == "*" || *t == agent.sync_target))
    }
}

/// A token file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    /// Reading the file failed.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `token workspace [sync targets...]`, or the file grants no token
    /// (line 0).
    #[error("token file {path}, line {line}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The line number, from 1.
        line: usize,
        /// What is wrong (never the token itself).
        reason: String,
    },
}

impl fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("grants", &self.current().len())
            .finish()
    }
}

impl TokenFile {
    /// Reads the grants in `path`.
    pub fn load(path: impl Into<std::path::PathBuf>) -> Result<Self, TokenFileError> {
        let path = path.into();
        let grants = Self::read(&path)?;
        Ok(TokenFile {
            path,
            grants: std::sync::RwLock::new(std::sync::Arc::new(grants)),
        })
    }

    /// Reads the file again and uses its grants from now on; returns how many there
    /// are. On an error the previous grants stay.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let grants = Self::read(&self.path)?;
        let count = grants.len();
        *self.grants.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(grants);
        Ok(count)
    }

    fn current(&self) -> std::sync::Arc<Vec<Grant>> {
        self.grants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn read(path: &std::path::Path) -> Result<Vec<Grant>, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut grants = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(token), Some(workspace)) = (fields.next(), fields.next()) else {
                return Err(TokenFileError::Parse {
                    path: path.display().to_string(),
                    line: i + 1,
                    reason: "expected a token and a workspace".into(),
                });
            };
            grants.push(Grant {
                token: token.as_bytes().to_vec(),
                workspace: workspace.to_owned(),
                sync_targets: fields.map(str::to_owned).collect(),
            });
        }
        if grants.is_empty() {
            // Almost certainly a truncated or wrong file: it would lock every agent out.
            return Err(TokenFileError::Parse {
                path: path.display().to_string(),
                line: 0,
                reason: "the file grants no token".into(),
            });
        }
        Ok(grants)
    }
}

impl Authenticator for TokenFile {
    fn authenticate(&self, request: &AuthRequest<'_>) -> Result<(), AuthError> {
        let Some(token) = request.token else {
            return Err(AuthError::Unauthorized("missing bearer token".into()));
        };
        let grants = self.current();
        let (mut known, mut allowed) = (false, false);
        // Every grant is compared, whatever matched before: no early exit to time.
        for grant in grants.iter() {
            let same = bool::from(token.as_bytes().ct_eq(&grant.token));
            known |= same;
            allowed |= same && grant.allows(request.agent);
        }
        match (known, allowed) {
            (_, true) => Ok(()),
            (true, false) => Err(AuthError::Forbidden(format!(
                "token may not claim {}",
                request.agent
            ))),
            (false, _) => Err(AuthError::Unauthorized("invalid token".into())),
        }
    }
}

#[cfg(test)]
mod token_file_tests {
    use super::*;

    fn file(text: &str) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("tokens");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// A directory removed when dropped.
    mod tempdir {
        pub(super) struct Dir(pub(super) std::path::PathBuf);
        impl Dir {
            pub(super) fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "tunnel-tokens-{}-{}",
                    std::process::id(),
                    crate::connection::next_connection_id()
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn check(tokens: &TokenFile, token: Option<&str>, ws: &str, target: &str) -> Result<(), u16> {
        tokens
            .authenticate(&AuthRequest {
                token,
                agent: &AgentId::new(ws, target),
            })
            .map_err(|e| e.status())
    }

    #[test]
    fn grants_decide_who_may_claim_what() {
        let (_dir, path) = file(
            "# comment\n\nteam-token root:team cluster-1 cluster-2\nteam-token root:shared\nops-token * *\n",
        );
        let tokens = TokenFile::load(&path).unwrap();
        assert_eq!(
            check(&tokens, Some("team-token"), "root:team", "cluster-1"),
            Ok(())
        );
        assert_eq!(
            check(&tokens, Some("team-token"), "root:team", "cluster-9"),
            Err(403)
        );
        assert_eq!(
            check(&tokens, Some("team-token"), "root:shared", "any"),
            Ok(())
        );
        assert_eq!(
            check(&tokens, Some("team-token"), "root:other", "cluster-1"),
            Err(403)
        );
        assert_eq!(
            check(&tokens, Some("ops-token"), "anything", "goes"),
            Ok(())
        );
        assert_eq!(
            check(&tokens, Some("team-toke"), "root:team", "cluster-1"),
            Err(401)
        );
        assert_eq!(check(&tokens, None, "root:team", "cluster-1"), Err(401));
        assert!(
            !format!("{tokens:?}").contains("team-token"),
            "Debug hides tokens"
        );
    }

    #[test]
    fn reload_swaps_grants_and_keeps_them_on_a_bad_file() {
        let (_dir, path) = file("old root:team\n");
        let tokens = TokenFile::load(&path).unwrap();
        assert_eq!(check(&tokens, Some("old"), "root:team", "c"), Ok(()));
        std::fs::write(&path, "new root:team\n").unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert_eq!(check(&tokens, Some("old"), "root:team", "c"), Err(401));
        assert_eq!(check(&tokens, Some("new"), "root:team", "c"), Ok(()));
        std::fs::write(&path, "lonely-token-without-workspace\n").unwrap();
        let err = tokens.reload().unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(
            !err.to_string().contains("lonely-token"),
            "errors never show tokens"
        );
        assert_eq!(
            check(&tokens, Some("new"), "root:team", "c"),
            Ok(()),
            "kept"
        );
        // A file without grants is refused like any other bad file.
        std::fs::write(&path, "# nothing here\n\n").unwrap();
        let err = tokens.reload().unwrap_err();
        assert!(err.to_string().contains("grants no token"), "{err}");
        assert_eq!(check(&tokens, Some("new"), "root:team", "c"), Ok(()));
        assert!(TokenFile::load(&path).is_err(), "nor loaded");
    }
}
