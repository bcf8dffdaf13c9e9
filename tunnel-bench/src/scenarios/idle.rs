//! `idle`: hub memory per idle agent connection, measured on a hub process.

use crate::harness::{HubProcess, TOKEN};
use crate::report::{figure, thousands};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tunnel_transport::{AgentId, ClientConfig, Connector, WsConnector};

/// Hub RSS per idle agent, for a hub without sessions (the connection alone: the bar)
/// and with sessions (what the session state adds).
pub(crate) async fn run(agents: usize) -> Result<(), String> {
    let bare = idle_one(agents, false).await?;
    let with_sessions = idle_one(agents, true).await?;
    let verdict = if bare <= 16.0 { "meets" } else { "ABOVE" };
    println!("  connection only: {bare:.1} KiB per idle agent ({verdict} the 16 KiB bar)");
    figure("idle", "hub_rss_per_agent", bare, "KiB");
    figure(
        "idle",
        "hub_rss_per_agent_with_sessions",
        with_sessions,
        "KiB",
    );
    println!(
        "  with sessions:   {with_sessions:.1} KiB per idle agent (session state adds {:.1} KiB; replay buffers are empty when idle and bounded by 16 MiB each)",
        with_sessions - bare
    );
    Ok(())
}

async fn idle_one(n: usize, sessions: bool) -> Result<f64, String> {
    let hub = HubProcess::start(sessions).await?;
    let pid = hub.pid()?;
    let url = hub.url();
    // Warm the hub with one connection so one-off allocations are in the baseline.
    let warm = connect_idle(&url, usize::MAX).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = hub.rss_kib()?;
    println!(
        "\nidle: {} idle agents on one hub process (pid {pid}, sessions {}), hub RSS before {} KiB",
        thousands(n as u64),
        if sessions { "on" } else { "off" },
        thousands(before)
    );
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let (tx, mut rx) = mpsc::channel(256);
    let url2 = url.clone();
    let dialer = tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(128));
        for i in 0..n {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let (tx, url) = (tx.clone(), url2.clone());
            tokio::spawn(async move {
                let r = connect_idle(&url, i).await;
                drop(permit);
                let _ = tx.send(r).await;
            });
        }
    });
    let mut failures = 0;
    while conns.len() + failures < n {
        match rx.recv().await {
            Some(Ok(c)) => conns.push(c),
            Some(Err(e)) => {
                failures += 1;
                if failures == 1 {
                    eprintln!("  first connection failure: {e}");
                }
            }
            None => break,
        }
    }
    let _ = dialer.await;
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = hub.rss_kib()?;
    let per_agent = (after.saturating_sub(before)) as f64 / conns.len().max(1) as f64;
    println!(
        "  connected {} agents in {:.1}s ({} failed); hub RSS after {} KiB",
        thousands(conns.len() as u64),
        connect_time.as_secs_f64(),
        failures,
        thousands(after)
    );
    drop(conns);
    hub.stop().await;
    // Let the closed sockets' ports settle before a second run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(per_agent)
}

/// An idle agent: an established connection whose receiver is kept (so the socket
/// stays open) but not polled.
async fn connect_idle(url: &str, i: usize) -> Result<tunnel_transport::Connection, String> {
    let config =
        ClientConfig::new(AgentId::new("bench", format!("idle-{i}"))).token(Some(TOKEN.into()));
    WsConnector::new(config)
        .connect(url)
        .await
        .map_err(|e| e.to_string())
}
