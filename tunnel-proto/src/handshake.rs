//! The handshake's rules (PROTOCOL.md, section 3), once, for every transport and
//! both sides: what an identity may be, what the hub checks in an agent's
//! `handshake` (its type, its form, that it claims the identity that was
//! authenticated, a common version), which capabilities hold (those both offered),
//! what the `handshake_ack` says about the session, and what the agent checks in it
//! before relying on it. Which session a connection gets is the hub's session store's
//! decision; these functions carry it to both sides.
//!
//! ```
//! use tunnel_proto::handshake::{self, Authenticated};
//! use tunnel_proto::messages::Handshake;
//! use tunnel_proto::{VersionRange, capability};
//!
//! let mut hello = Handshake::new("root:org", "cluster-1");
//! hello.capabilities = vec![capability::RESUME.into(), "x-unknown".into()];
//! let who = Authenticated { workspace: "root:org", sync_target: "cluster-1" };
//! let agreed = handshake::agree(&hello, who, VersionRange::SUPPORTED, &[capability::RESUME], None)?;
//! assert_eq!(agreed.capabilities, [capability::RESUME]);
//! // The hub's store chose a new session; the agent checks the ack against its hello.
//! let ack = agreed.ack("0123abcd", false, None);
//! let accepted = handshake::check_ack(ack, &hello)?;
//! assert_eq!((accepted.session_id.as_str(), accepted.resumed), ("0123abcd", false));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::messages::{Handshake, HandshakeAck, TypedMessage};
use crate::text::{Untrusted, is_visible_ascii};
use crate::{
    CloseCode, Envelope, MessageType, VersionRange, negotiate_capabilities, negotiate_version,
};

/// Longest workspace or sync target name, in bytes (a DNS name's length).
pub const MAX_IDENTITY_LEN: usize = 253;

/// Longest session id an agent accepts from a hub, in bytes.
pub const MAX_SESSION_ID: usize = 128;

/// Whether `id` can be a session id: 1 to [`MAX_SESSION_ID`] bytes of visible ASCII,
/// what a hub grants and an agent stores. Anything else names no session.
pub fn is_session_id(id: &str) -> bool {
    is_visible_ascii(id, MAX_SESSION_ID)
}

/// A claimed identity that a hub refuses (`400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be 1 to {MAX_IDENTITY_LEN} bytes of visible ASCII (0x21-0x7E), got {shown}")]
pub struct InvalidIdentity {
    what: &'static str,
    shown: String,
}

/// Checks an agent's identity: each part 1 to [`MAX_IDENTITY_LEN`] bytes of visible
/// ASCII, so it can be a log field, a metric label and a subject token as it is.
pub fn check_identity(workspace: &str, sync_target: &str) -> Result<(), InvalidIdentity> {
    for (what, value) in [("workspace", workspace), ("sync target", sync_target)] {
        if !is_visible_ascii(value, MAX_IDENTITY_LEN) {
            return Err(InvalidIdentity {
                what,
                shown: Untrusted(value).to_string(),
            });
        }
    }
    Ok(())
}

/// The identity the transport authenticated (from the upgrade's headers, say), which
/// the handshake must repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated<'a> {
    /// The workspace.
    pub workspace: &'a str,
    /// The sync target.
    pub sync_target: &'a str,
}

/// A handshake the hub refuses: it sends a `close` message with `code` and `reason`
/// (answering `correlation`, when set) and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {}", Untrusted(reason))]
#[non_exhaustive]
pub struct Refusal {
    /// The close code.
    pub code: CloseCode,
    /// Why, for the agent.
    pub reason: String,
    /// The handshake's id, when the refusal answers it.
    pub correlation: Option<u64>,
    /// A fixed label for metrics (`handshake_required`, `bad_handshake`,
    /// `identity_mismatch`, `version_mismatch`).
    pub label: &'static str,
}

impl Refusal {
    fn new(code: CloseCode, reason: String, label: &'static str) -> Self {
        Refusal {
            code,
            reason,
            correlation: None,
            label,
        }
    }
}

/// The hub's first check: the connection's first message must be a readable
/// `handshake`.
pub fn read_hello(env: &Envelope) -> Result<Handshake, Refusal> {
    if env.kind != MessageType::Handshake {
        return Err(Refusal::new(
            CloseCode::HANDSHAKE_REQUIRED,
            format!("expected handshake, got {}", Untrusted(env.kind.as_str())),
            "handshake_required",
        ));
    }
    Handshake::from_envelope(env)
        .map_err(|e| Refusal::new(CloseCode::BAD_HANDSHAKE, e.to_string(), "bad_handshake"))
}

/// What both sides agreed on, before the session is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The protocol version: the highest both support.
    pub version: u16,
    /// The capabilities both offered, in the hub's order.
    pub capabilities: Vec<String>,
    /// What the agent reports having received, when it asked to resume.
    asked_last_received: Option<u64>,
}

/// The hub's rules for an agent's `hello`: it must claim the identity that was
/// authenticated, and share a version; the capabilities are those both offer.
/// `correlation` is the handshake's id, answered by a version refusal.
pub fn agree<S: AsRef<str>>(
    hello: &Handshake,
    authenticated: Authenticated<'_>,
    versions: VersionRange,
    capabilities: &[S],
    correlation: Option<u64>,
) -> Result<Agreed, Refusal> {
    if hello.workspace != authenticated.workspace || hello.sync_target != authenticated.sync_target
    {
        return Err(Refusal::new(
            CloseCode::BAD_HANDSHAKE,
            format!(
                "handshake claims {}/{} but the upgrade authenticated {}/{}",
                Untrusted(&hello.workspace),
                Untrusted(&hello.sync_target),
                authenticated.workspace,
                authenticated.sync_target
            ),
            "identity_mismatch",
        ));
    }
    let version = negotiate_version(versions, hello.versions).map_err(|e| Refusal {
        correlation,
        ..Refusal::new(
            CloseCode::VERSION_MISMATCH,
            e.to_string(),
            "version_mismatch",
        )
    })?;
    Ok(Agreed {
        version,
        capabilities: negotiate_capabilities(capabilities, &hello.capabilities),
        asked_last_received: hello.resume.as_ref().map(|r| r.last_received),
    })
}

impl Agreed {
    /// The `handshake_ack` for the session the hub's store chose: `session_id`,
    /// whether it `resumed` the agent's, and then what the hub received of it.
    pub fn ack(&self, session_id: &str, resumed: bool, last_received: Option<u64>) -> HandshakeAck {
        HandshakeAck {
            version: self.version,
            session_id: session_id.to_owned(),
            capabilities: self.capabilities.clone(),
            resumed,
            last_received: last_received.filter(|_| resumed),
        }
    }

    /// What the agent received of the session, as the hub relies on it: only for a
    /// resumed session.
    pub fn peer_last_received(&self, resumed: bool) -> Option<u64> {
        self.asked_last_received.filter(|_| resumed)
    }
}

/// What an agent may rely on after checking the hub's `handshake_ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The protocol version.
    pub version: u16,
    /// The session id.
    pub session_id: String,
    /// The capabilities granted, only among those the agent offered.
    pub capabilities: Vec<String>,
    /// Whether the session the agent asked for continues.
    pub resumed: bool,
    /// What the hub received of the session, when resumed.
    pub peer_last_received: Option<u64>,
}

/// The agent's rules for the hub's `ack` to its `hello`: a session id it can store and
/// send back (1 to [`MAX_SESSION_ID`] bytes of visible ASCII), a resume only of the
/// session it asked for, a version within its range; only capabilities it offered are
/// kept.
pub fn check_ack(ack: HandshakeAck, hello: &Handshake) -> Result<Accepted, String> {
    let id = &ack.session_id;
    if !is_session_id(id) {
        return Err(format!("hub sent an unusable session id {}", Untrusted(id)));
    }
    let asked = hello.resume.as_ref().map(|r| r.session_id.as_str());
    if ack.resumed && asked.is_some_and(|asked| asked != id) {
        return Err("hub resumed a session other than the one asked for".into());
    }
    if ack.resumed && asked.is_none() {
        return Err("hub says resumed but no session was asked for".into());
    }
    if !hello.versions.contains(ack.version) {
        return Err(format!(
            "hub chose protocol version {} outside our range {}",
            ack.version, hello.versions
        ));
    }
    let mut capabilities = ack.capabilities;
    capabilities.retain(|c| hello.capabilities.contains(c));
    Ok(Accepted {
        version: ack.version,
        peer_last_received: ack.last_received.filter(|_| ack.resumed),
        session_id: ack.session_id,
        capabilities,
        resumed: ack.resumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability;
    use crate::messages::Resume;

    fn who() -> Authenticated<'static> {
        Authenticated {
            workspace: "w",
            sync_target: "a",
        }
    }

    #[test]
    fn identities_are_visible_ascii_within_the_bound() {
        assert!(check_identity("root:org", "cluster-1").is_ok());
        assert!(check_identity("", "a").is_err());
        assert!(check_identity("w", "a b").is_err());
        assert!(check_identity("w", &"x".repeat(MAX_IDENTITY_LEN + 1)).is_err());
        let e = check_identity("w", "\u{1b}[31m").expect_err("refused");
        assert!(!e.to_string().contains('\u{1b}'), "escaped: {e}");
    }

    #[test]
    fn the_first_message_must_be_a_readable_handshake() {
        let ping = Envelope::new(1, MessageType::Ping, 0);
        assert_eq!(
            read_hello(&ping).map_err(|r| (r.code, r.label)),
            Err((CloseCode::HANDSHAKE_REQUIRED, "handshake_required"))
        );
        let empty = Envelope::new(1, MessageType::Handshake, 0);
        assert_eq!(
            read_hello(&empty).map_err(|r| r.label),
            Err("bad_handshake")
        );
        let hello = Handshake::new("w", "a")
            .to_envelope(1, 0, crate::Format::Json)
            .expect("encodes");
        assert_eq!(read_hello(&hello).map(|h| h.sync_target), Ok("a".into()));
    }

    #[test]
    fn the_hub_agrees_only_with_the_authenticated_identity_and_a_common_version() {
        let hello = Handshake::new("w", "other");
        let refused = agree(
            &hello,
            who(),
            VersionRange::SUPPORTED,
            &[] as &[&str],
            Some(7),
        )
        .expect_err("mismatch");
        assert_eq!(
            (refused.code, refused.label),
            (CloseCode::BAD_HANDSHAKE, "identity_mismatch")
        );
        let mut hello = Handshake::new("w", "a");
        hello.versions = VersionRange { min: 9, max: 9 };
        let refused = agree(
            &hello,
            who(),
            VersionRange::SUPPORTED,
            &[] as &[&str],
            Some(7),
        )
        .expect_err("no common version");
        assert_eq!(
            (refused.code, refused.correlation),
            (CloseCode::VERSION_MISMATCH, Some(7))
        );
        let mut hello = Handshake::new("w", "a");
        hello.capabilities = vec!["b".into(), capability::RESUME.into()];
        let agreed = agree(
            &hello,
            who(),
            VersionRange::SUPPORTED,
            &[capability::RESUME, "c"],
            None,
        )
        .expect("agrees");
        assert_eq!(agreed.capabilities, [capability::RESUME]);
    }

    #[test]
    fn the_ack_carries_the_session_decision_to_both_sides() {
        let mut hello = Handshake::new("w", "a");
        hello.resume = Some(Resume {
            session_id: "s1".into(),
            last_received: 41,
        });
        let agreed =
            agree(&hello, who(), VersionRange::SUPPORTED, &[] as &[&str], None).expect("agrees");
        // Resumed: each side learns what the other received.
        assert_eq!(agreed.peer_last_received(true), Some(41));
        let ack = agreed.ack("s1", true, Some(9));
        assert_eq!(
            check_ack(ack, &hello).map(|a| a.peer_last_received),
            Ok(Some(9))
        );
        // Not resumed: neither position counts.
        assert_eq!(agreed.peer_last_received(false), None);
        assert_eq!(agreed.ack("s2", false, Some(9)).last_received, None);
    }

    #[test]
    fn the_agent_checks_what_the_hub_says_before_relying_on_it() {
        let mut hello = Handshake::new("w", "a");
        hello.capabilities = vec![capability::RESUME.into()];
        let ack = |id: &str, resumed: bool| HandshakeAck {
            version: 1,
            session_id: id.into(),
            capabilities: vec![capability::RESUME.into(), "never-offered".into()],
            resumed,
            last_received: None,
        };
        assert!(check_ack(ack("", false), &hello).is_err());
        assert!(check_ack(ack(&"x".repeat(MAX_SESSION_ID + 1), false), &hello).is_err());
        assert!(
            check_ack(ack("s", true), &hello).is_err(),
            "resumed unasked"
        );
        hello.resume = Some(Resume {
            session_id: "s".into(),
            last_received: 0,
        });
        assert!(
            check_ack(ack("t", true), &hello).is_err(),
            "another session"
        );
        let accepted = check_ack(ack("s", true), &hello).expect("accepted");
        assert_eq!(
            accepted.capabilities,
            [capability::RESUME],
            "only what was offered"
        );
        let mut outside = ack("s", false);
        outside.version = 99;
        assert!(check_ack(outside, &hello).is_err());
    }
}
