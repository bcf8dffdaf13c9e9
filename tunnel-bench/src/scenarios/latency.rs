//! `latency`: request/reply round trips, p50 and p99, beside a raw echo.

use crate::baseline::{raw_echo_client, raw_echo_server};
use crate::harness::{latency_placements, two_sided};
use crate::report::{figure, percentile, thousands, us};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tower::{BoxError, service_fn};
use tunnel_proto::MessageType;
use tunnel_router::{Hub, Inbound, Router};
use tunnel_transport::{
    AgentId, AllowAll, ClientConfig, ConnectionSender, Connector, ServerConfig, WsConnector,
    WsListener,
};

pub(crate) fn run(n: usize) -> Result<(), String> {
    println!(
        "\nlatency: {} request/reply round trips, one in flight, client and server each on a pinned single-thread runtime",
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
            move |url_tx| Box::pin(tunnel_echo_server(url_tx, done_rx)),
            move |url| Box::pin(tunnel_echo_client(url, n, done_tx)),
        )?;
        let (rp50, rp99) = (percentile(&raw, 0.5), percentile(&raw, 0.99));
        let (tp50, tp99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
        let ratio = tp50.as_secs_f64() / rp50.as_secs_f64();
        let name = placement.name.replace(' ', "_");
        figure("latency", &format!("{name}_raw_p50"), us(rp50), "us");
        figure("latency", &format!("{name}_raw_p99"), us(rp99), "us");
        figure("latency", &format!("{name}_p50"), us(tp50), "us");
        figure("latency", &format!("{name}_p99"), us(tp99), "us");
        let verdict = if ratio <= 1.3 { "meets" } else { "ABOVE" };
        println!(
            "  {} (client core {}, server core {}):",
            placement.name, placement.client_core, placement.server_core
        );
        println!(
            "    raw tokio-tungstenite echo      p50 {:>8.1} us  p99 {:>8.1} us",
            us(rp50),
            us(rp99)
        );
        println!(
            "    tunnel command -> reply (msgpack) p50 {:>8.1} us  p99 {:>8.1} us  p50 {ratio:.2}x raw ({verdict} the 1.3x bar)",
            us(tp50),
            us(tp99)
        );
    }
    Ok(())
}

async fn tunnel_echo_server(
    url_tx: mpsc::Sender<String>,
    done: tokio::sync::oneshot::Receiver<()>,
) {
    let router = Router::new().route(
        MessageType::Command,
        service_fn(|msg: Inbound| async move {
            let sender = msg.sender();
            let reply = sender
                .envelope(MessageType::Reply)
                .with_correlation(msg.envelope.id);
            sender.send(&reply).await?;
            Ok::<_, BoxError>(())
        }),
    );
    let Ok(listener) = WsListener::bind("127.0.0.1:0", ServerConfig::new(AllowAll)).await else {
        return;
    };
    let _ = url_tx
        .send(format!("ws://{}/", listener.local_addr()))
        .await;
    let hub = Hub::serve(listener, router);
    // Serve until the client is done (or gone).
    let _ = done.await;
    hub.shutdown().await;
}

async fn tunnel_echo_client(
    url: String,
    n: usize,
    done: tokio::sync::oneshot::Sender<()>,
) -> Result<Vec<Duration>, String> {
    let config = ClientConfig::new(AgentId::new("bench", "latency"));
    let conn = WsConnector::new(config)
        .connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, mut receiver): (ConnectionSender, _) = conn.split();
    let command = sender
        .payload(&tunnel_proto::messages::Command::new("echo"))
        .map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        let env = sender
            .envelope(MessageType::Command)
            .with_payload(command.clone());
        sender.send(&env).await.map_err(|e| e.to_string())?;
        loop {
            match receiver.recv().await {
                Ok(Some(reply)) if reply.correlation == Some(env.id) => break,
                Ok(Some(_)) => {}
                other => return Err(format!("tunnel echo: {other:?}")),
            }
        }
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    let close = sender.close(tunnel_proto::CloseCode::NORMAL, "done");
    let drain = async { while let Ok(Some(_)) = receiver.recv().await {} };
    tokio::join!(close, drain);
    let _ = done.send(());
    samples.sort();
    Ok(samples)
}
