//! Bad input from one client gets a documented close code and never disturbs another.

use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tunnel_proto::{CloseCode, Format, Limits, MessageType};
use tunnel_router::{Agent, Hub};
use tunnel_transport::{AgentId, ConnectionConfig};

use crate::support::*;

struct Fixture {
    hub: Hub,
    url: String,
    healthy: Agent,
    healthy_id: AgentId,
    at_hub: tokio::sync::mpsc::UnboundedReceiver<tunnel_router::Inbound>,
    at_healthy: tokio::sync::mpsc::UnboundedReceiver<tunnel_router::Inbound>,
}

const MAX: usize = 64 * 1024;

async fn fixture() -> Fixture {
    let (router, at_hub) = collecting_router();
    let connection = ConnectionConfig::default().limits(Limits::default().max_message_size(MAX));
    let hub = hub(server_config().connection(connection), router).await;
    let url = hub.url().expect("url");
    let healthy_id = AgentId::new("ws", "healthy");
    let (agent_router, at_healthy) = collecting_router();
    let healthy = agent(
        &url,
        client_config(&healthy_id, Format::MsgPack),
        agent_router,
    );
    healthy.wait_connected(SOON).await.expect("connected");
    Fixture {
        hub,
        url,
        healthy,
        healthy_id,
        at_hub,
        at_healthy,
    }
}

impl Fixture {
    /// The healthy agent still exchanges messages both ways on its first connection.
    async fn assert_healthy(&mut self) {
        assert_eq!(
            self.healthy.reconnects(),
            0,
            "the healthy agent was disconnected"
        );
        self.healthy
            .send(MessageType::Status, &serde_json::json!({"ok": true}))
            .await
            .expect("send");
        let got = recv_soon(&mut self.at_hub).await;
        assert_eq!(got.agent(), &self.healthy_id);
        self.hub
            .send(
                &self.healthy_id,
                MessageType::Command,
                &serde_json::json!({"name": "x"}),
            )
            .await
            .expect("hub send");
        assert_eq!(
            recv_soon(&mut self.at_healthy).await.envelope.kind,
            MessageType::Command
        );
    }

    async fn finish(mut self) {
        self.assert_healthy().await;
        self.healthy.shutdown().await;
        self.hub.shutdown().await;
    }

    async fn handshaken(&self, name: &str, format: Format) -> RawWs {
        let id = AgentId::new("ws", name);
        let mut ws = raw_client(&self.url, &id, format).await;
        raw_handshake(&mut ws, &id, format).await;
        ws
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_binary_frame_closes_with_1007() {
    let f = fixture().await;
    let mut ws = f.handshaken("garbage", Format::MsgPack).await;
    ws.send(Message::Binary(vec![0xc1, 0xff, 0x00, 0x13, 0x37].into()))
        .await
        .expect("send");
    assert_eq!(
        read_until_close(&mut ws, Format::MsgPack).await.0,
        Some(CloseCode::INVALID_PAYLOAD)
    );
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_closes_with_1007() {
    let f = fixture().await;
    let mut ws = f.handshaken("badjson", Format::Json).await;
    ws.send(Message::Text(
        "{\"id\": 1, \"type\": \"event\", \"ts\": ".into(),
    ))
    .await
    .expect("send");
    assert_eq!(
        read_until_close(&mut ws, Format::Json).await.0,
        Some(CloseCode::INVALID_PAYLOAD)
    );
    let mut ws = f.handshaken("wrongtype", Format::Json).await;
    ws.send(Message::Text(
        "{\"id\": \"one\", \"type\": \"event\", \"ts\": 1}".into(),
    ))
    .await
    .expect("send");
    assert_eq!(
        read_until_close(&mut ws, Format::Json).await.0,
        Some(CloseCode::INVALID_PAYLOAD)
    );
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_on_json_closes_with_1003() {
    let f = fixture().await;
    let mut ws = f.handshaken("binary-on-json", Format::Json).await;
    ws.send(Message::Binary(
        b"{\"id\":1,\"type\":\"event\",\"ts\":1}".to_vec().into(),
    ))
    .await
    .expect("send");
    assert_eq!(
        read_until_close(&mut ws, Format::Json).await.0,
        Some(CloseCode::UNSUPPORTED_DATA)
    );
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_with_1009() {
    let f = fixture().await;
    let mut ws = f.handshaken("oversized", Format::MsgPack).await;
    let _ = ws.send(Message::Binary(vec![0u8; MAX + 1].into())).await;
    assert_eq!(
        read_until_close(&mut ws, Format::MsgPack).await.0,
        Some(CloseCode::MESSAGE_TOO_BIG)
    );
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_before_the_handshake_closes_with_4001() {
    let f = fixture().await;
    let id = AgentId::new("ws", "eager");
    let mut ws = raw_client(&f.url, &id, Format::Json).await;
    let event = tunnel_proto::Envelope::new(1, MessageType::Event, 1);
    send_raw(&mut ws, Format::Json, &event).await;
    let (code, seen) = read_until_close(&mut ws, Format::Json).await;
    assert_eq!(code, Some(CloseCode::HANDSHAKE_REQUIRED));
    assert_eq!(
        seen.first().map(|e| e.kind.clone()),
        Some(MessageType::Close)
    );
    assert!(f.hub.sender(&id).is_none());
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_type_is_delivered_not_fatal() {
    let mut f = fixture().await;
    let id = AgentId::new("ws", "newer-peer");
    let mut ws = f.handshaken("newer-peer", Format::Json).await;
    ws.send(Message::Text(
        "{\"id\":5,\"type\":\"telemetry.v9\",\"ts\":1,\"shiny\":true,\"payload\":{\"x\":1}}".into(),
    ))
    .await
    .expect("send");
    let got = recv_soon(&mut f.at_hub).await;
    assert_eq!(got.agent(), &id);
    assert_eq!(got.envelope.kind, MessageType::from_wire("telemetry.v9"));
    assert_eq!(got.envelope.unknown_fields, vec!["shiny"]);
    assert!(f.hub.sender(&id).is_some(), "still connected");
    drop(ws);
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_garbage_and_half_upgrades_are_dropped() {
    let f = fixture().await;
    let addr = f.hub.local_addr().expect("addr");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    tcp.write_all(b"\x16\x03\x01\x02\x00 definitely not http\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf),
    )
    .await;
    assert!(read.is_ok(), "the hub closed the connection");
    // A client that opens TCP and sends nothing is cut off by the handshake deadline
    // without affecting anyone; it is left hanging here while the healthy agent works.
    let _idle = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.finish().await;
}
