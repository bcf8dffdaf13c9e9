//! Requests and replies, both ways, through the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tower::{BoxError, Service, ServiceExt, service_fn};
use tunnel_proto::messages::Command;
use tunnel_proto::{Format, MessageType, Payload};
use tunnel_router::{Error, Inbound, Request, Response, Router, error_code};
use tunnel_transport::AgentId;

use crate::support::*;

/// Answers `command`s named `echo` with their args, fails `boom`, sleeps on `slow`.
fn command_router() -> Router {
    Router::new().route(
        MessageType::Command,
        service_fn(|msg: Inbound| async move {
            let command: Command = msg.envelope.decode_payload()?;
            match command.name.as_str() {
                "boom" => Err::<_, BoxError>("no pod named web-9".into()),
                "slow" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(msg.encode(&json!({"slow": true}))?)
                }
                _ => Ok(msg.encode(&json!({"echo": command.name}))?),
            }
        }),
    )
}

fn command(name: &str) -> Request {
    Request::new(MessageType::Command, &Command::new(name))
        .expect("encode")
        .expect_reply()
}

#[tokio::test]
async fn an_agent_request_gets_the_hub_handlers_reply_in_both_codecs() {
    for format in [Format::MsgPack, Format::Json] {
        let hub = resumable(command_router()).await;
        let id = AgentId::new("root:org", "req");
        let agent = agent(
            &hub.url().expect("url"),
            client_config(&id, format),
            Router::new(),
        );
        agent.wait_connected(SOON).await.expect("connected");
        assert_eq!(agent.format(), format, "the connection's codec");
        let reply = agent.call(command("hello")).await.expect("reply");
        assert_eq!(
            reply.decode::<Value>().expect("decode"),
            json!({"echo": "hello"}),
            "{format:?}"
        );
        let Response::Reply(env) = reply else {
            panic!("a request gets a reply")
        };
        assert_eq!(env.kind, MessageType::Reply);
        assert!(env.seq.is_some(), "replies go through the session");
        // Encoded in the connection's codec up front (for JSON, no transcoding on the
        // way): the same reply.
        let payload = Payload::encode(agent.format(), &Command::new("native")).expect("encode");
        let request = Request::encoded(MessageType::Command, payload).expect_reply();
        let reply = agent.call(request).await.expect("reply");
        assert_eq!(
            reply.decode::<Value>().expect("decode"),
            json!({"echo": "native"}),
            "{format:?}"
        );
        agent.shutdown().await;
        hub.shutdown().await;
    }
}

#[tokio::test]
async fn a_handler_result_the_connection_cannot_carry_is_answered_with_handler_error() {
    const LIMIT: usize = 64 * 1024;
    let router = Router::new().route(
        MessageType::Command,
        service_fn(|msg: Inbound| async move {
            let command: Command = msg.envelope.decode_payload()?;
            Ok::<_, BoxError>(match command.name.as_str() {
                // Within the limit as a payload, not with its envelope.
                "big" => msg.encode(&"x".repeat(LIMIT - 10))?,
                // A map with a binary key: no form in JSON.
                "binary-key" => {
                    Payload::from_encoded(Format::MsgPack, vec![0x81, 0xc4, 0x01, 0x00, 0x01])
                        .expect("valid MessagePack")
                }
                _ => msg.encode(&json!({"echo": command.name}))?,
            })
        }),
    );
    let mut config = server_config();
    config.connection.limits = tunnel_proto::Limits::default().max_message_size(LIMIT);
    let hub = tunnel_router::Hub::bind("127.0.0.1:0", config, router)
        .await
        .expect("bind");
    let id = AgentId::new("root:org", "unsendable");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::Json),
        Router::new(),
    );
    let info = agent.wait_connected(SOON).await.expect("connected");

    for (name, why) in [("big", "exceeds max_message_size"), ("binary-key", "")] {
        let err = agent.call(command(name)).await.unwrap_err();
        let Error::Remote(body) = err else {
            panic!("{name}: expected a remote error, got {err:?}")
        };
        assert_eq!(body.code, error_code::HANDLER_ERROR, "{name}");
        assert!(
            body.message
                .starts_with("the handler's result cannot be sent")
                && body.message.contains(why),
            "{name}: {}",
            body.message
        );
    }
    // The session goes on, on the same connection.
    let reply = agent.call(command("after")).await.expect("reply");
    assert_eq!(
        reply.decode::<Value>().expect("decode"),
        json!({"echo": "after"})
    );
    assert_eq!(agent.sender().expect("connected").info().id, info.id);
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_failing_handler_answers_with_an_error_and_keeps_the_connection() {
    let hub = resumable(command_router()).await;
    let id = AgentId::new("root:org", "err");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::Json),
        Router::new(),
    );
    let info = agent.wait_connected(SOON).await.expect("connected");

    let err = agent.call(command("boom")).await.unwrap_err();
    let Error::Remote(body) = err else {
        panic!("expected a remote error, got {err:?}")
    };
    assert_eq!(body.code, error_code::HANDLER_ERROR);
    assert_eq!(body.message, "no pod named web-9");

    let err = agent
        .call(
            Request::new(MessageType::Event, &json!({}))
                .expect("encode")
                .expect_reply(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote(b) if b.code == error_code::NO_HANDLER),
        "{err:?}"
    );

    // Same connection, still working.
    agent.call(command("after")).await.expect("reply");
    assert_eq!(agent.sender().expect("connected").info().id, info.id);
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn the_hub_can_ask_one_agent_and_broadcast_to_all() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    let (a, b) = (AgentId::new("ws", "a"), AgentId::new("ws", "b"));
    let (router_b, mut seen_b) = collecting_router();
    let agent_a = agent(&url, client_config(&a, Format::MsgPack), command_router());
    let agent_b = agent(&url, client_config(&b, Format::Json), router_b);
    registered(&hub, &a).await;
    registered(&hub, &b).await;

    let reply = hub.call(&a, command("from-hub")).await.expect("reply");
    assert_eq!(
        reply.decode::<Value>().expect("decode"),
        json!({"echo": "from-hub"})
    );
    // Through the tower client too.
    let mut client = hub.client(a.clone());
    let reply = client
        .ready()
        .await
        .expect("ready")
        .call(command("svc"))
        .await
        .expect("reply");
    assert_eq!(reply.decode::<Value>().expect("decode")["echo"], "svc");

    let outcomes = hub
        .broadcast(MessageType::Event, &json!({"to": "all"}))
        .await;
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()));
    let got = recv_soon(&mut seen_b).await;
    assert_eq!(
        got.envelope.decode_payload::<Value>().expect("decode"),
        json!({"to": "all"})
    );

    // Only the asked agent may answer: a missing one is an error at once.
    let err = hub
        .call(&AgentId::new("ws", "nobody"), command("x"))
        .await
        .unwrap_err();
    assert_eq!(err, Error::NotConnected);
    agent_a.shutdown().await;
    agent_b.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn a_late_reply_is_discarded_and_counted_and_a_dropped_wait_leaves_nothing() {
    let hub = resumable(command_router()).await;
    let id = AgentId::new("root:org", "late");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");

    let err = agent
        .call(command("slow").timeout(Duration::from_millis(20)))
        .await
        .unwrap_err();
    assert_eq!(err, Error::Timeout(Duration::from_millis(20)));
    assert_eq!(agent.requests_in_flight(), 0);
    eventually("the late reply is counted", || agent.late_replies() == 1).await;

    // tower's own timeout drops the future: the wait is cancelled. Ours, which arms
    // its timer only once the call waits, does the same.
    let towers = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(20))
        .service(agent.client());
    times_out_and_cancels(towers, &agent, 2).await;
    let ours = tower::ServiceBuilder::new()
        .layer(tunnel_router::layer::timeout::TimeoutLayer::new(
            Duration::from_millis(20),
        ))
        .service(agent.client());
    times_out_and_cancels(ours, &agent, 3).await;
    agent.shutdown().await;
    hub.shutdown().await;
}

/// Calls `slow` through `client`, whose timeout is shorter than the handler: the call
/// fails with tower's `Elapsed`, its wait is dropped at once, and the reply that comes
/// later is the agent's `late`-th late one.
async fn times_out_and_cancels<S>(mut client: S, agent: &tunnel_router::Agent, late: u64)
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let called = client
        .ready()
        .await
        .expect("ready")
        .call(command("slow"))
        .await;
    let Err(err) = called else {
        panic!("a call slower than the timeout succeeded");
    };
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(agent.requests_in_flight(), 0, "dropping the future cancels");
    eventually("the late reply is counted", || agent.late_replies() == late).await;
}

#[tokio::test]
async fn a_request_without_a_session_fails_when_its_connection_ends() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // The handler never answers in time; the hub goes away meanwhile.
    let router = Router::new().route(
        MessageType::Command,
        service_fn(move |_: Inbound| {
            seen.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, BoxError>(())
            }
        }),
    );
    let hub = hub(server_config(), router).await;
    let id = AgentId::new("root:org", "nosession");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");
    let call = tokio::spawn({
        let agent = agent.clone();
        async move { agent.call(command("hang")).await }
    });
    eventually("the hub got the request", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    let registered = hub.sender(&id).expect("registered");
    registered.abort();
    let err = tokio::time::timeout(SOON, call)
        .await
        .expect("fails promptly")
        .expect("task")
        .unwrap_err();
    assert!(matches!(err, Error::Lost(_)), "{err:?}");
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn one_way_messages_through_the_client_are_held_in_call_and_the_sender_still_yields() {
    let (router, mut inbox) = collecting_router();
    let hub = resumable(router).await;
    let id = AgentId::new("root:org", "loop");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    // The session is resumable once the connection is published.
    agent.wait_connected(SOON).await.expect("connected");

    // Another task on this (single-threaded) runtime: it only runs if the sending loop
    // below yields.
    let other_ran_at = Arc::new(AtomicUsize::new(usize::MAX));
    let sent = Arc::new(AtomicUsize::new(0));
    let (seen, count) = (other_ran_at.clone(), sent.clone());
    tokio::spawn(async move { seen.store(count.load(Ordering::SeqCst), Ordering::SeqCst) });

    let mut client = agent.client();
    let n = 600;
    for i in 0..n {
        let held_before = agent.held().expect("sessions").messages;
        let request = Request::new(MessageType::Event, &json!({"n": i})).expect("encode");
        let response = client.ready().await.expect("ready").call(request);
        let held_after = agent.held().expect("sessions").messages;
        // Nothing else ran between the two reads, so no ack can have released one.
        assert_eq!(
            held_after,
            held_before + 1,
            "message {i} held by `call` itself"
        );
        let response = response.await.expect("accepted");
        assert!(matches!(response, Response::Accepted(_)));
        sent.store(i + 1, Ordering::SeqCst);
    }
    let ran_at = other_ran_at.load(Ordering::SeqCst);
    assert!(
        ran_at < n,
        "the other task ran only after the loop ended: the sender never yielded"
    );

    for i in 0..n {
        let msg = recv_soon(&mut inbox).await;
        let got: Value = msg.envelope.decode_payload().expect("payload");
        assert_eq!(got, json!({"n": i}), "in order, none lost");
    }
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn calls_through_the_client_go_on_the_wire_in_the_order_they_are_made() {
    let (tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<String>();
    let events = tx.clone();
    let router = Router::new()
        .route(
            MessageType::Command,
            service_fn(move |msg: Inbound| {
                let tx = tx.clone();
                async move {
                    let command: Command = msg.envelope.decode_payload()?;
                    let _ = tx.send(command.name);
                    Ok::<_, BoxError>(msg.encode(&json!({"ok": true}))?)
                }
            }),
        )
        .fallback(service_fn(move |msg: Inbound| {
            let _ = events.send(msg.envelope.kind.to_string());
            std::future::ready(Ok::<_, BoxError>(()))
        }));
    let hub = resumable(router).await;
    let id = AgentId::new("root:org", "order");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");

    // A request, a one-way message and another request, made in this order and awaited
    // in the reverse one: the wire follows the calls, not the polls.
    let mut client = agent.client();
    let first = client.ready().await.expect("ready").call(command("first"));
    let event = Request::new(MessageType::Event, &json!({"n": 1})).expect("encode");
    let second = client.ready().await.expect("ready").call(event);
    let third = client.ready().await.expect("ready").call(command("third"));
    third.await.expect("third answered");
    second.await.expect("event accepted");
    first.await.expect("first answered");

    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(recv_soon(&mut arrived).await);
    }
    assert_eq!(order, ["first", "event", "third"]);
    agent.shutdown().await;
    hub.shutdown().await;
}
