//! `sustained`: one connection through the full stack, MessagePack and JSON.

use crate::harness::{
    THROUGHPUT_PLACEMENT, counting_router, drive_layered, otel_recorder, serve_until_counted,
    start_agent, two_sided,
};
use crate::report::{figure, median, thousands};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tunnel_proto::Format;
use tunnel_router::Hub;
use tunnel_transport::{AgentId, AllowAll, ClientConfig, ServerConfig};

/// One-way events through the whole stack: a resumable hub, an agent with sessions (and
/// the same without sessions, to show what they cost),
/// OpenTelemetry metrics on both transports, and the metrics, timeout and tracing
/// layers on the agent's client.
pub(crate) fn run(n: u64, runs: usize, only: Option<Format>) -> Result<(), String> {
    if let Some(codec) = only {
        let (rate, _) = full_stack_run(n, codec, true)?;
        println!("sustained {codec:?}: {} msg/s", thousands(rate as u64));
        return Ok(());
    }
    println!(
        "\nsustained: {} one-way events per run through the full stack (resumable session, OpenTelemetry metrics on both sides, metrics + timeout + tracing layers), median of {runs} runs, agent and hub on their own pinned cores",
        thousands(n)
    );
    for (format, bar) in [(Format::MsgPack, 2_000_000.0), (Format::Json, 1_400_000.0)] {
        for sessions in [true, false] {
            let mut rates = Vec::new();
            let mut size = 0;
            for _ in 0..runs {
                let (rate, bytes) = full_stack_run(n, format, sessions)?;
                rates.push(rate);
                size = bytes;
            }
            let rate = median(rates);
            let name = if sessions {
                format!("{format}, full stack")
            } else {
                format!("{format}, the same without sessions")
            };
            println!(
                "  {name:<36} ({size} B per event on the wire) {:>11} msg/s  ({} the {} bar)",
                thousands(rate as u64),
                if rate >= bar { "meets" } else { "BELOW" },
                thousands(bar as u64)
            );
            let key = if sessions { "" } else { "_no_sessions" };
            figure("sustained", &format!("{format}_rate{key}"), rate, "msg/s");
            figure(
                "sustained",
                &format!("{format}_event_bytes{key}"),
                size as f64,
                "By",
            );
        }
    }
    Ok(())
}

fn full_stack_run(n: u64, format: Format, sessions: bool) -> Result<(f64, u64), String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let bytes = wire_bytes.clone();
    let rate = two_sided(
        &THROUGHPUT_PLACEMENT,
        move |url_tx| {
            Box::pin(async move {
                let (router, all_in) = counting_router(n);
                let (recorder, _provider) = otel_recorder();
                let mut config = ServerConfig::new(AllowAll);
                config.connection = config.connection.recorder(recorder);
                let hub = if sessions {
                    Hub::bind("127.0.0.1:0", config, router).await
                } else {
                    Hub::bind_with(
                        "127.0.0.1:0",
                        config,
                        router,
                        tunnel_router::HubConfig::default().without_sessions(),
                    )
                    .await
                };
                let Ok(hub) = hub else {
                    return;
                };
                serve_until_counted(hub, url_tx, done_tx, all_in).await;
            })
        },
        move |url| {
            Box::pin(async move {
                let (recorder, _provider) = otel_recorder();
                let mut client =
                    ClientConfig::new(AgentId::new("bench", "sustained")).format(format);
                client.connection = client.connection.recorder(recorder.clone());
                let agent = start_agent(&url, client).await?;
                let started = drive_layered(&agent, recorder, n).await?;
                let finished = done_rx
                    .await
                    .map_err(|_| "not every message arrived".to_string())?;
                if let Some(sender) = agent.sender() {
                    let stats = sender.stats();
                    bytes.store(
                        stats.bytes_out / stats.messages_out.max(1),
                        Ordering::Relaxed,
                    );
                }
                agent.shutdown().await;
                Ok(n as f64 / (finished - started).as_secs_f64())
            })
        },
    )?;
    Ok((rate, wire_bytes.load(Ordering::Relaxed)))
}
