//! A client stack composed with `ServiceBuilder`, the way tonic or hyper clients are:
//! metrics, a timeout, a concurrency limit, tracing with W3C trace context, and
//! compression, over an agent connected to an embedded hub whose handlers are wrapped
//! in tracing and metrics layers too.
//!
//! Run with `cargo run -p tunnel-router --example stack --features trace`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use tunnel_metrics::Recorder;
use tunnel_proto::messages::Command;
use tunnel_proto::{MessageType, Payload};
use tunnel_router::layer::compression::CompressionLayer;
use tunnel_router::layer::metrics::MetricsLayer;
use tunnel_router::layer::timeout::TimeoutLayer;
use tunnel_router::layer::trace::TraceLayer;
use tunnel_router::{Agent, AgentConfig, Hub, Inbound, Request, Router};
use tunnel_transport::{AgentId, ClientConfig, ServerConfig, SharedToken, WsConnector};

/// Counts finished requests and sums their latency.
#[derive(Debug, Default)]
struct Tally {
    requests: AtomicU64,
    errors: AtomicU64,
    micros: AtomicU64,
}

impl Recorder for Tally {
    fn request_finished(
        &self,
        _kind: &MessageType,
        elapsed: Duration,
        outcome: Result<(), &'static str>,
    ) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(micros, Ordering::Relaxed);
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let tally = Arc::new(Tally::default());

    // The hub: one handler for commands, wrapped in tracing and metrics.
    let restart = service_fn(|msg: Inbound| async move {
        let command: Command = msg.envelope.decode_payload()?;
        let answer: Payload = msg.encode(&format!("restarted {}", command.name))?;
        Ok::<_, BoxError>(answer)
    });
    let router = Router::new()
        .route(MessageType::Command, restart)
        .layer(TraceLayer::new())
        .layer(MetricsLayer::new(tally.clone()));
    let config = ServerConfig::new(SharedToken::new("t0k3n"));
    let hub = Hub::bind("127.0.0.1:0", config, router).await?;

    // The agent and its client stack.
    let id = AgentId::new("root:org", "cluster-1");
    let connector = WsConnector::new(ClientConfig::new(id).token(Some("t0k3n".into())));
    let url = hub.url().ok_or("no url")?;
    let agent = Agent::start(connector, AgentConfig::new(url), Router::new())?;
    agent.wait_connected(Duration::from_secs(5)).await?;
    let mut client = ServiceBuilder::new()
        .layer(MetricsLayer::new(tally.clone()))
        .layer(TimeoutLayer::new(Duration::from_secs(2)))
        .concurrency_limit(64)
        .layer(TraceLayer::new())
        .layer(CompressionLayer::new(512))
        .service(agent.client());

    for name in ["web-0", "web-1", "web-2"] {
        let request = Request::new(MessageType::Command, &Command::new(name))?.expect_reply();
        let reply = client.ready().await?.call(request).await?;
        println!("{}", reply.decode::<String>()?);
    }
    let requests = tally.requests.load(Ordering::Relaxed);
    println!(
        "{requests} requests measured on both sides, {} errors, mean {} us",
        tally.errors.load(Ordering::Relaxed),
        tally.micros.load(Ordering::Relaxed) / requests.max(1)
    );
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
