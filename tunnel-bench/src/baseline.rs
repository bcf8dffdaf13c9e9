//! The baseline every figure is compared with: the original design written directly on
//! tokio-tungstenite and serde_json, with no tunnel code in the path.

use crate::harness::{THROUGHPUT_PLACEMENT, sample_event, two_sided};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tunnel_proto::messages::Event;

/// The original design's envelope: uuid string id, RFC 3339 timestamp, a payload that
/// the sender serializes from its type and the receiver parses into a JSON value.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OriginalEnvelope<P> {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    timestamp: String,
    payload: Option<P>,
    error: Option<String>,
}

/// The baseline: each message is the original design's envelope built and serialized
/// by hand with serde_json; the server decodes every one, its payload either into a
/// `serde_json::Value` (the original design) or, with `typed`, into its struct.
pub(crate) fn raw_throughput(n: u64, typed: bool) -> Result<f64, String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    two_sided(
        &THROUGHPUT_PLACEMENT,
        move |url_tx| Box::pin(raw_sink_server(url_tx, done_tx, n, typed)),
        move |url| Box::pin(raw_source_client(url, done_rx, n)),
    )
}

pub(crate) async fn raw_sink_server(
    url_tx: mpsc::Sender<String>,
    done: tokio::sync::oneshot::Sender<Instant>,
    n: u64,
    typed: bool,
) {
    let Some(mut ws) = accept_raw(url_tx).await else {
        return;
    };
    let mut got = 0u64;
    while got < n {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let decoded = if typed {
                    serde_json::from_str::<OriginalEnvelope<Event>>(&text).map(|e| e.id.len())
                } else {
                    serde_json::from_str::<OriginalEnvelope<serde_json::Value>>(&text)
                        .map(|e| e.id.len())
                };
                if std::hint::black_box(decoded).is_err() {
                    return;
                }
                got += 1;
            }
            Some(Ok(_)) => {}
            _ => return,
        }
    }
    let _ = done.send(Instant::now());
    while let Some(Ok(_)) = ws.next().await {}
}

pub(crate) async fn raw_source_client(
    url: String,
    done: tokio::sync::oneshot::Receiver<Instant>,
    n: u64,
) -> Result<f64, String> {
    let mut ws = connect_raw(url).await?;
    let event = sample_event();
    let started = Instant::now();
    for i in 0..n {
        let env = OriginalEnvelope {
            id: uuid::Uuid::new_v4().to_string(),
            kind: "event".into(),
            timestamp: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| e.to_string())?,
            payload: Some(&event),
            error: None,
        };
        let text = serde_json::to_string(&env).map_err(|e| e.to_string())?;
        ws.feed(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())?;
        if i % 256 == 255 {
            ws.flush().await.map_err(|e| e.to_string())?;
        }
    }
    ws.flush().await.map_err(|e| e.to_string())?;
    let finished = done
        .await
        .map_err(|_| "baseline server failed".to_string())?;
    let _ = ws.close(None).await;
    Ok(n as f64 / (finished - started).as_secs_f64())
}

/// Listens on a loopback port, reports its URL, and upgrades the first connection with
/// tokio-tungstenite's defaults.
pub(crate) async fn accept_raw(url_tx: mpsc::Sender<String>) -> Option<WebSocketStream<TcpStream>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = listener.local_addr().ok()?;
    url_tx.send(format!("ws://{addr}/")).await.ok()?;
    let (tcp, _) = listener.accept().await.ok()?;
    let _ = tcp.set_nodelay(true);
    tokio_tungstenite::accept_async(tcp).await.ok()
}

/// Connects to `url` with tokio-tungstenite's defaults.
pub(crate) async fn connect_raw(url: String) -> Result<WebSocketStream<TcpStream>, String> {
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(url, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

pub(crate) async fn raw_echo_server(url_tx: mpsc::Sender<String>) {
    let Some(mut ws) = accept_raw(url_tx).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_binary() && ws.send(msg).await.is_err() {
            return;
        }
    }
}

pub(crate) async fn raw_echo_client(url: String, n: usize) -> Result<Vec<Duration>, String> {
    let mut ws = connect_raw(url).await?;
    let payload = bytes::Bytes::from(vec![7u8; 64]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        ws.send(Message::Binary(payload.clone()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(_))) => break,
                Some(Ok(_)) => {}
                other => return Err(format!("raw echo: {other:?}")),
            }
        }
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    let _ = ws.close(None).await;
    samples.sort();
    Ok(samples)
}
