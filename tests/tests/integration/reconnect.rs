//! Reconnect policy in the agent: circuit breaker and the hub's close hints.

use std::time::{Duration, Instant};

use tunnel_proto::messages::{Close, ReconnectHint, TypedMessage};
use tunnel_proto::{CloseCode, Format};
use tunnel_reconnect::BreakerConfig;
use tunnel_router::{Agent, AgentConfig, ConnectionState, Hub, Redirects, Router};
use tunnel_transport::{AgentId, WsConnector};

use crate::support::*;

fn agent_with(url: &str, id: &AgentId, breaker: BreakerConfig) -> Agent {
    Agent::start(
        WsConnector::new(client_config(id, Format::MsgPack)),
        AgentConfig::new(url)
            .backoff(fast_backoff())
            .breaker(breaker),
        Router::new(),
    )
    .expect("valid config")
}

/// Tells `id` to go away, with a `close` message carrying `hint` first.
async fn close_with_hint(hub: &Hub, id: &AgentId, hint: ReconnectHint) {
    let sender = registered(hub, id).await;
    let close = Close {
        code: CloseCode::GOING_AWAY.as_u16(),
        reason: "moving you".into(),
        reconnect: Some(hint),
    }
    .to_envelope(
        sender.next_id(),
        tunnel_transport::unix_millis(),
        sender.info().format,
    )
    .expect("close message");
    sender.send(&close).await.expect("send close");
    sender.close(CloseCode::GOING_AWAY, "moving you").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_after_failed_connects_and_probes_after_the_cooldown() {
    // A loopback port with nothing listening on it (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let id = AgentId::new("ws", "breaker");
    let breaker = BreakerConfig::default()
        .failure_threshold(2)
        .cooldown(Duration::from_millis(300));
    let meter = tunnel_metrics::testing::TestMeter::new();
    let url = format!("ws://{addr}/");
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack)),
        AgentConfig::new(&url)
            .backoff(fast_backoff())
            .breaker(breaker)
            .recorder(meter.recorder()),
        Router::new(),
    )
    .expect("valid config");
    let mut state = agent.state();
    tokio::time::timeout(
        SOON,
        state.wait_for(|s| matches!(s, ConnectionState::CircuitOpen { .. })),
    )
    .await
    .expect("the circuit opened")
    .expect("state");
    let endpoint = opentelemetry::KeyValue::new("endpoint", url.clone());
    let circuit = || meter.gauge("tunnel.circuit.state", std::slice::from_ref(&endpoint));
    assert_eq!(circuit(), Some(2), "open, in the metrics too");

    // The hub comes up: the next probe after the cooldown connects.
    let hub = tunnel_router::Hub::bind_with(
        addr,
        server_config(),
        Router::new(),
        tunnel_router::HubConfig::default().without_sessions(),
    )
    .await
    .expect("bind the port");
    agent
        .wait_connected(SOON)
        .await
        .expect("connected after the cooldown");
    assert_eq!(circuit(), Some(0), "closed again");
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_hint_delays_the_next_attempt() {
    let hub = hub(server_config(), Router::new()).await;
    let id = AgentId::new("ws", "patient");
    let agent = agent_with(&hub.url().expect("url"), &id, BreakerConfig::default());
    let first = agent.wait_connected(SOON).await.expect("connected");
    let after = Duration::from_millis(600);
    let told = Instant::now();
    close_with_hint(
        &hub,
        &id,
        ReconnectHint {
            after_ms: Some(after.as_millis() as u64),
            endpoints: Vec::new(),
        },
    )
    .await;
    let mut state = agent.state();
    tokio::time::timeout(SOON, state.wait_for(|s| {
        matches!(s, ConnectionState::Connected { session_id } if *session_id != first.session_id)
    }))
    .await
    .expect("reconnected")
    .expect("state");
    // Without the hint the fast backoff would have redialed within 200 ms.
    assert!(
        told.elapsed() >= after,
        "redialed after {:?}",
        told.elapsed()
    );
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_hint_with_endpoints_moves_the_agent() {
    let old = hub(server_config(), Router::new()).await;
    let new = hub(server_config(), Router::new()).await;
    let id = AgentId::new("ws", "mover");
    // The agent follows a hint only to hubs its configuration allows: here, the new
    // hub's origin.
    let new_origin = new.url().expect("url").trim_end_matches('/').to_owned();
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack)),
        AgentConfig::new(old.url().expect("url"))
            .backoff(fast_backoff())
            .redirects(Redirects::Origins(vec![new_origin])),
        Router::new(),
    )
    .expect("valid config");
    agent.wait_connected(SOON).await.expect("connected");
    close_with_hint(
        &old,
        &id,
        ReconnectHint {
            after_ms: None,
            endpoints: vec![new.url().expect("url")],
        },
    )
    .await;
    registered(&new, &id).await;
    assert!(old.sender(&id).is_none());
    agent.shutdown().await;
    old.shutdown().await;
    new.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_to_a_hub_the_agent_does_not_know_is_not_followed() {
    let hub = hub(server_config(), Router::new()).await;
    // A listener that counts who dials it: the agent must never send it its token.
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let evil_url = format!("ws://{}/", evil.local_addr().expect("addr"));
    let dialed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = dialed.clone();
    let evil_task = tokio::spawn(async move {
        while let Ok((_tcp, _)) = evil.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let id = AgentId::new("ws", "loyal");
    let agent = agent_with(&hub.url().expect("url"), &id, BreakerConfig::default());
    let first = agent.wait_connected(SOON).await.expect("connected");
    close_with_hint(
        &hub,
        &id,
        ReconnectHint {
            after_ms: None,
            endpoints: vec![evil_url.clone(), evil_url.replace("ws://", "wss://")],
        },
    )
    .await;
    let mut state = agent.state();
    tokio::time::timeout(SOON, state.wait_for(|s| {
        matches!(s, ConnectionState::Connected { session_id } if *session_id != first.session_id)
    }))
    .await
    .expect("back on its own hub")
    .expect("state");
    assert_eq!(
        dialed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the hinted host was dialed"
    );
    agent.shutdown().await;
    hub.shutdown().await;
    evil_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_supplied_wait_is_capped_by_the_agents_configuration() {
    let hub = hub(server_config(), Router::new()).await;
    let id = AgentId::new("ws", "impatient");
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack)),
        AgentConfig::new(hub.url().expect("url"))
            .backoff(fast_backoff())
            .max_hub_wait(Duration::from_millis(300)),
        Router::new(),
    )
    .expect("valid config");
    let first = agent.wait_connected(SOON).await.expect("connected");
    close_with_hint(
        &hub,
        &id,
        ReconnectHint {
            after_ms: Some(1_000_000_000_000),
            endpoints: Vec::new(),
        },
    )
    .await;
    let mut state = agent.state();
    tokio::time::timeout(SOON, state.wait_for(|s| {
        matches!(s, ConnectionState::Connected { session_id } if *session_id != first.session_id)
    }))
    .await
    .expect("reconnected after at most max_hub_wait, not after 31 years")
    .expect("state");
    agent.shutdown().await;
    hub.shutdown().await;
}
