//! The NATS subjects, streams, buckets and headers of a tunnel cluster, as PROTOCOL.md
//! §11 specifies them: the one place their names are spelled.
//!
//! A subject token (and a KV key part) holds an agent's workspace, its sync target or
//! a message type, escaped ([`escape`]) so that it is valid in both: every byte but
//! ASCII letters, digits, `-`, `_` and `/` becomes `=XX` (what NATS gives a meaning,
//! `.` `*` `>` and whitespace, and what KV keys refuse, such as `:`). Escaping is
//! reversible ([`unescape`]) and one-to-one: two identities never share a subject.

use std::fmt::Write as _;

use tunnel_transport::AgentId;

/// The first tokens of every subject: the scheme's version.
pub const PREFIX: &str = "tunnel.v1";

/// The JetStream stream of what agents send: subjects `tunnel.v1.up.>`.
pub const UP_STREAM: &str = "TUNNEL_UP";
/// The JetStream stream of what backends send to agents: subjects `tunnel.v1.down.>`.
pub const DOWN_STREAM: &str = "TUNNEL_DOWN";
/// The KV bucket of presence: one key per connected agent.
pub const PRESENCE_BUCKET: &str = "tunnel_presence";
/// The KV bucket of hubs' heartbeats: key [`hub_key`], value `{"url": .., "since_ms": ..}`.
pub const HUBS_BUCKET: &str = "tunnel_hubs";

/// The KV bucket of sessions' records, each kept for the cluster's grace period after
/// its last write.
pub const SESSIONS_BUCKET: &str = "tunnel_sessions";

/// The envelope header a down message carries to the agent: its `TUNNEL_DOWN` stream
/// sequence, by which a hub that resumes the agent's session knows which down
/// messages the session already holds.
pub const HEADER_DOWN_SEQ: &str = "tunnel-down-seq";

/// Header: the envelope's id, as the agent assigned it (decimal).
pub const HEADER_ID: &str = "Tunnel-Id";
/// Header: the envelope's sequence number in its session (decimal).
pub const HEADER_SEQ: &str = "Tunnel-Seq";
/// Header: the message type.
pub const HEADER_TYPE: &str = "Tunnel-Type";
/// Header: the session id.
pub const HEADER_SESSION: &str = "Tunnel-Session";
/// Header: the payload's codec, `json` or `msgpack`.
pub const HEADER_CODEC: &str = "Tunnel-Codec";
/// Header: W3C trace context, as the envelope carried it.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header: an error reply's code (a call answered with an error); the payload is then
/// the error's message.
pub const HEADER_ERROR: &str = "Tunnel-Error";
/// Header: how long a call may wait for the agent's reply, in milliseconds (at most
/// 30,000; default 30,000).
pub const HEADER_TIMEOUT_MS: &str = "Tunnel-Timeout-Ms";

/// Whether `b` stands for itself in a token.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/')
}

/// `value` as one subject token: bytes other than ASCII letters, digits and `- _ /`
/// become `=XX` (upper-case hex). An empty value becomes `=`, which no escaped value
/// otherwise is.
///
/// ```
/// use tunnel_cluster::subject::{escape, unescape};
///
/// assert_eq!(escape("cluster-1"), "cluster-1");
/// assert_eq!(escape("root:org"), "root=3Aorg");
/// assert_eq!(escape("a.b*c>"), "a=2Eb=2Ac=3E");
/// assert_eq!(unescape("a=2Eb=2Ac=3E").as_deref(), Some("a.b*c>"));
/// ```
pub fn escape(value: &str) -> String {
    if value.is_empty() {
        return "=".into();
    }
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    out
}

/// The value [`escape`] made `token` from; `None` if `token` is not one it makes.
pub fn unescape(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' => {
                let hex = token.get(i + 1..i + 3)?;
                let b = u8::from_str_radix(hex, 16).ok()?;
                if plain(b) || hex.bytes().any(|h| h.is_ascii_lowercase()) {
                    return None; // not how escape writes it: one value, one token
                }
                out.push(b);
                i += 3;
            }
            b if plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// `tunnel.v1.up.<workspace>.<sync_target>.<type>`: what `agent` sent, of `kind`.
pub fn up(agent: &AgentId, kind: &str) -> String {
    format!("{PREFIX}.up.{}.{}", agent_tokens(agent), escape(kind))
}

/// `tunnel.v1.up.<workspace>.<sync_target>.>`: everything `agent` sent.
pub fn up_all(agent: &AgentId) -> String {
    format!("{PREFIX}.up.{}.>", agent_tokens(agent))
}

/// `tunnel.v1.down.<workspace>.<sync_target>.<type>`: what a backend sends `agent`.
pub fn down(agent: &AgentId, kind: &str) -> String {
    format!("{PREFIX}.down.{}.{}", agent_tokens(agent), escape(kind))
}

/// `tunnel.v1.down.<workspace>.<sync_target>.>`: everything addressed to `agent`: its
/// down messages (five tokens, kept in the down stream) and calls to it (six tokens,
/// [`call`]). The hub that holds the agent subscribes to it.
pub fn down_all(agent: &AgentId) -> String {
    format!("{PREFIX}.down.{}.>", agent_tokens(agent))
}

/// The down stream's subjects: `tunnel.v1.down.*.*.*` (calls, one token longer, are
/// not stored).
pub fn down_stream_subjects() -> String {
    format!("{PREFIX}.down.*.*.*")
}

/// Whether `subject` (under [`down_all`]) is a call rather than a down message.
pub fn is_call(subject: &str) -> bool {
    subject.split('.').count() == 7 && subject.split('.').nth(5) == Some("call")
}

/// The NATS micro service name every hub announces.
pub const SERVICE: &str = "tunnel-hub";

/// `tunnel.v1.hub.<hub id>.load`: a hub's load endpoint (JSON `{"agents": n,
/// "accepting": bool}`).
pub fn hub_load(hub_id: &str) -> String {
    format!("{PREFIX}.hub.{}.load", escape(hub_id))
}

/// `tunnel.v1.down.<workspace>.<sync_target>.call.<type>`: requests of `kind` to
/// `agent` (core NATS request/reply, answered by the hub that holds it; not stored).
pub fn call(agent: &AgentId, kind: &str) -> String {
    format!(
        "{PREFIX}.down.{}.call.{}",
        agent_tokens(agent),
        escape(kind)
    )
}

/// The hubs bucket's key of a hub: its id, escaped.
pub fn hub_key(hub_id: &str) -> String {
    escape(hub_id)
}

/// The presence bucket's key of `agent`: `<workspace>.<sync_target>`, escaped.
pub fn presence_key(agent: &AgentId) -> String {
    agent_tokens(agent)
}

/// The agent a presence key names.
pub fn agent_of_key(key: &str) -> Option<AgentId> {
    let (workspace, sync_target) = key.split_once('.')?;
    Some(AgentId::new(unescape(workspace)?, unescape(sync_target)?))
}

/// `Nats-Msg-Id` of message `seq` of `session` from `agent`: the stream drops a second
/// publish with the same id (a replay after a hub died before acknowledging).
pub fn message_id(agent: &AgentId, session: &str, seq: u64) -> String {
    format!("{}.{}.{seq}", agent_tokens(agent), escape(session))
}

/// The agent an up, down or call subject names (its workspace and sync target tokens,
/// unescaped).
pub fn agent_of(subject: &str) -> Option<AgentId> {
    let mut tokens = subject.split('.').skip(3);
    let (workspace, sync_target) = (tokens.next()?, tokens.next()?);
    Some(AgentId::new(unescape(workspace)?, unescape(sync_target)?))
}

/// The type token of an up or down subject, unescaped.
pub fn kind_of(subject: &str) -> Option<String> {
    unescape(subject.rsplit('.').next()?)
}

/// The key of session `session` of `agent` in the sessions bucket:
/// `<workspace>.<sync_target>.<session token>`.
pub fn session_key(agent: &AgentId, session: &str) -> String {
    format!("{}.{}", agent_tokens(agent), escape(session))
}

fn agent_tokens(agent: &AgentId) -> String {
    format!(
        "{}.{}",
        escape(&agent.workspace),
        escape(&agent.sync_target)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hold_no_separator_wildcard_or_space_and_come_back_unchanged() {
        for value in [
            "root:org", "a.b", "*", ">", "a b", "50%", "ünï", "", "=", "x/y=z",
        ] {
            let token = escape(value);
            // Valid as a subject token and as a KV key part.
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_/=".contains(&b)),
                "{value:?} -> {token:?}"
            );
            assert_eq!(unescape(&token).as_deref(), Some(value), "{token}");
        }
    }

    #[test]
    fn tokens_not_made_by_escape_are_refused_so_that_each_value_has_one_token() {
        for token in ["a.b", "=2e", "=41", "=4", "=ZZ", "a b", "=FF", "a:b"] {
            assert_eq!(unescape(token), None, "{token}");
        }
    }

    #[test]
    fn subjects_follow_the_scheme() {
        let agent = AgentId::new("root:org", "cluster.1");
        assert_eq!(
            up(&agent, "status"),
            "tunnel.v1.up.root=3Aorg.cluster=2E1.status"
        );
        assert_eq!(up_all(&agent), "tunnel.v1.up.root=3Aorg.cluster=2E1.>");
        assert_eq!(
            down(&agent, "command"),
            "tunnel.v1.down.root=3Aorg.cluster=2E1.command"
        );
        assert_eq!(
            call(&agent, "command"),
            "tunnel.v1.down.root=3Aorg.cluster=2E1.call.command"
        );
        // One subscription covers both; only the call is not a stored down message.
        assert!(is_call(&call(&agent, "call")));
        assert!(!is_call(&down(&agent, "call")));
        assert!(!is_call(&down(&agent, "command")));
        assert_eq!(
            kind_of(&call(&agent, "my.type")).as_deref(),
            Some("my.type")
        );
        assert_eq!(presence_key(&agent), "root=3Aorg.cluster=2E1");
        assert_eq!(agent_of(&up(&agent, "status")), Some(agent.clone()));
        assert_eq!(agent_of(&call(&agent, "command")), Some(agent.clone()));
        assert_eq!(agent_of("tunnel.v1.up.only"), None);
        assert_eq!(agent_of_key(&presence_key(&agent)), Some(agent.clone()));
        assert_eq!(message_id(&agent, "s-1", 7), "root=3Aorg.cluster=2E1.s-1.7");
        assert_eq!(kind_of(&up(&agent, "my.type")).as_deref(), Some("my.type"));
    }
}
