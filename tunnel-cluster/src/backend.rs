//! A backend's client of the cluster: send to an agent through the down stream, call
//! an agent through whichever hub holds it, read what agents sent from the up stream,
//! and see who is connected where.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv, message::PublishMessage};
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tunnel_proto::{Format, MessageType, Payload};
use tunnel_transport::AgentId;

use crate::ClusterError;
use crate::hub::Presence;
use crate::subject::{self, HEADER_CODEC, HEADER_ERROR, HEADER_TYPE};

/// Presence entries [`Backend::presence`] reads at most.
const MAX_PRESENCE: usize = 1_000_000;

/// A backend's connection to the cluster.
///
/// ```no_run
/// # async fn f() -> Result<(), tunnel_cluster::ClusterError> {
/// use std::time::Duration;
/// use futures_util::StreamExt as _;
/// use tunnel_cluster::Backend;
/// use tunnel_proto::{MessageType, messages::Command};
/// use tunnel_transport::AgentId;
///
/// let backend = Backend::connect("nats://127.0.0.1:4222").await?;
/// let agent = AgentId::new("root:org", "cluster-1");
/// // Waits in the down stream until the agent is connected to some hub.
/// backend.send(&agent, MessageType::Command, &Command::new("sync")).await?;
/// // Answered by the agent, through the hub that holds it.
/// let reply = backend.call(&agent, MessageType::Command, &Command::new("ping"), Duration::from_secs(5)).await?;
/// println!("{:?}", reply.payload);
/// // What agents sent, in order per agent, from a durable consumer named "inventory".
/// let mut messages = backend.messages("inventory", None).await?;
/// while let Some(Ok(msg)) = messages.next().await {
///     println!("{} sent a {}", msg.agent, msg.kind);
///     msg.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Backend {
    client: async_nats::Client,
    js: jetstream::Context,
    presence: kv::Store,
}

/// A reply from an agent to [`Backend::call`].
#[derive(Debug, Clone)]
pub struct Reply {
    /// The reply's payload, in the codec the agent used.
    pub payload: Option<Payload>,
}

impl Reply {
    /// Decodes the payload.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClusterError> {
        self.payload
            .as_ref()
            .ok_or_else(|| ClusterError::Payload("the reply has no payload".into()))?
            .decode()
            .map_err(|e| ClusterError::Payload(e.to_string()))
    }
}

/// A change of one agent's presence entry ([`Backend::watch_presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// Whose entry changed.
    pub agent: AgentId,
    /// Which hub holds it now; `None` once no hub does.
    pub presence: Option<Presence>,
    /// The entry's revision (newer writes have higher ones).
    pub revision: u64,
}

/// One message an agent sent, read from the up stream.
#[derive(Debug)]
pub struct UpMessage {
    /// Who sent it.
    pub agent: AgentId,
    /// Its type.
    pub kind: MessageType,
    /// The agent's session it was sent in.
    pub session: String,
    /// Its sequence number in that session (`None` for a message sent without one).
    pub seq: Option<u64>,
    /// Its payload, in the codec the agent used.
    pub payload: Option<Payload>,
    message: jetstream::Message,
}

impl UpMessage {
    /// Acknowledges it to the consumer: it is not delivered to this consumer again.
    pub async fn ack(&self) -> Result<(), ClusterError> {
        self.message
            .ack()
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))
    }

    /// Decodes the payload.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClusterError> {
        self.payload
            .as_ref()
            .ok_or_else(|| ClusterError::Payload("the message has no payload".into()))?
            .decode()
            .map_err(|e| ClusterError::Payload(e.to_string()))
    }
}

impl Backend {
    /// Connects to the cluster's NATS server.
    pub async fn connect(url: &str) -> Result<Backend, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name("tunnel-backend")
            .connect(url)
            .await
            .map_err(|source| ClusterError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let presence = crate::streams::presence(&js).await?;
        Ok(Backend {
            client,
            js,
            presence,
        })
    }

    /// Sends `value` (as JSON) to `agent` through the down stream; returns its stream
    /// sequence number once stored. It is delivered when the agent is connected to a
    /// hub, now or later; a full stream refuses it ([`ClusterError::Publish`]).
    pub async fn send<T: serde::Serialize + ?Sized>(
        &self,
        agent: &AgentId,
        kind: MessageType,
        value: &T,
    ) -> Result<u64, ClusterError> {
        let payload = Payload::encode(Format::Json, value)
            .map_err(|e| ClusterError::Payload(e.to_string()))?;
        self.publish(agent, kind, &payload, None).await
    }

    /// [`Backend::send`] under the message id `id` (`Nats-Msg-Id`): sent again with
    /// the same id within the down stream's duplicate window (a retry after an error
    /// whose publish may have landed), it is stored once. After a nats-server restart
    /// the stream may store it again (its window then knows only the messages it still
    /// has); an agent whose session is kept in NATS still gets it once when the retry
    /// follows the first copy by fewer than 64 messages to that agent and the id is at
    /// most 128 bytes (PROTOCOL.md 10.7).
    pub async fn send_with_id<T: serde::Serialize + ?Sized>(
        &self,
        agent: &AgentId,
        kind: MessageType,
        value: &T,
        id: &str,
    ) -> Result<u64, ClusterError> {
        let payload = Payload::encode(Format::Json, value)
            .map_err(|e| ClusterError::Payload(e.to_string()))?;
        self.publish(agent, kind, &payload, Some(id)).await
    }

    /// [`Backend::send`] with a payload already encoded, in either codec.
    pub async fn send_payload(
        &self,
        agent: &AgentId,
        kind: MessageType,
        payload: &Payload,
    ) -> Result<u64, ClusterError> {
        self.publish(agent, kind, payload, None).await
    }

    async fn publish(
        &self,
        agent: &AgentId,
        kind: MessageType,
        payload: &Payload,
        id: Option<&str>,
    ) -> Result<u64, ClusterError> {
        let subject = subject::down(agent, kind.as_str());
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CODEC, payload.format().name());
        if let Some(id) = id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let publish = PublishMessage::build()
            .payload(payload.bytes().clone())
            .headers(headers);
        let failed = |e: String| ClusterError::Publish {
            subject: subject.clone(),
            reason: e,
        };
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| failed(e.to_string()))?
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(ack.sequence)
    }

    /// Calls `agent` with `value` (as JSON) and waits at most `timeout` for its reply,
    /// through whichever hub holds it. Fails at once with [`ClusterError::NoHub`] when
    /// no hub does; with [`ClusterError::Call`] when the agent answered with an error,
    /// timed out or left.
    pub async fn call<T: serde::Serialize + ?Sized>(
        &self,
        agent: &AgentId,
        kind: MessageType,
        value: &T,
        timeout: Duration,
    ) -> Result<Reply, ClusterError> {
        let payload =
            serde_json::to_vec(value).map_err(|e| ClusterError::Payload(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_CODEC, "json");
        headers.insert(
            subject::HEADER_TIMEOUT_MS,
            timeout.as_millis().to_string().as_str(),
        );
        let request = async_nats::Request::new()
            .payload(Bytes::from(payload))
            .headers(headers)
            // A little longer than the hub's own wait, so its answer comes first.
            .timeout(Some(timeout + Duration::from_millis(500)));
        let answer = self
            .client
            .send_request(subject::call(agent, kind.as_str()), request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    ClusterError::NoHub(agent.to_string())
                }
                async_nats::RequestErrorKind::TimedOut => {
                    ClusterError::Call("no answer in time".into())
                }
                _ => ClusterError::Call(e.to_string()),
            })?;
        let headers = answer.headers.as_ref();
        if let Some(code) = headers.and_then(|h| h.get(HEADER_ERROR)) {
            return Err(ClusterError::Call(format!(
                "{}: {}",
                code.as_str(),
                String::from_utf8_lossy(&answer.payload)
            )));
        }
        let format = match headers
            .and_then(|h| h.get(HEADER_CODEC))
            .map(|v| v.as_str())
        {
            Some("msgpack") => Format::MsgPack,
            _ => Format::Json,
        };
        let payload = if answer.payload.is_empty() {
            None
        } else {
            Some(
                Payload::from_encoded(format, answer.payload.clone())
                    .map_err(|e| ClusterError::Payload(e.to_string()))?,
            )
        };
        Ok(Reply { payload })
    }

    /// Which agents are connected, and to which hub (at most a million).
    pub async fn presence(&self) -> Result<Vec<(AgentId, Presence)>, ClusterError> {
        let keys = crate::streams::keys(&self.presence, MAX_PRESENCE)
            .await
            .map_err(ClusterError::JetStream)?;
        let mut out = Vec::new();
        for key in keys {
            let Some(agent) = subject::agent_of_key(&key) else {
                continue;
            };
            if let Ok(Some(value)) = self.presence.get(&key).await
                && let Ok(presence) = serde_json::from_slice::<Presence>(&value)
            {
                out.push((agent, presence));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Who is connected, as it changes: first every current entry, then each change
    /// (a hub claiming an agent, or letting it go) as it is written.
    pub async fn watch_presence(
        &self,
    ) -> Result<impl Stream<Item = PresenceChange> + use<>, ClusterError> {
        let watch = self
            .presence
            .watch_all()
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))?;
        Ok(watch.filter_map(|entry| {
            std::future::ready(entry.ok().and_then(|entry| {
                let agent = subject::agent_of_key(&entry.key)?;
                let presence = match entry.operation {
                    kv::Operation::Put => {
                        Some(serde_json::from_slice::<Presence>(&entry.value).ok()?)
                    }
                    kv::Operation::Delete | kv::Operation::Purge => None,
                };
                Some(PresenceChange {
                    agent,
                    presence,
                    revision: entry.revision,
                })
            }))
        }))
    }

    /// What agents sent (only `agent`'s, if given), from the up stream through the
    /// durable consumer `durable` (created if missing: a consumer remembers what it
    /// acknowledged across restarts). In order per agent.
    pub async fn messages(
        &self,
        durable: &str,
        agent: Option<&AgentId>,
    ) -> Result<impl Stream<Item = Result<UpMessage, ClusterError>> + use<>, ClusterError> {
        let up = self
            .js
            .get_stream(subject::UP_STREAM)
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))?;
        let filter = match agent {
            Some(agent) => subject::up_all(agent),
            None => format!("{}.up.>", subject::PREFIX),
        };
        let consumer: consumer::PullConsumer = up
            .get_or_create_consumer(
                durable,
                consumer::pull::Config {
                    durable_name: Some(durable.to_owned()),
                    filter_subject: filter,
                    ack_policy: consumer::AckPolicy::Explicit,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))?;
        Ok(messages.map(|m| {
            let message = m.map_err(|e| ClusterError::JetStream(e.to_string()))?;
            up_message(message)
        }))
    }
}

fn up_message(message: jetstream::Message) -> Result<UpMessage, ClusterError> {
    let headers = message.headers.as_ref();
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let agent = subject::agent_of(message.subject.as_str()).ok_or_else(|| {
        ClusterError::Payload(format!(
            "not an agent's subject: {}",
            tunnel_proto::text::Untrusted(message.subject.as_str())
        ))
    })?;
    let kind = header(HEADER_TYPE)
        .or_else(|| subject::kind_of(message.subject.as_str()))
        .unwrap_or_default();
    let format = match header(HEADER_CODEC).as_deref() {
        Some("msgpack") => Format::MsgPack,
        _ => Format::Json,
    };
    let payload = if message.payload.is_empty() {
        None
    } else {
        Some(
            Payload::from_encoded(format, message.payload.clone())
                .map_err(|e| ClusterError::Payload(e.to_string()))?,
        )
    };
    Ok(UpMessage {
        agent,
        kind: MessageType::from_wire(&kind),
        session: header(subject::HEADER_SESSION).unwrap_or_default(),
        seq: header(subject::HEADER_SEQ).and_then(|s| s.parse().ok()),
        payload,
        message,
    })
}
