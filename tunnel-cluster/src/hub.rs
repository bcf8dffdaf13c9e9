//! A hub's side of the cluster: what its agents send goes into the up stream (and is
//! acknowledged to them only once stored), what backends send them comes from the down
//! stream, backends' calls are forwarded, and presence is kept in KV.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{BoxError, service_fn};
use tunnel_proto::{CloseCode, Envelope, Format, MessageType, Payload};
use tunnel_router::{Hub, HubEvent, Inbound, Request, Router, Unavailable};
use tunnel_transport::AgentId;

use crate::subject::{self, HEADER_CODEC, HEADER_ERROR, HEADER_TRACEPARENT, HEADER_TYPE};
use crate::{ClusterConfig, ClusterError};

/// A hub's membership in a cluster: its NATS connection, streams and presence bucket.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClusterConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    down: stream::Stream,
    presence: kv::Store,
    calls: Arc<Semaphore>,
}

/// What a presence entry says (JSON in the bucket's value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Presence {
    /// The hub that holds the agent.
    pub hub: String,
    /// The agent's session on it.
    pub session: String,
    /// When the connection was registered, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

impl Cluster {
    /// Connects to NATS and makes sure the streams and the presence bucket exist
    /// (creating them with `config`'s bounds if they do not).
    pub async fn connect(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        config.check()?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("tunnel-hub {}", config.hub_id))
            .connect(config.url.as_str())
            .await
            .map_err(|source| ClusterError::Connect {
                url: config.url.clone(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let (_, down) = crate::streams::ensure(&js, &config).await?;
        let presence = crate::streams::presence(&js).await?;
        Ok(Cluster {
            inner: Arc::new(Inner {
                calls: Arc::new(Semaphore::new(config.max_calls)),
                config,
                client,
                js,
                down,
                presence,
            }),
        })
    }

    /// This hub's name in the cluster.
    pub fn hub_id(&self) -> &str {
        &self.inner.config.hub_id
    }

    /// Whether the NATS connection is up (a hub reports not ready without it).
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A router whose fallback publishes every data message an agent sends into the up
    /// stream: the agent's session acknowledges it only once the stream stored it, and a
    /// message the stream cannot take now (NATS down, no ack in time) is answered with
    /// [`Unavailable`], so the agent keeps it and replays it. Routes already in
    /// `router` keep their messages in this hub.
    pub fn router(&self, router: Router) -> Router {
        let cluster = self.clone();
        router
            .fallback(service_fn(move |msg: Inbound| {
                let cluster = cluster.clone();
                async move { cluster.store(&msg).await }
            }))
            .acknowledge_later()
    }

    /// Stores one agent message in the up stream and waits for the stream's ack: what
    /// [`Cluster::router`]'s fallback does, for a handler of one's own. Fails with
    /// [`Unavailable`] when the stream cannot take it now.
    ///
    /// Publishes are pipelined: the handler returns once the publish is sent, and the
    /// session acknowledges the message when the stream's ack arrives
    /// ([`Inbound::acknowledge_later`]), so one agent's messages do not wait one round
    /// trip each.
    pub async fn store(&self, msg: &Inbound) -> Result<(), BoxError> {
        let ack = publish_up(&self.inner, msg).await?;
        let timeout = self.inner.config.publish_timeout;
        let stored = |r: Result<Result<_, async_nats::jetstream::context::PublishError>, _>| match r
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("the up stream did not store it: {e}")),
            Err(_) => Err("the up stream did not acknowledge in time".to_string()),
        };
        match msg.acknowledge_later() {
            Some(later) => {
                tokio::spawn(async move {
                    match stored(tokio::time::timeout(timeout, ack).await) {
                        Ok(()) => later.done(),
                        Err(reason) => later.unavailable(reason),
                    }
                });
                Ok(())
            }
            None => stored(tokio::time::timeout(timeout, ack).await)
                .map_err(|reason| Unavailable::new(reason).into()),
        }
    }

    /// Serves `hub`'s agents to the cluster until the returned handle is stopped: for
    /// each agent it holds, the hub claims its presence entry, delivers what waits for
    /// it in the down stream, and answers backends' calls to it. An agent whose entry
    /// another hub takes over is closed here with `4004`.
    pub fn serve(&self, hub: &Hub) -> Serving {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(self.inner.clone(), hub.clone(), cancel.clone()));
        Serving { cancel, task }
    }
}

/// The cluster work of one hub ([`Cluster::serve`]).
#[derive(Debug)]
pub struct Serving {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Stops serving: per-agent work ends and this hub's presence entries are removed.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Publishes one agent message into the up stream; the stream's ack is the future
/// returned.
async fn publish_up(
    inner: &Inner,
    msg: &Inbound,
) -> Result<async_nats::jetstream::context::PublishAckFuture, BoxError> {
    let env = &msg.envelope;
    let info = msg.sender().info();
    let subject = subject::up(&info.agent, env.kind.as_str());
    let mut headers = HeaderMap::new();
    headers.insert(subject::HEADER_ID, env.id.to_string().as_str());
    headers.insert(HEADER_TYPE, env.kind.as_str());
    headers.insert(subject::HEADER_SESSION, info.session_id.as_str());
    headers.insert(subject::HEADER_WORKSPACE, info.agent.workspace.as_str());
    headers.insert(subject::HEADER_SYNC_TARGET, info.agent.sync_target.as_str());
    if let Some(seq) = env.seq {
        headers.insert(subject::HEADER_SEQ, seq.to_string().as_str());
        // A replay of a message the stream has (a hub died before acknowledging it) is
        // dropped by the stream.
        let id = subject::message_id(&info.agent, &info.session_id, seq);
        headers.insert("Nats-Msg-Id", id.as_str());
    }
    if let Some(trace) = env.headers.get(tunnel_proto::header::TRACEPARENT) {
        headers.insert(HEADER_TRACEPARENT, trace);
    }
    let payload = match &env.payload {
        Some(p) => {
            headers.insert(HEADER_CODEC, p.format().name());
            p.bytes().clone()
        }
        None => Bytes::new(),
    };
    let publish = PublishMessage::build().payload(payload).headers(headers);
    match tokio::time::timeout(
        inner.config.publish_timeout,
        inner.js.send_publish(subject, publish),
    )
    .await
    {
        Ok(Ok(ack)) => Ok(ack),
        Ok(Err(e)) => Err(Unavailable::new(format!("the up stream did not take it: {e}")).into()),
        Err(_) => Err(Unavailable::new("NATS did not take the publish in time").into()),
    }
}

/// Per agent: the work that lasts while this hub holds it.
struct Held {
    connection: u64,
    cancel: CancellationToken,
    /// The presence entry's revision this hub wrote: its fencing token.
    revision: Option<u64>,
}

type HeldMap = Arc<Mutex<HashMap<AgentId, Held>>>;

async fn serve(inner: Arc<Inner>, hub: Hub, cancel: CancellationToken) {
    let mut events = hub.events();
    let held: HeldMap = Arc::default();
    let mut tasks = JoinSet::new();
    // One watch of the whole bucket per hub (not one per agent: each is a consumer).
    let owners = tokio::spawn(watch_owners(inner.clone(), hub.clone(), held.clone()));
    let announce = tokio::spawn(announce(inner.clone(), hub.clone()));
    // Agents already connected when serving starts.
    for info in hub.agents() {
        start_agent(
            &inner,
            &hub,
            &held,
            &mut tasks,
            info.agent.clone(),
            info.id,
            &info.session_id,
        );
    }
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            event = events.recv() => match event {
                Ok(HubEvent::Connected { agent, connection }) => {
                    let session = hub
                        .sender(&agent)
                        .map(|s| s.info().session_id.clone())
                        .unwrap_or_default();
                    start_agent(&inner, &hub, &held, &mut tasks, agent, connection, &session);
                }
                Ok(HubEvent::Disconnected { agent, connection }) => {
                    stop_agent(&held, &agent, connection);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed events: compare with who is connected now.
                    let now: HashMap<AgentId, u64> =
                        hub.agents().into_iter().map(|i| (i.agent.clone(), i.id)).collect();
                    let gone: Vec<(AgentId, u64)> = held
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .filter(|(a, h)| now.get(*a) != Some(&h.connection))
                        .map(|(a, h)| (a.clone(), h.connection))
                        .collect();
                    for (agent, connection) in gone {
                        stop_agent(&held, &agent, connection);
                    }
                    for info in hub.agents() {
                        start_agent(&inner, &hub, &held, &mut tasks, info.agent.clone(), info.id, &info.session_id);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
                Ok(_) => {}
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    owners.abort();
    announce.abort();
    for (_, h) in held.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        h.cancel.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

/// Announces this hub as a NATS micro service (`tunnel-hub`, the ecosystem's way to
/// find services: `$SRV.PING.tunnel-hub`, `$SRV.INFO.tunnel-hub`), with its id and URL
/// as metadata, and answers `tunnel.v1.hub.<hub id>.load` with its load.
async fn announce(inner: Arc<Inner>, hub: Hub) {
    use async_nats::service::ServiceExt as _;
    let metadata = HashMap::from([
        ("hub_id".to_string(), inner.config.hub_id.clone()),
        ("url".to_string(), hub.url().unwrap_or_default()),
    ]);
    let service = inner
        .client
        .service_builder()
        .description("a tunnel hub: agents connect to it over WebSocket")
        .metadata(metadata)
        .start(subject::SERVICE, env!("CARGO_PKG_VERSION"))
        .await;
    let service = match service {
        Ok(service) => service,
        Err(e) => {
            tracing::warn!(error = %e, "the hub is not announced as a service");
            return;
        }
    };
    let Ok(mut load) = service
        .endpoint_builder()
        .name("load")
        .add(subject::hub_load(&inner.config.hub_id))
        .await
    else {
        return;
    };
    while let Some(request) = load.next().await {
        let body = serde_json::json!({
            "agents": hub.agents().len(),
            "accepting": hub.is_accepting(),
        });
        let _ = request.respond(Ok(Bytes::from(body.to_string()))).await;
    }
}

/// Closes, with `4004`, each agent this hub holds whose presence entry another hub
/// has taken (a revision newer than the one this hub wrote).
async fn watch_owners(inner: Arc<Inner>, hub: Hub, held: HeldMap) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(mut watch) = inner.presence.watch_all().await {
            backoff = Duration::from_millis(100);
            while let Some(Ok(entry)) = watch.next().await {
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Some(agent) = subject::agent_of_key(&entry.key) else {
                    continue;
                };
                let other = serde_json::from_slice::<Presence>(&entry.value)
                    .ok()
                    .filter(|p| p.hub != inner.config.hub_id);
                let Some(other) = other else { continue };
                let lost = held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&agent)
                    .filter(|h| h.revision.is_some_and(|r| entry.revision > r))
                    .map(|h| h.connection);
                if let Some(connection) = lost {
                    tracing::info!(%agent, hub = %tunnel_proto::text::Untrusted(&other.hub), "the agent moved to another hub: closing it here");
                    if let Some(sender) = hub.sender(&agent).filter(|s| s.info().id == connection) {
                        sender.abort_with(
                            CloseCode::SESSION_REPLACED,
                            "the agent connected to another hub",
                        );
                    }
                }
            }
        }
        // The watch ended (NATS went away): watch again once it is back.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn start_agent(
    inner: &Arc<Inner>,
    hub: &Hub,
    held: &HeldMap,
    tasks: &mut JoinSet<()>,
    agent: AgentId,
    connection: u64,
    session: &str,
) {
    let cancel = CancellationToken::new();
    {
        let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(&agent).is_some_and(|h| h.connection == connection) {
            return;
        }
        if let Some(old) = held.insert(
            agent.clone(),
            Held {
                connection,
                cancel: cancel.clone(),
                revision: None,
            },
        ) {
            old.cancel.cancel();
        }
    }
    let presence = Presence {
        hub: inner.config.hub_id.clone(),
        session: session.to_owned(),
        since_ms: tunnel_transport::unix_millis(),
    };
    tasks.spawn(agent_work(
        inner.clone(),
        hub.clone(),
        held.clone(),
        agent,
        connection,
        presence,
        cancel,
    ));
}

fn stop_agent(held: &Mutex<HashMap<AgentId, Held>>, agent: &AgentId, connection: u64) {
    let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
    if held.get(agent).is_some_and(|h| h.connection == connection)
        && let Some(h) = held.remove(agent)
    {
        h.cancel.cancel();
    }
}

/// Everything this hub does for one connected agent, until `cancel`.
async fn agent_work(
    inner: Arc<Inner>,
    hub: Hub,
    held: HeldMap,
    agent: AgentId,
    connection: u64,
    presence: Presence,
    cancel: CancellationToken,
) {
    let key = subject::presence_key(&agent);
    let revision = match claim(&inner.presence, &key, &presence).await {
        Ok(revision) => Some(revision),
        Err(e) => {
            tracing::warn!(%agent, error = %e, "presence entry not written");
            None
        }
    };
    if let Some(h) = held
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(&agent)
        .filter(|h| h.connection == connection)
    {
        h.revision = revision;
    }
    // Taken over before the watch could know our revision: let go now.
    if let Some(revision) = revision
        && let Ok(Some(entry)) = inner.presence.entry(&key).await
        && entry.revision > revision
        && serde_json::from_slice::<Presence>(&entry.value)
            .is_ok_and(|p| p.hub != inner.config.hub_id)
        && let Some(sender) = hub.sender(&agent).filter(|s| s.info().id == connection)
    {
        sender.abort_with(
            CloseCode::SESSION_REPLACED,
            "the agent connected to another hub",
        );
    }
    let work = async {
        tokio::join!(
            deliver_down(&inner, &hub, &agent),
            answer_calls(&inner, &hub, &agent),
        )
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        _ = work => {}
    }
    // Still ours: the agent left this hub. Removed only at our revision, so an entry
    // another hub wrote meanwhile stays.
    if let Some(revision) = revision {
        let current = inner.presence.entry(&key).await.ok().flatten();
        if current.is_some_and(|e| e.revision == revision) {
            let _ = inner
                .presence
                .delete_expect_revision(&key, Some(revision))
                .await;
        }
    }
}

/// Writes this hub's presence entry for an agent, taking it from whichever hub had it
/// (the newest connection wins, as within one hub); returns the entry's revision, this
/// hub's fencing token.
async fn claim(presence: &kv::Store, key: &str, value: &Presence) -> Result<u64, ClusterError> {
    let bytes =
        Bytes::from(serde_json::to_vec(value).map_err(|e| ClusterError::Payload(e.to_string()))?);
    for _ in 0..8 {
        let current = presence
            .entry(key)
            .await
            .map_err(|e| ClusterError::JetStream(e.to_string()))?;
        let written = match current {
            Some(entry) if entry.operation == kv::Operation::Put => presence
                .update(key, bytes.clone(), entry.revision)
                .await
                .map_err(|e| e.to_string()),
            _ => presence
                .create(key, bytes.clone())
                .await
                .map_err(|e| e.to_string()),
        };
        if let Ok(revision) = written {
            return Ok(revision);
        }
        // Someone wrote in between: read again.
    }
    Err(ClusterError::JetStream(format!(
        "presence entry {key} kept changing"
    )))
}

/// Delivers what waits for the agent in the down stream, acknowledging each message in
/// JetStream once the agent acknowledged it (a message whose delivery failed is
/// redelivered, on whichever hub then holds the agent).
async fn deliver_down(inner: &Inner, hub: &Hub, agent: &AgentId) {
    let name = consumer_name(agent);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: subject::down_all(agent),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: DOWN_ACK_WAIT,
        max_ack_pending: inner.config.down_in_flight,
        ..Default::default()
    };
    let mut acks = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    // Read again after NATS comes back (a restart ends the consumer's stream).
    loop {
        match read_down(inner, hub, agent, &name, &config, &mut acks).await {
            DownEnd::AgentGone => break,
            DownEnd::Nats => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // Let the acks of what was delivered finish; the caller cancels this at the end.
    while acks.join_next().await.is_some() {}
    std::future::pending().await
}

/// Why [`read_down`] stopped.
enum DownEnd {
    /// The hub no longer holds the agent.
    AgentGone,
    /// The consumer could not be made or read: try again.
    Nats,
}

/// Delivers from the agent's down consumer until it fails or the agent is gone.
async fn read_down(
    inner: &Inner,
    hub: &Hub,
    agent: &AgentId,
    name: &str,
    config: &consumer::pull::Config,
    acks: &mut JoinSet<()>,
) -> DownEnd {
    let consumer = match inner
        .down
        .get_or_create_consumer(name, config.clone())
        .await
    {
        Ok(consumer) => consumer,
        Err(e) => {
            tracing::debug!(%agent, error = %e, "cannot read the agent's down messages yet");
            return DownEnd::Nats;
        }
    };
    let Ok(mut messages) = consumer.messages().await else {
        return DownEnd::Nats;
    };
    loop {
        tokio::select! {
            next = messages.next() => {
                let Some(Ok(msg)) = next else {
                    return DownEnd::Nats;
                };
                let env = match down_envelope(&msg.message) {
                    Ok(env) => env,
                    Err(e) => {
                        // Never deliverable: terminate it rather than redeliver forever.
                        tracing::warn!(%agent, error = %e, "dropping an undecodable down message");
                        let _ = msg.ack_with(jetstream::AckKind::Term).await;
                        continue;
                    }
                };
                match hub.send_envelope(agent, env).await {
                    Ok(receipt) => {
                        acks.spawn(async move {
                            let delivered = receipt.delivered();
                            tokio::pin!(delivered);
                            // While the agent has not acknowledged it (it may be away,
                            // its session held), the hub says it is still at work, so
                            // that only a dead hub's messages are redelivered.
                            let mut progress = tokio::time::interval(DOWN_ACK_WAIT / 3);
                            progress.tick().await;
                            let kind = loop {
                                tokio::select! {
                                    outcome = &mut delivered => break match outcome {
                                        Ok(()) => jetstream::AckKind::Ack,
                                        Err(_) => jetstream::AckKind::Nak(None),
                                    },
                                    _ = progress.tick() => {
                                        let _ = msg.ack_with(jetstream::AckKind::Progress).await;
                                    }
                                }
                            };
                            let _ = msg.ack_with(kind).await;
                        });
                    }
                    Err(_) => {
                        let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                        return DownEnd::AgentGone;
                    }
                }
            }
            Some(_) = acks.join_next(), if !acks.is_empty() => {}
        }
    }
}

/// How long JetStream waits for a hub's ack of a down message before it redelivers it:
/// the longest a dead hub's messages wait. A live hub sends progress meanwhile.
const DOWN_ACK_WAIT: Duration = Duration::from_secs(5);

/// The durable consumer of one agent's down messages: a name NATS accepts, the same on
/// every hub.
fn consumer_name(agent: &AgentId) -> String {
    // FNV-1a over the presence key: stable across processes and versions.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject::presence_key(agent).bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("down-{hash:016x}")
}

/// The envelope a down message stands for: its type from the subject, its payload in
/// the codec its header names (JSON by default), validated.
fn down_envelope(msg: &async_nats::Message) -> Result<Box<Envelope>, String> {
    let kind = subject::kind_of(msg.subject.as_str()).ok_or("a subject without a type")?;
    let headers = msg.headers.as_ref();
    let format = codec(
        headers
            .and_then(|h| h.get(HEADER_CODEC))
            .map(|v| v.as_str()),
    )?;
    let mut env = Box::new(Envelope::new(0, MessageType::from_wire(&kind), 0));
    if !msg.payload.is_empty() {
        env.payload =
            Some(Payload::from_encoded(format, msg.payload.clone()).map_err(|e| e.to_string())?);
    }
    if let Some(trace) = headers.and_then(|h| h.get(HEADER_TRACEPARENT)) {
        env.headers
            .insert(tunnel_proto::header::TRACEPARENT, trace.as_str());
    }
    Ok(env)
}

fn codec(name: Option<&str>) -> Result<Format, String> {
    match name {
        None | Some("json") => Ok(Format::Json),
        Some("msgpack") => Ok(Format::MsgPack),
        Some(other) => Err(format!(
            "unknown codec {}",
            tunnel_proto::text::Untrusted(other)
        )),
    }
}

/// Answers backends' calls to the agent: each becomes a tunnel request, and the
/// agent's reply (or the reason there is none) goes back to the caller.
async fn answer_calls(inner: &Inner, hub: &Hub, agent: &AgentId) {
    let Ok(mut calls) = inner.client.subscribe(subject::call(agent)).await else {
        return std::future::pending().await;
    };
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            next = calls.next() => {
                let Some(call) = next else { break };
                let Some(reply_to) = call.reply.clone() else { continue };
                let client = inner.client.clone();
                let Ok(permit) = inner.calls.clone().try_acquire_owned() else {
                    let _ = respond_error(&client, reply_to, "busy", "too many calls in flight").await;
                    continue;
                };
                let (hub, agent) = (hub.clone(), agent.clone());
                running.spawn(async move {
                    let answer = forward_call(&hub, &agent, &call).await;
                    let _ = match answer {
                        Ok(reply) => respond(&client, reply_to, &reply).await,
                        Err((code, message)) => respond_error(&client, reply_to, &code, &message).await,
                    };
                    drop(permit);
                });
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    std::future::pending().await
}

/// Longest a forwarded call waits for the agent unless the caller asks for less.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn forward_call(
    hub: &Hub,
    agent: &AgentId,
    call: &async_nats::Message,
) -> Result<Envelope, (String, String)> {
    let mut env = down_envelope(call).map_err(|e| ("bad_request".to_string(), e))?;
    if let Some(kind) = call.headers.as_ref().and_then(|h| h.get(HEADER_TYPE)) {
        env.kind = MessageType::from_wire(kind.as_str());
    } else {
        env.kind = MessageType::Command;
    }
    let timeout = call
        .headers
        .as_ref()
        .and_then(|h| h.get(subject::HEADER_TIMEOUT_MS))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .map_or(CALL_TIMEOUT, |ms| {
            Duration::from_millis(ms).min(CALL_TIMEOUT)
        });
    let request = Request::from_envelope(env).expect_reply().timeout(timeout);
    match hub.call(agent, request).await {
        Ok(response) => response.into_reply().ok_or_else(|| {
            (
                "no_reply".to_string(),
                "the agent sent no reply".to_string(),
            )
        }),
        Err(e) => Err((e.kind().to_string(), e.to_string())),
    }
}

async fn respond(
    client: &async_nats::Client,
    to: async_nats::Subject,
    reply: &Envelope,
) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    let payload = match &reply.payload {
        Some(p) => {
            headers.insert(HEADER_CODEC, p.format().name());
            p.bytes().clone()
        }
        None => Bytes::new(),
    };
    client
        .publish_with_headers(to, headers, payload)
        .await
        .map_err(|e| e.to_string())
}

async fn respond_error(
    client: &async_nats::Client,
    to: async_nats::Subject,
    code: &str,
    message: &str,
) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_ERROR, code);
    client
        .publish_with_headers(to, headers, Bytes::from(message.to_owned()))
        .await
        .map_err(|e| e.to_string())
}
