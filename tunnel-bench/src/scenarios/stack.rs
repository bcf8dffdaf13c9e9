//! `stack`: the router's tower stack (timeout, tracing and metrics layers) beside the
//! bare agent client and the baseline; request/reply through the stack beside a raw
//! echo; failover time of a pool when its hub dies.

use crate::baseline::{raw_echo_client, raw_echo_server, raw_throughput};
use crate::harness::{
    THROUGHPUT_PLACEMENT, counting_router, drive, drive_layered, latency_placements, layered,
    otel_recorder, resumable_hub, serve_until_counted, start_agent, two_sided,
};
use crate::report::{figure, median, percentile, thousands, us};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tower::{BoxError, Service, ServiceExt, service_fn};
use tunnel_proto::messages::Command;
use tunnel_proto::{Format, MessageType};
use tunnel_reconnect::{BackoffConfig, BreakerConfig};
use tunnel_router::layer::metrics::MetricsLayer;
use tunnel_router::layer::trace::TraceLayer;
use tunnel_router::{AgentConfig, Hub, Inbound, Pool, PoolMode, Request, Router};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, AllowAll, ClientConfig, ServerConfig, WsConnector};

/// A MessagePack client config for agent `bench/<name>`.
fn client(name: &str) -> ClientConfig {
    ClientConfig::new(AgentId::new("bench", name)).format(Format::MsgPack)
}

fn agent_throughput(n: u64, layers: bool) -> Result<f64, String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    two_sided(
        &THROUGHPUT_PLACEMENT,
        move |url_tx| {
            Box::pin(async move {
                let (router, all_in) = counting_router(n);
                let Ok(hub) = Hub::bind_with(
                    "127.0.0.1:0",
                    ServerConfig::new(AllowAll),
                    router,
                    tunnel_router::HubConfig::default().without_sessions(),
                )
                .await
                else {
                    return;
                };
                serve_until_counted(hub, url_tx, done_tx, all_in).await;
            })
        },
        move |url| {
            Box::pin(async move {
                let agent = start_agent(&url, client("stack")).await?;
                let started = if layers {
                    let (recorder, _provider) = otel_recorder();
                    drive_layered(&agent, recorder, n).await?
                } else {
                    drive(agent.client(), agent.format(), n).await?
                };
                let finished = done_rx
                    .await
                    .map_err(|_| "not every message arrived".to_string())?;
                agent.shutdown().await;
                Ok(n as f64 / (finished - started).as_secs_f64())
            })
        },
    )
}

/// One-way throughput: the full stack against the bare agent client and the baseline.
pub(crate) fn throughput(n: u64, runs: usize) -> Result<(), String> {
    println!(
        "\nstack throughput: {} one-way events per run, median of {runs} runs, agent and hub on their own pinned cores (MessagePack, no sessions)",
        thousands(n)
    );
    println!(
        "  layers: metrics (OpenTelemetry SDK meter), timeout (5 s, layer::timeout), tracing (spans disabled by the log filter, as with RUST_LOG=warn); compression off"
    );
    let (mut baseline, mut bare, mut stack) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        baseline.push(raw_throughput(n, true)?);
        bare.push(agent_throughput(n, false)?);
        stack.push(agent_throughput(n, true)?);
    }
    let (baseline, bare, stack) = (median(baseline), median(bare), median(stack));
    let ratio = stack / bare;
    figure("stack", "agent_client_rate", bare, "msg/s");
    figure("stack", "layers_rate", stack, "msg/s");
    figure("stack", "layers_vs_bare", ratio, "x");
    println!(
        "  hand-written tokio-tungstenite baseline (typed) {:>12} msg/s",
        thousands(baseline as u64)
    );
    println!(
        "  agent client, no layers                        {:>12} msg/s",
        thousands(bare as u64)
    );
    println!(
        "  agent client + metrics + timeout + tracing     {:>12} msg/s  {ratio:.2}x without layers ({} the 0.8x bar), {:.2}x the baseline ({} it)",
        thousands(stack as u64),
        if ratio >= 0.8 { "meets" } else { "BELOW" },
        stack / baseline,
        if stack > baseline {
            "above"
        } else {
            "NOT above"
        },
    );
    Ok(())
}

async fn stack_echo_server(url_tx: mpsc::Sender<String>, done: tokio::sync::oneshot::Receiver<()>) {
    let (recorder, _provider) = otel_recorder();
    let router = Router::new()
        .route(
            MessageType::Command,
            service_fn(|msg: Inbound| async move { Ok::<_, BoxError>(msg.encode(&"ok")?) }),
        )
        .layer(TraceLayer::new())
        .layer(MetricsLayer::new(recorder));
    let Ok(hub) = Hub::bind_with(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        router,
        tunnel_router::HubConfig::default().without_sessions(),
    )
    .await
    else {
        return;
    };
    let _ = url_tx.send(hub.url().unwrap_or_default()).await;
    // Serve until the client is done (or gone).
    let _ = done.await;
    hub.shutdown().await;
}

async fn stack_echo_client(
    url: String,
    n: usize,
    done: tokio::sync::oneshot::Sender<()>,
) -> Result<Vec<Duration>, String> {
    let agent = start_agent(&url, client("stack-latency")).await?;
    let (recorder, _provider) = otel_recorder();
    let mut stack = layered(&agent, recorder);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        let request = Request::new(MessageType::Command, &Command::new("echo"))
            .map_err(|e| e.to_string())?
            .expect_reply();
        stack
            .ready()
            .await
            .map_err(|e| e.to_string())?
            .call(request)
            .await
            .map_err(|e| e.to_string())?;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    agent.shutdown().await;
    let _ = done.send(());
    samples.sort();
    Ok(samples)
}

/// Request/reply through the full stack on both sides, beside a raw echo.
pub(crate) fn latency(n: usize) -> Result<(), String> {
    println!(
        "\nstack latency: {} request/reply round trips through agent client + metrics + timeout + tracing, hub handler + tracing + metrics",
        thousands(n as u64)
    );
    for placement in &latency_placements() {
        let raw = two_sided(
            placement,
            move |url_tx| Box::pin(raw_echo_server(url_tx)),
            move |url| Box::pin(raw_echo_client(url, n)),
        )?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let ours = two_sided(
            placement,
            move |url_tx| Box::pin(stack_echo_server(url_tx, done_rx)),
            move |url| Box::pin(stack_echo_client(url, n, done_tx)),
        )?;
        println!(
            "  {} (client core {}, server core {}):",
            placement.name, placement.client_core, placement.server_core
        );
        let name = placement.name.replace(' ', "_");
        for (what, samples) in [("raw", &raw), ("stack", &ours)] {
            for (p, label) in [(0.5, "p50"), (0.99, "p99")] {
                figure(
                    "stack_latency",
                    &format!("{name}_{what}_{label}"),
                    us(percentile(samples, p)),
                    "us",
                );
            }
        }
        println!(
            "    raw tokio-tungstenite echo  p50 {:>8.1} us  p99 {:>8.1} us",
            us(percentile(&raw, 0.5)),
            us(percentile(&raw, 0.99))
        );
        println!(
            "    tunnel stack request/reply  p50 {:>8.1} us  p99 {:>8.1} us  p50 {:.2}x raw",
            us(percentile(&ours, 0.5)),
            us(percentile(&ours, 0.99)),
            percentile(&ours, 0.5).as_secs_f64() / percentile(&raw, 0.5).as_secs_f64()
        );
    }
    Ok(())
}

/// Time from a hub's death to the next answered request, for a failover pool over
/// two hubs (each behind a proxy that cuts it off at once).
pub(crate) async fn failover(trials: usize) -> Result<(), String> {
    let backoff = BackoffConfig::default()
        .base(Duration::from_millis(20))
        .cap(Duration::from_millis(500));
    println!(
        "\nfailover: {trials} hub kills, failover pool over 2 hubs, backoff full jitter base {:?} cap {:?} (reset by a connection up 100 ms, as after a long stable period), circuit breaker out of the way (threshold 1000)",
        backoff.base, backoff.cap
    );
    let router = Router::new().route(
        MessageType::Command,
        service_fn(|msg: Inbound| async move { Ok::<_, BoxError>(msg.encode(&"ok")?) }),
    );
    let mut hubs = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let hub = resumable_hub(router.clone()).await?;
        let addr = hub.local_addr().ok_or("no address")?;
        proxies.push(FaultProxy::start(addr).await.map_err(|e| e.to_string())?);
        hubs.push(hub);
    }
    let endpoints: Vec<String> = proxies.iter().map(FaultProxy::ws_url).collect();
    let config = AgentConfig::with_endpoints(endpoints)
        .backoff(backoff)
        .stable_after(Duration::from_millis(100))
        .breaker(BreakerConfig::default().failure_threshold(1000));
    let connector = WsConnector::new(ClientConfig::new(AgentId::new("bench", "failover")));
    let pool = Pool::start(PoolMode::Failover, connector, config, Router::new())
        .map_err(|e| e.to_string())?;
    let agent = pool.members()[0].1.clone();
    agent
        .wait_connected(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut client = pool.client();
    let mut samples = Vec::with_capacity(trials);
    for _ in 0..trials {
        let active = proxies
            .iter()
            .position(|p| p.connections() > 0)
            .ok_or("no active hub")?;
        proxies[active].set_refuse(true);
        let killed = Instant::now();
        proxies[active].cut_all();
        loop {
            let request = Request::new(MessageType::Command, &Command::new("ping"))
                .map_err(|e| e.to_string())?
                .expect_reply()
                .timeout(Duration::from_millis(250));
            let answered = client
                .ready()
                .await
                .map_err(|e| e.to_string())?
                .call(request)
                .await;
            if answered.is_ok() {
                samples.push(killed.elapsed());
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                return Err("no failover within 30 s".into());
            }
        }
        proxies[active].set_refuse(false);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    samples.sort();
    figure("failover", "p50", us(percentile(&samples, 0.5)) / 1e3, "ms");
    figure(
        "failover",
        "p99",
        us(percentile(&samples, 0.99)) / 1e3,
        "ms",
    );
    println!(
        "  kill -> next answered request  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
        us(percentile(&samples, 0.5)) / 1000.0,
        us(percentile(&samples, 0.99)) / 1000.0,
        us(samples[samples.len() - 1]) / 1000.0,
    );
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
    Ok(())
}
