//! Pools over several hubs: a hub killed under load, failover, spread, drain.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tower::{BoxError, Service, ServiceExt, service_fn};
use tunnel_proto::messages::Command;
use tunnel_proto::{Format, MessageType};
use tunnel_reconnect::BreakerConfig;
use tunnel_router::{
    AgentConfig, ConnectionState, Drain, Hub, Inbound, Pool, PoolClient, PoolMode, Readiness,
    Receipt, Request, Response, Router,
};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, WsConnector};

use crate::support::*;

/// What the hubs saw: (hub index, n) for every `event {"n": ...}`.
type Seen = mpsc::UnboundedSender<(usize, u64)>;

/// Records events and answers commands with the hub's index.
fn hub_router(index: usize, seen: Seen) -> Router {
    Router::new()
        .route(
            MessageType::Event,
            service_fn(move |msg: Inbound| {
                let seen = seen.clone();
                async move {
                    let v: serde_json::Value = msg.envelope.decode_payload()?;
                    if let Some(n) = v["n"].as_u64() {
                        let _ = seen.send((index, n));
                    }
                    Ok::<_, BoxError>(())
                }
            }),
        )
        .route(
            MessageType::Command,
            service_fn(move |msg: Inbound| async move {
                Ok::<_, BoxError>(msg.encode(&json!({"hub": index}))?)
            }),
        )
}

async fn start_hub(addr: SocketAddr, index: usize, seen: Seen) -> Hub {
    Hub::bind(addr, server_config(), hub_router(index, seen))
        .await
        .expect("bind")
}

/// Three hubs, each behind a proxy that can cut it off instantly.
async fn three_hubs(seen: &Seen) -> (Vec<Hub>, Vec<FaultProxy>) {
    let mut hubs = Vec::new();
    let mut proxies = Vec::new();
    for i in 0..3 {
        let hub = start_hub("127.0.0.1:0".parse().expect("addr"), i, seen.clone()).await;
        proxies.push(
            FaultProxy::start(hub.local_addr().expect("addr"))
                .await
                .expect("proxy"),
        );
        hubs.push(hub);
    }
    (hubs, proxies)
}

fn pool_config(endpoints: Vec<String>) -> AgentConfig {
    AgentConfig::with_endpoints(endpoints)
        .backoff(fast_backoff())
        .breaker(
            BreakerConfig::default()
                .failure_threshold(2)
                .cooldown(Duration::from_millis(300)),
        )
        .request_timeout(Duration::from_secs(2))
}

async fn readiness_becomes(pool: &Pool, want: Readiness) {
    eventually(&format!("readiness {want}"), || pool.readiness() == want).await;
}

async fn send_event(client: &mut PoolClient, n: u64) -> Receipt {
    let request = Request::new(MessageType::Event, &json!({"n": n})).expect("encode");
    match client.ready().await.expect("ready").call(request).await {
        Ok(Response::Accepted(receipt)) => receipt,
        other => panic!("message {n} not accepted: {other:?}"),
    }
}

async fn ask(client: &mut PoolClient) -> usize {
    let request = Request::new(MessageType::Command, &Command::new("which"))
        .expect("encode")
        .expect_reply();
    let reply = tokio::time::timeout(SOON, async {
        client.ready().await.expect("ready").call(request).await
    })
    .await
    .expect("answered in time")
    .expect("reply");
    let v: serde_json::Value = reply.decode().expect("decode");
    usize::try_from(v["hub"].as_u64().expect("hub index")).expect("index")
}

/// Every accepted message was delivered at most once, every message whose receipt
/// succeeded was delivered, and every other one's receipt failed: nothing is lost
/// silently and nothing is duplicated. (A failed receipt means "maybe not delivered":
/// a hub cut off mid-flight may have handled a message it never acknowledged.)
/// Returns the messages whose receipts failed.
async fn check_outcomes(
    receipts: Vec<(u64, Receipt)>,
    seen: &mut mpsc::UnboundedReceiver<(usize, u64)>,
) -> Vec<u64> {
    let mut outcomes = Vec::new();
    for (n, receipt) in receipts {
        let outcome = tokio::time::timeout(SOON, receipt.delivered())
            .await
            .unwrap_or_else(|_| panic!("receipt {n} unresolved"));
        outcomes.push((n, outcome.is_ok()));
    }
    let mut delivered = HashSet::new();
    while let Ok((_, n)) = seen.try_recv() {
        assert!(delivered.insert(n), "message {n} delivered twice");
    }
    let mut failed = Vec::new();
    for (n, ok) in outcomes {
        if ok {
            assert!(
                delivered.contains(&n),
                "message {n} acknowledged but not delivered"
            );
        } else {
            failed.push(n);
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_pool_survives_a_hub_killed_under_load() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (mut hubs, proxies) = three_hubs(&seen_tx).await;
    let id = AgentId::new("root:org", "spread");
    let endpoints: Vec<String> = proxies.iter().map(FaultProxy::ws_url).collect();
    let pool = Pool::start(
        PoolMode::Spread,
        WsConnector::new(client_config(&id, Format::MsgPack)),
        pool_config(endpoints),
        Router::new(),
    )
    .expect("pool");
    readiness_becomes(
        &pool,
        Readiness {
            connected: 3,
            desired: 3,
        },
    )
    .await;
    let mut client = pool.client();

    // Requests are spread over the hubs.
    let mut answered_by = HashSet::new();
    for _ in 0..60 {
        answered_by.insert(ask(&mut client).await);
    }
    assert_eq!(answered_by.len(), 3, "p2c uses every hub: {answered_by:?}");

    let total = 3000u64;
    let mut receipts = Vec::new();
    for n in 0..total {
        if n == 1000 {
            // Kill hub 1: its connections die at once and it loses its state.
            proxies[1].set_refuse(true);
            proxies[1].cut_all();
            hubs[1].shutdown().await;
        }
        receipts.push((n, send_event(&mut client, n).await));
    }
    readiness_becomes(
        &pool,
        Readiness {
            connected: 2,
            desired: 3,
        },
    )
    .await;
    // Requests fail over: every one is answered by a live hub.
    for _ in 0..20 {
        assert_ne!(ask(&mut client).await, 1);
    }

    // The hub comes back on the same address; the pool recovers.
    let addr = hubs[1].local_addr().expect("addr");
    hubs[1] = rebind("restart hub 1", || {
        Hub::bind(addr, server_config(), hub_router(1, seen_tx.clone()))
    })
    .await;
    proxies[1].set_refuse(false);
    readiness_becomes(
        &pool,
        Readiness {
            connected: 3,
            desired: 3,
        },
    )
    .await;
    for n in total..total + 300 {
        receipts.push((n, send_event(&mut client, n).await));
    }

    let failed = check_outcomes(receipts, &mut seen).await;
    assert!(
        failed.iter().all(|n| *n < total),
        "only messages in flight when hub 1 died can fail: {failed:?}"
    );
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_pool_moves_to_the_next_hub_and_back() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (hubs, proxies) = three_hubs(&seen_tx).await;
    let id = AgentId::new("root:org", "failover");
    let endpoints: Vec<String> = proxies.iter().map(FaultProxy::ws_url).collect();
    let pool = Pool::start(
        PoolMode::Failover,
        WsConnector::new(client_config(&id, Format::Json)),
        pool_config(endpoints),
        Router::new(),
    )
    .expect("pool");
    readiness_becomes(
        &pool,
        Readiness {
            connected: 1,
            desired: 1,
        },
    )
    .await;
    let mut client = pool.client();
    assert_eq!(ask(&mut client).await, 0, "the first endpoint is preferred");

    let mut receipts = Vec::new();
    for n in 0..500 {
        receipts.push((n, send_event(&mut client, n).await));
    }
    proxies[0].set_refuse(true);
    proxies[0].cut_all();
    for n in 500..1000 {
        receipts.push((n, send_event(&mut client, n).await));
    }
    let agent = pool.members()[0].1.clone();
    eventually("the agent reconnected", || {
        agent.reconnects() >= 1 && agent.is_connected()
    })
    .await;
    assert_eq!(ask(&mut client).await, 1, "moved to the next endpoint");
    for n in 1000..1200 {
        receipts.push((n, send_event(&mut client, n).await));
    }
    let failed = check_outcomes(receipts, &mut seen).await;
    assert!(
        failed.iter().all(|n| *n < 1000),
        "only messages in flight at the cut can fail: {failed:?}"
    );
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_hubs_agents_move_without_errors() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (hubs, proxies) = three_hubs(&seen_tx).await;
    let id = AgentId::new("root:org", "drained");
    let endpoints: Vec<String> = proxies.iter().map(FaultProxy::ws_url).collect();
    let pool = Pool::start(
        PoolMode::Failover,
        WsConnector::new(client_config(&id, Format::MsgPack)),
        pool_config(endpoints.clone()),
        Router::new(),
    )
    .expect("pool");
    readiness_becomes(
        &pool,
        Readiness {
            connected: 1,
            desired: 1,
        },
    )
    .await;
    let agent = pool.members()[0].1.clone();
    let mut resets = agent.session_events();
    let mut client = pool.client();
    assert_eq!(ask(&mut client).await, 0);

    // Traffic keeps flowing while hub 0 drains, pointing agents at hub 2.
    let sender = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut receipts = Vec::new();
            let mut hubs_answering = Vec::new();
            for n in 0..2000u64 {
                receipts.push((n, send_event(&mut client, n).await));
                if n % 100 == 0 {
                    hubs_answering.push(ask(&mut client).await);
                }
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            (receipts, hubs_answering)
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    hubs[0]
        .drain(Drain::default().endpoints(vec![endpoints[2].clone()]))
        .await;
    let (receipts, hubs_answering) = sender.await.expect("sender");
    assert!(
        hubs_answering.contains(&2),
        "moved to hub 2: {hubs_answering:?}"
    );

    let mut failed = 0;
    let count = receipts.len();
    for (n, receipt) in receipts {
        if let Err(e) = tokio::time::timeout(SOON, receipt.delivered())
            .await
            .expect("resolved")
        {
            failed += 1;
            eprintln!("message {n} failed: {e}");
        }
    }
    assert_eq!(failed, 0, "no message failed across the drain");
    let mut delivered = HashSet::new();
    eventually("every message delivered", || {
        while let Ok((_, n)) = seen.try_recv() {
            assert!(delivered.insert(n), "message {n} delivered twice");
        }
        delivered.len() == count
    })
    .await;
    assert!(resets.try_recv().is_err(), "no session reset");
    assert!(matches!(
        *agent.state().borrow(),
        ConnectionState::Connected { .. }
    ));
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
}

/// Three hubs, and a pool that discovery has told about the first one only; returns
/// the hubs, their proxies, their URLs, the discovery sender and the pool (connected).
async fn discovered_pool(
    mode: PoolMode,
    name: &str,
) -> (
    Vec<Hub>,
    Vec<FaultProxy>,
    Vec<String>,
    tokio::sync::watch::Sender<Vec<String>>,
    Pool,
) {
    let (seen_tx, _seen) = mpsc::unbounded_channel();
    let (hubs, proxies) = three_hubs(&seen_tx).await;
    let id = AgentId::new("root:org", name);
    let urls: Vec<String> = proxies.iter().map(FaultProxy::ws_url).collect();
    let (updates, discovered) = tokio::sync::watch::channel(urls[..1].to_vec());
    let pool = Pool::start(
        mode,
        WsConnector::new(client_config(&id, Format::MsgPack)),
        pool_config(urls[..1].to_vec()).endpoint_updates(discovered),
        Router::new(),
    )
    .expect("pool");
    readiness_becomes(
        &pool,
        Readiness {
            connected: 1,
            desired: 1,
        },
    )
    .await;
    (hubs, proxies, urls, updates, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_updates_change_the_pools_endpoints() {
    let (hubs, _proxies, urls, updates, pool) =
        discovered_pool(PoolMode::Spread, "discovered").await;
    let mut client = pool.client();
    assert_eq!(ask(&mut client).await, 0);

    // Discovery finds the other two hubs: connections to them open and take traffic.
    updates.send(urls.clone()).expect("update");
    readiness_becomes(
        &pool,
        Readiness {
            connected: 3,
            desired: 3,
        },
    )
    .await;
    let mut answered_by = HashSet::new();
    for _ in 0..60 {
        answered_by.insert(ask(&mut client).await);
    }
    assert_eq!(answered_by.len(), 3, "{answered_by:?}");

    // Hub 0 leaves discovery: its connection is closed, traffic stays on the others.
    updates.send(urls[1..].to_vec()).expect("update");
    readiness_becomes(
        &pool,
        Readiness {
            connected: 2,
            desired: 2,
        },
    )
    .await;
    eventually("hub 0 lost its agent", || hubs[0].agents().is_empty()).await;
    for _ in 0..20 {
        assert_ne!(ask(&mut client).await, 0);
    }
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_agent_follows_discovery_on_its_next_connection() {
    let (hubs, proxies, urls, updates, pool) =
        discovered_pool(PoolMode::Failover, "rediscovered").await;
    let mut client = pool.client();
    assert_eq!(ask(&mut client).await, 0);
    updates.send(vec![urls[2].clone()]).expect("update");
    // The current connection stays until it ends; the next one follows the update.
    assert_eq!(ask(&mut client).await, 0);
    proxies[0].set_refuse(true);
    proxies[0].cut_all();
    let agent = pool.members()[0].1.clone();
    eventually("reconnected", || {
        agent.reconnects() >= 1 && agent.is_connected()
    })
    .await;
    assert_eq!(ask(&mut client).await, 2);
    pool.shutdown().await;
    for hub in hubs {
        hub.shutdown().await;
    }
}
