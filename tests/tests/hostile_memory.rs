//! Hub memory after hostile clients: every allocation of this test process is counted
//! (a one-test binary, so nothing else runs beside it), and after rounds of hostile
//! clients the live heap must come back near where it was.

use std::alloc::System;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cap::Cap;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tower::{BoxError, service_fn};
use tunnel_proto::{Envelope, Format, MessageType, Payload};
use tunnel_router::{Agent, Hub, Inbound, Router};
use tunnel_transport::AgentId;

#[path = "integration/support.rs"]
#[allow(dead_code)]
mod support;

use support::*;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Live heap bytes, after letting background tasks settle.
async fn live_heap() -> usize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    ALLOCATOR.allocated()
}

fn event(n: u64) -> Envelope {
    Envelope::new(n + 1, MessageType::Event, 0).with_payload(Payload::msgpack(&n).expect("payload"))
}

struct Scene {
    hub: Hub,
    url: String,
    healthy: Agent,
    received: Arc<AtomicU64>,
}

impl Scene {
    /// Waits until the hub has received at least `n` messages in all.
    async fn received_at_least(&self, n: u64) {
        let received = self.received.clone();
        eventually("messages reached the hub", move || {
            received.load(Ordering::Relaxed) >= n
        })
        .await;
    }

    /// The healthy agent still gets through, and it is the only agent left.
    async fn healthy_and_alone(&self) {
        let before = self.received.load(Ordering::Relaxed);
        let mut receipts = Vec::new();
        for n in 0..100u64 {
            receipts.push(
                self.healthy
                    .send(MessageType::Event, &n)
                    .await
                    .expect("send"),
            );
        }
        for receipt in receipts {
            tokio::time::timeout(SOON, receipt.delivered())
                .await
                .expect("in time")
                .expect("delivered");
        }
        self.received_at_least(before + 100).await;
        assert_eq!(
            self.healthy.reconnects(),
            0,
            "the healthy agent was dropped"
        );
        let hub = self.hub.clone();
        eventually("hostile connections are gone", move || {
            hub.agents().len() == 1
        })
        .await;
    }

    /// One round of hostile clients, one after another; returns the live heap while the
    /// hub held a full queue for the client that never reads.
    async fn hostile_round(&self) -> usize {
        let addr = self.hub.local_addr().expect("addr");

        // Raw TCP garbage.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = tcp.write_all(&[0x17; 4096]).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(SOON, tcp.read_to_end(&mut sink)).await;
        drop(tcp);

        // A wrong token.
        let refused = raw_upgrade(
            &self.url,
            &[
                ("authorization", "Bearer wrong"),
                ("x-workspace", "ws"),
                ("x-synctarget", "intruder"),
                ("sec-websocket-protocol", Format::MsgPack.subprotocol()),
            ],
        )
        .await;
        assert_eq!(status_of(refused), 401);

        // A frame header claiming 2^63 - 1 bytes.
        let id = AgentId::new("ws", "enormous");
        let mut ws = raw_client(&self.url, &id, Format::MsgPack).await;
        raw_handshake(&mut ws, &id, Format::MsgPack).await;
        let header = [
            0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4,
        ];
        let _ = ws.get_mut().write_all(&header).await;
        let _ = read_until_close(&mut ws, Format::MsgPack).await;
        drop(ws);

        // 10,000 messages in a burst, all delivered.
        let id = AgentId::new("ws", "bursty");
        let mut ws = raw_client(&self.url, &id, Format::MsgPack).await;
        raw_handshake(&mut ws, &id, Format::MsgPack).await;
        let before = self.received.load(Ordering::Relaxed);
        let mut buf = Vec::new();
        for n in 0..10_000u64 {
            buf.clear();
            Format::MsgPack
                .codec()
                .encode(&event(n), &mut buf)
                .expect("encode");
            ws.feed(Message::Binary(buf.clone().into()))
                .await
                .expect("feed");
        }
        ws.flush().await.expect("flush");
        self.received_at_least(before + 10_000).await;
        drop(ws);

        // A ping flood.
        let id = AgentId::new("ws", "pinger");
        let mut ws = raw_client(&self.url, &id, Format::MsgPack).await;
        raw_handshake(&mut ws, &id, Format::MsgPack).await;
        for i in 0..5_000u32 {
            ws.feed(Message::Ping(i.to_be_bytes().to_vec().into()))
                .await
                .expect("ping");
        }
        ws.flush().await.expect("flush");
        drop(ws);

        // A client that never reads: the hub's queue for it fills and refuses.
        let id = AgentId::new("ws", "deaf");
        let mut ws = raw_client(&self.url, &id, Format::MsgPack).await;
        raw_handshake(&mut ws, &id, Format::MsgPack).await;
        let sender = registered(&self.hub, &id).await;
        // Fails unless the queue for a client that never reads refuses one (bounded).
        fill_until_full(&sender).await;
        let holding = ALLOCATOR.allocated();
        drop(sender);
        drop(ws);

        self.healthy_and_alone().await;
        holding
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_memory_returns_near_its_baseline_after_hostile_clients() {
    let received = Arc::new(AtomicU64::new(0));
    let router = {
        let received = received.clone();
        Router::new().fallback(service_fn(move |_: Inbound| {
            received.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok::<_, BoxError>(()))
        }))
    };
    let (hub, url, healthy, _) = hub_with_healthy_agent(router).await;
    let scene = Scene {
        hub,
        url,
        healthy,
        received,
    };
    // Warm up: first-use allocations (runtime, pools, tables) belong to the baseline.
    for _ in 0..2 {
        scene.hostile_round().await;
    }
    let baseline = live_heap().await;
    let rounds = 5;
    let mut holding = usize::MAX;
    for _ in 0..rounds {
        holding = holding.min(scene.hostile_round().await);
    }
    let after = live_heap().await;
    let grown = after.saturating_sub(baseline);
    eprintln!(
        "live heap: baseline {} KiB, at least {} KiB while a deaf client's queue was full, after {rounds} rounds {} KiB (+{} KiB)",
        baseline / 1024,
        holding / 1024,
        after / 1024,
        grown / 1024
    );
    // The count sees the hub's allocations: a full queue of 16 KiB messages is large.
    assert!(
        holding > baseline + 4 * 1024 * 1024,
        "a full queue for the deaf client should show: {} KiB",
        holding / 1024
    );
    // One leaked connection per case and round would be several hundred KiB; the deaf
    // client's queue alone holds up to 16 MiB while it lives.
    assert!(
        grown < 256 * 1024,
        "the live heap grew by {} KiB over {rounds} rounds of hostile clients",
        grown / 1024
    );
    scene.healthy.shutdown().await;
    scene.hub.shutdown().await;
}
