//! Protocol rules a foreign client relies on (PROTOCOL.md), checked on the wire with raw
//! WebSocket frames: refused messages, resume decisions, ids, close messages.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tunnel_proto::messages::{Handshake, HandshakeAck, Resume, TypedMessage};
use tunnel_proto::{CloseCode, Envelope, Format, MessageType, Payload, capability, header};
use tunnel_router::{Hub, HubSessions, Router, Undelivered, error_code};
use tunnel_transport::AgentId;

use crate::support::*;

/// A raw connection that offers every capability (and `resume` if given); returns the
/// socket and the hub's answer.
async fn open(url: &str, id: &AgentId, resume: Option<Resume>) -> (RawWs, HandshakeAck) {
    let mut ws = raw_client(url, id, Format::MsgPack).await;
    let mut hello = Handshake::new(id.workspace.clone(), id.sync_target.clone());
    hello.capabilities = [
        capability::REPLIES,
        capability::RESUME,
        capability::DEFLATE,
        capability::TRACE_CONTEXT,
    ]
    .map(str::to_owned)
    .to_vec();
    hello.resume = resume;
    let env = hello.to_envelope(0, 1, Format::MsgPack).expect("handshake");
    send_raw(&mut ws, Format::MsgPack, &env).await;
    let ack = recv_raw_until(&mut ws, Format::MsgPack, MessageType::HandshakeAck).await;
    (ws, HandshakeAck::from_envelope(&ack).expect("ack"))
}

/// Every envelope the hub sends within `wait`, or until it closes.
async fn collect(ws: &mut RawWs, wait: Duration) -> (Vec<Envelope>, Option<CloseCode>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) | Ok(None) | Ok(Some(Err(_))) => return (seen, None),
            Ok(Some(Ok(Message::Binary(b)))) => seen.push(
                Format::MsgPack
                    .codec()
                    .decode(&b, &Default::default())
                    .expect("decodable"),
            ),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (seen, frame.map(|f| CloseCode(u16::from(f.code))));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn event(id: u64, seq: u64) -> Envelope {
    Envelope::new(id, MessageType::Event, 0)
        .with_seq(seq)
        .with_payload(Payload::msgpack(&json!({"n": seq})).expect("payload"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_message_the_hub_cannot_read_is_refused_and_not_replayed() {
    let (router, mut seen) = collecting_router();
    let hub = resumable(router).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "poison");
    let (mut ws, ack) = open(&url, &id, None).await;
    assert!(ack.capabilities.iter().any(|c| c == capability::DEFLATE));
    // Not deflate at all: the payload is plain MessagePack under a deflate header.
    let poison = event(41, 1).with_header(header::CONTENT_ENCODING, "deflate");
    send_raw(&mut ws, Format::MsgPack, &poison).await;
    send_raw(&mut ws, Format::MsgPack, &event(42, 2)).await;
    let (got, closed) = collect(&mut ws, Duration::from_millis(500)).await;
    assert_eq!(closed, None, "the connection stays up");
    let refusal = got
        .iter()
        .find(|e| e.kind == MessageType::Reply && e.correlation == Some(41))
        .expect("a reply refusing the one-way message");
    let error = refusal.error.as_ref().expect("an error");
    assert_eq!(error.code, error_code::BAD_REQUEST);
    // Its sequence number counts as received: acknowledged, so never replayed...
    let acked = got.iter().filter_map(|e| e.ack).max();
    assert_eq!(acked, Some(2), "{got:?}");
    // ...and the refusal came before (or with) the ack that covers it.
    let refusal_at = got
        .iter()
        .position(|e| e.correlation == Some(41))
        .expect("refusal");
    let first_ack = got
        .iter()
        .position(|e| e.ack.is_some_and(|a| a >= 1))
        .expect("ack");
    assert!(refusal_at <= first_ack, "{got:?}");
    // Only the readable message reached the handler.
    let handled = recv_soon(&mut seen).await;
    assert_eq!(handled.envelope.id, 42);
    assert!(seen.try_recv().is_err());
    drop(ws);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoding_that_was_not_negotiated_is_refused() {
    let (router, mut seen) = collecting_router();
    let hub = hub(server_config(), router).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "no-deflate");
    let mut ws = raw_client(&url, &id, Format::MsgPack).await;
    // This handshake offers no capability, so deflate is not granted.
    raw_handshake(&mut ws, &id, Format::MsgPack).await;
    let mut compressed = Envelope::new(7, MessageType::Event, 0)
        .with_payload(Payload::msgpack(&json!({"n": "x".repeat(1000)})).expect("payload"));
    assert!(compressed.compress_payload(0));
    send_raw(&mut ws, Format::MsgPack, &compressed).await;
    let reply = recv_raw_until(&mut ws, Format::MsgPack, MessageType::Reply).await;
    assert_eq!(reply.correlation, Some(7));
    assert_eq!(reply.error.expect("error").code, error_code::BAD_REQUEST);
    assert!(seen.try_recv().is_err(), "not handed to the handler");
    drop(ws);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_told_when_the_hub_refuses_its_message() {
    // Nothing on the hub handles events.
    let hub = resumable(Router::new()).await;
    let id = AgentId::new("ws", "unheard");
    let agent = tunnel_router::Agent::start(
        tunnel_transport::WsConnector::new(client_config(&id, Format::MsgPack)),
        tunnel_router::AgentConfig::new(hub.url().expect("url")).backoff(fast_backoff()),
        Router::new(),
    )
    .expect("agent");
    agent.wait_connected(SOON).await.expect("connected");
    let receipt = agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("accepted");
    let outcome = tokio::time::timeout(SOON, receipt.delivered())
        .await
        .expect("resolved");
    assert!(
        matches!(&outcome, Err(Undelivered::Rejected { code, .. }) if code == error_code::NO_HANDLER),
        "{outcome:?}"
    );
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_reporting_more_than_the_hub_sent_is_a_reset() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "ahead");
    let (ws, first) = open(&url, &id, None).await;
    drop(ws);
    eventually("the hub to notice", || hub.sender(&id).is_none()).await;
    let resume = Resume {
        session_id: first.session_id.clone(),
        last_received: 1000,
    };
    let (_ws, second) = open(&url, &id, Some(resume)).await;
    assert!(
        !second.resumed,
        "the hub sent nothing, so 1000 cannot be resumed"
    );
    assert_ne!(second.session_id, first.session_id);
    // A truthful resume of the new session still works.
    let resume = Resume {
        session_id: second.session_id.clone(),
        last_received: 0,
    };
    drop(_ws);
    eventually("the hub to notice", || hub.sender(&id).is_none()).await;
    let (ws, third) = open(&url, &id, Some(resume)).await;
    assert!(third.resumed);
    assert_eq!(third.session_id, second.session_id);
    drop(ws);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_resuming_one_session_leave_exactly_one_open() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "twice");
    let (ws, first) = open(&url, &id, None).await;
    drop(ws);
    eventually("the hub to notice", || hub.sender(&id).is_none()).await;
    let resume = || {
        Some(Resume {
            session_id: first.session_id.clone(),
            last_received: 0,
        })
    };
    let ((mut a, ack_a), (mut b, ack_b)) =
        tokio::join!(open(&url, &id, resume()), open(&url, &id, resume()));
    assert!(ack_a.resumed && ack_b.resumed);
    let ((_, closed_a), (_, closed_b)) = tokio::join!(
        collect(&mut a, Duration::from_millis(500)),
        collect(&mut b, Duration::from_millis(500))
    );
    let replaced = [closed_a, closed_b]
        .iter()
        .filter(|c| **c == Some(CloseCode::SESSION_REPLACED))
        .count();
    assert_eq!(replaced, 1, "one replaced: {closed_a:?} {closed_b:?}");
    assert!(
        closed_a.is_none() || closed_b.is_none(),
        "the other stays open"
    );
    eventually("the open one is registered", || hub.sender(&id).is_some()).await;
    drop((a, b));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_are_unique_within_a_connection() {
    let (router, _seen) = collecting_router();
    let hub = resumable(router).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "ids");
    let (mut ws, _) = open(&url, &id, None).await;
    for n in 1..=5u64 {
        let request = event(100 + n, n).expecting_reply();
        send_raw(&mut ws, Format::MsgPack, &request).await;
        send_raw(
            &mut ws,
            Format::MsgPack,
            &Envelope::new(200 + n, MessageType::Ping, 0),
        )
        .await;
        // A duplicate: acknowledged at once, standalone.
        send_raw(
            &mut ws,
            Format::MsgPack,
            &event(300 + n, n).expecting_reply(),
        )
        .await;
    }
    let (got, _) = collect(&mut ws, Duration::from_millis(500)).await;
    let kinds: HashSet<_> = got.iter().map(|e| e.kind.clone()).collect();
    for kind in [MessageType::Pong, MessageType::Ack, MessageType::Reply] {
        assert!(kinds.contains(&kind), "no {kind} among {got:?}");
    }
    let mut ids = HashSet::new();
    for env in &got {
        assert!(ids.insert(env.id), "id {} used twice: {got:?}", env.id);
    }
    drop(ws);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_close_the_hub_starts_is_preceded_by_a_close_message() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    // A gap in sequence numbers: 1002 after the handshake.
    let id = AgentId::new("ws", "gap");
    let (mut ws, _) = open(&url, &id, None).await;
    send_raw(&mut ws, Format::MsgPack, &event(1, 1)).await;
    send_raw(&mut ws, Format::MsgPack, &event(2, 3)).await;
    let (code, seen) = read_until_close(&mut ws, Format::MsgPack).await;
    assert_eq!(code, Some(CloseCode::PROTOCOL_ERROR));
    let close = seen
        .iter()
        .rev()
        .find(|e| e.kind == MessageType::Close)
        .expect("a close message");
    let close = tunnel_proto::messages::Close::from_envelope(close).expect("close");
    assert_eq!(close.code, CloseCode::PROTOCOL_ERROR.as_u16());
    // A newer connection of the same agent: 4004 for the older.
    let (mut older, _) = open(&url, &AgentId::new("ws", "replaced"), None).await;
    let (newer, _) = open(&url, &AgentId::new("ws", "replaced"), None).await;
    let (code, seen) = read_until_close(&mut older, Format::MsgPack).await;
    assert_eq!(code, Some(CloseCode::SESSION_REPLACED));
    assert!(
        seen.iter().any(|e| e.kind == MessageType::Close),
        "no close message before 4004: {seen:?}"
    );
    drop(newer);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_close_ends_the_connection_not_the_session() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "polite");
    let (mut ws, first) = open(&url, &id, None).await;
    ws.close(None).await.expect("close 1000");
    eventually("the hub to notice", || hub.sender(&id).is_none()).await;
    let resume = Resume {
        session_id: first.session_id.clone(),
        last_received: 0,
    };
    let (ws, again) = open(&url, &id, Some(resume)).await;
    assert!(again.resumed, "the session outlived a 1000 close");
    assert_eq!(again.session_id, first.session_id);
    drop(ws);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_with_1001_for_agents_that_stay() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "stays");
    let (mut ws, _) = open(&url, &id, None).await;
    let drain = tunnel_router::Drain::default().timeout(Duration::from_millis(300));
    let (_, (code, seen)) =
        tokio::join!(hub.drain(drain), read_until_close(&mut ws, Format::MsgPack));
    assert_eq!(code, Some(CloseCode::GOING_AWAY));
    let closes: Vec<_> = seen
        .iter()
        .filter(|e| e.kind == MessageType::Close)
        .map(|e| tunnel_proto::messages::Close::from_envelope(e).expect("close"))
        .collect();
    assert!(
        closes.first().is_some_and(|c| c.reconnect.is_some()),
        "the notice first: {closes:?}"
    );
    assert!(
        closes
            .last()
            .is_some_and(|c| c.code == CloseCode::GOING_AWAY.as_u16()),
        "then the close message of the 1001: {closes:?}"
    );
}

/// Agents whose handshake the hub answers just as a drain begins are either not
/// acknowledged or taken in and drained like the others (`1001`): none is told it is
/// connected and then dropped unheard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_answered_as_a_drain_begins_are_drained_too() {
    let hub = resumable(Router::new()).await;
    let url = hub.url().expect("url");
    let mut sockets = Vec::new();
    for n in 0..32u64 {
        let id = AgentId::new("ws", format!("late-{n}").as_str());
        let hello = Handshake::new(id.workspace.clone(), id.sync_target.clone())
            .to_envelope(0, 1, Format::MsgPack)
            .expect("handshake");
        sockets.push((n, raw_client(&url, &id, Format::MsgPack).await, hello));
    }
    // Hellos go out over a few milliseconds, so that the drain finds some handshakes
    // before, some during and some after their acknowledgement.
    let agents =
        futures_util::future::join_all(sockets.iter_mut().map(|(n, ws, hello)| async move {
            tokio::time::sleep(Duration::from_micros(300 * *n)).await;
            send_raw(ws, Format::MsgPack, hello).await;
            let (code, seen) = read_until_close(ws, Format::MsgPack).await;
            let acked = seen.iter().any(|e| e.kind == MessageType::HandshakeAck);
            (*n, acked, code)
        }));
    let drain = async {
        tokio::time::sleep(Duration::from_millis(4)).await;
        hub.drain(tunnel_router::Drain::default().timeout(Duration::from_millis(300)))
            .await;
    };
    let ((), outcomes) = tokio::join!(drain, agents);
    for (n, acked, code) in outcomes {
        if acked {
            assert_eq!(
                code,
                Some(CloseCode::GOING_AWAY),
                "agent {n} was acknowledged, then not drained"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_acknowledges_replies_is_closed_not_ignored() {
    let sessions = HubSessions::default().session(
        tunnel_proto::session::SessionConfig::default()
            .max_replay_messages(5)
            .stall_timeout(Duration::from_millis(200)),
    );
    let (router, _seen) = collecting_router();
    let hub = Hub::bind_with(
        "127.0.0.1:0",
        server_config(),
        router,
        tunnel_router::HubConfig::default().sessions(tunnel_router::SessionRegistry::new(sessions)),
    )
    .await
    .expect("bind");
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "never-acks");
    let (mut ws, _) = open(&url, &id, None).await;
    // Requests without seq acknowledge nothing: every reply stays in the replay buffer.
    // While it is full but not yet stalled, replies are dropped; past the stall
    // timeout the next one closes the connection.
    for n in 1..=10u64 {
        let request = Envelope::new(n, MessageType::Command, 0)
            .with_payload(Payload::msgpack(&json!({"n": n})).expect("payload"))
            .expecting_reply();
        send_raw(&mut ws, Format::MsgPack, &request).await;
    }
    let (got, closed) = collect(&mut ws, Duration::from_millis(100)).await;
    assert_eq!(closed, None, "not stalled yet: {got:?}");
    let replies = got.iter().filter(|e| e.kind == MessageType::Reply).count();
    assert_eq!(
        replies, 5,
        "the buffer's worth of replies, the rest dropped"
    );
    // Once the oldest reply has waited past the stall timeout (the hub's clock for
    // it moves with its sweep), the next reply closes the connection.
    let mut n = 10;
    let code = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        n += 1;
        assert!(n < 60, "not closed within 5 s");
        let request = Envelope::new(n, MessageType::Command, 0)
            .with_payload(Payload::msgpack(&json!({"n": n})).expect("payload"))
            .expecting_reply();
        send_raw(&mut ws, Format::MsgPack, &request).await;
        let (_, closed) = collect(&mut ws, Duration::from_millis(50)).await;
        if closed.is_some() {
            break closed;
        }
    };
    assert_eq!(code, Some(CloseCode::POLICY_VIOLATION));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_does_not_drain_because_an_agent_says_so() {
    let (router, _seen) = collecting_router();
    let hub = resumable(router).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "bossy");
    let (mut ws, _) = open(&url, &id, None).await;
    let notice = tunnel_proto::messages::Close {
        code: CloseCode::GOING_AWAY.as_u16(),
        reason: "you drain".into(),
        reconnect: Some(tunnel_proto::messages::ReconnectHint {
            after_ms: Some(1),
            endpoints: vec!["ws://127.0.0.1:1/".into()],
        }),
    };
    let notice = notice.to_envelope(9, 0, Format::MsgPack).expect("close");
    send_raw(&mut ws, Format::MsgPack, &notice).await;
    send_raw(&mut ws, Format::MsgPack, &event(10, 1).expecting_reply()).await;
    let reply = recv_raw_until(&mut ws, Format::MsgPack, MessageType::Reply).await;
    assert_eq!(reply.correlation, Some(10));
    assert!(
        reply.seq.is_some(),
        "the reply still goes through the session"
    );
    drop(ws);
    hub.shutdown().await;
}
