//! Reconnect policy in the agent: circuit breaker and the hub's close hints.

use std::time::{Duration, Instant};

use tunnel_proto::messages::{Close, ReconnectHint, TypedMessage};
use tunnel_proto::{CloseCode, Format};
use tunnel_reconnect::BreakerConfig;
use tunnel_router::{Agent, AgentConfig, ConnectionState, Hub, Router};
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
    let hub = tunnel_router::Hub::bind(addr, server_config(), Router::new())
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
    let agent = agent_with(&old.url().expect("url"), &id, BreakerConfig::default());
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
