//! Typed payloads of the message types.
//!
//! Each struct is the payload of one [`MessageType`]; [`TypedMessage`] ties them
//! together. All of them ignore unknown fields when decoding, so a newer peer may add
//! fields, and optional fields may be left out by an older one.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::envelope::{Envelope, Format, MessageType, Payload};
use crate::error::{DecodeError, EncodeError};
use crate::version::VersionRange;

/// A payload type with its message type.
pub trait TypedMessage: Serialize + DeserializeOwned {
    /// The message type this payload travels as.
    const TYPE: MessageType;

    /// Wraps the message in an envelope with its payload encoded in `format`.
    fn to_envelope(
        &self,
        id: u64,
        timestamp: u64,
        format: Format,
    ) -> Result<Envelope, EncodeError> {
        Ok(Envelope::new(id, Self::TYPE, timestamp).with_payload(Payload::encode(format, self)?))
    }

    /// Decodes the payload of `env`, checking that its type matches.
    fn from_envelope(env: &Envelope) -> Result<Self, DecodeError> {
        if env.kind != Self::TYPE {
            return Err(DecodeError::Payload {
                expected: std::any::type_name::<Self>(),
                reason: format!("message type is `{}`, not `{}`", env.kind, Self::TYPE),
            });
        }
        env.decode_payload()
    }
}

/// An agent's resume request inside its handshake (used by session resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The session to resume.
    pub session_id: String,
    /// The highest sequence number the agent received in order from the hub.
    pub last_received: u64,
}

/// The agent's opening message: who it is and what it speaks.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// The sync target (the agent's identity within the workspace).
    pub sync_target: String,
    /// The workspace the sync target belongs to.
    pub workspace: String,
    /// Protocol versions the agent supports.
    pub versions: VersionRange,
    /// Capabilities the agent offers (see [`crate::capability`]).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Free-form metadata (agent version, cluster name, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// A bearer token, for transports without HTTP headers. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Present when the agent asks to resume an earlier session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("sync_target", &self.sync_target)
            .field("workspace", &self.workspace)
            .field("versions", &self.versions)
            .field("capabilities", &self.capabilities)
            .field("metadata", &self.metadata)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("resume", &self.resume)
            .finish()
    }
}

impl Handshake {
    /// A handshake for `workspace`/`sync_target` offering the supported versions and no
    /// capabilities.
    pub fn new(workspace: impl Into<String>, sync_target: impl Into<String>) -> Self {
        Handshake {
            sync_target: sync_target.into(),
            workspace: workspace.into(),
            versions: VersionRange::SUPPORTED,
            capabilities: Vec::new(),
            metadata: BTreeMap::new(),
            token: None,
            resume: None,
        }
    }
}

impl TypedMessage for Handshake {
    const TYPE: MessageType = MessageType::Handshake;
}

/// The hub's answer to a handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeAck {
    /// The negotiated protocol version.
    pub version: u16,
    /// The session id: opaque, chosen by the hub.
    pub session_id: String,
    /// The capabilities both sides support.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Whether an earlier session was resumed (false: a new session).
    #[serde(default)]
    pub resumed: bool,
    /// When resumed: the highest sequence number the hub received in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_received: Option<u64>,
}

impl TypedMessage for HandshakeAck {
    const TYPE: MessageType = MessageType::HandshakeAck;
}

/// Where and when to reconnect, sent by a closing hub.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectHint {
    /// Wait at least this long before reconnecting, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// Reconnect to one of these endpoints instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// Sent just before a WebSocket close frame, with the same code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    /// The close code (see [`crate::CloseCode`]).
    pub code: u16,
    /// Why the connection is closing.
    pub reason: String,
    /// Where and when to reconnect, if the sender has a preference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<ReconnectHint>,
}

impl TypedMessage for Close {
    const TYPE: MessageType = MessageType::Close;
}

/// A Kubernetes group, version and resource (`apps/v1/deployments`). The core group
/// is the empty string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Gvr {
    /// API group; empty for the core group.
    #[serde(default)]
    pub group: String,
    /// API version.
    pub version: String,
    /// Resource (plural, lower case).
    pub resource: String,
}

impl Gvr {
    /// A group, version and resource.
    pub fn new(
        group: impl Into<String>,
        version: impl Into<String>,
        resource: impl Into<String>,
    ) -> Self {
        Gvr {
            group: group.into(),
            version: version.into(),
            resource: resource.into(),
        }
    }
}

/// What a `resource` message does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResourceOp {
    /// `create`
    Create,
    /// `update`
    Update,
    /// `delete`
    Delete,
    /// An operation this version does not know, with its wire name.
    Other(String),
}

impl ResourceOp {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            ResourceOp::Create => "create",
            ResourceOp::Update => "update",
            ResourceOp::Delete => "delete",
            ResourceOp::Other(s) => s,
        }
    }
}

impl Serialize for ResourceOp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ResourceOp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "create" => ResourceOp::Create,
            "update" => ResourceOp::Update,
            "delete" => ResourceOp::Delete,
            _ => ResourceOp::Other(s),
        })
    }
}

/// A change to a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    /// What to do.
    pub op: ResourceOp,
    /// The resource's group, version and resource.
    pub gvr: Gvr,
    /// Namespace; absent for cluster-scoped resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The object; absent for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
}

impl TypedMessage for Resource {
    const TYPE: MessageType = MessageType::Resource;
}

/// The status of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The resource's group, version and resource.
    pub gvr: Gvr,
    /// Namespace; absent for cluster-scoped resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The status object.
    pub status: serde_json::Value,
    /// The generation this status describes, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl TypedMessage for Status {
    const TYPE: MessageType = MessageType::Status;
}

/// A reference to an object, as in a Kubernetes event's `regarding`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The object's group, version and resource.
    pub gvr: Gvr,
    /// Namespace; absent for cluster-scoped objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
}

/// An event about an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `Normal` or `Warning` (other values are passed through).
    #[serde(rename = "type")]
    pub event_type: String,
    /// A short machine-readable reason (`Synced`, `FailedMount`).
    pub reason: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// The object the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regarding: Option<ObjectRef>,
}

impl TypedMessage for Event {
    const TYPE: MessageType = MessageType::Event;
}

/// A named command with arguments; usually answered with a `reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The command's name.
    pub name: String,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, serde_json::Value>,
}

impl Command {
    /// A command without arguments.
    pub fn new(name: impl Into<String>) -> Self {
        Command {
            name: name.into(),
            args: BTreeMap::new(),
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.args.insert(name.into(), value.into());
        self
    }
}

impl TypedMessage for Command {
    const TYPE: MessageType = MessageType::Command;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_debug_redacts_the_token() {
        let mut hs = Handshake::new("root:org", "cluster-1");
        hs.token = Some("s3cr3t-token".into());
        let shown = format!("{hs:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn unknown_resource_ops_are_kept() {
        let r: ResourceOp = serde_json::from_str("\"patch\"").expect("op");
        assert_eq!(r, ResourceOp::Other("patch".into()));
        assert_eq!(serde_json::to_string(&r).expect("json"), "\"patch\"");
    }

    #[test]
    fn typed_envelope_checks_the_type() {
        let env = Event {
            event_type: "Normal".into(),
            reason: "Synced".into(),
            message: String::new(),
            regarding: None,
        }
        .to_envelope(1, 2, Format::Json)
        .expect("encode");
        assert!(Event::from_envelope(&env).is_ok());
        assert!(matches!(
            Command::from_envelope(&env),
            Err(DecodeError::Payload { .. })
        ));
    }
}
