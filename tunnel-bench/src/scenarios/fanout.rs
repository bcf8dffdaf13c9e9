//! `fanout`: the hub sending to many agents, aggregate messages per second.

use crate::harness::{resumable_hub, sample_event, stop_crowd};
use crate::report::{Progress, figure, median, thousands};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tower::{BoxError, service_fn};
use tunnel_proto::{Envelope, Format, MessageType, Payload};
use tunnel_router::{Agent, AgentConfig, Inbound, Router};
use tunnel_transport::{AgentId, ClientConfig, WsConnector};

pub(crate) async fn run(agents: usize, per_agent: u64, runs: usize) -> Result<(), String> {
    println!(
        "\nfanout: one hub (in this process, resumable sessions) sending {} events to each of {} agents (MessagePack, {} bytes each), aggregate rate until every agent has all of its events, median of {} runs (each with a new hub and agents)",
        thousands(per_agent),
        thousands(agents as u64),
        Payload::encode(Format::MsgPack, &sample_event())
            .map_err(|e| e.to_string())?
            .len(),
        runs.max(1)
    );
    let mut rates = Vec::with_capacity(runs);
    for run in 1..=runs.max(1) {
        let rate = fanout_once(agents, per_agent).await?;
        println!("  run {run}: {} msg/s", thousands(rate as u64));
        rates.push(rate);
    }
    let rate = median(rates);
    println!(
        "  {} events per run: {} msg/s aggregate ({} the 500,000 bar)",
        thousands(per_agent * agents as u64),
        thousands(rate as u64),
        if rate >= 500_000.0 { "meets" } else { "BELOW" }
    );
    figure("fanout", "agents", agents as f64, "agents");
    figure("fanout", "aggregate_rate", rate, "msg/s");
    Ok(())
}

/// One fanout run: a new hub and `agents` agents; returns the aggregate rate.
async fn fanout_once(agents: usize, per_agent: u64) -> Result<f64, String> {
    let hub = resumable_hub(Router::new()).await?;
    let url = hub.url().ok_or("no hub address")?;
    let mut progress = Progress::new("fanout");
    let received = Arc::new(AtomicU64::new(0));
    let mut crowd = Vec::with_capacity(agents);
    for i in 0..agents {
        let received = received.clone();
        let router = Router::new().route(
            MessageType::Event,
            service_fn(move |_: Inbound| {
                received.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, BoxError>(()))
            }),
        );
        let config =
            ClientConfig::new(AgentId::new("bench", format!("fanout-{i}"))).format(Format::MsgPack);
        crowd.push(
            Agent::start(
                WsConnector::new(config),
                AgentConfig::new(url.clone()),
                router,
            )
            .map_err(|e| e.to_string())?,
        );
    }
    for agent in &crowd {
        agent
            .wait_connected(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
    }
    let ids: Vec<AgentId> = (0..agents)
        .map(|i| AgentId::new("bench", format!("fanout-{i}")))
        .collect();
    for id in &ids {
        hub.wait_for_agent(id, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
    }
    let payload = Payload::encode(Format::MsgPack, &sample_event()).map_err(|e| e.to_string())?;
    let total = per_agent * agents as u64;
    let started = Instant::now();
    // One sending task per core, each over half of the agents, round-robin so every
    // agent's queue has work at once.
    let mut senders = tokio::task::JoinSet::new();
    let workers = 2;
    for w in 0..workers {
        let (hub, payload) = (hub.clone(), payload.clone());
        let ids: Vec<AgentId> = ids.iter().skip(w).step_by(workers).cloned().collect();
        senders.spawn(async move {
            for _ in 0..per_agent {
                for id in &ids {
                    let mut env = Box::new(Envelope::new(0, MessageType::Event, 0));
                    env.payload = Some(payload.clone());
                    hub.send_envelope(id, env)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(())
        });
    }
    let deadline = started + Duration::from_secs(300);
    while received.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {total} events arrived within 300 s",
                received.load(Ordering::Relaxed)
            ));
        }
        if let Some(Ok(Err(e)) | Err(e)) = senders
            .try_join_next()
            .map(|r| r.map_err(|e| e.to_string()))
        {
            return Err(format!("fanout sender failed: {e}"));
        }
        progress.update(|| {
            format!(
                "{} of {} events delivered",
                thousands(received.load(Ordering::Relaxed)),
                thousands(total)
            )
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    progress.finish();
    while let Some(r) = senders.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    stop_crowd(crowd).await;
    hub.shutdown().await;
    Ok(total as f64 / elapsed.as_secs_f64())
}
