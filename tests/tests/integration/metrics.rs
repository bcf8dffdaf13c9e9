//! A hub's OpenTelemetry recorder counts exactly the traffic that crossed it.

use opentelemetry::KeyValue;
use tunnel_metrics::testing::TestMeter;
use tunnel_proto::{Format, MessageType, VersionRange};
use tunnel_transport::{AgentId, ConnectionConfig, Connector, WsConnector};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_metrics_count_exactly_what_was_sent() {
    let meter = TestMeter::new();
    let config = server_config().connection(ConnectionConfig::default().recorder(meter.recorder()));
    let (router, mut at_hub) = collecting_router();
    let hub = hub(config, router).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("ws", "counted");
    let agent = agent(
        &url,
        client_config(&id, Format::MsgPack),
        tunnel_router::Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;

    for i in 0..5 {
        agent
            .send(MessageType::Status, &serde_json::json!({ "i": i }))
            .await
            .expect("send");
    }
    for _ in 0..2 {
        agent
            .send(MessageType::Event, &serde_json::json!({}))
            .await
            .expect("send");
    }
    for _ in 0..7 {
        recv_soon(&mut at_hub).await;
    }
    for _ in 0..3 {
        hub.send(&id, MessageType::Command, &serde_json::json!({"name": "x"}))
            .await
            .expect("send");
    }
    let inbound = |kind: &'static str| {
        meter.sum(
            "tunnel.messages",
            &[
                KeyValue::new("direction", "in"),
                KeyValue::new("message.type", kind),
            ],
        )
    };
    assert_eq!(inbound("status"), 5);
    assert_eq!(inbound("event"), 2);
    // Sent messages are counted as the connection's writer writes them, a moment
    // after `send` queued them.
    let commands_out = || {
        meter.sum(
            "tunnel.messages",
            &[
                KeyValue::new("direction", "out"),
                KeyValue::new("message.type", "command"),
            ],
        )
    };
    eventually("three commands written", || commands_out() >= 3).await;
    assert_eq!(commands_out(), 3);
    assert!(
        meter.sum(
            "tunnel.message.size",
            &[KeyValue::new("message.type", "status")]
        ) > 5 * 20
    );
    assert_eq!(meter.sum("tunnel.connections.active", &[]), 1);

    // A refused handshake is counted by reason, and never becomes a connection.
    let future = WsConnector::new(
        client_config(&AgentId::new("ws", "future"), Format::Json)
            .versions(VersionRange::new(7, 9).expect("range")),
    );
    assert!(future.connect(&url).await.is_err());
    eventually("the failure to be counted", || {
        meter.sum(
            "tunnel.handshake.failures",
            &[KeyValue::new("reason", "version_mismatch")],
        ) == 1
    })
    .await;

    agent.shutdown().await;
    eventually("the connection to be released", || {
        meter.sum("tunnel.connections.active", &[]) == 0
    })
    .await;
    hub.shutdown().await;
}
