//! `cluster`: a hub on a real nats-server (started here, JetStream in a temporary
//! directory). Agent to stream through the hub beside a plain async-nats JetStream
//! publisher with pipelined acks, same server, same payload, same run, with the hub
//! keeping its sessions itself and in NATS; a backend's call to an agent through NATS
//! and the hub beside a plain NATS request to a local responder.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tunnel_cluster::testing::Nats;
use tunnel_cluster::{Backend, Cluster, ClusterConfig};
use tunnel_proto::{Format, MessageType, Payload};
use tunnel_router::{Hub, Inbound, Router};
use tunnel_transport::{AgentId, AllowAll, ClientConfig, ServerConfig};

use crate::harness::{sample_event, start_agent};
use crate::report::{figure, median, percentile, thousands, us};

/// Acks a plain publisher keeps in flight (as async-nats's default window allows).
const WINDOW: usize = 1024;

pub(crate) async fn run(n: u64, runs: usize, calls: usize) -> Result<(), String> {
    let mut nats = Nats::start("bench");
    let payload = Payload::encode(Format::MsgPack, &sample_event()).map_err(|e| e.to_string())?;
    println!(
        "\ncluster: nats-server {} (JetStream, file storage), {} events of {} B per run, median of {runs} runs",
        nats.url(),
        thousands(n),
        payload.len()
    );
    let (mut plain, mut with_headers, mut through, mut stored) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs.max(1) {
        plain.push(plain_publisher(&nats, &payload, n, run, false).await?);
        with_headers.push(plain_publisher(&nats, &payload, n, run, true).await?);
        through.push(through_hub(&nats, n, run, false).await?);
        stored.push(through_hub(&nats, n, run, true).await?);
    }
    let (plain, with_headers, through, stored) = (
        median(plain),
        median(with_headers),
        median(through),
        median(stored),
    );
    let ratio = through / plain;
    figure("cluster", "plain_publisher_rate", plain, "msg/s");
    figure(
        "cluster",
        "plain_publisher_with_headers_rate",
        with_headers,
        "msg/s",
    );
    figure("cluster", "agent_to_stream_rate", through, "msg/s");
    figure("cluster", "agent_to_stream_vs_plain", ratio, "x");
    println!(
        "  {:<58} {:>10} msg/s",
        format!("plain async-nats JetStream publisher, {WINDOW} acks in flight"),
        thousands(plain as u64)
    );
    println!(
        "  {:<58} {:>10} msg/s  {:.2}x plain",
        "the same with the hub's headers and a Nats-Msg-Id each",
        thousands(with_headers as u64),
        with_headers / plain
    );
    println!(
        "  {:<58} {:>10} msg/s  {ratio:.2}x plain ({} the 0.8x bar)",
        "one agent -> hub -> TUNNEL_UP, acknowledged once stored",
        thousands(through as u64),
        if ratio >= 0.8 { "meets" } else { "BELOW" }
    );
    figure(
        "cluster",
        "agent_to_stream_stored_sessions_rate",
        stored,
        "msg/s",
    );
    figure("cluster", "stored_sessions_vs_local", stored / through, "x");
    println!(
        "  {:<58} {:>10} msg/s  {:.2}x the hub keeping them itself (no store write per up message)",
        "the same, sessions kept in NATS (resumable on any hub)",
        thousands(stored as u64),
        stored / through
    );
    call_latency(&nats, calls).await?;
    nats.kill();
    Ok(())
}

/// A plain JetStream publisher: `n` publishes to one subject of its own stream, at most
/// [`WINDOW`] acks outstanding; with `headers`, each carries headers like those a hub
/// adds (PROTOCOL.md section 10.2), a unique `Nats-Msg-Id` among them, in a stream with
/// the up stream's duplicate window: what the server itself pays for them.
async fn plain_publisher(
    nats: &Nats,
    payload: &Payload,
    n: u64,
    run: usize,
    headers: bool,
) -> Result<f64, String> {
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let name = format!("PLAIN_{run}_{headers}");
    let subject = format!("plain.{run}.{headers}");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::with_capacity(WINDOW);
    for i in 0..n {
        if acks.len() == WINDOW
            && let Some(ack) = acks.pop_front()
        {
            let ack: async_nats::jetstream::context::PublishAckFuture = ack;
            ack.await.map_err(|e| e.to_string())?;
        }
        let ack = if headers {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Tunnel-Id", i.to_string().as_str());
            h.insert("Tunnel-Type", "event");
            h.insert("Tunnel-Session", "s-0123456789abcdef");
            h.insert("Tunnel-Seq", i.to_string().as_str());
            h.insert("Tunnel-Codec", "msgpack");
            h.insert(
                "Nats-Msg-Id",
                format!("bench.up-{run}.s-0123456789abcdef.{i}").as_str(),
            );
            js.publish_with_headers(subject.clone(), h, payload.bytes().clone())
                .await
        } else {
            js.publish(subject.clone(), payload.bytes().clone()).await
        }
        .map_err(|e| e.to_string())?;
        acks.push_back(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    Ok(rate)
}

/// One agent sending `n` events to a cluster hub as fast as they are accepted, timed
/// until the last receipt resolves (every message stored in the up stream).
/// Agent to stream through a hub; with `stored`, the hub keeps its sessions in NATS
/// (resumable on any hub, as `tunnel hub --nats` does), else in its own memory.
async fn through_hub(nats: &Nats, n: u64, run: usize, stored: bool) -> Result<f64, String> {
    let name = format!("bench-{run}-{}", if stored { "stored" } else { "local" });
    let config = ClusterConfig::new(nats.url(), name.clone());
    let grace = config.session_grace;
    let cluster = Cluster::connect(config).await.map_err(|e| e.to_string())?;
    let mut sessions = tunnel_router::HubSessions::default().grace(grace);
    if stored {
        sessions = sessions.store(cluster.session_store().map_err(|e| e.to_string())?);
    }
    let hub = Hub::bind_with(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        cluster.router(Router::new()),
        tunnel_router::HubConfig::default().sessions(tunnel_router::SessionRegistry::new(sessions)),
    )
    .await
    .map_err(|e| e.to_string())?;
    let serving = cluster.serve(&hub);
    let id = AgentId::new("bench", format!("up-{name}"));
    let agent = start_agent(
        &hub.url().unwrap_or_default(),
        ClientConfig::new(id).format(Format::MsgPack),
    )
    .await?;
    let event = sample_event();
    let started = Instant::now();
    let mut last = None;
    for _ in 0..n {
        last = Some(
            agent
                .send(MessageType::Event, &event)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(last) = last {
        tokio::time::timeout(Duration::from_secs(300), last.delivered())
            .await
            .map_err(|_| "not every message was stored in time".to_string())?
            .map_err(|e| e.to_string())?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    agent.shutdown().await;
    serving.stop().await;
    hub.shutdown().await;
    Ok(rate)
}

/// Backend calls to an agent (one in flight) through NATS and its hub, alternating with
/// plain NATS requests to a responder in this process.
async fn call_latency(nats: &Nats, n: usize) -> Result<(), String> {
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| e.to_string())?;
    let mut responder = client
        .subscribe("plain.echo")
        .await
        .map_err(|e| e.to_string())?;
    let echo = client.clone();
    let responding = tokio::spawn(async move {
        while let Some(msg) = responder.next().await {
            if let Some(reply) = msg.reply {
                let _ = echo.publish(reply, msg.payload).await;
            }
        }
    });
    let cluster = Cluster::connect(ClusterConfig::new(nats.url(), "bench-calls"))
        .await
        .map_err(|e| e.to_string())?;
    let agent_router = Router::new().route(
        MessageType::Command,
        tower::service_fn(|_: Inbound| async { Ok::<_, tower::BoxError>(()) }),
    );
    let hub = Hub::bind(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        cluster.router(Router::new()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let serving = cluster.serve(&hub);
    let id = AgentId::new("bench", "callee");
    let agent = tunnel_router::Agent::start(
        tunnel_transport::WsConnector::new(ClientConfig::new(id.clone())),
        tunnel_router::AgentConfig::new(hub.url().unwrap_or_default()),
        agent_router,
    )
    .map_err(|e| e.to_string())?;
    agent
        .wait_connected(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let backend = Backend::connect(&nats.url())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The hub subscribes to the agent's call subject just after registering it.
    while backend
        .call(
            &id,
            MessageType::Command,
            &serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("the agent never answered a call".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One plain request and one call per round, so that both see the same machine: on
    // two shared cores the plain figure alone varies twofold from one phase to the next.
    let (mut plain, mut through) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + n / 10 {
        let started = Instant::now();
        client
            .request("plain.echo", bytes::Bytes::from_static(b"{}"))
            .await
            .map_err(|e| e.to_string())?;
        let plain_took = started.elapsed();
        let started = Instant::now();
        backend
            .call(
                &id,
                MessageType::Command,
                &serde_json::json!({}),
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| e.to_string())?;
        if i >= n / 10 {
            plain.push(plain_took);
            through.push(started.elapsed());
        }
    }
    responding.abort();
    agent.shutdown().await;
    serving.stop().await;
    hub.shutdown().await;
    plain.sort();
    through.sort();
    let (p50, t50) = (percentile(&plain, 0.5), percentile(&through, 0.5));
    let ratio = t50.as_secs_f64() / p50.as_secs_f64().max(1e-9);
    figure("cluster", "plain_request_p50", us(p50), "us");
    figure("cluster", "call_p50", us(t50), "us");
    figure("cluster", "call_p99", us(percentile(&through, 0.99)), "us");
    figure("cluster", "call_vs_plain_request", ratio, "x");
    println!(
        "  plain NATS request/reply, local responder   p50 {:>8.1} us  p99 {:>8.1} us",
        us(p50),
        us(percentile(&plain, 0.99))
    );
    println!(
        "  backend -> NATS -> hub -> agent -> back       p50 {:>8.1} us  p99 {:>8.1} us  p50 {ratio:.2}x plain ({} the 2x bar)",
        us(t50),
        us(percentile(&through, 0.99)),
        if ratio <= 2.0 { "meets" } else { "ABOVE" }
    );
    Ok(())
}
