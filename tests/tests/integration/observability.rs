//! What an operator sees: a hub under known traffic scraped over HTTP, readiness while
//! draining, the agents list, instruments read back exactly, and no secrets in logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::{BoxError, service_fn};
use tunnel_metrics::prometheus::PrometheusMetrics;
use tunnel_metrics::testing::TestMeter;
use tunnel_proto::messages::Command;
use tunnel_proto::{Format, MessageType};
use tunnel_router::admin::Admin;
use tunnel_router::layer::metrics::MetricsLayer;
use tunnel_router::{
    Agent, AgentConfig, AgentStatus, Drain, Hub, Inbound, Pool, PoolMode, Readiness, Request,
    Router,
};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, ConnectionConfig, WsConnector};

use crate::support::*;

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8(response).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a full response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

/// The value of the Prometheus series whose line starts with `name{` and contains
/// every label in `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_under_known_traffic_is_scraped_over_http() {
    let metrics = PrometheusMetrics::new().expect("prometheus");
    let router = Router::new()
        .route(
            MessageType::Event,
            service_fn(|_: Inbound| async { Ok::<_, BoxError>(()) }),
        )
        .route(
            MessageType::Command,
            service_fn(|msg: Inbound| async move { Ok::<_, BoxError>(msg.encode(&"done")?) }),
        )
        .layer(MetricsLayer::new(metrics.recorder()));
    let config =
        server_config().connection(ConnectionConfig::default().recorder(metrics.recorder()));
    let hub = Hub::bind("127.0.0.1:0", config, router)
        .await
        .expect("bind");
    let render = metrics.clone();
    let admin = Admin::new()
        .hub(hub.clone())
        .metrics(move || render.render())
        .bind("127.0.0.1:0")
        .await
        .expect("admin");
    let addr = admin.local_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    let url = hub.url().expect("url");
    let (a, b) = (AgentId::new("root:org", "a"), AgentId::new("root:org", "b"));
    let agent_a = agent(&url, client_config(&a, Format::MsgPack), Router::new());
    let agent_b = agent(&url, client_config(&b, Format::Json), Router::new());
    registered(&hub, &a).await;
    registered(&hub, &b).await;

    // Known traffic: 120 events from a, 80 from b, and 5 requests from a.
    let mut receipts = Vec::new();
    for n in 0..120 {
        receipts.push(
            agent_a
                .send(MessageType::Event, &json!({"n": n}))
                .await
                .expect("send"),
        );
    }
    for n in 0..80 {
        receipts.push(
            agent_b
                .send(MessageType::Event, &json!({"n": n}))
                .await
                .expect("send"),
        );
    }
    for receipt in receipts {
        receipt.delivered().await.expect("delivered");
    }
    for _ in 0..5 {
        agent_a
            .call(
                Request::new(MessageType::Command, &Command::new("x"))
                    .expect("encode")
                    .expect_reply(),
            )
            .await
            .expect("reply");
    }

    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let events_in = [r#"direction="in""#, r#"message_type="event""#];
    assert_eq!(
        series(&text, "tunnel_messages_total", &events_in),
        Some(200.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "tunnel_messages_total",
            &[r#"direction="in""#, r#"message_type="command""#]
        ),
        Some(5.0)
    );
    assert_eq!(
        series(
            &text,
            "tunnel_messages_total",
            &[r#"direction="out""#, r#"message_type="reply""#]
        ),
        Some(5.0)
    );
    assert_eq!(
        series(
            &text,
            "tunnel_request_duration_seconds_count",
            &[r#"message_type="event""#]
        ),
        Some(200.0),
        "every handled event is timed"
    );
    assert_eq!(
        series(
            &text,
            "tunnel_request_duration_seconds_count",
            &[r#"message_type="command""#]
        ),
        Some(5.0)
    );
    assert_eq!(series(&text, "tunnel_connections_active", &[]), Some(2.0));
    assert!(
        series(&text, "tunnel_message_size_bytes_total", &events_in).is_some_and(|v| v > 200.0)
    );

    // /agents lists exactly the connected agents, with what they carried.
    let (status, body) = get(addr, "/agents").await;
    assert_eq!(status, 200);
    let agents: Vec<AgentStatus> = serde_json::from_str(&body).expect("json");
    let names: Vec<&str> = agents.iter().map(|s| s.sync_target.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let a_status = &agents[0];
    assert!(a_status.messages_in >= 125, "{a_status:?}");
    assert_eq!(a_status.codec, "msgpack");
    assert_eq!(agents[1].codec, "json");
    agent_b.shutdown().await;
    eventually("b is gone", || hub.agents().len() == 1).await;
    let agents: Vec<AgentStatus> =
        serde_json::from_str(&get(addr, "/agents").await.1).expect("json");
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].sync_target, "a");

    // While draining, the hub is not ready.
    let draining = tokio::spawn({
        let hub = hub.clone();
        async move {
            hub.drain(Drain::default().timeout(Duration::from_secs(2)))
                .await
        }
    });
    eventually("not ready while draining", || !hub.is_accepting()).await;
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    agent_a.shutdown().await;
    draining.await.expect("drain");
    admin.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_readyz_follows_its_pool_and_instruments_count_exactly() {
    let meter = TestMeter::new();
    let hubs = [
        Hub::bind("127.0.0.1:0", server_config(), Router::new())
            .await
            .expect("bind"),
        Hub::bind("127.0.0.1:0", server_config(), Router::new())
            .await
            .expect("bind"),
    ];
    let proxies = [
        FaultProxy::start(hubs[0].local_addr().expect("addr"))
            .await
            .expect("proxy"),
        FaultProxy::start(hubs[1].local_addr().expect("addr"))
            .await
            .expect("proxy"),
    ];
    let id = AgentId::new("root:org", "measured");
    let connection = quick_keepalive().recorder(meter.recorder());
    let pool = Pool::start(
        PoolMode::Spread,
        WsConnector::new(client_config(&id, Format::MsgPack).connection(connection)),
        AgentConfig::with_endpoints(proxies.iter().map(FaultProxy::ws_url))
            .backoff(fast_backoff())
            .recorder(meter.recorder()),
        Router::new(),
    )
    .expect("pool");
    let admin = Admin::new()
        .pool(pool.clone())
        .bind("127.0.0.1:0")
        .await
        .expect("admin");
    let addr = admin.local_addr();
    eventually("2/2", || {
        pool.readiness()
            == Readiness {
                connected: 2,
                desired: 2,
            }
    })
    .await;
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!((status, body.trim()), (200, "ready: pool 2/2 connected"));
    assert_eq!(
        get(addr, "/agents").await.0,
        404,
        "an agent has no agent list"
    );
    eventually("readiness recorded", || {
        meter.gauge(
            "tunnel.pool.connections",
            &[opentelemetry::KeyValue::new("state", "connected")],
        ) == Some(2)
    })
    .await;
    eventually("an RTT measured", || {
        meter.histogram_count("tunnel.rtt", &[]) > 0
    })
    .await;

    // Both hubs go away: not ready, each drop counted once as a reconnect reason.
    for proxy in &proxies {
        proxy.set_refuse(true);
        proxy.cut_all();
    }
    eventually("0/2", || pool.readiness().connected == 0).await;
    assert_eq!(get(addr, "/readyz").await.0, 503);
    eventually("drops counted", || {
        meter.sum(
            "tunnel.reconnect.attempts",
            &[opentelemetry::KeyValue::new("reason", "dropped")],
        ) == 2
    })
    .await;
    eventually("connections closed", || {
        meter.histogram_count("tunnel.connection.duration", &[]) == 2
    })
    .await;
    // Messages accepted while offline are held: the replay gauges count them.
    let agent: Agent = pool.members()[0].1.clone();
    for n in 0..7 {
        agent
            .send(MessageType::Event, &json!({"n": n}))
            .await
            .expect("held");
    }
    assert_eq!(meter.sum("tunnel.session.replay.messages", &[]), 7);
    assert!(meter.sum("tunnel.session.replay.size", &[]) > 7 * 10);
    for proxy in &proxies {
        proxy.set_refuse(false);
    }
    eventually("replayed and acknowledged", || {
        meter.sum("tunnel.session.replay.messages", &[]) == 0
    })
    .await;
    eventually("ready again", || pool.readiness().connected == 2).await;
    assert_eq!(get(addr, "/readyz").await.0, 200);
    admin.shutdown().await;
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
}

/// A writer that keeps every log line in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_appear_in_logs() {
    const SECRET: &str = "sup3r-s3cret-t0ken-4711";
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    // A current-thread runtime: every task logs through this subscriber.
    let guard = tracing::subscriber::set_default(subscriber);

    let hub = hub(
        tunnel_transport::ServerConfig::new(tunnel_transport::SharedToken::new(SECRET)),
        Router::new(),
    )
    .await;
    let url = hub.url().expect("url");
    let id = AgentId::new("root:org", "secretive");
    let good = agent(
        &url,
        tunnel_transport::ClientConfig::new(id.clone()).token(Some(SECRET.into())),
        Router::new(),
    );
    good.wait_connected(SOON).await.expect("connected");
    good.send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("send");
    // A wrong token (which shares a prefix with the right one) is refused and logged.
    let wrong = format!("{SECRET}-but-wrong");
    let bad = agent(
        &url,
        tunnel_transport::ClientConfig::new(AgentId::new("root:org", "intruder"))
            .token(Some(wrong.clone())),
        Router::new(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    bad.shutdown().await;
    good.shutdown().await;
    hub.shutdown().await;
    drop(guard);

    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(logs.contains("secretive"), "the logs were captured: {logs}");
    assert!(logs.len() > 1000, "trace-level logs were written");
    assert!(!logs.contains(SECRET), "a token leaked into the logs");
    assert!(
        !logs.contains("s3cret"),
        "part of a token leaked into the logs"
    );
}
