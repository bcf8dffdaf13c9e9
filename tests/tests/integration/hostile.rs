//! Hostile and broken clients, each against a hub that keeps serving a healthy agent
//! (more cases, and the fixture, live in `bad_input`, `auth` and `layers`).

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tunnel_proto::messages::{Handshake, HandshakeAck, Resume, TypedMessage};
use tunnel_proto::{CloseCode, Envelope, Format, MessageType, Payload, capability};
use tunnel_router::{Hub, Router};
use tunnel_transport::AgentId;

use crate::support::*;

/// A resumable hub with a healthy agent on it.
struct Scene {
    hub: Hub,
    url: String,
    healthy: tunnel_router::Agent,
    healthy_id: AgentId,
    at_hub: tokio::sync::mpsc::UnboundedReceiver<tunnel_router::Inbound>,
}

async fn scene() -> Scene {
    let (router, at_hub) = collecting_router();
    let (hub, url, healthy, healthy_id) = hub_with_healthy_agent(router).await;
    Scene {
        hub,
        url,
        healthy,
        healthy_id,
        at_hub,
    }
}

impl Scene {
    /// The healthy agent is still on its first connection and gets through; messages
    /// from others that are still queued are skipped.
    async fn assert_healthy(&mut self) {
        assert_eq!(
            self.healthy.reconnects(),
            0,
            "the healthy agent was disconnected"
        );
        let receipt = self
            .healthy
            .send(MessageType::Status, &json!({"ok": true}))
            .await
            .expect("send");
        tokio::time::timeout(SOON, receipt.delivered())
            .await
            .expect("in time")
            .expect("delivered");
        loop {
            let got = recv_soon(&mut self.at_hub).await;
            if got.agent() == &self.healthy_id {
                break;
            }
        }
    }

    async fn finish(mut self) {
        self.assert_healthy().await;
        self.healthy.shutdown().await;
        self.hub.shutdown().await;
    }

    /// A raw client that completed the handshake, offering `resume` (and optionally
    /// asking to resume `session`); returns the socket and the hub's answer.
    async fn raw(&self, name: &str, session: Option<&str>) -> (RawWs, HandshakeAck) {
        raw_session(&self.url, name, session).await
    }
}

/// A raw client of agent `ws/<name>` at `url` that completed the handshake, offering
/// `resume` (and optionally asking to resume `session`); the socket and the answer.
async fn raw_session(url: &str, name: &str, session: Option<&str>) -> (RawWs, HandshakeAck) {
    let id = AgentId::new("ws", name);
    let format = Format::MsgPack;
    let mut ws = raw_client(url, &id, format).await;
    let mut hello = Handshake::new(id.workspace.clone(), id.sync_target.clone());
    hello.capabilities = vec![capability::RESUME.into()];
    hello.resume = session.map(|s| Resume {
        session_id: s.to_owned(),
        last_received: 0,
    });
    send_raw(
        &mut ws,
        format,
        &hello.to_envelope(0, 1, format).expect("hello"),
    )
    .await;
    let ack = recv_raw_until(&mut ws, format, MessageType::HandshakeAck).await;
    (ws, HandshakeAck::from_envelope(&ack).expect("ack"))
}

fn event(id: u64, seq: Option<u64>, n: u64) -> Envelope {
    let mut env = Envelope::new(id, MessageType::Event, 0)
        .with_payload(Payload::msgpack(&json!({"n": n})).expect("payload"));
    env.seq = seq;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_claiming_an_enormous_length_closes_only_that_connection() {
    let mut scene = scene().await;
    let (mut ws, _) = scene.raw("enormous", None).await;
    // A masked binary frame header claiming 2^63 - 1 bytes, then a few bytes.
    let header = [
        0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4, 9, 9, 9,
    ];
    ws.get_mut().write_all(&header).await.expect("write");
    let (code, _) = read_until_close(&mut ws, Format::MsgPack).await;
    assert!(
        code.is_none()
            || code == Some(CloseCode::MESSAGE_TOO_BIG)
            || code == Some(CloseCode::PROTOCOL_ERROR),
        "{code:?}"
    );
    scene.assert_healthy().await;
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tiny_messages_in_a_burst_are_all_delivered() {
    let mut scene = scene().await;
    let (mut ws, _) = scene.raw("bursty", None).await;
    let mut buf = Vec::new();
    for n in 0..10_000u64 {
        buf.clear();
        Format::MsgPack
            .codec()
            .encode(&event(n + 1, None, n), &mut buf)
            .expect("encode");
        ws.feed(Message::Binary(buf.clone().into()))
            .await
            .expect("feed");
    }
    ws.flush().await.expect("flush");
    let mut from_bursty = 0;
    while from_bursty < 10_000 {
        let got = recv_soon(&mut scene.at_hub).await;
        if got.agent().sync_target == "bursty" {
            from_bursty += 1;
        }
    }
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_answered_and_harmless() {
    let mut scene = scene().await;
    let (mut ws, _) = scene.raw("pinger", None).await;
    for i in 0..5_000u32 {
        ws.feed(Message::Ping(i.to_be_bytes().to_vec().into()))
            .await
            .expect("ping");
    }
    ws.flush().await.expect("flush");
    // The flooder's connection still carries data afterwards.
    send_raw(&mut ws, Format::MsgPack, &event(1, None, 1)).await;
    loop {
        let got = recv_soon(&mut scene.at_hub).await;
        if got.agent().sync_target == "pinger" {
            break;
        }
    }
    scene.assert_healthy().await;
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_fills_a_bounded_queue_not_the_hubs_memory() {
    let scene = scene().await;
    let id = AgentId::new("ws", "deaf");
    let (ws, _) = scene.raw("deaf", None).await;
    let sender = registered(&scene.hub, &id).await;
    // Fails unless the queue refuses before 100,000 are accepted.
    let accepted = fill_until_full(&sender).await;
    // What the hub holds for it: the queue (1024 messages) plus what the socket buffers
    // took, far below the 100,000 x 16 KiB offered.
    assert!(
        accepted < 20_000,
        "{accepted} messages accepted for a client that never reads"
    );
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_is_dropped() {
    let scene = scene().await;
    let id = AgentId::new("ws", "halfway");
    let (mut ws, _) = scene.raw("halfway", None).await;
    registered(&scene.hub, &id).await;
    ws.get_mut().shutdown().await.expect("half close");
    eventually("the hub dropped the half-closed client", || {
        scene.hub.sender(&id).is_none()
    })
    .await;
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_sequence_numbers_are_delivered_once() {
    let mut scene = scene().await;
    let (mut ws, ack) = scene.raw("replayer", None).await;
    assert!(ack.capabilities.iter().any(|c| c == capability::RESUME));
    for (id, seq) in [(1, 1), (2, 2), (3, 2), (4, 1), (5, 3)] {
        send_raw(&mut ws, Format::MsgPack, &event(id, Some(seq), seq)).await;
    }
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let got = recv_soon(&mut scene.at_hub).await;
        if got.agent().sync_target == "replayer" {
            seqs.push(got.envelope.seq.expect("seq"));
        }
    }
    assert_eq!(seqs, [1, 2, 3]);
    // Nothing more from it: the duplicates were dropped.
    scene.assert_healthy().await;
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_a_message_never_sent_is_a_protocol_error() {
    let scene = scene().await;
    let (mut ws, _) = scene.raw("liar", None).await;
    let lie = Envelope::new(1, MessageType::Ack, 0).with_ack(999);
    send_raw(&mut ws, Format::MsgPack, &lie).await;
    let (code, _) = read_until_close(&mut ws, Format::MsgPack).await;
    assert_eq!(code, Some(CloseCode::PROTOCOL_ERROR));
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_another_agents_session_is_not_granted() {
    let scene = scene().await;
    let victim = scene
        .hub
        .sender(&scene.healthy_id)
        .expect("registered")
        .info()
        .session_id
        .clone();
    let (ws, ack) = scene.raw("thief", Some(&victim)).await;
    assert!(!ack.resumed, "another agent's session was handed out");
    assert_ne!(ack.session_id, victim);
    drop(ws);
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_that_is_not_an_upgrade_is_refused() {
    let scene = scene().await;
    let addr = scene.hub.local_addr().expect("addr");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut response),
    )
    .await
    .expect("closed in time")
    .expect("read");
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "not an upgrade: {text}"
    );
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_is_refused() {
    let scene = scene().await;
    let addr = scene.hub.local_addr().expect("addr");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let huge = "a".repeat(1 << 20);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Junk: {huge}\r\n\r\n"
    );
    // The hub may close before taking it all.
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut response),
    )
    .await
    .expect("closed in time");
    assert!(
        scene.hub.agents().len() == 1,
        "only the healthy agent is registered"
    );
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_send_the_upgrade_do_not_hold_others_back() {
    let mut scene = scene().await;
    let addr = scene.hub.local_addr().expect("addr");
    // Many connections that never send a byte (each cut off by the handshake deadline).
    let mut stalled = Vec::new();
    for _ in 0..600 {
        stalled.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // A new agent still connects at once, and the healthy one is unaffected.
    let id = AgentId::new("ws", "newcomer");
    let newcomer = agent(
        &scene.url,
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    newcomer
        .wait_connected(SOON)
        .await
        .expect("connected beside the stalled clients");
    registered(&scene.hub, &id).await;
    scene.assert_healthy().await;
    drop(stalled);
    newcomer.shutdown().await;
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_and_credential_stuffing_leave_the_healthy_agent_alone() {
    let scene = scene().await;
    let sessions_before = scene.hub.sessions();
    let attempt = |auth: Option<String>, codec: &'static str, identity: bool| {
        let url = scene.url.clone();
        async move {
            let mut headers: Vec<(&str, String)> = vec![("sec-websocket-protocol", codec.into())];
            if let Some(auth) = auth {
                headers.push(("authorization", auth));
            }
            if identity {
                headers.push(("x-workspace", "ws".into()));
                headers.push(("x-synctarget", "intruder".into()));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            status_of(raw_upgrade(&url, &headers).await)
        }
    };
    let good = Some(format!("Bearer {TOKEN}"));
    let msgpack = Format::MsgPack.subprotocol();
    assert_eq!(attempt(None, msgpack, true).await, 401, "no token");
    assert_eq!(
        attempt(good.clone(), "tunnel.v9.cbor", true).await,
        400,
        "unknown codec"
    );
    assert_eq!(attempt(good, msgpack, false).await, 400, "no identity");
    // Many wrong tokens in a row, a few at a time: every one refused, none admitted.
    for round in 0..20 {
        let tries: Vec<_> = (0..10)
            .map(|i| attempt(Some(format!("Bearer guess-{round}-{i}")), msgpack, true))
            .collect();
        for status in futures_util::future::join_all(tries).await {
            assert_eq!(status, 401);
        }
    }
    let agents = scene.hub.agents();
    assert_eq!(agents.len(), 1, "only the healthy agent is registered");
    assert_eq!(agents[0].agent, scene.healthy_id);
    assert_eq!(
        scene.hub.sessions(),
        sessions_before,
        "no session was created"
    );
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_rate_paces_new_connections_without_refusing_them() {
    // Two per second: two at once (one second of burst), then one every 500 ms.
    let hub = Hub::bind_with(
        "127.0.0.1:0",
        server_config().accept_rate(Some(2.0)),
        Router::new(),
        tunnel_router::HubConfig::default().without_sessions(),
    )
    .await
    .expect("bind");
    let url = hub.url().expect("url");
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for i in 0..4 {
        let id = AgentId::new("ws", format!("paced-{i}"));
        // The upgrade is answered at once; the handshake waits its turn.
        let paced = async {
            let mut ws = raw_client(&url, &id, Format::MsgPack).await;
            raw_handshake(&mut ws, &id, Format::MsgPack).await;
            ws
        };
        clients.push(
            tokio::time::timeout(SOON, paced)
                .await
                .expect("accepted in time, not refused"),
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "four connections at two per second took only {elapsed:?}"
    );
    drop(clients);
    hub.shutdown().await;
}

/// A session peer that stops reading until the hub's outbound queue stays full for the
/// send timeout is closed with `1008`, not left connected with its session no longer
/// writing to it (it would then get nothing, acks included, for as long as it stayed);
/// its next connection resumes the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_peer_that_stops_reading_is_closed_and_resumes_on_its_next_connection() {
    let (router, at_hub) = collecting_router();
    let mut config = server_config();
    config.connection = config
        .connection
        .outbound_queue(8)
        .send_timeout(Duration::from_millis(300));
    let (hub, url, healthy, healthy_id) = hub_with_healthy_agent_config(router, config).await;
    let scene = Scene {
        hub,
        url,
        healthy,
        healthy_id,
        at_hub,
    };
    let id = AgentId::new("ws", "pausing");
    let (mut ws, ack) = scene.raw("pausing", None).await;
    let sender = registered(&scene.hub, &id).await;
    // 200 x 64 KiB: more than the socket buffers and the queue take from a peer that
    // does not read (a few MiB here), less than the replay buffer's 16 MiB.
    let payload = Payload::msgpack(&"x".repeat(64 * 1024)).expect("payload");
    tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..200 {
            let env = Envelope::new(0, MessageType::Event, 0).with_payload(payload.clone());
            scene
                .hub
                .send_envelope(&id, env)
                .await
                .expect("held by the session");
        }
    })
    .await
    .expect("sends wait at most the send timeout");
    eventually("the hub to close the connection", || sender.is_closed()).await;
    assert!(
        matches!(
            sender.close_reason(),
            Some(tunnel_transport::CloseReason::Protocol(CloseCode::POLICY_VIOLATION, ref why))
                if why.contains("does not read")
        ),
        "{:?}",
        sender.close_reason()
    );
    // The peer reads again: what reached its socket, then the end.
    let (_, seen) = read_until_close(&mut ws, Format::MsgPack).await;
    let last_received = seen
        .iter()
        .filter_map(|env| env.seq)
        .enumerate()
        .inspect(|(i, seq)| assert_eq!(*seq, *i as u64 + 1, "in order from 1"))
        .map(|(_, seq)| seq)
        .last()
        .unwrap_or(0);
    assert!(last_received < 200, "the peer could not have read them all");
    drop(ws);

    let format = Format::MsgPack;
    let mut ws = raw_client(&scene.url, &id, format).await;
    let mut hello = Handshake::new(id.workspace.clone(), id.sync_target.clone());
    hello.capabilities = vec![capability::RESUME.into()];
    hello.resume = Some(Resume {
        session_id: ack.session_id.clone(),
        last_received,
    });
    send_raw(
        &mut ws,
        format,
        &hello.to_envelope(0, 1, format).expect("hello"),
    )
    .await;
    let again = recv_raw_until(&mut ws, format, MessageType::HandshakeAck).await;
    let again = HandshakeAck::from_envelope(&again).expect("ack");
    assert!(again.resumed, "the session resumes");
    assert_eq!(again.session_id, ack.session_id);
    let next = recv_raw_until(&mut ws, format, MessageType::Event).await;
    assert_eq!(
        next.seq,
        Some(last_received + 1),
        "the replay goes on where it stopped"
    );
    drop(ws);
    scene.finish().await;
}

/// The session of a peer closed for not reading counts as disconnected from then on:
/// if the peer does not come back, it is dropped after the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_of_a_peer_closed_for_not_reading_ends_after_its_grace() {
    let mut config = server_config();
    config.connection = config
        .connection
        .outbound_queue(8)
        .send_timeout(Duration::from_millis(300));
    let sessions = tunnel_router::HubSessions::default().grace(Duration::from_millis(500));
    let hub = Hub::bind_with(
        "127.0.0.1:0",
        config,
        Router::new(),
        tunnel_router::HubConfig::default().sessions(tunnel_router::SessionRegistry::new(sessions)),
    )
    .await
    .expect("bind");
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "gone-deaf");
    let (ws, _) = raw_session(&url, "gone-deaf", None).await;
    let sender = registered(&hub, &id).await;
    let payload = Payload::msgpack(&"x".repeat(64 * 1024)).expect("payload");
    let mut receipts = Vec::new();
    for _ in 0..200 {
        let env = Envelope::new(0, MessageType::Event, 0).with_payload(payload.clone());
        receipts.push(hub.send_envelope(&id, env).await.expect("held"));
    }
    eventually("the hub to close the connection", || sender.is_closed()).await;
    assert_eq!(hub.sessions(), 1);
    // Past the grace period the session is dropped and what it held fails.
    let last = receipts.pop().expect("sent");
    let outcome = tokio::time::timeout(SOON, last.delivered())
        .await
        .expect("resolved after the grace period");
    assert!(
        matches!(outcome, Err(tunnel_router::Undelivered::Reset(_))),
        "{outcome:?}"
    );
    eventually("the session to be dropped", || hub.sessions() == 0).await;
    drop(ws);
    hub.shutdown().await;
}
