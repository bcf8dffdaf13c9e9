//! Hubs on a real `nats-server` (JetStream in a temporary directory, an ephemeral
//! loopback port), started and killed by the tests themselves.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::json;
use tokio::sync::mpsc;
use tower::{BoxError, service_fn};
use tunnel_cluster::testing::Nats;
use tunnel_cluster::{Backend, Cluster, ClusterConfig, ClusterError, Serving};
use tunnel_proto::{CloseCode, Format, MessageType};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::{Agent, AgentConfig, Hub, Inbound, Router};
use tunnel_transport::{
    AgentId, AllowAll, ClientConfig, CloseReason, Connector as _, ServerConfig, WsConnector,
};

const SOON: Duration = Duration::from_secs(20);

/// A hub in the cluster, with `router`'s routes kept local.
async fn cluster_hub(nats: &Nats, name: &str, router: Router) -> (Hub, Cluster, Serving) {
    let cluster = Cluster::connect(
        ClusterConfig::new(nats.url(), name).publish_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("join the cluster");
    let hub = Hub::bind(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        cluster.router(router),
    )
    .await
    .expect("bind");
    let serving = cluster.serve(&hub);
    (hub, cluster, serving)
}

fn agent(url: &str, id: &AgentId, router: Router) -> Agent {
    Agent::start(
        WsConnector::new(ClientConfig::new(id.clone()).format(Format::MsgPack)),
        AgentConfig::new(url).backoff(
            BackoffConfig::default()
                .base(Duration::from_millis(20))
                .cap(Duration::from_millis(200)),
        ),
        router,
    )
    .expect("agent")
}

/// An agent router that forwards the `n` of each command into a channel and answers
/// calls with `{"echo": n}`.
fn agent_router() -> (Router, mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().route(
        MessageType::Command,
        service_fn(move |msg: Inbound| {
            let tx = tx.clone();
            async move {
                let v: serde_json::Value = msg.envelope.decode_payload()?;
                let n = v["n"].as_u64().unwrap_or_default();
                let _ = tx.send(n);
                Ok::<_, BoxError>(tunnel_proto::Payload::json(&json!({"echo": n}))?)
            }
        }),
    );
    (router, rx)
}

/// Numbered events (`{"n": 1}` on), one a millisecond, from a task: their receipts.
fn send_events(agent: &Agent, count: u64) -> tokio::task::JoinHandle<Vec<tunnel_router::Receipt>> {
    let sender = agent.clone();
    tokio::spawn(async move {
        let mut receipts = Vec::new();
        for n in 1..=count {
            receipts.push(
                sender
                    .send(MessageType::Event, &json!({"n": n}))
                    .await
                    .expect("accepted by the agent's session"),
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        receipts
    })
}

/// Waits for every receipt: each event acknowledged, so stored.
async fn all_stored(receipts: Vec<tunnel_router::Receipt>) {
    for (i, r) in receipts.into_iter().enumerate() {
        within("event receipt", r.delivered())
            .await
            .unwrap_or_else(|e| panic!("event {} not acknowledged as stored: {e}", i + 1));
    }
}

/// The `n` of each message, in order.
fn numbers_of(messages: &[tunnel_cluster::UpMessage]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| {
            m.decode::<serde_json::Value>().expect("payload")["n"]
                .as_u64()
                .expect("n")
        })
        .collect()
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(SOON, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {SOON:?}"))
}

/// Reads `n` messages of `agent` from the up stream through a new durable consumer.
async fn read_up(
    backend: &Backend,
    durable: &str,
    agent: &AgentId,
    n: usize,
) -> Vec<tunnel_cluster::UpMessage> {
    let mut messages = Box::pin(
        backend
            .messages(durable, Some(agent))
            .await
            .expect("consumer"),
    );
    let mut out = Vec::new();
    while out.len() < n {
        let msg = within("up messages", messages.next())
            .await
            .expect("stream")
            .expect("message");
        msg.ack().await.expect("ack");
        out.push(msg);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_messages_land_in_the_up_stream_in_order_once_each_with_their_headers() {
    let nats = Nats::start("up");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let id = AgentId::new("root:org", "cluster.1");
    let agent = agent(&hub.url().expect("url"), &id, Router::new());
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let mut receipts = Vec::new();
    for n in 1..=200u64 {
        receipts.push(
            agent
                .send(MessageType::Status, &json!({"n": n}))
                .await
                .expect("accepted"),
        );
    }
    for r in receipts {
        within("receipt", r.delivered())
            .await
            .expect("stored, then acknowledged");
    }
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let got = read_up(&backend, "reader", &id, 200).await;
    let numbers = numbers_of(&got);
    assert_eq!(numbers, (1..=200).collect::<Vec<_>>());
    assert!(
        got.iter()
            .all(|m| m.agent == id && m.kind == MessageType::Status)
    );
    let seqs: Vec<u64> = got.iter().map(|m| m.seq.expect("seq")).collect();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<_>>(),
        "the agent's own numbering"
    );
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_an_agent_is_offline_arrive_in_order_when_it_connects() {
    let nats = Nats::start("down");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let id = AgentId::new("root:org", "offline");
    for n in 1..=20u64 {
        backend
            .send(&id, MessageType::Command, &json!({"n": n}))
            .await
            .expect("stored");
    }
    let (router, mut commands) = agent_router();
    let agent = agent(&hub.url().expect("url"), &id, router);
    let mut got = Vec::new();
    while got.len() < 20 {
        got.push(within("commands", commands.recv()).await.expect("command"));
    }
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    // And once more while connected.
    backend
        .send(&id, MessageType::Command, &json!({"n": 21}))
        .await
        .expect("stored");
    assert_eq!(within("live", commands.recv()).await, Some(21));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(commands.try_recv().is_err(), "nothing twice");
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_calls_an_agent_on_another_hub_and_fails_at_once_when_no_hub_holds_it() {
    let nats = Nats::start("call");
    let (hub_a, _a, serving_a) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let (hub_b, _b, serving_b) = cluster_hub(&nats, "hub-b", Router::new()).await;
    let id = AgentId::new("root:org", "callee");
    let (router, _commands) = agent_router();
    let agent = agent(&hub_b.url().expect("url"), &id, router);
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    // The hub subscribes to the agent's call subject just after it registers it.
    let reply = within("call", async {
        loop {
            match backend
                .call(
                    &id,
                    MessageType::Command,
                    &json!({"n": 7}),
                    Duration::from_secs(5),
                )
                .await
            {
                Err(ClusterError::NoHub(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                other => return other,
            }
        }
    })
    .await
    .expect("reply");
    assert_eq!(
        reply.decode::<serde_json::Value>().expect("json"),
        json!({"echo": 7})
    );
    let started = Instant::now();
    let nobody = backend
        .call(
            &AgentId::new("root:org", "nobody"),
            MessageType::Command,
            &json!({}),
            Duration::from_secs(5),
        )
        .await;
    assert!(matches!(nobody, Err(ClusterError::NoHub(_))), "{nobody:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting for a timeout"
    );
    serving_a.stop().await;
    serving_b.stop().await;
    agent.shutdown().await;
    hub_a.shutdown().await;
    hub_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_names_the_hub_and_an_agent_that_appears_on_a_second_hub_leaves_the_first() {
    let nats = Nats::start("presence");
    let (hub_a, _a, serving_a) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let (hub_b, _b, serving_b) = cluster_hub(&nats, "hub-b", Router::new()).await;
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let id = AgentId::new("root:org", "mover");
    // The first connection is a bare one, which does not redial once closed.
    let first = WsConnector::new(ClientConfig::new(id.clone()))
        .connect(&hub_a.url().expect("url"))
        .await
        .expect("connected to hub-a");
    let (first_tx, mut first_rx) = first.split();
    let owner = |want: &'static str| {
        let backend = backend.clone();
        let id = id.clone();
        async move {
            loop {
                let presence = backend.presence().await.expect("presence");
                if presence.iter().any(|(a, p)| *a == id && p.hub == want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    within("presence on hub-a", owner("hub-a")).await;
    // The same identity connects to hub-b: hub-b takes the entry, and hub-a closes its
    // connection at once with 4004.
    let second = agent(&hub_b.url().expect("url"), &id, Router::new());
    within("connect", second.wait_connected(SOON))
        .await
        .expect("up");
    within("presence on hub-b", owner("hub-b")).await;
    within("hub-a closes its connection", async {
        while let Ok(Some(_)) = first_rx.recv().await {}
    })
    .await;
    assert!(
        matches!(
            first_tx.close_reason(),
            Some(CloseReason::Remote(CloseCode::SESSION_REPLACED, _))
        ),
        "{:?}",
        first_tx.close_reason()
    );
    within("hub-a lets go", async {
        while hub_a.agents().iter().any(|i| i.agent == id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Exactly one owner, and it is hub-b.
    let presence = backend.presence().await.expect("presence");
    let owners: Vec<_> = presence.iter().filter(|(a, _)| *a == id).collect();
    assert_eq!(owners.len(), 1, "{presence:?}");
    assert_eq!(owners[0].1.hub, "hub-b");
    // The agent leaves: its entry goes.
    second.shutdown().await;
    within("presence removed", async {
        while backend
            .presence()
            .await
            .expect("presence")
            .iter()
            .any(|(a, _)| *a == id)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    serving_a.stop().await;
    serving_b.stop().await;
    hub_a.shutdown().await;
    hub_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_down_the_agent_keeps_its_messages_and_the_stream_gets_each_once_after() {
    let mut nats = Nats::start("outage");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let id = AgentId::new("root:org", "patient");
    let agent = agent(&hub.url().expect("url"), &id, Router::new());
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let mut receipts = Vec::new();
    for n in 1..=30u64 {
        let r = agent
            .send(MessageType::Event, &json!({"n": n}))
            .await
            .expect("accepted");
        within("receipt", r.delivered()).await.expect("stored");
    }
    nats.kill();
    // Accepted by the agent's session, not acknowledged by the hub (it cannot store
    // them): they wait in the agent's replay buffer.
    for n in 31..=60u64 {
        receipts.push(
            agent
                .send(MessageType::Event, &json!({"n": n}))
                .await
                .expect("accepted"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.held().expect("sessions").messages > 0,
        "held while NATS is down"
    );
    nats.restart();
    for r in receipts {
        within("receipt after the outage", r.delivered())
            .await
            .expect("stored once NATS is back");
    }
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let got = read_up(&backend, "after", &id, 60).await;
    let numbers = numbers_of(&got);
    assert_eq!(numbers, (1..=60).collect::<Vec<_>>(), "each once, in order");
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

/// Hubs that start together on a fresh server race to make the streams and buckets:
/// each of them joins (nats-server 2.9 refuses the losers' creates as overlapping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_joining_a_fresh_server_at_once_all_join() {
    for round in 0..20 {
        let nats = Nats::start(&format!("fresh-{round}"));
        let joins =
            (0..4).map(|i| Cluster::connect(ClusterConfig::new(nats.url(), format!("hub-{i}"))));
        for joined in futures_util::future::join_all(joins).await {
            if let Err(e) = joined {
                panic!("round {round}: a hub did not join: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hub_announces_itself_as_a_micro_service_with_its_load() {
    let nats = Nats::start("service");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let id = AgentId::new("root:org", "counted");
    let agent = agent(&hub.url().expect("url"), &id, Router::new());
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let client = async_nats::connect(nats.url()).await.expect("client");
    let info = within("service info", async {
        loop {
            if let Ok(msg) = client.request("$SRV.INFO.tunnel-hub", "".into()).await {
                return msg;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let info: serde_json::Value = serde_json::from_slice(&info.payload).expect("json");
    assert_eq!(info["name"], "tunnel-hub");
    assert_eq!(info["metadata"]["hub_id"], "hub-a");
    assert_eq!(info["metadata"]["url"], hub.url().expect("url"));
    let load = client
        .request(tunnel_cluster::subject::hub_load("hub-a"), "".into())
        .await
        .expect("load");
    let load: serde_json::Value = serde_json::from_slice(&load.payload).expect("json");
    assert_eq!(load, json!({"agents": 1, "accepting": true}));
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_a_connected_agent_again_after_nats_restarts() {
    let mut nats = Nats::start("down-outage");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let id = AgentId::new("root:org", "steady");
    let (router, mut commands) = agent_router();
    let agent = agent(&hub.url().expect("url"), &id, router);
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    backend
        .send(&id, MessageType::Command, &json!({"n": 1}))
        .await
        .expect("stored");
    assert_eq!(within("before", commands.recv()).await, Some(1));
    nats.restart();
    // The backend's client reconnects on its own; a send may fail while it does.
    within("stored after the restart", async {
        while backend
            .send(&id, MessageType::Command, &json!({"n": 2}))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(within("after", commands.recv()).await, Some(2));
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_under_load_both_ways_loses_nothing_acknowledged() {
    const EVENTS: u64 = 600;
    const COMMANDS: u64 = 150;
    let mut nats = Nats::start("outage-load");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let id = AgentId::new("root:org", "busy");
    let (router, mut commands) = agent_router();
    let agent = agent(&hub.url().expect("url"), &id, router);
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let backend = Backend::connect(&nats.url()).await.expect("backend");

    // Agent to stream: numbered events, one every millisecond.
    let events = send_events(&agent, EVENTS);
    // Backend to agent: numbered commands; one the stream did not take (NATS away) is
    // sent again, so what counts as acknowledged to the backend is what it stored.
    let publisher = backend.clone();
    let target = id.clone();
    let stored = tokio::spawn(async move {
        let mut stored = Vec::new();
        for n in 1..=COMMANDS {
            let deadline = Instant::now() + SOON;
            while publisher
                .send(&target, MessageType::Command, &json!({"n": n}))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "command {n} never stored");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stored.push(n);
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        stored
    });

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !events.is_finished() && !stored.is_finished(),
        "the outage falls within both directions' sending"
    );
    nats.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.restart();

    all_stored(within("events sent", events).await.expect("sender")).await;
    let stored = within("commands stored", stored).await.expect("publisher");
    let mut got = std::collections::BTreeMap::<u64, usize>::new();
    while got.len() < stored.len() {
        let n = within("commands delivered", commands.recv())
            .await
            .expect("command");
        *got.entry(n).or_default() += 1;
    }
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        stored,
        "every stored command reached the agent"
    );
    let again: usize = got.values().map(|c| c - 1).sum();
    eprintln!("commands delivered twice: {again} of {}", stored.len());

    let up = read_up(&backend, "after-load", &id, EVENTS as usize).await;
    let mut numbers = numbers_of(&up);
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=EVENTS).collect::<Vec<_>>(),
        "each event stored once"
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let mut up_stream = js
        .get_stream(tunnel_cluster::subject::UP_STREAM)
        .await
        .expect("up stream");
    let held = up_stream.info().await.expect("info").state.messages;
    assert_eq!(held, EVENTS, "no second copy in the stream");
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_entries_of_a_hub_that_stopped_beating_are_removed() {
    let nats = Nats::start("sweep");
    let cluster = Cluster::connect(
        ClusterConfig::new(nats.url(), "hub-a").hub_heartbeat(Duration::from_millis(100)),
    )
    .await
    .expect("join the cluster");
    // A hub that died: one heartbeat and one agent's entry, never renewed.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let hubs = js
        .get_key_value(tunnel_cluster::subject::HUBS_BUCKET)
        .await
        .expect("hubs bucket");
    hubs.put("ghost", "{}".into()).await.expect("beat");
    let presence = js
        .get_key_value(tunnel_cluster::subject::PRESENCE_BUCKET)
        .await
        .expect("presence bucket");
    let orphan = AgentId::new("root:org", "orphan");
    let entry = json!({"hub": "ghost", "session": "s-1", "since_ms": 1});
    presence
        .put(
            tunnel_cluster::subject::presence_key(&orphan),
            entry.to_string().into(),
        )
        .await
        .expect("entry");
    // An entry of an earlier run of the live hub (restarted under the same id).
    let earlier = AgentId::new("root:org", "earlier-run");
    let entry = json!({"hub": "hub-a", "session": "s-0", "since_ms": 1, "run": "before"});
    presence
        .put(
            tunnel_cluster::subject::presence_key(&earlier),
            entry.to_string().into(),
        )
        .await
        .expect("entry");
    // A live hub with an agent of its own, whose entry stays.
    let hub = Hub::bind(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        cluster.router(Router::new()),
    )
    .await
    .expect("bind");
    let serving = cluster.serve(&hub);
    let live = AgentId::new("root:org", "live");
    let agent = agent(&hub.url().expect("url"), &live, Router::new());
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    within("the dead hub's entries swept", async {
        loop {
            let now = backend.presence().await.expect("presence");
            let holds = |id: &AgentId| now.iter().any(|(a, _)| a == id);
            if holds(&live) && !holds(&orphan) && !holds(&earlier) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        hubs.get("ghost").await.expect("read").is_none(),
        "the dead hub's heartbeat is removed with its entries"
    );
    assert!(
        hubs.get("hub-a").await.expect("read").is_some(),
        "the live hub beats"
    );
    serving.stop().await;
    assert!(
        hubs.get("hub-a").await.expect("read").is_none(),
        "a hub that stops in order removes its heartbeat"
    );
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_message_the_agent_rejects_is_deleted_not_sent_again() {
    let nats = Nats::start("rejected");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let id = AgentId::new("root:org", "picky");
    // The agent routes commands only: an event has no handler there.
    let (router, mut commands) = agent_router();
    let agent = agent(&hub.url().expect("url"), &id, router);
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    backend
        .send(&id, MessageType::Event, &json!({"n": 0}))
        .await
        .expect("stored");
    backend
        .send(&id, MessageType::Command, &json!({"n": 1}))
        .await
        .expect("stored");
    assert_eq!(within("the command", commands.recv()).await, Some(1));
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let mut down = js
        .get_stream(tunnel_cluster::subject::DOWN_STREAM)
        .await
        .expect("down stream");
    within("both deleted", async {
        while down.info().await.expect("info").state.messages > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_message_the_agents_codec_cannot_carry_is_deleted_and_later_ones_arrive() {
    let nats = Nats::start("uncarried");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let id = AgentId::new("root:org", "json");
    let (router, mut commands) = agent_router();
    let agent = Agent::start(
        WsConnector::new(ClientConfig::new(id.clone()).format(Format::Json)),
        AgentConfig::new(hub.url().expect("url")),
        router,
    )
    .expect("agent");
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    // Valid MessagePack (a map with a binary key) with no JSON form.
    let bytes: &[u8] = &[0x81, 0xc4, 0x01, 0x00, 0x01];
    let payload =
        tunnel_proto::Payload::from_encoded(Format::MsgPack, bytes.to_vec()).expect("valid");
    backend
        .send_payload(&id, MessageType::Command, &payload)
        .await
        .expect("stored");
    backend
        .send(&id, MessageType::Command, &json!({"n": 1}))
        .await
        .expect("stored");
    assert_eq!(
        within("the command after it", commands.recv()).await,
        Some(1)
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let mut down = js
        .get_stream(tunnel_cluster::subject::DOWN_STREAM)
        .await
        .expect("down stream");
    within("both deleted", async {
        while down.info().await.expect("info").state.messages > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

/// A hub in the cluster whose detached sessions wait in NATS (the cluster's store).
async fn hub_with_stored_sessions(nats: &Nats, name: &str) -> (Hub, Cluster, Serving) {
    let config = ClusterConfig::new(nats.url(), name).publish_timeout(Duration::from_secs(2));
    let grace = config.session_grace;
    let cluster = Cluster::connect(config).await.expect("join the cluster");
    let sessions = tunnel_router::HubSessions::default()
        .grace(grace)
        .store(cluster.session_store().expect("the cluster's grace"));
    let hub = Hub::bind_with(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        cluster.router(Router::new()),
        tunnel_router::HubConfig::default().sessions(tunnel_router::SessionRegistry::new(sessions)),
    )
    .await
    .expect("bind");
    let serving = cluster.serve(&hub);
    (hub, cluster, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_hub_when_its_hub_drains_with_nothing_lost_or_repeated() {
    const EVENTS: u64 = 300;
    const COMMANDS: u64 = 80;
    let nats = Nats::start("handover");
    let (hub_a, _cluster_a, serving_a) = hub_with_stored_sessions(&nats, "hub-a").await;
    let (hub_b, _cluster_b, serving_b) = hub_with_stored_sessions(&nats, "hub-b").await;
    let (url_a, url_b) = (hub_a.url().expect("url"), hub_b.url().expect("url"));
    let id = AgentId::new("root:org", "mover");
    let (router, mut commands) = agent_router();
    let agent = Agent::start(
        WsConnector::new(ClientConfig::new(id.clone()).format(Format::MsgPack)),
        AgentConfig::with_endpoints([url_a.clone(), url_b.clone()]).backoff(
            BackoffConfig::default()
                .base(Duration::from_millis(20))
                .cap(Duration::from_millis(200)),
        ),
        router,
    )
    .expect("agent");
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let mut resets = agent.session_events();
    let mut state = agent.state();
    let backend = Backend::connect(&nats.url()).await.expect("backend");

    // Both directions busy while the agent moves.
    let events = send_events(&agent, EVENTS);
    let publisher = backend.clone();
    let target = id.clone();
    let stored = tokio::spawn(async move {
        for n in 1..=COMMANDS {
            publisher
                .send(&target, MessageType::Command, &json!({"n": n}))
                .await
                .expect("stored");
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !events.is_finished() && !stored.is_finished(),
        "the move falls within both directions' sending"
    );
    hub_a
        .drain(
            tunnel_router::Drain::default()
                .after(Duration::from_millis(100))
                .endpoints(vec![url_b.clone()])
                .timeout(Duration::from_secs(5)),
        )
        .await;
    serving_a.stop().await;

    within("back on the other hub", async {
        loop {
            if matches!(
                &*state.borrow_and_update(),
                tunnel_router::ConnectionState::Resumed { .. }
            ) {
                break;
            }
            state.changed().await.expect("agent alive");
        }
    })
    .await;
    all_stored(within("events sent", events).await.expect("sender")).await;
    within("commands stored", stored).await.expect("publisher");
    let mut got = Vec::new();
    while got.len() < COMMANDS as usize {
        got.push(
            within("commands delivered", commands.recv())
                .await
                .expect("command"),
        );
    }
    // Anything sent twice would come within this wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(n) = commands.try_recv() {
        got.push(n);
    }
    assert_eq!(
        got,
        (1..=COMMANDS).collect::<Vec<_>>(),
        "every command once, in order"
    );
    assert!(
        matches!(
            resets.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "the session was not reset"
    );
    let up = read_up(&backend, "after-move", &id, EVENTS as usize).await;
    let numbers = numbers_of(&up);
    assert_eq!(
        numbers,
        (1..=EVENTS).collect::<Vec<_>>(),
        "each event stored once, in order"
    );
    let now = backend.presence().await.expect("presence");
    assert_eq!(
        now.iter()
            .find(|(a, _)| *a == id)
            .map(|(_, p)| p.hub.as_str()),
        Some("hub-b")
    );
    serving_b.stop().await;
    agent.shutdown().await;
    hub_b.shutdown().await;
    hub_a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_held_by_one_hub_at_a_time_and_outlives_its_hub_by_the_clusters_grace() {
    use tunnel_router::SessionStore as _;
    let nats = Nats::start("store");
    let grace = Duration::from_secs(1);
    let join = |id: &'static str| {
        let url = nats.url();
        async move {
            Cluster::connect(ClusterConfig::new(url, id).session_grace(grace))
                .await
                .expect("join the cluster")
        }
    };
    let (a, b) = (join("hub-a").await, join("hub-b").await);
    let (store_a, store_b) = (
        a.session_store().expect("the cluster's grace"),
        b.session_store().expect("the cluster's grace"),
    );
    let agent = AgentId::new("root:org", "stored");
    store_a.open(&agent, "s1").await.expect("opened");
    assert_eq!(store_a.holds(&agent, "s1").await.expect("read"), Some(true));
    let taken = store_b
        .take(&agent, "s1")
        .await
        .expect("take")
        .expect("stored");
    assert!(
        taken.open_tail,
        "the numbering goes on after what the agent has"
    );
    assert_eq!(taken.acked, 0);
    assert_eq!(
        store_a.holds(&agent, "s1").await.expect("read"),
        Some(false),
        "the first hub no longer holds it"
    );
    // What the first hub does with it now changes nothing.
    store_a
        .save(&agent, "s1", taken.clone(), grace)
        .await
        .expect("not its to save: nothing to do");
    store_a
        .remove(&agent, "s1")
        .await
        .expect("not its to remove");
    assert_eq!(store_b.holds(&agent, "s1").await.expect("read"), Some(true));
    for bad in ["", "a b", &"x".repeat(200)] {
        assert_eq!(
            store_b.take(&agent, bad).await.expect("take"),
            None,
            "an id no hub grants is not looked up"
        );
        assert!(store_b.open(&agent, bad).await.is_err(), "nor kept");
    }
    // A hub with another grace may not keep its sessions there.
    let other = Cluster::connect(
        ClusterConfig::new(nats.url(), "hub-c").session_grace(Duration::from_secs(5)),
    )
    .await
    .expect("joins all the same");
    assert!(matches!(
        other.session_store(),
        Err(ClusterError::Config(_))
    ));
    // Held, a session's entry stays past the grace; once its hub is gone, it goes.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let bucket = js
        .get_key_value(tunnel_cluster::subject::SESSIONS_BUCKET)
        .await
        .expect("sessions bucket");
    let key = tunnel_cluster::subject::session_key(&agent, "s1");
    tokio::time::sleep(grace * 2).await;
    assert!(
        bucket.get(&key).await.expect("read").is_some(),
        "rewritten while held"
    );
    drop((store_b, b));
    within("the session expires", async {
        while bucket.get(&key).await.expect("read").is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(store_a.take(&agent, "s1").await.expect("take"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_hubs_taking_one_session_at_once_one_holds_it_after() {
    use tunnel_router::SessionStore as _;
    let nats = Nats::start("store-race");
    let join = |id: &'static str| {
        let url = nats.url();
        async move {
            Cluster::connect(ClusterConfig::new(url, id))
                .await
                .expect("join the cluster")
        }
    };
    let (a, b, c) = (
        join("hub-a").await,
        join("hub-b").await,
        join("hub-c").await,
    );
    let (store_a, store_b, store_c) = (
        a.session_store().expect("grace"),
        b.session_store().expect("grace"),
        c.session_store().expect("grace"),
    );
    let agent = AgentId::new("root:org", "contested");
    for round in 0..20 {
        let id = format!("s{round}");
        store_a.open(&agent, &id).await.expect("opened");
        let (x, y) = tokio::join!(store_b.take(&agent, &id), store_c.take(&agent, &id));
        // Both may get it, one after the other (a take does not wait for the holder,
        // which may be dead); one that raced the other lost the write (none), or got
        // no answer (an error: 1013). Either way one holds it after.
        let got = [&x, &y]
            .into_iter()
            .filter(|r| matches!(r, Ok(Some(_))))
            .count();
        assert!(got >= 1, "round {round}: a hub took it: {x:?} {y:?}");
        let holders = [
            store_a.holds(&agent, &id).await.expect("read"),
            store_b.holds(&agent, &id).await.expect("read"),
            store_c.holds(&agent, &id).await.expect("read"),
        ];
        assert_eq!(
            holders.iter().filter(|h| **h == Some(true)).count(),
            1,
            "round {round}: one holder, {holders:?}"
        );
    }
}

/// A backend that did not hear a publish's ack sends it again under its message id.
/// The down stream drops such a second copy by `Nats-Msg-Id`, except after nats-server
/// restarted: its duplicate window then knows only the messages it still stores, and
/// the first copy was delivered and deleted. The session remembers the ids it
/// delivered, so the agent still gets the command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_again_under_its_id_after_nats_restarts_is_delivered_once() {
    let mut nats = Nats::start("retried-id");
    let (hub, _cluster, serving) = hub_with_stored_sessions(&nats, "hub-a").await;
    let id = AgentId::new("root:org", "retried");
    let (router, mut commands) = agent_router();
    let agent = agent(&hub.url().expect("url"), &id, router);
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let send = |n: u64| {
        let (backend, id) = (backend.clone(), id.clone());
        async move {
            while backend
                .send_with_id(
                    &id,
                    MessageType::Command,
                    &json!({ "n": n }),
                    &format!("cmd-{n}"),
                )
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    within("stored", send(1)).await;
    assert_eq!(within("delivered", commands.recv()).await, Some(1));
    // Delivered, acknowledged and deleted from the stream.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    within("deleted", async {
        loop {
            let mut down = js.get_stream("TUNNEL_DOWN").await.expect("stream");
            if down.info().await.expect("info").state.messages == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    nats.restart();
    within("sent again", send(1)).await;
    within("the next one", send(2)).await;
    assert_eq!(
        within("after the restart", commands.recv()).await,
        Some(2),
        "the command sent again under its id is not delivered a second time"
    );
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_message_goes_out_while_later_ones_keep_coming_not_with_a_full_batch() {
    // Fewer than a record batch (64), one every 100 ms: each copy of a new message
    // starts the hub's rechecks again, which once kept the first message staged until
    // the sending stopped.
    const COMMANDS: u64 = 30;
    let nats = Nats::start("steady-down");
    let (hub, _cluster, serving) = hub_with_stored_sessions(&nats, "hub-a").await;
    let id = AgentId::new("root:org", "steady");
    let (router, mut commands) = agent_router();
    let agent = agent(&hub.url().expect("url"), &id, router);
    within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let target = id.clone();
    let sending = tokio::spawn(async move {
        for n in 1..=COMMANDS {
            backend
                .send(&target, MessageType::Command, &json!({"n": n}))
                .await
                .expect("stored");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_eq!(within("the first command", commands.recv()).await, Some(1));
    assert!(
        !sending.is_finished(),
        "the first command waited until all {COMMANDS} were sent"
    );
    for n in 2..=COMMANDS {
        assert_eq!(within("the next command", commands.recv()).await, Some(n));
    }
    sending.await.expect("sender");
    agent.shutdown().await;
    serving.stop().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_message_larger_than_nats_takes_is_refused_and_later_ones_land() {
    let nats = Nats::start("too-large");
    let (hub, _cluster, serving) = cluster_hub(&nats, "hub-a", Router::new()).await;
    let id = AgentId::new("root:org", "large.1");
    let agent = agent(&hub.url().expect("url"), &id, Router::new());
    let info = within("connect", agent.wait_connected(SOON))
        .await
        .expect("up");
    // Within the tunnel's 16 MiB, over nats-server's default max_payload (1 MiB).
    let big = agent
        .send(
            MessageType::Event,
            &json!({"n": 0, "pad": "x".repeat(1_100_000)}),
        )
        .await
        .expect("accepted by the agent's session");
    let outcome = within("refusal", big.delivered()).await;
    assert!(
        matches!(&outcome, Err(tunnel_router::Undelivered::Rejected { code, .. }) if code == "bad_request"),
        "{outcome:?}"
    );
    let receipts = send_events(&agent, 5).await.expect("sender");
    all_stored(receipts).await;
    let backend = Backend::connect(&nats.url()).await.expect("backend");
    let got = read_up(&backend, "reader", &id, 5).await;
    assert_eq!(numbers_of(&got), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        agent.sender().expect("connected").info().id,
        info.id,
        "the same connection: a refusal closes nothing"
    );
    serving.stop().await;
    agent.shutdown().await;
    hub.shutdown().await;
}
