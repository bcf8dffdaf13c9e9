//! The tower layers end to end: compression (with a bomb), trace context across the
//! tunnel, and request metrics.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use tokio::sync::mpsc;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tunnel_metrics::testing::TestMeter;
use tunnel_proto::messages::Command;
use tunnel_proto::{Envelope, Format, Limits, MessageType, Payload, capability};
use tunnel_router::layer::compression::CompressionLayer;
use tunnel_router::layer::metrics::MetricsLayer;
use tunnel_router::layer::trace::TraceLayer;
use tunnel_router::{Agent, AgentConfig, Error, Hub, Inbound, Request, Router, error_code};
use tunnel_transport::{AgentId, ConnectionConfig, WsConnector};

use crate::support::*;

/// Answers every command with the payload it received, as seen by the handler (after
/// the router inflated it), and forwards the envelope for inspection.
fn echo_router() -> (Router, mpsc::UnboundedReceiver<Envelope>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().route(
        MessageType::Command,
        service_fn(move |msg: Inbound| {
            let tx = tx.clone();
            async move {
                let command: Command = msg.envelope.decode_payload()?;
                let _ = tx.send(Envelope::clone(&msg.envelope));
                if command.name == "fail" {
                    return Err::<Payload, BoxError>("failed on purpose".into());
                }
                if command.name == "slow" {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(msg.encode(&command)?)
            }
        }),
    );
    (router, rx)
}

fn big_command() -> Command {
    let mut command = Command::new("big");
    command
        .args
        .insert("lines".into(), json!(vec!["the same log line again"; 500]));
    command
}

#[tokio::test]
async fn compressed_requests_arrive_inflated_in_both_codecs() {
    for format in [Format::MsgPack, Format::Json] {
        let (router, mut seen) = echo_router();
        let hub = hub(server_config(), router).await;
        let id = AgentId::new("root:org", "deflate");
        let agent = agent(
            &hub.url().expect("url"),
            client_config(&id, format),
            Router::new(),
        );
        let info = agent.wait_connected(SOON).await.expect("connected");
        assert!(info.has_capability(capability::DEFLATE), "negotiated");

        // A tap below the compression layer sees what goes on the wire.
        let (wire_tx, mut wire) = mpsc::unbounded_channel();
        let inner = agent.client();
        let tap = service_fn(move |req: Request| {
            let _ = wire_tx.send(req.envelope.content_encoding().map(str::to_owned));
            let mut inner = inner.clone();
            async move { inner.call(req).await }
        });
        let mut client = ServiceBuilder::new()
            .layer(CompressionLayer::new(256))
            .service(tap);
        let command = big_command();
        let reply = client
            .ready()
            .await
            .expect("ready")
            .call(
                Request::new(MessageType::Command, &command)
                    .expect("encode")
                    .expect_reply(),
            )
            .await
            .expect("reply");
        assert_eq!(wire.recv().await.flatten().as_deref(), Some("deflate"));
        let at_hub = recv_soon(&mut seen).await;
        assert_eq!(
            at_hub.content_encoding(),
            None,
            "the handler sees it inflated"
        );
        assert_eq!(
            reply.decode::<Command>().expect("decode"),
            command,
            "{format:?}"
        );
        agent.shutdown().await;
        hub.shutdown().await;
    }
}

#[tokio::test]
async fn a_compression_bomb_gets_an_error_reply_and_the_connection_stays_up() {
    let (router, mut seen) = echo_router();
    let limits = Limits::default().max_decompressed_size(64 * 1024);
    let config = server_config().connection(ConnectionConfig::default().limits(limits));
    let hub = hub(config, router).await;
    let url = hub.url().expect("url");
    let id = AgentId::new("root:org", "bomb");
    let mut ws = raw_client(&url, &id, Format::MsgPack).await;
    raw_handshake(&mut ws, &id, Format::MsgPack).await;

    // 1 MiB of zeros deflates to about 1 KiB; the hub may inflate only 64 KiB.
    let mut bomb = Envelope::new(5, MessageType::Command, 0)
        .with_payload(Payload::msgpack(&vec![0u8; 1 << 20]).expect("payload"))
        .expecting_reply();
    assert!(bomb.compress_payload(0));
    assert!(bomb.payload.as_ref().expect("payload").len() < 4 * 1024);
    send_raw(&mut ws, Format::MsgPack, &bomb).await;
    let reply = recv_raw_until(&mut ws, Format::MsgPack, MessageType::Reply).await;
    assert_eq!(reply.correlation, Some(5));
    let error = reply.error.expect("an error reply");
    assert_eq!(error.code, error_code::BAD_REQUEST);

    // Still connected: a normal request on the same socket is answered.
    let ok = Envelope::new(6, MessageType::Command, 0)
        .with_payload(Payload::msgpack(&Command::new("after")).expect("payload"))
        .expecting_reply();
    send_raw(&mut ws, Format::MsgPack, &ok).await;
    let reply = recv_raw_until(&mut ws, Format::MsgPack, MessageType::Reply).await;
    assert_eq!(reply.correlation, Some(6));
    assert_eq!(reply.error, None);
    assert_eq!(
        recv_soon(&mut seen)
            .await
            .decode_payload::<Command>()
            .expect("decode")
            .name,
        "after",
        "the bomb never reached the handler"
    );
    drop(ws);
    hub.shutdown().await;
}

#[tokio::test]
async fn a_trace_started_in_the_agent_continues_in_the_hubs_handler() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // A current-thread runtime: every task of hub and agent sees this subscriber.
    let guard = tracing::subscriber::set_default(subscriber);

    let (router, _seen) = echo_router();
    let hub = hub(server_config(), router.layer(TraceLayer::new())).await;
    let id = AgentId::new("root:org", "traced");
    let agent = agent(
        &hub.url().expect("url"),
        client_config(&id, Format::MsgPack),
        Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");
    let mut client = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service(agent.client());
    let request = Request::new(MessageType::Command, &Command::new("traced"))
        .expect("encode")
        .expect_reply();
    async {
        client
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("reply");
    }
    .instrument(tracing::info_span!("agent-operation"))
    .await;
    agent.shutdown().await;
    hub.shutdown().await;
    drop(guard);
    provider.force_flush().expect("flush");

    let spans = exporter.get_finished_spans().expect("spans");
    let named = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no span {name} among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let (root, send, handle) = (
        named("agent-operation"),
        named("tunnel.send"),
        named("tunnel.handle"),
    );
    assert_eq!(send.parent_span_id, root.span_context.span_id());
    assert_eq!(
        handle.span_context.trace_id(),
        root.span_context.trace_id(),
        "the hub's handler continues the agent's trace"
    );
    assert_eq!(handle.parent_span_id, send.span_context.span_id());
    assert!(handle.parent_span_is_remote);
    assert!(
        handle
            .attributes
            .contains(&KeyValue::new("message.type", "command")),
        "{:?}",
        handle.attributes
    );
}

#[tokio::test]
async fn the_metrics_layer_records_latency_errors_in_flight_and_late_replies() {
    let meter = TestMeter::new();
    let (router, _seen) = echo_router();
    let hub = Hub::bind("127.0.0.1:0", server_config(), router)
        .await
        .expect("bind");
    let id = AgentId::new("root:org", "measured");
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack)),
        AgentConfig::new(hub.url().expect("url"))
            .backoff(fast_backoff())
            .recorder(meter.recorder()),
        Router::new(),
    )
    .expect("agent");
    agent.wait_connected(SOON).await.expect("connected");
    let mut client = ServiceBuilder::new()
        .layer(MetricsLayer::new(meter.recorder()))
        .service(agent.client());
    let mut call = |name: &str, timeout: Duration| {
        let request = Request::new(MessageType::Command, &Command::new(name))
            .expect("encode")
            .expect_reply()
            .timeout(timeout);
        client.call(request)
    };
    call("ok", SOON).await.expect("reply");
    call("ok", SOON).await.expect("reply");
    let err = call("fail", SOON).await.unwrap_err();
    assert!(matches!(err, Error::Remote(_)), "{err:?}");
    let err = call("slow", Duration::from_millis(20)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    // One one-way message too.
    client
        .call(Request::new(MessageType::Event, &json!({"n": 1})).expect("encode"))
        .await
        .expect("accepted");

    let command = KeyValue::new("message.type", "command");
    assert_eq!(
        meter.histogram_count(
            "tunnel.request.duration",
            &[KeyValue::new("message.type", "event")]
        ),
        1
    );
    assert_eq!(
        meter.sum(
            "tunnel.request.errors",
            &[command.clone(), KeyValue::new("error.kind", "remote")]
        ),
        1
    );
    assert_eq!(
        meter.sum(
            "tunnel.request.errors",
            &[command.clone(), KeyValue::new("error.kind", "timeout")]
        ),
        1
    );
    assert_eq!(meter.sum("tunnel.requests.in_flight", &[]), 0);
    // A request in flight is counted while it waits.
    let slow = tokio::spawn(
        client.call(
            Request::new(MessageType::Command, &Command::new("slow"))
                .expect("encode")
                .expect_reply()
                .timeout(SOON),
        ),
    );
    eventually("one request in flight", || {
        meter.sum("tunnel.requests.in_flight", std::slice::from_ref(&command)) == 1
    })
    .await;
    slow.await.expect("task").expect("reply");
    assert_eq!(meter.sum("tunnel.requests.in_flight", &[]), 0);
    assert_eq!(meter.unit("tunnel.request.duration").as_deref(), Some("s"));
    eventually("the first slow reply arrived late and was counted", || {
        meter.sum("tunnel.replies.late", &[]) == 1
    })
    .await;
    agent.shutdown().await;
    hub.shutdown().await;
}
