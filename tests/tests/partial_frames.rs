//! Hub memory under many partially received frames: the resident memory of this test
//! process (a one-test binary) must stay within the hub's read budget however many
//! connections send most of a large frame and stall.
//!
//! Resident memory, not allocations, is what is bounded: tungstenite reserves a frame's
//! announced length when it reads the header (address space, not memory, until bytes
//! arrive), and the budget bounds the bytes that arrive.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tunnel_proto::Format;
use tunnel_router::Router;
use tunnel_transport::AgentId;

#[path = "integration/support.rs"]
#[allow(dead_code)]
mod support;

use support::*;

/// A field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("field")
        * 1024
}

/// Resets the peak resident size, so that `VmHWM` measures from now on.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
}

/// A binary frame header (masked, as a client sends it) announcing `len` bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header
}

/// Opens `count` connections (handshaken or not) that each send `bytes` of a frame
/// announced as 15 MiB, and stall; returns the writers, still pushing.
async fn stallers(
    url: &str,
    count: usize,
    handshake: bool,
    bytes: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut writers = Vec::new();
    for i in 0..count {
        let id = AgentId::new("ws", format!("staller-{handshake}-{i}"));
        let mut ws = raw_client(url, &id, Format::MsgPack).await;
        if handshake {
            raw_handshake(&mut ws, &id, Format::MsgPack).await;
        }
        writers.push(tokio::spawn(async move {
            let tcp = ws.get_mut();
            let _ = tcp.write_all(&frame_header(15 << 20)).await;
            let chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < bytes {
                if tcp.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
            }
            // Holds the connection open, the frame unfinished.
            std::future::pending::<()>().await;
        }));
    }
    writers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_frames_stay_within_the_read_budget() {
    const BUDGET: usize = 8 << 20;
    let handled = Router::new().fallback(tower::service_fn(|_: tunnel_router::Inbound| {
        std::future::ready(Ok::<_, tower::BoxError>(()))
    }));
    let (hub, url, healthy, _) =
        hub_with_healthy_agent_config(handled, server_config().read_budget(BUDGET)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = status_bytes("VmRSS:");
    reset_peak();

    // Before the handshake only a handshake-sized message is read: 40 connections
    // sending 1 MiB each are closed after 64 KiB.
    let early = stallers(&url, 40, false, 1 << 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_handshake = status_bytes("VmHWM:").saturating_sub(baseline);
    for w in early {
        w.abort();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = status_bytes("VmRSS:");
    reset_peak();

    // After it, 40 connections each send 4 MiB of a 15 MiB frame and stall: readers
    // wait for the shared budget instead of buffering 160 MiB.
    let late = stallers(&url, 40, true, 4 << 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_handshake = status_bytes("VmHWM:").saturating_sub(baseline);
    eprintln!(
        "peak resident memory above baseline: {} KiB before the handshake, {} KiB after (budget {} KiB)",
        before_handshake / 1024,
        after_handshake / 1024,
        BUDGET / 1024
    );
    // 40 x (64 KiB allowed + one 64 KiB read + tungstenite's buffers), far below 40 MiB.
    assert!(
        before_handshake < 16 << 20,
        "pre-handshake frames took {} KiB",
        before_handshake / 1024
    );
    // The budget, plus each connection's free 128 KiB and a read, plus the stallers'
    // own client-side buffers in this process: nowhere near 160 MiB.
    assert!(
        after_handshake < BUDGET + (48 << 20),
        "partial frames took {} KiB",
        after_handshake / 1024
    );
    // Small messages still flow for everyone else.
    let receipt = healthy
        .send(tunnel_proto::MessageType::Event, &1u64)
        .await
        .expect("send");
    tokio::time::timeout(SOON, receipt.delivered())
        .await
        .expect("in time")
        .expect("delivered");
    for w in late {
        w.abort();
    }
    healthy.shutdown().await;
    hub.shutdown().await;
}
