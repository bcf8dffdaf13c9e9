//! Connect, exchange every message type both ways, route, reconnect, shut down.

use std::time::Duration;

use serde_json::json;
use tower::{BoxError, service_fn};
use tunnel_proto::messages::{Command, Event, Gvr, Resource, ResourceOp, Status};
use tunnel_proto::{Envelope, ErrorBody, Format, MessageType, Payload};
use tunnel_router::{ConnectionState, Inbound, Router};
use tunnel_transport::AgentId;

use crate::support::*;

/// One of each data message type, with payloads in `format`.
fn every_message(sender: &tunnel_transport::ConnectionSender, format: Format) -> Vec<Envelope> {
    macro_rules! p {
        ($value:expr) => {
            Payload::encode(format, &$value).expect("payload")
        };
    }
    let gvr = Gvr::new("apps", "v1", "deployments");
    vec![
        sender
            .envelope(MessageType::Resource)
            .with_payload(p!(Resource {
                op: ResourceOp::Update,
                gvr: gvr.clone(),
                namespace: Some("default".into()),
                name: "web".into(),
                object: Some(json!({"spec": {"replicas": 2}})),
            })),
        sender
            .envelope(MessageType::Status)
            .with_payload(p!(Status {
                gvr: gvr.clone(),
                namespace: Some("default".into()),
                name: "web".into(),
                status: json!({"readyReplicas": 2}),
                observed_generation: Some(3),
            })),
        sender.envelope(MessageType::Event).with_payload(p!(Event {
            event_type: "Normal".into(),
            reason: "Synced".into(),
            message: "ok".into(),
            regarding: None,
        })),
        sender
            .envelope(MessageType::Command)
            .with_payload(p!(Command::new("restart").arg("pod", "web-0"))),
        sender
            .envelope(MessageType::Reply)
            .with_correlation(41)
            .with_error(ErrorBody::new("handler_error", "nope")),
        sender.envelope(MessageType::Ack).with_ack(17),
        sender
            .envelope(MessageType::Window)
            .with_payload(p!(json!({"credit": 64}))),
        sender
            .envelope(MessageType::from_wire("telemetry.v9"))
            .with_header("x-trace", "abc")
            .with_payload(p!(json!([1, 2, 3]))),
    ]
}

fn same_message(got: &Envelope, sent: &Envelope) {
    assert_eq!(got.kind, sent.kind);
    assert_eq!(got.id, sent.id);
    assert_eq!(got.correlation, sent.correlation);
    assert_eq!(got.ack, sent.ack);
    assert_eq!(got.headers, sent.headers);
    assert_eq!(got.error, sent.error);
    assert_eq!(
        got.payload
            .as_ref()
            .map(|p| p.decode::<serde_json::Value>().expect("payload")),
        sent.payload
            .as_ref()
            .map(|p| p.decode::<serde_json::Value>().expect("payload")),
        "{}",
        sent.kind
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_type_both_ways_in_both_codecs() {
    let (hub_router, mut at_hub) = collecting_router();
    let hub = hub(server_config(), hub_router).await;
    let url = hub.url().expect("url");
    for format in [Format::Json, Format::MsgPack] {
        let id = AgentId::new("root:org", format!("cluster-{format}"));
        let (agent_router, mut at_agent) = collecting_router();
        let agent = agent(&url, client_config(&id, format), agent_router);
        let info = agent.wait_connected(SOON).await.expect("connected");
        assert_eq!(info.format, format);

        // Agent to hub.
        let late_before = hub.late_replies();
        let sender = agent.sender().expect("sender");
        let sent = every_message(&sender, format);
        for env in &sent {
            sender.send(env).await.expect("send");
        }
        // A reply goes to the request waiting for it, never to a handler; nobody
        // waits for this one, so it is discarded and counted.
        for env in sent.iter().filter(|e| e.kind != MessageType::Reply) {
            let got = recv_soon(&mut at_hub).await;
            assert_eq!(got.agent(), &id);
            same_message(&got.envelope, env);
        }
        eventually("the unasked-for reply counted", || {
            hub.late_replies() == late_before + 1
        })
        .await;

        // Hub to agent.
        let sender = registered(&hub, &id).await;
        assert_eq!(sender.info().session_id, info.session_id);
        let sent = every_message(&sender, format);
        for env in &sent {
            sender.send(env).await.expect("send");
        }
        for env in sent.iter().filter(|e| e.kind != MessageType::Reply) {
            same_message(&recv_soon(&mut at_agent).await.envelope, env);
        }
        eventually("the unasked-for reply counted", || {
            agent.late_replies() == 1
        })
        .await;
        agent.shutdown().await;
        eventually("the hub to drop the agent", || hub.sender(&id).is_none()).await;
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_type_with_fallback() {
    let (cmd_tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    let (other_tx, mut others) = tokio::sync::mpsc::unbounded_channel();
    let router = Router::new()
        .route(
            MessageType::Command,
            service_fn(move |msg: Inbound| {
                let tx = cmd_tx.clone();
                async move {
                    tx.send(msg.envelope.decode_payload::<Command>()?.name)?;
                    Ok::<_, BoxError>(())
                }
            }),
        )
        .route(
            MessageType::Event,
            service_fn(|_: Inbound| async { Err::<(), BoxError>("event handler failed".into()) }),
        )
        .fallback(service_fn(move |msg: Inbound| {
            let tx = other_tx.clone();
            async move {
                tx.send(msg.envelope.kind)?;
                Ok::<_, BoxError>(())
            }
        }));
    let hub = hub(server_config(), router).await;
    let id = AgentId::new("ws", "router");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");

    agent
        .send(MessageType::Command, &Command::new("one"))
        .await
        .expect("send");
    agent
        .send(
            MessageType::Event,
            &Event {
                event_type: "Warning".into(),
                reason: "Boom".into(),
                message: String::new(),
                regarding: None,
            },
        )
        .await
        .expect("send");
    agent
        .send(MessageType::Status, &json!({}))
        .await
        .expect("send");
    agent
        .send(MessageType::Command, &Command::new("two"))
        .await
        .expect("send");

    assert_eq!(recv_soon(&mut commands).await, "one");
    // The failing event handler neither drops the connection nor reaches the fallback.
    assert_eq!(recv_soon(&mut others).await, MessageType::Status);
    assert_eq!(recv_soon(&mut commands).await, "two");
    assert!(others.try_recv().is_err());
    assert_eq!(agent.reconnects(), 0);
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_pings_get_pongs() {
    let hub = hub(server_config(), Router::new()).await;
    let id = AgentId::new("ws", "pinger");
    let (router, mut at_agent) = collecting_router();
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::Json),
        router,
    );
    agent.wait_connected(SOON).await.expect("connected");
    let sender = agent.sender().expect("sender");
    let ping = sender.envelope(MessageType::Ping);
    sender.send(&ping).await.expect("send");
    let pong = recv_soon(&mut at_agent).await.envelope;
    assert_eq!(pong.kind, MessageType::Pong);
    assert_eq!(pong.correlation, Some(ping.id));
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_and_reconnect_after_hub_restart() {
    let (router, mut at_hub) = collecting_router();
    let first = hub(server_config(), router.clone()).await;
    let addr = first.local_addr().expect("addr");
    let url = first.url().expect("url");
    let id = AgentId::new("root:org", "cluster-1");
    let agent = agent(&url, client_config(&id, Format::MsgPack), Router::new());
    let info = agent.wait_connected(SOON).await.expect("connected");
    registered(&first, &id).await;
    assert_eq!(first.agents().len(), 1);
    assert_eq!(first.agents()[0].agent, id);
    agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("send");
    assert_eq!(recv_soon(&mut at_hub).await.agent(), &id);

    // The hub goes away: the agent notices and backs off.
    first.shutdown().await;
    wait_disconnected(&agent).await;

    // A new hub on the same port: the agent comes back with a new session.
    let second = rebind("rebind", || {
        tunnel_router::Hub::bind_with(
            addr,
            server_config(),
            router.clone(),
            tunnel_router::HubConfig::default().without_sessions(),
        )
    })
    .await;
    let again = agent.wait_connected(SOON).await.expect("reconnected");
    assert_ne!(again.session_id, info.session_id);
    assert!(agent.reconnects() >= 1);
    agent
        .send(MessageType::Event, &json!({"n": 2}))
        .await
        .expect("send");
    let got = recv_soon(&mut at_hub).await;
    assert_eq!(
        got.envelope
            .decode_payload::<serde_json::Value>()
            .expect("json"),
        json!({"n": 2})
    );

    agent.shutdown().await;
    assert_eq!(*agent.state().borrow(), ConnectionState::Closed);
    eventually("the hub to drop the agent", || second.agents().is_empty()).await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_leaves_no_tasks() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let (router, mut at_hub) = collecting_router();
    let hub = hub(server_config(), router).await;
    let url = hub.url().expect("url");
    let agents: Vec<_> = (0..3)
        .map(|i| {
            let id = AgentId::new("ws", format!("a{i}"));
            agent(&url, client_config(&id, Format::MsgPack), Router::new())
        })
        .collect();
    for a in &agents {
        a.wait_connected(SOON).await.expect("connected");
        a.send(MessageType::Status, &json!({})).await.expect("send");
    }
    for _ in 0..3 {
        recv_soon(&mut at_hub).await;
    }
    assert!(metrics.num_alive_tasks() > baseline);

    // The hub shuts down first: every agent is told to go away, then agents stop.
    hub.shutdown().await;
    for a in &agents {
        a.shutdown().await;
    }
    drop(agents);
    drop(hub);
    eventually("all tasks to end", || metrics.num_alive_tasks() == baseline).await;
    // And nothing lingers a moment later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(metrics.num_alive_tasks(), baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_replaces_the_first() {
    let hub = hub(server_config(), Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "twin");
    let one = agent(&url, client_config(&id, Format::MsgPack), Router::new());
    let first = one.wait_connected(SOON).await.expect("connected");
    let first_sender = one.sender().expect("sender");
    let two = agent(&url, client_config(&id, Format::Json), Router::new());
    let second = two.wait_connected(SOON).await.expect("connected");
    eventually("the first connection to be closed", || {
        first_sender.is_closed()
    })
    .await;
    assert_eq!(
        first_sender.close_reason(),
        Some(tunnel_transport::CloseReason::Remote(
            tunnel_proto::CloseCode::SESSION_REPLACED,
            "a newer connection took over".into()
        ))
    );
    assert_ne!(first.session_id, second.session_id);
    one.shutdown().await;
    two.shutdown().await;
    hub.shutdown().await;
}
