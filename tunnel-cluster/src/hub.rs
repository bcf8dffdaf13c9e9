//! A hub's side of the cluster: what its agents send goes into the up stream (and is
//! acknowledged to them only once stored), what backends send them comes from the down
//! stream, backends' calls are forwarded, and presence is kept in KV.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::{BoxError, service_fn};
use tunnel_proto::{CloseCode, Envelope, Format, MessageType, Payload};
use tunnel_router::{Hub, HubEvent, Inbound, Refused, Request, Router, Unavailable, Undelivered};
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
    down: stream::Stream,
    presence: kv::Store,
    /// This run of the hub, unique among its runs: in its beats and presence entries.
    run: String,
    /// Hubs' heartbeats.
    hubs: kv::Store,
    /// The cluster's sessions (see [`Cluster::session_store`]); holds those of this
    /// hub's sessions that it keeps there.
    sessions: crate::NatsSessionStore,
    /// Why this hub may not keep its sessions there: another grace period.
    grace_mismatch: Option<String>,
    /// The connection agents' messages are published through ([`crate::publisher`]).
    publishers: crate::publisher::Publishers,
    /// Keeps each connection's messages in order across publishing connections.
    fences: Fences,
    /// The up stream's duplicate window, as the stream has it.
    up_duplicate_window: Duration,
    /// The store was handed out ([`Cluster::session_store`]): the hub serves only
    /// sessions it holds there.
    keeps_sessions: AtomicBool,
    /// Deletes of acknowledged down messages under way (waited for on stop).
    deleting: tokio_util::task::TaskTracker,
    calls: Arc<Semaphore>,
    /// Per agent, the down messages delivered and not yet deleted ([`InFlight`]).
    in_flight: Mutex<Swept<AgentId, std::sync::Weak<InFlight>>>,
    /// The collector of publish acks that agents' sessions wait for: one task for the
    /// hub rather than one per message. As many wait as publishes may be in flight
    /// ([`MAX_ACKS_IN_FLIGHT`]).
    acks: mpsc::UnboundedSender<AckWait>,
    /// Bumped each time the NATS connection is (re)established (a copy of a down
    /// message published meanwhile may have been missed) and every [`LOOK_AGAIN`]:
    /// readers read again, and claims are checked.
    look_again: Arc<watch::Sender<u64>>,
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
    /// The hub's run that wrote it (a hub restarted under the same id has a new one):
    /// an entry of an earlier run is swept.
    #[serde(default)]
    pub run: String,
}

impl Cluster {
    /// Connects to NATS and makes sure the streams and the presence bucket exist
    /// (creating them with `config`'s bounds if they do not).
    pub async fn connect(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        config.check()?;
        let look_again = Arc::new(watch::Sender::new(0u64));
        let bump = look_again.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("tunnel-hub {}", config.hub_id))
            .event_callback(move |event| {
                let bump = bump.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        bump.send_modify(|n| *n += 1);
                    }
                }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|source| ClusterError::Connect {
                url: config.url.clone(),
                source,
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .build(client.clone());
        let (up, down) = crate::streams::ensure(&js, &config).await?;
        // What the up stream itself keeps (it may have been made by another hub).
        let up_duplicate_window = up.cached_info().config.duplicate_window;
        let publishers = crate::publisher::Publishers::connect(&config, MAX_ACKS_IN_FLIGHT).await?;
        let (acks, waiting) = mpsc::unbounded_channel();
        tokio::spawn(collect_acks(waiting));
        let presence = crate::streams::presence(&js).await?;
        let hubs = crate::streams::hubs(&js).await?;
        let (sessions, grace_mismatch) = crate::streams::sessions(&js, &config).await?;
        let run = format!(
            "{}-{}-{}",
            std::process::id(),
            tunnel_transport::unix_millis(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let sessions = crate::NatsSessionStore::new(
            sessions,
            config.hub_id.clone(),
            run.clone(),
            config.session_grace,
            down.cached_info().config.duplicate_window,
        );
        Ok(Cluster {
            inner: Arc::new(Inner {
                hubs,
                sessions,
                grace_mismatch,
                keeps_sessions: AtomicBool::new(false),
                up_duplicate_window,
                publishers,
                fences: Fences::default(),
                deleting: tokio_util::task::TaskTracker::new(),
                run,
                calls: Arc::new(Semaphore::new(config.max_calls)),
                config,
                client,
                down,
                presence,
                in_flight: Mutex::default(),
                acks,
                look_again,
            }),
        })
    }

    /// Where this hub keeps its sessions, in NATS, for any hub of the cluster
    /// to resume: give it to the hub's sessions
    /// ([`HubSessions::store`](tunnel_router::HubSessions::store)), with the
    /// cluster's grace ([`ClusterConfig::session_grace`]). An agent whose hub drains,
    /// restarts, crashes or hangs then resumes its session on whichever hub it reaches
    /// next, with nothing lost or repeated in either direction (see
    /// [`NatsSessionStore`](crate::NatsSessionStore)). Calls forwarded by a hub that
    /// crashed get no answer: the backend's request times out.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tunnel_cluster::{Cluster, ClusterConfig};
    /// use tunnel_router::HubSessions;
    ///
    /// let config = ClusterConfig::new("nats://127.0.0.1:4222", "hub-a");
    /// let grace = config.session_grace;
    /// let cluster = Cluster::connect(config).await?;
    /// let sessions = HubSessions::default()
    ///     .grace(grace)
    ///     .store(cluster.session_store()?);
    /// # let _ = sessions; Ok(()) }
    /// ```
    ///
    /// Fails with [`ClusterError::Config`] when the bucket keeps sessions for another
    /// grace period than this hub's (the grace is the cluster's), or when the up
    /// stream's duplicate window (as the stream has it: see
    /// [`ClusterConfig::duplicate_window`]) is shorter than the grace (an agent resuming
    /// replays what its hub may have stored: the stream must still know it). With the
    /// default window (2 min), a grace of at most 2 min.
    pub fn session_store(&self) -> Result<Arc<crate::NatsSessionStore>, ClusterError> {
        if let Some(why) = &self.inner.grace_mismatch {
            return Err(ClusterError::Config(why.clone()));
        }
        let (window, grace) = (
            self.inner.up_duplicate_window,
            self.inner.config.session_grace,
        );
        if window < grace {
            return Err(ClusterError::Config(format!(
                "the up stream's duplicate window ({window:?}) is shorter than the session grace ({grace:?})"
            )));
        }
        self.inner.keeps_sessions.store(true, Ordering::Relaxed);
        Ok(Arc::new(self.inner.sessions.clone()))
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
    /// [`Unavailable`], so the agent keeps it and replays it. One NATS can never take
    /// (with its headers, larger than the server's `max_payload`) is [`Refused`]: the
    /// agent's receipt fails with `bad_request` and it is not sent again. Routes
    /// already in `router` keep their messages in this hub.
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
    /// [`Unavailable`] when the stream cannot take it now, and with [`Refused`] when it
    /// never can (larger than NATS's `max_payload`).
    ///
    /// Publishes are pipelined: the handler returns once the publish is sent, and the
    /// session acknowledges the message when the stream's ack arrives
    /// ([`Inbound::acknowledge_later`]), so one agent's messages do not wait one round
    /// trip each.
    pub async fn store(&self, msg: &Inbound) -> Result<(), BoxError> {
        let connection = msg.sender().info().id;
        let Some(publisher) = self.inner.publishers.current() else {
            return Err(Unavailable::new("NATS is not connected".to_owned()).into());
        };
        self.inner
            .fences
            .admit(publisher.generation, msg.sender())?;
        // The context bounds the wait for the ack by `publish_timeout`.
        let ack = match publish_up(&publisher.js, msg).await {
            Ok(ack) => ack,
            Err(e) => {
                // A refused message was never sent: it fails nothing after it.
                let never_sent = e.is::<Refused>();
                self.inner.fences.resolved(connection, never_sent);
                return Err(e);
            }
        };
        let inner = self.inner.clone();
        let stored = move |r: Result<_, async_nats::jetstream::context::PublishError>| {
            inner.fences.resolved(connection, r.is_ok());
            match r {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("the up stream did not store it: {e}")),
            }
        };
        match msg.acknowledge_later() {
            Some(later) => {
                let waiting = Box::pin(async move {
                    match stored(ack.await) {
                        Ok(()) => later.done(),
                        Err(reason) => later.unavailable(reason),
                    }
                });
                if let Err(back) = self.inner.acks.send(waiting) {
                    // The collector is gone (the runtime is shutting down): wait here.
                    back.0.await;
                }
                Ok(())
            }
            None => stored(ack.await).map_err(|reason| Unavailable::new(reason).into()),
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

/// Keeps each agent connection's messages in order in the up stream across
/// publishing connections ([`crate::publisher`]), which are never reestablished: what
/// one had not sent when it broke fails with it. An agent connection publishes
/// through a new publishing connection only once none of its earlier publishes is
/// unresolved (a later one could otherwise be stored before an earlier one failed),
/// and never again once one failed (its connection is being closed: the agent replays
/// from the failed one, in order).
#[derive(Debug, Default)]
struct Fences {
    by_connection: Mutex<Swept<u64, Fence>>,
}

#[derive(Debug)]
struct Fence {
    /// The publishing connection of the unresolved publishes.
    generation: u64,
    unresolved: u32,
    /// A publish failed: nothing more from this connection.
    failed: bool,
    /// To forget a failed fence once its connection is over.
    sender: tunnel_transport::ConnectionSender,
}

impl Fences {
    fn lock(&self) -> std::sync::MutexGuard<'_, Swept<u64, Fence>> {
        self.by_connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one publish of `sender`'s connection through publishing connection
    /// `generation`, or refuses it ([`Unavailable`]).
    fn admit(
        &self,
        generation: u64,
        sender: &tunnel_transport::ConnectionSender,
    ) -> Result<(), BoxError> {
        let refuse = |why: &str| -> BoxError { Unavailable::new(why.to_owned()).into() };
        let mut fences = self.lock();
        fences.sweep(|_, f| !f.sender.is_closed());
        let fence = fences.map.entry(sender.info().id).or_insert_with(|| Fence {
            generation,
            unresolved: 0,
            failed: false,
            sender: sender.clone(),
        });
        if fence.failed {
            return Err(refuse(
                "an earlier message of this connection was not stored",
            ));
        }
        if fence.unresolved > 0 && fence.generation != generation {
            fence.failed = true;
            return Err(refuse(
                "NATS reconnected with earlier messages of this connection unresolved",
            ));
        }
        if fence.unresolved == 0 {
            fence.generation = generation;
        }
        fence.unresolved += 1;
        Ok(())
    }

    /// One admitted publish of `connection` was stored (`ok`) or not.
    fn resolved(&self, connection: u64, ok: bool) {
        let mut fences = self.lock();
        if let Some(fence) = fences.map.get_mut(&connection) {
            fence.unresolved = fence.unresolved.saturating_sub(1);
            fence.failed |= !ok;
            if fence.unresolved == 0 && !fence.failed {
                fences.map.remove(&connection);
            }
        }
    }
}

/// Publishes one agent message into the up stream; the stream's ack is the future
/// returned.
async fn publish_up(
    js: &jetstream::Context,
    msg: &Inbound,
) -> Result<async_nats::jetstream::context::PublishAckFuture, BoxError> {
    let env = &msg.envelope;
    let info = msg.sender().info();
    let subject = subject::up(&info.agent, env.kind.as_str());
    let mut headers = HeaderMap::new();
    headers.insert(subject::HEADER_ID, env.id.to_string().as_str());
    headers.insert(HEADER_TYPE, env.kind.as_str());
    headers.insert(subject::HEADER_SESSION, info.session_id.as_str());
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
    // The context bounds the wait for the client to take it by `publish_timeout`
    // (and, past `MAX_ACKS_IN_FLIGHT` publishes awaiting acks, waits for one to end:
    // each of those ends within `publish_timeout`).
    js.send_publish(subject, publish)
        .await
        .map_err(|e| -> BoxError {
            if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
                Refused::new(format!("larger than the cluster's NATS takes: {e}")).into()
            } else {
                Unavailable::new(format!("the up stream did not take it: {e}")).into()
            }
        })
}

/// One publish's ack and what the session does with it.
type AckWait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs every [`AckWait`] sent to it until the hub's cluster membership is dropped.
async fn collect_acks(mut waiting: mpsc::UnboundedReceiver<AckWait>) {
    let mut running = futures_util::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            next = waiting.recv() => match next {
                Some(wait) => running.push(wait),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

/// Clusters joined by this process, for [`Inner::run`].
static RUNS: AtomicU64 = AtomicU64::new(0);

/// Up-stream publishes one hub awaits acks for at once (1,024 per connection at most).
const MAX_ACKS_IN_FLIGHT: usize = 65_536;

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
    let beating = tokio::spawn(heartbeat(inner.clone(), hub.clone()));
    let looking = {
        let inner = inner.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now() + LOOK_AGAIN;
            let mut ticks = tokio::time::interval_at(start, LOOK_AGAIN);
            loop {
                ticks.tick().await;
                inner.look_again.send_modify(|n| *n += 1);
            }
        })
    };
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
    looking.abort();
    for (_, h) in held.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        h.cancel.cancel();
    }
    // The agents' entries are released first; then, stopped in order, this hub is not
    // a dead one whose entries need sweeping.
    while tasks.join_next().await.is_some() {}
    // Messages the agents acknowledged are deleted before this hub goes (a hub that
    // takes an agent over would otherwise deliver them again), within a bound.
    inner.deleting.close();
    let _ = tokio::time::timeout(DELETES_ON_STOP, inner.deleting.wait()).await;
    inner.deleting.reopen();
    beating.abort();
    let _ = inner
        .hubs
        .delete(subject::hub_key(&inner.config.hub_id))
        .await;
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

/// Renews this hub's heartbeat in the hubs bucket every `hub_heartbeat`, and sweeps.
async fn heartbeat(inner: Arc<Inner>, hub: Hub) {
    let key = subject::hub_key(&inner.config.hub_id);
    let beat = Bytes::from(
        serde_json::json!({
            "url": hub.url().unwrap_or_default(),
            "since_ms": tunnel_transport::unix_millis(),
            "run": inner.run,
        })
        .to_string(),
    );
    let every = inner.config.hub_heartbeat;
    // Beats do not wait for a sweep, which may take long on a large bucket.
    let beating = async {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = inner.hubs.put(&key, beat.clone()).await {
                tracing::debug!(error = %e, "heartbeat not written");
            }
        }
    };
    let sweeping = async {
        let mut swept = false;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match Box::pin(sweep(&inner, swept)).await {
                Ok(Some(complete)) => swept = complete,
                // Not the sweeper (now): scan again when it becomes it.
                Ok(None) => swept = false,
                Err(e) => tracing::debug!(error = %e, "presence sweep failed; trying again"),
            }
        }
    };
    tokio::join!(beating, sweeping);
}

/// Hub heartbeats a sweep reads at most.
const MAX_HUBS: usize = 1024;

/// Presence entries a sweep reads at most (the rest wait for the next sweep).
const MAX_SWEPT: usize = 1_000_000;

/// Removes the presence entries of dead hubs, if this hub is the live hub with the
/// lowest id (one sweeper at a time; the deletes are compare-and-set, so two would do
/// no harm). A hub is dead when its last beat is three heartbeats older than the newest
/// beat: all times are the server's, so hubs' clocks do not matter. An entry naming a
/// hub that is not alive (dead, with no beat at all, or alive in another run than the
/// one that wrote it: restarted under the same id) goes if it is older than that too;
/// an agent that claims it meanwhile changes its revision, and the delete fails. The
/// presence bucket is scanned when this hub becomes the sweeper, and again while an
/// entry of a hub that is not alive is left (too young yet, or its delete failed) or a
/// hub died; a dead hub's beat is removed once all such entries are. Returns whether
/// the scan left nothing to do, or `None` when this hub is not the sweeper.
async fn sweep(inner: &Inner, swept_before: bool) -> Result<Option<bool>, String> {
    let mut beats = Vec::new();
    for key in crate::streams::keys(&inner.hubs, MAX_HUBS).await? {
        if let Some(entry) = inner.hubs.entry(&key).await.map_err(|e| e.to_string())?
            && entry.operation == kv::Operation::Put
        {
            let run = serde_json::from_slice::<serde_json::Value>(&entry.value)
                .ok()
                .and_then(|v| v["run"].as_str().map(str::to_owned))
                .unwrap_or_default();
            beats.push((key, entry.revision, millis(&entry), run));
        }
    }
    let Some(newest) = beats.iter().map(|b| b.2).max() else {
        return Ok(None);
    };
    let limit = (inner.config.hub_heartbeat * 3).as_millis() as i128;
    let stale = |created: i128| newest - created > limit;
    let (dead, live): (Vec<_>, Vec<_>) = beats.into_iter().partition(|b| stale(b.2));
    let me = subject::hub_key(&inner.config.hub_id);
    if live.iter().map(|b| &b.0).min() != Some(&me) {
        return Ok(None);
    }
    if swept_before && dead.is_empty() {
        return Ok(Some(false));
    }
    let live: HashMap<String, String> = live.into_iter().map(|b| (b.0, b.3)).collect();
    // Entries left for a later sweep: not old enough yet, or their delete failed.
    let (mut removed, mut left) = (0usize, 0usize);
    for key in crate::streams::keys(&inner.presence, MAX_SWEPT).await? {
        let Ok(Some(entry)) = inner.presence.entry(&key).await else {
            continue;
        };
        let not_alive = entry.operation == kv::Operation::Put
            && serde_json::from_slice::<Presence>(&entry.value)
                .is_ok_and(|p| live.get(&subject::hub_key(&p.hub)) != Some(&p.run));
        if not_alive && !stale(millis(&entry)) {
            left += 1;
        } else if not_alive {
            match inner
                .presence
                .delete_expect_revision(&key, Some(entry.revision))
                .await
            {
                Ok(()) => removed += 1,
                // Claimed meanwhile, or NATS away: the next sweep looks again.
                Err(_) => left += 1,
            }
        }
    }
    if left > 0 {
        return Ok(Some(false));
    }
    for (key, revision, _, _) in dead {
        tracing::info!(hub = %tunnel_proto::text::Untrusted(&key), "a hub stopped beating: its presence entries are removed");
        let _ = inner
            .hubs
            .delete_expect_revision(&key, Some(revision))
            .await;
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "presence entries of hubs that are gone were removed"
        );
    }
    Ok(Some(true))
}

/// When the server stored a KV entry, in milliseconds since the Unix epoch.
fn millis(entry: &kv::Entry) -> i128 {
    entry.created.unix_timestamp_nanos() / 1_000_000
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
        run: inner.run.clone(),
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

/// Everything this hub does for one connected agent, until `cancel`: one subscription
/// to everything addressed to it (calls, and copies of what backends put in the down
/// stream, which say when to read it), its presence claim, and the delivery of its
/// down messages.
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
    // Futures that run once are boxed, so that the task an idle agent keeps holds only
    // what waiting needs.
    // Subscribed before the first read, so nothing published later goes unnoticed.
    let inbox = tokio::select! {
        () = cancel.cancelled() => return,
        inbox = Box::pin(subscribe(&inner, &agent)) => inbox,
    };
    // Revisions start at 1; 0 is none yet.
    let revision = AtomicU64::new(0);
    let claiming = async {
        let claim = Claim {
            inner: &inner,
            hub: &hub,
            held: &held,
            agent: &agent,
            connection,
            key: &key,
        };
        Box::pin(claim.run(&presence, &revision)).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        _ = async { tokio::join!(claiming, serve_inbox(&inner, &hub, &agent, inbox)) } => {}
    }
    let revision = revision.load(Ordering::Relaxed);
    Box::pin(release(&inner, &key, revision, &presence)).await;
}

/// Claiming one agent's presence entry for one of its connections.
struct Claim<'a> {
    inner: &'a Inner,
    hub: &'a Hub,
    held: &'a HeldMap,
    agent: &'a AgentId,
    connection: u64,
    key: &'a str,
}

impl Claim<'_> {
    /// Claims the entry (its revision goes to `revision` and to the held map), then
    /// lets go at once if another hub took it before the watch knew our revision.
    /// After each NATS reconnect and every [`LOOK_AGAIN`], writes it again if it is
    /// gone (a hub cut off from NATS, or too slow to beat, is swept as dead: [`sweep`]).
    async fn run(&self, presence: &Presence, revision: &AtomicU64) {
        let mut look_again = self.inner.look_again.subscribe();
        // Each claim and look is boxed: this future stays alive as long as the agent's
        // connection, and holding the largest of them inline would keep its whole size
        // (2.6 KiB) in every idle agent's task.
        Box::pin(self.claim(presence, revision)).await;
        while look_again.changed().await.is_ok() {
            let gone = match Box::pin(self.inner.presence.entry(self.key)).await {
                Ok(None) => true,
                Ok(Some(entry)) => entry.operation != kv::Operation::Put,
                Err(_) => false,
            };
            if gone {
                Box::pin(self.claim(presence, revision)).await;
            }
        }
    }

    async fn claim(&self, presence: &Presence, revision: &AtomicU64) {
        let written = claim_until_written(self.inner, self.agent, self.key, presence).await;
        revision.store(written, Ordering::Relaxed);
        if let Some(h) = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.agent)
            .filter(|h| h.connection == self.connection)
        {
            h.revision = Some(written);
        }
        if let Ok(Some(entry)) = self.inner.presence.entry(self.key).await
            && entry.revision > written
            && serde_json::from_slice::<Presence>(&entry.value)
                .is_ok_and(|p| p.hub != self.inner.config.hub_id)
            && let Some(sender) = self
                .hub
                .sender(self.agent)
                .filter(|s| s.info().id == self.connection)
        {
            sender.abort_with(
                CloseCode::SESSION_REPLACED,
                "the agent connected to another hub",
            );
        }
    }
}

/// The agent left this hub: its presence entry is removed, but only at our revision, so
/// an entry another hub wrote meanwhile stays. A claim cut short (the agent left while
/// it ran; `revision` is 0) may have been written all the same: the entry is removed if
/// it holds exactly what we wrote.
async fn release(inner: &Inner, key: &str, revision: u64, ours: &Presence) {
    let Some(current) = inner.presence.entry(key).await.ok().flatten() else {
        return;
    };
    let mine = current.operation == kv::Operation::Put
        && if revision > 0 {
            current.revision == revision
        } else {
            serde_json::from_slice::<Presence>(&current.value).is_ok_and(|p| p == *ours)
        };
    if mine {
        let _ = inner
            .presence
            .delete_expect_revision(key, Some(current.revision))
            .await;
    }
}

/// The subscription to everything addressed to `agent`, retried until NATS takes it.
async fn subscribe(inner: &Inner, agent: &AgentId) -> async_nats::Subscriber {
    let mut backoff = Backoff::new();
    loop {
        match inner.client.subscribe(subject::down_all(agent)).await {
            Ok(inbox) => return inbox,
            Err(e) => {
                tracing::debug!(%agent, error = %e, "cannot subscribe for the agent yet");
                backoff.wait().await;
            }
        }
    }
}

/// Claims the agent's presence entry, retrying (NATS may be down or busy) until it is
/// written; returns its revision.
async fn claim_until_written(inner: &Inner, agent: &AgentId, key: &str, value: &Presence) -> u64 {
    let mut backoff = Backoff::new();
    let mut warned = false;
    loop {
        match claim(&inner.presence, key, value).await {
            Ok(revision) => return revision,
            Err(e) => {
                if !warned {
                    tracing::warn!(%agent, error = %e, "presence entry not written yet: retrying");
                    warned = true;
                }
                backoff.wait().await;
            }
        }
    }
}

/// Doubling waits from 100 ms to 5 s, for retries against NATS.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
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

/// One agent's down messages that this hub has delivered and not yet deleted from the
/// stream. It outlives the agent's connection: a session resumed on this hub
/// acknowledges them later, and the next connection's reader must not send them again.
#[derive(Debug, Default)]
struct InFlight {
    state: Mutex<InFlightState>,
    /// Bumped when a delivery ended (a slot is free, or it failed): wakes every reader
    /// of the agent (the old connection's may still be there; a wake-up for one
    /// reader only could go to it).
    changed: watch::Sender<u64>,
    /// Held by the agent's reader for each read and delivery: a new connection's
    /// reader may start before the old one's task has gone.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct InFlightState {
    /// Down messages handed to the agent's session, by stream sequence.
    seqs: std::collections::BTreeMap<u64, Slot>,
    /// Entries of `seqs` awaiting their outcome (not deleted).
    awaiting: usize,
    /// Reads of the stream begun so far.
    reads: u64,
    /// Deliveries that failed so far: a reader that has not seen the last reads the
    /// agent's messages from the start of the stream again (each reader: one that
    /// took a shared flag could leave another reader past the failed message).
    rewinds: u64,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlightState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One down message handed to the agent's session.
#[derive(Debug)]
struct Slot {
    /// Receipts awaited for it: one per session copy it was handed to (a session
    /// restored here may carry one this hub sent to an older copy).
    owners: u32,
    /// Once it was deleted: the reads begun by then. It is kept until every read in
    /// flight at the delete has ended, so a read racing the delete does not deliver it
    /// again.
    deleted: Option<u64>,
    /// The session copy it was last handed to.
    copy: u64,
}

impl InFlightState {
    /// Down message `seq` was handed to session copy `copy` (see
    /// [`crate::sessions::StagedIn::copy`]; 0 outside sessions kept in NATS), whose
    /// receipt is to be awaited; false when it was deleted already (nothing to await).
    fn start(&mut self, seq: u64, copy: u64) -> bool {
        match self.seqs.get_mut(&seq) {
            None => {
                self.seqs.insert(
                    seq,
                    Slot {
                        owners: 1,
                        deleted: None,
                        copy,
                    },
                );
                self.awaiting += 1;
                true
            }
            Some(slot) if slot.deleted.is_some() => false,
            Some(slot) => {
                slot.owners += 1;
                slot.copy = copy;
                true
            }
        }
    }

    /// What a reader for session copy `copy` does with stream message `seq`: send it
    /// (`None`), pass it (`Some(false)`: this copy has it, or it is deleted), or stop
    /// before it (`Some(true)`): another copy has it, and if that copy's delivery
    /// fails it is to be sent again, before anything after it.
    fn meets(&self, seq: u64, copy: u64) -> Option<bool> {
        self.seqs
            .get(&seq)
            .map(|slot| slot.deleted.is_none() && slot.copy != copy)
    }

    /// One receipt of down message `seq`: the agent has it (`done`: it was deleted),
    /// or it failed; once every copy failed, the message is to be delivered again.
    fn end(&mut self, seq: u64, done: bool) {
        let Some(slot) = self.seqs.get_mut(&seq) else {
            return;
        };
        if slot.deleted.is_some() {
            return;
        }
        slot.owners = slot.owners.saturating_sub(1);
        if done {
            slot.deleted = Some(self.reads);
            self.awaiting -= 1;
        } else if slot.owners == 0 {
            self.seqs.remove(&seq);
            self.awaiting -= 1;
            self.rewinds += 1;
        }
    }

    /// A read begins (one at a time per agent: [`InFlight::reading`]). Messages
    /// deleted before it began cannot be met again: they are forgotten.
    fn begin_read(&mut self) {
        self.reads += 1;
        let reads = self.reads;
        if self.seqs.len() > self.awaiting {
            self.seqs
                .retain(|_, slot| slot.deleted.is_none_or(|at| at >= reads));
        }
    }
}

/// The agent's [`InFlight`], shared by its connections on this hub.
fn in_flight(inner: &Inner, agent: &AgentId) -> Arc<InFlight> {
    let mut map = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(live) = map.map.get(agent).and_then(std::sync::Weak::upgrade) {
        return live;
    }
    // Bounded by the agents that have a reader or a delivery pending, plus as many
    // ended ones (see `Swept`).
    map.sweep(|_, w| w.strong_count() > 0);
    let fresh = Arc::new(InFlight::default());
    map.map.insert(agent.clone(), Arc::downgrade(&fresh));
    fresh
}

/// A map whose ended entries are swept out once it has grown to twice what the last
/// sweep left (and to at least [`Swept::AT_LEAST`]): a sweep costs the map's length,
/// so each insert pays for it about once, and what is left is at most twice what is
/// live.
#[derive(Debug)]
struct Swept<K, V> {
    map: HashMap<K, V>,
    sweep_at: usize,
}

impl<K, V> Default for Swept<K, V> {
    fn default() -> Self {
        Swept {
            map: HashMap::new(),
            sweep_at: Self::AT_LEAST,
        }
    }
}

impl<K, V> Swept<K, V> {
    /// No sweep below this many entries.
    const AT_LEAST: usize = 1024;
}

impl<K: std::hash::Hash + Eq, V> Swept<K, V> {
    /// Before an insert: keeps only the entries `keep` says are live, when it is time.
    fn sweep(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(keep);
            self.sweep_at = (self.map.len() * 2).max(Self::AT_LEAST);
        }
    }
}

/// Serves what arrives for the agent: calls are forwarded to it; a copy of a down
/// message (or a reconnect to NATS, or a delivery's end) says to read the down stream,
/// which is read by subject, oldest first, at most `down_in_flight` unacknowledged.
async fn serve_inbox(
    inner: &Arc<Inner>,
    hub: &Hub,
    agent: &AgentId,
    mut inbox: async_nats::Subscriber,
) {
    let shared = in_flight(inner, agent);
    // A session kept in the cluster's store: each down message is recorded there
    // before it may reach the agent.
    let granted = hub.session_of(agent).map(|s| s.id);
    let session = granted
        .clone()
        .filter(|id| inner.sessions.holds_session(agent, id));
    if granted.is_some() && session.is_none() && inner.keeps_sessions.load(Ordering::Relaxed) {
        // Taken by another hub since its grant: delivering unrecorded could repeat or
        // lose messages there.
        tracing::info!(%agent, "the agent's session is held by another hub: not delivering here");
        return std::future::pending().await;
    }
    {
        let _reading = shared.reading.lock().await;
        adopt_held(inner, hub, agent, &shared);
        if let Some(id) = &session
            && !Box::pin(adopt_taken(inner, hub, agent, id, &shared)).await
        {
            return Box::pin(lost(hub, agent)).await;
        }
    }
    // Down messages staged since the last record. At the start, what an earlier
    // reader of this session may have left staged is recorded and released.
    let mut staged = usize::from(session.is_some());
    // The copy of the session this reader delivers for (0: not kept in NATS).
    let copy = session
        .as_deref()
        .and_then(|id| inner.sessions.copy_of(agent, id))
        .unwrap_or(0);
    let mut look_again = inner.look_again.subscribe();
    let mut changed = shared.changed.subscribe();
    // The failed deliveries this reader has read again for.
    let mut rewinds = shared.lock().rewinds;
    let filter = subject::down_all(agent);
    // After a copy of a new message: how many of the [`RECHECKS`] were made.
    let mut rechecks = RECHECKS.len();
    let limit = inner.config.down_in_flight.max(1);
    let mut calls = JoinSet::new();
    // The first stream sequence not looked at yet, and whether there may be more.
    let (mut next, mut unread) = (1u64, true);
    // The wait before reading again, if any.
    let mut retry: Option<Wait> = None;
    // A "busy" answer to a call, sent before anything else is looked at.
    let mut busy = None;
    loop {
        if let Some(answer) = busy.take() {
            answer.await;
        }
        // A full batch of staged messages is recorded before more are read.
        while unread && retry.is_none() && staged < RECORD_AT_MOST {
            let _reading = shared.reading.lock().await;
            {
                let state = shared.lock();
                if state.awaiting >= limit {
                    break;
                }
                if state.rewinds != rewinds {
                    rewinds = state.rewinds;
                    next = 1;
                }
            }
            shared.lock().begin_read();
            let read = Box::pin(
                inner
                    .down
                    .direct_get_next_for_subject(filter.as_str(), Some(next)),
            );
            match read.await {
                Ok(msg) => {
                    match shared.lock().meets(msg.sequence, copy) {
                        Some(false) => {
                            next = msg.sequence + 1;
                            continue;
                        }
                        Some(true) => {
                            // An older copy's delivery: wait for its outcome (which
                            // wakes the reader) before sending anything after it.
                            next = msg.sequence;
                            unread = false;
                            break;
                        }
                        None => next = msg.sequence + 1,
                    }
                    let seq = msg.sequence;
                    let delivered = Box::pin(deliver(
                        inner,
                        hub,
                        agent,
                        &shared,
                        msg,
                        session.as_deref(),
                        copy,
                    ))
                    .await;
                    match delivered {
                        Ok(was_staged) => staged += usize::from(was_staged),
                        // The hub no longer holds the agent: what is unread waits.
                        Err(NotDelivered::Gone) => {
                            drop(_reading);
                            if let Some(id) = &session
                                && !inner.sessions.holds_session(agent, id)
                            {
                                return Box::pin(lost(hub, agent)).await;
                            }
                            return std::future::pending().await;
                        }
                        Err(NotDelivered::Later) => {
                            next = seq;
                            retry = Some(Wait::after_failure());
                        }
                    }
                }
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                    unread = false;
                    // A copy of a new message may come before the stream answers with
                    // it: look a few times more, a little later each time.
                    if let Some(wait) = RECHECKS.get(rechecks) {
                        rechecks += 1;
                        retry = Some(Wait::recheck(*wait));
                    }
                }
                Err(e) => {
                    tracing::debug!(%agent, error = %e, "cannot read the agent's down messages yet");
                    retry = Some(Wait::after_failure());
                }
            }
        }
        if staged > 0 && retry.as_ref().is_none_or(|w| w.recheck) {
            let full = staged >= RECORD_AT_MOST;
            match Box::pin(record(inner, hub, agent, session.as_deref(), &mut staged)).await {
                Recorded::Lost => return Box::pin(lost(hub, agent)).await,
                Recorded::NotYet => retry = Some(Wait::after_failure()),
                // More may wait: read on without waiting for a wake-up.
                Recorded::Written if full && retry.is_none() => continue,
                Recorded::Written => {}
            }
        }
        tokio::select! {
            next_msg = inbox.next() => {
                let Some(msg) = next_msg else {
                    // The client is closed: nothing more arrives.
                    return std::future::pending().await;
                };
                if !subject::is_call(msg.subject.as_str()) {
                    unread = true;
                    rechecks = 0;
                    continue;
                }
                busy = start_call(inner, hub, agent, msg, &mut calls);
            }
            Ok(()) = changed.changed() => unread = true,
            // Reconnected to NATS, or the periodic look: read from the start.
            Ok(()) = look_again.changed() => {
                unread = true;
                next = 1;
            }
            () = async { if let Some(w) = retry.as_mut() { w.sleep.as_mut().await } }, if retry.is_some() => {
                retry = None;
                unread = true;
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
}

/// Starts forwarding a call to the agent, in `calls`; returns the answer to send
/// instead when too many calls are in flight. Not async, and the answer is awaited
/// outside the reader's `select!`: a call's message held across an await there would
/// stay in every idle agent's task.
fn start_call(
    inner: &Inner,
    hub: &Hub,
    agent: &AgentId,
    msg: async_nats::Message,
    calls: &mut JoinSet<()>,
) -> Option<futures_util::future::BoxFuture<'static, ()>> {
    let reply_to = msg.reply.clone()?;
    let client = inner.client.clone();
    let Ok(permit) = inner.calls.clone().try_acquire_owned() else {
        return Some(Box::pin(async move {
            let _ = respond_error(&client, reply_to, "busy", "too many calls in flight").await;
        }));
    };
    let (hub, agent) = (hub.clone(), agent.clone());
    calls.spawn(async move {
        let answer = forward_call(&hub, &agent, &msg).await;
        let _ = match answer {
            Ok(reply) => respond(&client, reply_to, &reply).await,
            Err((code, message)) => respond_error(&client, reply_to, &code, &message).await,
        };
        drop(permit);
    });
    None
}

/// A down reader's wait before it reads again.
struct Wait {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// One of the [`RECHECKS`], not a wait after a failure: what is staged is recorded
    /// and released meanwhile. (Each copy of a new message starts the rechecks again:
    /// under a steady flow, staged messages would otherwise wait for a full batch, and
    /// with them the agent's acks, which ride on them.)
    recheck: bool,
}

impl Wait {
    fn recheck(wait: Duration) -> Self {
        Wait {
            sleep: Box::pin(tokio::time::sleep(wait)),
            recheck: true,
        }
    }

    /// After a failure (NATS, or the session cannot take a message now).
    fn after_failure() -> Self {
        Wait {
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
            recheck: false,
        }
    }
}

/// The waits before looking again after a copy of a new message found nothing yet.
const RECHECKS: [Duration; 3] = [
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(500),
];

/// How often every reader of down messages looks again whatever it was told: a
/// backstop for a missed copy or reconnect event. The hub's claims are checked as often.
const LOOK_AGAIN: Duration = Duration::from_secs(60);

/// Sends one down message to the agent; once the agent acknowledged it, deletes it from
/// the stream. A message that can never be delivered (undecodable) is deleted at once.
/// Fails when the hub no longer holds the agent. In a `session` kept in the cluster's
/// store the message is staged, for [`record`] to release: `Ok(true)`.
async fn deliver(
    inner: &Arc<Inner>,
    hub: &Hub,
    agent: &AgentId,
    shared: &Arc<InFlight>,
    msg: jetstream::message::StreamMessage,
    session: Option<&str>,
    copy: u64,
) -> Result<bool, NotDelivered> {
    let seq = msg.sequence;
    let env = match down_envelope(msg.subject.as_str(), Some(&msg.headers), &msg.payload) {
        Ok(mut env) => {
            env.headers
                .insert(subject::HEADER_DOWN_SEQ, seq.to_string().as_str());
            env
        }
        Err(e) => {
            tracing::warn!(%agent, error = %e, "deleting an undecodable down message");
            delete_down(inner, seq).await;
            return Ok(false);
        }
    };
    let msg_id = msg.headers.get("Nats-Msg-Id").map(|v| v.as_str());
    if let (Some(id), Some(msg_id)) = (session, msg_id)
        && inner.sessions.sent_before(agent, id, msg_id, seq)
    {
        tracing::debug!(%agent, seq, "deleting a second copy of a down message sent in the session (stored again under its id)");
        delete_down(inner, seq).await;
        return Ok(false);
    }
    // A reader of a copy this hub has since replaced (the agent came back and the
    // session was taken again) stops: the new copy's reader delivers, from its record.
    // Checked after the hub found the session's copy: a take replaces the copy here
    // before the hub registers the session it restored, so a message staged after a
    // yes is in the old copy's session, which never sends it.
    let sent = match session {
        Some(id) => {
            let ours = || copy == 0 || inner.sessions.copy_of(agent, id) == Some(copy);
            hub.send_staged(agent, id, env, ours).await
        }
        None => hub.send_envelope(agent, env).await,
    };
    let receipt = match sent {
        Ok(receipt) => receipt,
        Err(tunnel_router::Error::NotConnected) => return Err(NotDelivered::Gone),
        Err(tunnel_router::Error::Encode(e)) => {
            // Never: its payload has no form on the agent's connection (a MessagePack
            // map with a binary key for a JSON agent, say). Left in the stream, it
            // would stop every later message to the agent.
            tracing::warn!(%agent, stream_seq = seq, error = %e, "deleting a down message the agent's connection cannot carry");
            delete_down(inner, seq).await;
            return Ok(false);
        }
        Err(e) => {
            tracing::debug!(%agent, error = %e, "a down message waits: the agent's session cannot take it now");
            return Err(NotDelivered::Later);
        }
    };
    let staged = match session {
        Some(id) => match inner
            .sessions
            .stage(agent, id, copy, receipt.seq(), seq, msg_id)
        {
            Some(staged) => Some(staged),
            // Lost meanwhile: staged, it never goes out of this copy.
            None => return Err(NotDelivered::Gone),
        },
        None => None,
    };
    tracing::debug!(%agent, stream_seq = seq, session_seq = receipt.seq(), session = ?session, "down message handed to the session");
    shared.lock().start(
        seq,
        staged.as_ref().map_or(0, crate::sessions::StagedIn::copy),
    );
    track(inner, shared, agent, seq, receipt, staged);
    Ok(session.is_some())
}

/// How many 5 ms waits a reader waits for its connection to attach (10 s).
const ATTACH_WAITS: u32 = 2_000;

/// At most this many down messages are staged before they are recorded.
const RECORD_AT_MOST: usize = 64;

/// What [`record`] did.
enum Recorded {
    /// Written (or nothing to write), and released.
    Written,
    /// NATS did not take the write: they stay staged.
    NotYet,
    /// Another hub holds the session now.
    Lost,
}

/// Writes the staged down messages of `session` in its record, then releases them to
/// the agent.
async fn record(
    inner: &Inner,
    hub: &Hub,
    agent: &AgentId,
    session: Option<&str>,
    staged: &mut usize,
) -> Recorded {
    let Some(id) = session else {
        *staged = 0;
        return Recorded::Written;
    };
    match inner.sessions.record(agent, id).await {
        Ok(through) => {
            *staged = 0;
            hub.release(agent, id, through).await;
            Recorded::Written
        }
        Err(crate::sessions::WriteError::Lost) => Recorded::Lost,
        Err(e) => {
            tracing::debug!(%agent, error = %e, "down messages wait: their record is not written");
            Recorded::NotYet
        }
    }
}

/// The agent's session is another hub's now: its connection here is closed (`4004`),
/// so that it goes where its session is; this reader delivers nothing more.
async fn lost(hub: &Hub, agent: &AgentId) {
    tracing::info!(%agent, "the agent's session is held by another hub: closing its connection here");
    if let Some(sender) = hub.sender(agent) {
        sender.abort_with(
            tunnel_proto::CloseCode::SESSION_REPLACED,
            "the session is held by another hub",
        );
    }
    std::future::pending::<()>().await;
}

/// For a session taken from the cluster's store, once its agent resumed (reporting
/// `R`): deletes the down messages the record says it has, then writes the record
/// without the taken pairs, then lets the session send again (it holds everything
/// after `R` until then; see [`NatsSessionStore::adopt`](crate::NatsSessionStore)).
/// False when another hub holds the session now (or it never attached).
async fn adopt_taken(
    inner: &Arc<Inner>,
    hub: &Hub,
    agent: &AgentId,
    id: &str,
    shared: &Arc<InFlight>,
) -> bool {
    // The connection is announced before it attaches: what the agent has is known
    // once its resume was applied.
    let mut waits = 0u32;
    let resumed_at = loop {
        match hub.session_of(agent) {
            Some(s) if s.id == id && s.attached => break s.resumed_open_at,
            Some(s) if s.id == id && waits < ATTACH_WAITS => {
                waits += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Gone, or never attached: the agent's next connection adopts it.
            _ => return false,
        }
    };
    // Not restored from a record here: nothing to adopt.
    let Some(resumed_at) = resumed_at else {
        return true;
    };
    if let Some(has) = inner.sessions.taken_down(agent, id, resumed_at) {
        let copy = inner.sessions.copy_of(agent, id).unwrap_or(0);
        tracing::debug!(%agent, resumed_at, deleting = ?has, "a taken session resumed: deleting what the agent has");
        let mine: Vec<u64> = has
            .into_iter()
            .filter(|seq| shared.lock().start(*seq, copy))
            .collect();
        // Deleted before the record forgets them: a crash in between leaves them
        // recorded, and the next hub deletes them again.
        futures_util::future::join_all(mine.iter().map(|seq| delete_down(inner, *seq))).await;
        for seq in &mine {
            shared.lock().end(*seq, true);
        }
        let mut backoff = Backoff::new();
        loop {
            match inner.sessions.adopt(agent, id, resumed_at).await {
                Ok(()) => break,
                Err(crate::sessions::WriteError::Lost) => return false,
                Err(e) => {
                    tracing::debug!(%agent, error = %e, "the resumed session's record is not written yet");
                    backoff.wait().await;
                }
            }
        }
        shared.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
    // Only the hold: a message staged under `R + 1` by an earlier reader of this copy
    // is released by a record write that carries it, like any other.
    hub.release_resumed(agent, id).await;
    true
}

/// Waits for the outcome of down message `seq` (in `shared`): deletes it from the
/// stream once the agent has it, or lets the next read deliver it again.
fn track(
    inner: &Arc<Inner>,
    shared: &Arc<InFlight>,
    agent: &AgentId,
    seq: u64,
    receipt: tunnel_router::Receipt,
    staged: Option<crate::sessions::StagedIn>,
) {
    let (inner, shared, agent) = (inner.clone(), shared.clone(), agent.clone());
    let in_session = receipt.seq();
    // Held by the task: the pair is forgotten only once the message is deleted, or
    // its delivery failed (a send again records anew).
    // Not tied to this connection: a session resumed on this hub acknowledges later.
    tokio::spawn(async move {
        let outcome = receipt.delivered().await;
        tracing::debug!(%agent, stream_seq = seq, session_seq = in_session, outcome = ?outcome, "down message's outcome");
        let done = match outcome {
            Ok(()) => true,
            // Sent on a connection that tracks nothing (a hub without sessions): all
            // that can be known, so at most once there.
            Err(Undelivered::Untracked) => true,
            // The agent can never take it (no handler for its type, a bad payload):
            // sending it again would not help.
            Err(Undelivered::Rejected { code, message }) => {
                tracing::warn!(%agent, code = %tunnel_proto::text::Untrusted(&code), message = %tunnel_proto::text::Untrusted(&message), "the agent rejected a down message: deleting it");
                true
            }
            Err(_) => false,
        };
        if done {
            inner.deleting.track_future(delete_down(&inner, seq)).await;
        }
        if let Some(staged) = &staged {
            if done {
                staged.delivered(seq, in_session);
            } else {
                staged.undelivered(seq, in_session);
            }
        }
        shared.lock().end(seq, done);
        shared.changed.send_modify(|n| *n = n.wrapping_add(1));
    });
}

/// Takes over the down messages a session restored from a store of whole snapshots
/// (a `MemoryStore` shared by hubs of one process; the cluster's own store restores
/// sessions holding nothing) carried from the hub that saved it (sent to the agent,
/// not acknowledged then, so still in the stream): they are the session's to deliver
/// (or the agent's resume acknowledged them), so the reader skips them, and each is
/// deleted once the agent has it.
fn adopt_held(inner: &Arc<Inner>, hub: &Hub, agent: &AgentId, shared: &Arc<InFlight>) {
    for held in hub.take_restored(agent, subject::HEADER_DOWN_SEQ) {
        let Some(seq) = held
            .headers
            .get(subject::HEADER_DOWN_SEQ)
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        if shared.lock().start(seq, 0) {
            track(inner, shared, agent, seq, held.receipt, None);
        }
    }
}

/// Why [`deliver`] did not hand a message to the agent's session.
enum NotDelivered {
    /// The hub no longer holds the agent.
    Gone,
    /// The session cannot take it now (its buffer stays full): read it again later.
    Later,
}

/// Deletes a delivered down message, retrying (every 5 s at most) until the stream
/// says it is deleted or not there (any other answer, such as a server that has not
/// recovered its streams yet, leaves it there). Until then its in-flight slot keeps it
/// from being read again.
async fn delete_down(inner: &Inner, seq: u64) {
    let mut backoff = Backoff::new();
    let mut warned = false;
    loop {
        let why = match inner.down.delete_message(seq).await {
            Ok(_) => return,
            Err(e) => match e.kind() {
                stream::DeleteMessageErrorKind::JetStream(js) if gone(&js) => return,
                _ => e.to_string(),
            },
        };
        if !warned && backoff.0 >= Duration::from_secs(5) {
            tracing::warn!(seq, error = %why, "a delivered down message is not deleted yet: retrying");
            warned = true;
        }
        backoff.wait().await;
    }
}

/// The stream's answers to a delete that say the message is not there: deleted
/// already (`10043`; `10057` "no message found" below the stream's first message),
/// past the stream's last message (`10057` "stream store EOF"), or the stream gone
/// (`10059`). Other `10057`s are failures.
fn gone(error: &jetstream::Error) -> bool {
    use jetstream::ErrorCode as E;
    let code = error.error_code();
    code == E::SEQUENCE_NOT_FOUND
        || code == E::STREAM_NOT_FOUND
        || (code == E::STREAM_MESSAGE_DELETE_FAILED && {
            let said = error.to_string().to_ascii_lowercase();
            said.contains("no message found") || said.contains("store eof")
        })
}

/// How long a hub that stops waits for the deletes of acknowledged down messages.
const DELETES_ON_STOP: Duration = Duration::from_secs(2);

/// The envelope a down message stands for: its type from the subject, its payload in
/// the codec its header names (JSON by default), validated.
fn down_envelope(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Result<Box<Envelope>, String> {
    let kind = subject::kind_of(subject).ok_or("a subject without a type")?;
    let format = codec(
        headers
            .and_then(|h| h.get(HEADER_CODEC))
            .map(|v| v.as_str()),
    )?;
    let mut env = Box::new(Envelope::new(0, MessageType::from_wire(&kind), 0));
    if !payload.is_empty() {
        env.payload =
            Some(Payload::from_encoded(format, payload.clone()).map_err(|e| e.to_string())?);
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

/// Longest a forwarded call waits for the agent unless the caller asks for less.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn forward_call(
    hub: &Hub,
    agent: &AgentId,
    call: &async_nats::Message,
) -> Result<Envelope, (String, String)> {
    let env = down_envelope(call.subject.as_str(), call.headers.as_ref(), &call.payload)
        .map_err(|e| ("bad_request".to_string(), e))?;
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

#[cfg(test)]
mod tests {
    use super::{InFlightState, Swept};

    #[test]
    fn a_swept_map_sweeps_when_it_doubled_not_on_every_insert() {
        let mut swept: Swept<u32, bool> = Swept::default();
        let mut sweeps = 0;
        // 1,500 live entries and as many ended ones, inserted in turn.
        for i in 0..3000u32 {
            swept.sweep(|_, live| {
                sweeps += 1;
                *live
            });
            swept.map.insert(i, i % 2 == 0);
        }
        // Swept at 1,024 (512 left), then at 1,024 again, ...: each entry is looked at
        // a bounded number of times, not once per insert.
        assert!(sweeps < 4 * 3000, "{sweeps} entries looked at");
        assert!(
            swept.map.len() <= 2 * 1500,
            "at most twice the live entries"
        );
        let live = swept.map.values().filter(|l| **l).count();
        assert_eq!(live, 1500, "no live entry swept");
        // A map of live entries at the bound, looked up again and again without an
        // insert, is swept once, not on every call.
        let mut full: Swept<u32, ()> = Swept::default();
        full.map.extend((0..1024).map(|i| (i, ())));
        let mut looked = 0;
        for _ in 0..1000 {
            full.sweep(|_, ()| {
                looked += 1;
                true
            });
        }
        assert_eq!(looked, 1024);
    }

    #[test]
    fn a_message_handed_to_two_session_copies_is_read_again_only_when_both_failed() {
        let mut state = InFlightState::default();
        assert!(state.start(7, 0));
        assert!(state.start(7, 0), "the restored copy holds it too");
        assert_eq!(state.awaiting, 1, "one message awaited");
        state.end(7, false);
        assert_eq!(state.rewinds, 0, "the other copy may still deliver it");
        assert!(state.seqs.contains_key(&7));
        state.end(7, false);
        assert_eq!(state.rewinds, 1, "no copy left: read it again");
        assert!(!state.seqs.contains_key(&7));
        assert_eq!(state.awaiting, 0);
    }

    #[test]
    fn a_deleted_message_is_known_through_the_read_racing_its_delete_then_forgotten() {
        let mut state = InFlightState::default();
        state.begin_read();
        assert!(state.start(3, 0));
        // Read 2 is in flight when the delete lands: its answer may still hold 3.
        state.begin_read();
        state.end(3, true);
        assert_eq!(state.awaiting, 0);
        assert!(state.seqs.contains_key(&3), "skipped if read 2 returns it");
        assert!(!state.start(3, 0), "nothing to await for a deleted message");
        // Read 3 began after the delete: it cannot meet 3.
        state.begin_read();
        assert!(state.seqs.is_empty(), "forgotten");
        // A late failure of a copy of a message already deleted changes nothing.
        state.end(3, false);
        assert_eq!(state.rewinds, 0);
    }

    #[test]
    fn a_reader_stops_before_a_message_another_copy_may_give_back() {
        let mut state = InFlightState::default();
        assert!(state.start(5, 1), "sent by copy 1");
        assert_eq!(state.meets(5, 1), Some(false), "copy 1 has it: pass it");
        assert_eq!(
            state.meets(5, 2),
            Some(true),
            "copy 2 waits for its outcome"
        );
        assert_eq!(state.meets(6, 2), None, "nobody has 6: send it");
        state.end(5, false);
        assert_eq!(state.meets(5, 2), None, "copy 1 failed: copy 2 sends it");
        assert!(state.start(5, 2));
        state.end(5, true);
        assert_eq!(state.meets(5, 3), Some(false), "deleted: nobody sends it");
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod against_nats {
    use super::*;

    async fn delete_error(down: &stream::Stream, seq: u64) -> Option<bool> {
        match down.delete_message(seq).await {
            Ok(_) => None,
            Err(e) => match e.kind() {
                stream::DeleteMessageErrorKind::JetStream(js) => Some(gone(&js)),
                other => panic!("no answer from the stream: {other:?}"),
            },
        }
    }

    /// The server's answers for a message that is not there, as this server words
    /// them: a delete that misread one would retry forever (or drop one still there).
    #[tokio::test]
    async fn a_delete_of_a_message_not_there_is_told_apart() {
        let nats = crate::testing::Nats::start("gone");
        let client = async_nats::connect(nats.url()).await.expect("nats");
        let js = jetstream::new(client);
        let down = js
            .create_stream(stream::Config {
                name: "GONE".into(),
                subjects: vec!["gone.>".into()],
                ..Default::default()
            })
            .await
            .expect("stream");
        for i in 0..5u32 {
            js.publish("gone.x", i.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
        assert_eq!(delete_error(&down, 1).await, None, "there: deleted");
        assert_eq!(delete_error(&down, 1).await, Some(true), "below the first");
        assert_eq!(delete_error(&down, 3).await, None);
        assert_eq!(
            delete_error(&down, 3).await,
            Some(true),
            "deleted in the middle"
        );
        assert_eq!(delete_error(&down, 99).await, Some(true), "past the last");
        js.delete_stream("GONE").await.expect("deleted");
        assert_eq!(delete_error(&down, 2).await, Some(true), "the stream gone");
    }
}
