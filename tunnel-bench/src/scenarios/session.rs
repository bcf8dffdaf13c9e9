//! `session`: what resumable sessions cost and how fast they recover.

use crate::harness::{
    THROUGHPUT_PLACEMENT, counting_router, resumable_hub, sample_event, serve_until_counted,
    tunnel_throughput, two_sided,
};
use crate::report::{figure, median, percentile, thousands, us};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tunnel_proto::{Envelope, Format, MessageType, Payload};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::{Agent, AgentConfig, ConnectionState, Held, Router};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, ClientConfig, WsConnector};

/// One-way MessagePack throughput through an agent's session into a resumable hub,
/// beside the transport-only figure, same placement, same run.
pub(crate) fn throughput(n: u64, runs: usize) -> Result<(), String> {
    println!(
        "\nsession: {} one-way event messages agent -> hub per run, median of {runs} runs, client core 0, server core 1",
        thousands(n)
    );
    let mut plain = Vec::new();
    let mut with_sessions = Vec::new();
    let mut held = Held::default();
    for _ in 0..runs.max(1) {
        plain.push(tunnel_throughput(n, Format::MsgPack)?);
        let (rate, max_held) = session_throughput(n)?;
        with_sessions.push(rate);
        held = held.max(max_held);
    }
    let (plain, sessions) = (median(plain), median(with_sessions));
    let ratio = sessions / plain;
    figure("session", "transport_only_rate", plain, "msg/s");
    figure("session", "sessions_rate", sessions, "msg/s");
    figure("session", "sessions_vs_transport_only", ratio, "x");
    let verdict = if ratio >= 0.8 { "meets" } else { "BELOW" };
    println!(
        "  {:<44} {:>10} msg/s",
        "transport only (connection -> hub)",
        thousands(plain as u64)
    );
    println!(
        "  {:<44} {:>10} msg/s  {ratio:.2}x transport-only ({verdict} the 0.8x bar)",
        "with sessions (agent -> resumable hub)",
        thousands(sessions as u64)
    );
    println!(
        "  replay buffer under this load: at most {} messages, {} KiB held (bounds: 10,000 messages, 16 MiB, 5 min)",
        thousands(held.messages as u64),
        thousands(held.bytes as u64 / 1024)
    );
    Ok(())
}

fn session_throughput(n: u64) -> Result<(f64, Held), String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    two_sided(
        &THROUGHPUT_PLACEMENT,
        move |url_tx| Box::pin(sink(url_tx, done_tx, n)),
        move |url| Box::pin(source(url, done_rx, n)),
    )
}

async fn sink(url_tx: mpsc::Sender<String>, done: tokio::sync::oneshot::Sender<Instant>, n: u64) {
    let (router, all_in) = counting_router(n);
    let Ok(hub) = resumable_hub(router).await else {
        return;
    };
    serve_until_counted(hub, url_tx, done, all_in).await;
}

async fn source(
    url: String,
    done: tokio::sync::oneshot::Receiver<Instant>,
    n: u64,
) -> Result<(f64, Held), String> {
    let connector = WsConnector::new(ClientConfig::new(AgentId::new("bench", "session")));
    let agent =
        Agent::start(connector, AgentConfig::new(url), Router::new()).map_err(|e| e.to_string())?;
    agent
        .wait_connected(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let event = sample_event();
    let mut held = Held::default();
    let started = Instant::now();
    for i in 0..n {
        let payload = Payload::encode(Format::MsgPack, &event).map_err(|e| e.to_string())?;
        let mut env = Box::new(Envelope::new(
            0,
            MessageType::Event,
            tunnel_transport::unix_millis(),
        ));
        env.payload = Some(payload);
        drop(agent.send_envelope(env).await.map_err(|e| e.to_string())?);
        if i % 10_000 == 0 {
            held = held.max(agent.held().unwrap_or_default());
        }
    }
    let finished = done
        .await
        .map_err(|_| "not every message arrived".to_string())?;
    let rate = n as f64 / (finished - started).as_secs_f64();
    agent.shutdown().await;
    Ok((rate, held))
}

/// Time from a cut TCP connection to a resumed session, over `cuts` cuts.
pub(crate) async fn resume_time(cuts: usize) -> Result<(), String> {
    let backoff = BackoffConfig::default()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(100));
    let hub = resumable_hub(Router::new()).await?;
    let proxy = FaultProxy::start(hub.local_addr().ok_or("no address")?)
        .await
        .map_err(|e| e.to_string())?;
    let connector = WsConnector::new(ClientConfig::new(AgentId::new("bench", "resume")));
    let agent = Agent::start(
        connector,
        AgentConfig::new(proxy.ws_url()).backoff(backoff),
        Router::new(),
    )
    .map_err(|e| e.to_string())?;
    agent
        .wait_connected(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let mut state = agent.state();
    let mut samples = Vec::with_capacity(cuts);
    for _ in 0..cuts.max(1) {
        let cut_at = Instant::now();
        proxy.cut_all();
        // Down first, then resumed again.
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| {
                !matches!(
                    s,
                    ConnectionState::Connected { .. } | ConnectionState::Resumed { .. }
                )
            }),
        )
        .await
        .map_err(|_| "the cut went unnoticed")?
        .map_err(|e| e.to_string())?;
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| matches!(s, ConnectionState::Resumed { .. })),
        )
        .await
        .map_err(|_| "no resume")?
        .map_err(|e| e.to_string())?;
        samples.push(cut_at.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples.sort();
    figure(
        "session",
        "resume_p50",
        us(percentile(&samples, 0.5)) / 1e3,
        "ms",
    );
    figure(
        "session",
        "resume_p99",
        us(percentile(&samples, 0.99)) / 1e3,
        "ms",
    );
    println!(
        "  cut to resumed session, {} cuts (backoff 10 ms base, 100 ms cap, full jitter): p50 {:.1} ms, p99 {:.1} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
    agent.shutdown().await;
    hub.shutdown().await;
    Ok(())
}
