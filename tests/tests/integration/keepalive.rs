//! Keepalive: idle connections stay up; dead peers are detected within the timeout.

use std::time::{Duration, Instant};

use tunnel_proto::Format;
use tunnel_router::Router;
use tunnel_transport::AgentId;
use tunnel_transport::fault::FaultProxy;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_survives_many_ping_intervals() {
    let hub = hub(server_config().connection(quick_keepalive()), Router::new()).await;
    let id = AgentId::new("ws", "idle");
    let config = client_config(&id, Format::MsgPack).connection(quick_keepalive());
    let agent = agent(&hub.url().expect("url"), config, Router::new());
    let info = agent.wait_connected(SOON).await.expect("connected");
    // Ten ping intervals, more than three dead-peer deadlines, without any data.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let sender = agent.sender().expect("still connected");
    assert_eq!(sender.info().session_id, info.session_id);
    assert_eq!(agent.reconnects(), 0);
    assert!(sender.rtt().is_some(), "pongs measured a round trip");
    assert!(hub.sender(&id).and_then(|s| s.rtt()).is_some());
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_peer_is_declared_dead_within_the_timeout() {
    let keepalive = quick_keepalive();
    let dead_after = keepalive.dead_after();
    let hub = hub(server_config().connection(keepalive.clone()), Router::new()).await;
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "blackholed");
    let agent = agent(
        &proxy.ws_url(),
        client_config(&id, Format::MsgPack).connection(keepalive),
        Router::new(),
    );
    agent.wait_connected(SOON).await.expect("connected");
    let sender = agent.sender().expect("sender");
    let hub_side = registered(&hub, &id).await;

    // Bytes are swallowed in both directions from now on; TCP stays up.
    proxy.set_refuse(true);
    proxy.set_stalled(true);
    let stalled_at = Instant::now();
    wait_disconnected(&agent).await;
    let agent_noticed = stalled_at.elapsed();
    eventually("the hub to notice", || hub_side.is_closed()).await;
    let hub_noticed = stalled_at.elapsed();

    assert_eq!(
        sender.close_reason(),
        Some(tunnel_transport::CloseReason::DeadPeer)
    );
    assert_eq!(
        hub_side.close_reason(),
        Some(tunnel_transport::CloseReason::DeadPeer)
    );
    // Never before the deadline counted from the last traffic (at most one ping
    // interval before the stall), and at most half a pong timeout after it, plus
    // scheduling slack.
    let config = quick_keepalive();
    let latest = dead_after + config.pong_timeout / 2 + Duration::from_millis(400);
    for noticed in [agent_noticed, hub_noticed] {
        assert!(
            noticed >= dead_after - config.ping_interval,
            "too early: {noticed:?}"
        );
        assert!(noticed <= latest, "too late: {noticed:?}");
    }
    eventually("the hub to drop the agent", || hub.sender(&id).is_none()).await;
    agent.shutdown().await;
    hub.shutdown().await;
}
