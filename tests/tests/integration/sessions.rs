//! Resumable sessions: nothing accepted is lost or duplicated across disconnects, or the
//! application is told plainly.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tower::{BoxError, service_fn};
use tunnel_proto::{Format, MessageType};
use tunnel_reconnect::BreakerConfig;
use tunnel_router::{
    Agent, AgentConfig, Hub, HubSessions, Inbound, Router, SessionEvent, Undelivered,
};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, WsConnector};

use crate::support::*;

/// A router that forwards the `n` of every `{"n": ...}` payload into a channel.
fn numbers() -> (Router, mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let router = Router::new().fallback(service_fn(move |msg: Inbound| {
        let tx = tx.clone();
        async move {
            if let Ok(v) = msg.envelope.decode_payload::<serde_json::Value>()
                && let Some(n) = v["n"].as_u64().or_else(|| v["status"]["n"].as_u64())
            {
                let _ = tx.send(n);
            }
            Ok::<_, BoxError>(())
        }
    }));
    (router, rx)
}

async fn resumable_hub(router: Router, sessions: HubSessions) -> Hub {
    Hub::bind_with(
        "127.0.0.1:0",
        server_config(),
        router,
        tunnel_router::HubConfig::default().sessions(tunnel_router::SessionRegistry::new(sessions)),
    )
    .await
    .expect("bind")
}

fn session_agent(url: &str, id: &AgentId, router: Router) -> Agent {
    Agent::start(
        WsConnector::new(client_config(id, Format::MsgPack)),
        AgentConfig::new(url)
            .backoff(fast_backoff())
            // Tests refuse connections for a while: keep the breaker's cooldown short.
            .breaker(BreakerConfig::default().cooldown(Duration::from_millis(200))),
        router,
    )
    .expect("valid config")
}

/// Cuts the agent off (and keeps it off) until `proxy.set_refuse(false)`, and waits
/// until the agent has noticed.
async fn go_offline(proxy: &FaultProxy, agent: &Agent) {
    proxy.set_refuse(true);
    proxy.cut_all();
    wait_disconnected(agent).await;
}

async fn expect_numbers(rx: &mut mpsc::UnboundedReceiver<u64>, count: u64) {
    for expected in 1..=count {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {expected}"))
            .expect("channel");
        assert_eq!(got, expected, "out of order or duplicated");
    }
    // Nothing more (no duplicates after the last one).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        rx.try_recv().is_err(),
        "a duplicate arrived after the last message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_without_loss_or_duplicates() {
    let (hub_router, mut at_hub) = numbers();
    let hub = resumable_hub(hub_router, HubSessions::default()).await;
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "resumer");
    let (agent_router, mut at_agent) = numbers();
    let agent = session_agent(&proxy.ws_url(), &id, agent_router);
    let first = agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;

    let n = 3000u64;
    let mut receipts = Vec::new();
    let mut hub_receipts = Vec::new();
    for i in 1..=n {
        receipts.push(
            agent
                .send(MessageType::Event, &json!({ "n": i }))
                .await
                .expect("send"),
        );
        hub_receipts.push(
            hub.send(&id, MessageType::Command, &json!({ "n": i }))
                .await
                .expect("send"),
        );
        if i % 1000 == 500 {
            proxy.cut_all();
        }
    }
    expect_numbers(&mut at_hub, n).await;
    expect_numbers(&mut at_agent, n).await;
    for r in receipts.into_iter().chain(hub_receipts) {
        assert_eq!(r.delivered().await, Ok(()));
    }
    assert!(agent.reconnects() >= 1);
    let info = agent.sender().expect("connected").info().clone();
    assert_eq!(
        info.session_id, first.session_id,
        "the same session throughout"
    );
    assert!(info.resumed);
    assert_eq!(agent.held(), Some(tunnel_router::Held::default()));
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_disconnected_are_delivered_after_reconnecting() {
    let (hub_router, mut at_hub) = numbers();
    let hub = resumable_hub(hub_router, HubSessions::default()).await;
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "offline");
    let agent = session_agent(&proxy.ws_url(), &id, Router::new());
    agent.wait_connected(SOON).await.expect("connected");
    go_offline(&proxy, &agent).await;
    let mut receipts = Vec::new();
    for i in 1..=10 {
        receipts.push(
            agent
                .send(MessageType::Status, &json!({ "n": i }))
                .await
                .expect("accepted offline"),
        );
    }
    assert_eq!(agent.held().map(|h| h.messages), Some(10));
    proxy.set_refuse(false);
    expect_numbers(&mut at_hub, 10).await;
    for r in receipts {
        assert_eq!(r.delivered().await, Ok(()));
    }
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_the_grace_period_is_a_reset_and_undelivered_messages_fail() {
    let sessions = HubSessions::default().grace(Duration::from_millis(300));
    // The hub handles what it gets: a message nobody handles is refused, not delivered.
    let hub = resumable_hub(numbers().0, sessions).await;
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "late");
    let (agent_router, mut at_agent) = numbers();
    let agent = session_agent(&proxy.ws_url(), &id, agent_router);
    let mut events = agent.session_events();
    agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;

    // The agent goes away; the hub keeps sending into its session.
    proxy.set_refuse(true);
    proxy.cut_all();
    eventually("the hub to notice", || hub.sender(&id).is_none()).await;
    let receipt = hub
        .send(&id, MessageType::Command, &json!({ "n": 1 }))
        .await
        .expect("buffered");
    // Past the grace period the session is dropped: the hub's message fails.
    let failed = tokio::time::timeout(SOON, receipt.delivered())
        .await
        .expect("resolved");
    assert!(matches!(failed, Err(Undelivered::Reset(_))), "{failed:?}");
    assert_eq!(hub.sessions(), 0);

    // Meanwhile the agent buffered a message; when it comes back its resume is refused,
    // and the message, never sent to the lost session, goes to the new one.
    let mine = agent
        .send(MessageType::Event, &json!({ "n": 1 }))
        .await
        .expect("accepted");
    proxy.set_refuse(false);
    let event = tokio::time::timeout(SOON, events.recv())
        .await
        .expect("event")
        .expect("event");
    assert!(
        matches!(event, SessionEvent::Reset { epoch: 1, .. }),
        "{event:?}"
    );
    assert_eq!(mine.delivered().await, Ok(()));
    assert!(
        at_agent.try_recv().is_err(),
        "the failed message was not delivered late"
    );
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hub_sessions_receipts_say_delivery_is_untracked() {
    let hub = hub(server_config(), Router::new()).await;
    let id = AgentId::new("ws", "plain");
    let agent = session_agent(&hub.url().expect("url"), &id, Router::new());
    let info = agent.wait_connected(SOON).await.expect("connected");
    assert!(!info.has_capability("resume"));
    let receipt = agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("send");
    assert_eq!(receipt.delivered().await, Err(Undelivered::Untracked));
    agent.shutdown().await;
    hub.shutdown().await;
}

/// The chaos run: both sides send as fast as they can while a proxy cuts the
/// connection at seeded random intervals of 50 to 500 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_many_messages_each_way_with_random_cuts_exactly_once_in_order() {
    use rand::{Rng, SeedableRng};

    const N: u64 = 200_000;
    let (hub_router, mut at_hub) = numbers();
    let hub = resumable_hub(hub_router, HubSessions::default()).await;
    let proxy = Arc::new(
        FaultProxy::start(hub.local_addr().expect("addr"))
            .await
            .expect("proxy"),
    );
    let id = AgentId::new("ws", "chaos");
    let (agent_router, mut at_agent) = numbers();
    // Exactly once for everything: statuses wait for room like the rest instead of
    // replacing each other when the buffer is full (that policy has its own test).
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack)),
        AgentConfig::new(proxy.ws_url())
            .backoff(fast_backoff())
            .breaker(BreakerConfig::default().cooldown(Duration::from_millis(200)))
            .when_full(tunnel_router::FullPolicy::default().set(
                MessageType::Status,
                tunnel_router::WhenFull::Wait(Duration::from_secs(5)),
            )),
        agent_router,
    )
    .expect("valid config");
    agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;

    let stop = tokio_util_stop();
    let cutter = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(0x7e11);
            let mut cuts = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..=500))).await;
                if proxy.cut_all() > 0 {
                    cuts += 1;
                }
            }
            cuts
        })
    };
    let up = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(N as usize);
            for i in 1..=N {
                // A third are statuses of a few resources: the default policy for
                // statuses must not drop any while there is room.
                let receipt = if i % 3 == 0 {
                    let mut update = status(&format!("web-{}", i % 16), 0);
                    update.status = json!({ "n": i });
                    agent.send(MessageType::Status, &update).await
                } else {
                    agent.send(MessageType::Event, &json!({ "n": i })).await
                };
                receipts.push(receipt.expect("agent send"));
            }
            receipts
        })
    };
    let down = {
        let (hub, id) = (hub.clone(), id.clone());
        tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(N as usize);
            for i in 1..=N {
                receipts.push(
                    hub.send(&id, MessageType::Command, &json!({ "n": i }))
                        .await
                        .expect("hub send"),
                );
            }
            receipts
        })
    };
    let (got_up, got_down) = tokio::join!(
        expect_numbers_within(&mut at_hub, N, Duration::from_secs(120)),
        expect_numbers_within(&mut at_agent, N, Duration::from_secs(120)),
    );
    got_up.expect("agent to hub");
    got_down.expect("hub to agent");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let cuts = cutter.await.expect("cutter");
    assert!(cuts >= 2, "only {cuts} cuts happened");
    for r in up
        .await
        .expect("up")
        .into_iter()
        .chain(down.await.expect("down"))
    {
        assert_eq!(r.delivered().await, Ok(()));
    }
    agent.shutdown().await;
    hub.shutdown().await;
}

fn tokio_util_stop() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}

/// Like `expect_numbers`, with an overall deadline and an error instead of a panic.
async fn expect_numbers_within(
    rx: &mut mpsc::UnboundedReceiver<u64>,
    count: u64,
    limit: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    for expected in 1..=count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(got)) if got == expected => {}
            Ok(Some(got)) => return Err(format!("expected {expected}, got {got}")),
            Ok(None) => return Err("channel closed".into()),
            Err(_) => return Err(format!("timed out at {expected} of {count}")),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_hub_cannot_resume_and_the_agent_is_told() {
    let first = resumable_hub(Router::new(), HubSessions::default()).await;
    let addr = first.local_addr().expect("addr");
    let id = AgentId::new("ws", "restart");
    let agent = session_agent(&first.url().expect("url"), &id, Router::new());
    let mut events = agent.session_events();
    let before = agent.wait_connected(SOON).await.expect("connected");
    first.shutdown().await;
    // The new hub handles what it gets: a message nobody handles is refused.
    let second = rebind("rebind", || Hub::bind(addr, server_config(), numbers().0)).await;
    let event = tokio::time::timeout(SOON, events.recv())
        .await
        .expect("event")
        .expect("event");
    assert!(
        matches!(event, SessionEvent::Reset { epoch: 1, .. }),
        "{event:?}"
    );
    let after = agent.wait_connected(SOON).await.expect("reconnected");
    assert_ne!(after.session_id, before.session_id);
    assert!(!after.resumed);
    // The new session works.
    let receipt = agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("send");
    assert_eq!(receipt.delivered().await, Ok(()));
    agent.shutdown().await;
    second.shutdown().await;
}

fn status(name: &str, ready: u64) -> tunnel_proto::messages::Status {
    tunnel_proto::messages::Status {
        gvr: tunnel_proto::messages::Gvr::new("apps", "v1", "deployments"),
        namespace: Some("default".into()),
        name: name.into(),
        status: json!({ "readyReplicas": ready }),
        observed_generation: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_statuses_keep_only_the_latest_per_resource_and_full_buffers_follow_policy() {
    let (tx, mut at_hub) = mpsc::unbounded_channel();
    let router = Router::new().fallback(service_fn(move |msg: Inbound| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(msg.envelope);
            Ok::<_, BoxError>(())
        }
    }));
    let hub = resumable_hub(router, HubSessions::default()).await;
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "conflate");
    let small = tunnel_proto::session::SessionConfig::default().max_replay_messages(3);
    let policy = tunnel_router::FullPolicy::default()
        .set(MessageType::Event, tunnel_router::WhenFull::Reject);
    let agent = Agent::start(
        WsConnector::new(client_config(&id, Format::MsgPack)),
        AgentConfig::new(proxy.ws_url())
            .backoff(fast_backoff())
            .breaker(BreakerConfig::default().cooldown(Duration::from_millis(200)))
            .session(Some(small))
            .when_full(policy),
        Router::new(),
    )
    .expect("valid config");
    agent.wait_connected(SOON).await.expect("connected");
    go_offline(&proxy, &agent).await;

    // Offline, with room: every status is held.
    let a1 = agent
        .send(MessageType::Status, &status("a", 1))
        .await
        .expect("held");
    let b1 = agent
        .send(MessageType::Status, &status("b", 1))
        .await
        .expect("held");
    let e1 = agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("held");
    assert_eq!(agent.held().map(|h| h.messages), Some(3));
    // Full: an event is rejected at once (its policy)...
    let e2 = agent.send(MessageType::Event, &json!({"n": 2})).await;
    assert!(matches!(e2, Err(tunnel_router::Error::Full(_))), "{e2:?}");
    // ...while a newer status for a waiting resource replaces the older one in place.
    let a2 = agent
        .send(MessageType::Status, &status("a", 2))
        .await
        .expect("replaces a1");
    let a3 = agent
        .send(MessageType::Status, &status("a", 3))
        .await
        .expect("replaces a2");
    assert_eq!(
        (a1.seq(), a2.seq()),
        (a3.seq(), a3.seq()),
        "replaced in place"
    );
    assert_eq!(agent.held().map(|h| h.messages), Some(3));

    proxy.set_refuse(false);
    let mut got = Vec::new();
    for _ in 0..3 {
        let env = recv_soon(&mut at_hub).await;
        got.push(match env.kind {
            MessageType::Status => {
                let s: tunnel_proto::messages::Status = env.decode_payload().expect("status");
                format!("{}={}", s.name, s.status["readyReplicas"])
            }
            kind => kind.to_string(),
        });
    }
    assert_eq!(got, ["a=3", "b=1", "event"]);
    for r in [a1, b1, e1, a2, a3] {
        assert_eq!(r.delivered().await, Ok(()));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(at_hub.try_recv().is_err(), "nothing else arrived");
    agent.shutdown().await;
    hub.shutdown().await;
}

/// A hub handler that has not finished with a message (storing it, say) is not
/// acknowledged for it, not even by an ack riding on a message the hub sends meanwhile;
/// one that answers `Unavailable` gets the message again on the agent's next
/// connection, and nothing is lost or delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_covers_a_message_until_its_handler_is_done_and_unavailable_replays_it() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let refusals = Arc::new(AtomicU64::new(0));
    let refused = refusals.clone();
    let router = Router::new().fallback(service_fn(move |msg: Inbound| {
        let (mut gate, seen, refused) = (gate_rx.clone(), seen_tx.clone(), refused.clone());
        async move {
            let n = msg.envelope.decode_payload::<serde_json::Value>()?["n"]
                .as_u64()
                .unwrap_or_default();
            if n == 1 {
                // Held until the test opens the gate.
                let _ = gate.wait_for(|open| *open).await;
            }
            if n == 2 && refused.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err::<(), BoxError>(tunnel_router::Unavailable::new("store down").into());
            }
            let _ = seen.send(n);
            Ok(())
        }
    }));
    let hub = resumable_hub(router, HubSessions::default()).await;
    let id = AgentId::new("ws", "held");
    let takes_all =
        Router::new().fallback(service_fn(|_: Inbound| async { Ok::<_, BoxError>(()) }));
    let agent = session_agent(&hub.url().expect("url"), &id, takes_all);
    agent
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("up");
    registered(&hub, &id).await;

    let first = agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("held");
    // While the hub's handler holds 1, the hub sends to the agent: its messages may
    // carry acks, but none that covers 1.
    for _ in 0..20 {
        hub.send(&id, MessageType::Event, &json!({"down": true}))
            .await
            .expect("sent");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        agent.held().map(|h| h.messages),
        Some(1),
        "1 is not acknowledged yet"
    );
    gate_tx.send(true).expect("open");
    first.delivered().await.expect("acknowledged once handled");
    assert_eq!(recv_soon(&mut seen).await, 1);

    // 2 is refused as unavailable: the connection closes with 1013, the agent
    // reconnects and resumes, and 2 then 3 arrive once each, in order.
    let two = agent
        .send(MessageType::Event, &json!({"n": 2}))
        .await
        .expect("held");
    let three = agent
        .send(MessageType::Event, &json!({"n": 3}))
        .await
        .expect("held");
    two.delivered()
        .await
        .expect("delivered on the next connection");
    three.delivered().await.expect("delivered");
    assert_eq!(recv_soon(&mut seen).await, 2);
    assert_eq!(recv_soon(&mut seen).await, 3);
    assert_eq!(
        refusals.load(Ordering::SeqCst),
        2,
        "refused once, taken the second time"
    );
    assert!(agent.reconnects() >= 1, "the refusal closed the connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(seen.try_recv().is_err(), "nothing twice");
    agent.shutdown().await;
    hub.shutdown().await;
}

/// A handler that acknowledges later lets the next messages through meanwhile; the
/// session acknowledges only the prefix that is done, whatever order they finish in,
/// and a message whose handle is dropped unfinished is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_later_messages_are_acknowledged_in_order_once_done_and_replayed_if_dropped() {
    use std::sync::Mutex;
    use tunnel_router::AckLater;
    let laters: Arc<Mutex<Vec<(u64, AckLater)>>> = Arc::default();
    let collected = laters.clone();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let router = Router::new()
        .fallback(service_fn(move |msg: Inbound| {
            let (collected, seen) = (collected.clone(), seen_tx.clone());
            async move {
                let n = msg.envelope.decode_payload::<serde_json::Value>()?["n"]
                    .as_u64()
                    .unwrap_or_default();
                let later = msg.acknowledge_later().expect("a message of a session");
                collected.lock().expect("lock").push((n, later));
                // Reported once its handle is collected, so the test can take it.
                let _ = seen.send(n);
                Ok::<_, BoxError>(())
            }
        }))
        .acknowledge_later();
    let hub = resumable_hub(router, HubSessions::default()).await;
    let id = AgentId::new("ws", "later");
    let agent = session_agent(&hub.url().expect("url"), &id, Router::new());
    agent
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("up");
    let mut receipts = Vec::new();
    for n in 1..=3 {
        receipts.push(
            agent
                .send(MessageType::Event, &json!({"n": n}))
                .await
                .expect("held"),
        );
    }
    // All three reach the handler although none is done: the reader did not wait.
    for n in 1..=3 {
        assert_eq!(recv_soon(&mut seen).await, n);
    }
    let take = |n: u64| {
        let mut laters = laters.lock().expect("lock");
        let i = laters.iter().position(|(m, _)| *m == n).expect("collected");
        laters.remove(i).1
    };
    take(3).done();
    take(2).done();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        agent.held().map(|h| h.messages),
        Some(3),
        "1 is not done, so nothing is acknowledged"
    );
    take(1).done();
    for r in receipts {
        r.delivered().await.expect("acknowledged once all are done");
    }
    // Dropped unfinished: the connection closes with 1013 and the agent replays it.
    let four = agent
        .send(MessageType::Event, &json!({"n": 4}))
        .await
        .expect("held");
    assert_eq!(recv_soon(&mut seen).await, 4);
    drop(take(4));
    assert_eq!(recv_soon(&mut seen).await, 4, "replayed");
    take(4).done();
    four.delivered().await.expect("delivered the second time");
    agent.shutdown().await;
    hub.shutdown().await;
}

/// `acknowledge_later` called after the handler returned (here from a task it spawned)
/// may come after the ack: the connection is closed rather than the message taken for
/// held, and the agent's replay brings it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledge_later_after_the_handler_returned_closes_the_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let misbehaved = Arc::new(AtomicBool::new(false));
    let once = misbehaved.clone();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let router = Router::new()
        .fallback(service_fn(move |msg: Inbound| {
            let (once, seen) = (once.clone(), seen_tx.clone());
            async move {
                let _ = seen.send(());
                if !once.swap(true, Ordering::SeqCst) {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if let Some(later) = msg.acknowledge_later() {
                            later.done();
                        }
                    });
                }
                Ok::<_, BoxError>(())
            }
        }))
        .acknowledge_later();
    let hub = resumable_hub(router, HubSessions::default()).await;
    let id = AgentId::new("ws", "late");
    let agent = session_agent(&hub.url().expect("url"), &id, Router::new());
    agent
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("up");
    let receipt = agent
        .send(MessageType::Event, &json!({"n": 1}))
        .await
        .expect("held");
    recv_soon(&mut seen).await;
    eventually("the hub closes the connection", || agent.reconnects() >= 1).await;
    receipt.delivered().await.expect("delivered");
    assert!(misbehaved.load(Ordering::SeqCst));
    agent.shutdown().await;
    hub.shutdown().await;
}

fn numbered(n: u64) -> Box<tunnel_proto::Envelope> {
    let payload = tunnel_proto::Payload::msgpack(&json!({ "n": n })).expect("encode");
    Box::new(
        tunnel_proto::Envelope::new(0, MessageType::Status, tunnel_transport::unix_millis())
            .with_payload(payload),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_message_waits_for_its_release_and_one_its_sender_disowns_is_never_staged() {
    let hub = resumable_hub(Router::new(), HubSessions::default()).await;
    let (agent_router, mut at_agent) = numbers();
    let id = AgentId::new("ws", "staged");
    let agent = session_agent(
        &format!("ws://{}/", hub.local_addr().expect("addr")),
        &id,
        agent_router,
    );
    agent.wait_connected(SOON).await.expect("connected");
    let session = hub.session_of(&id).expect("a session").id;

    let mut asked = false;
    let refused = hub
        .send_staged(&id, &session, numbered(1), || {
            asked = true;
            false
        })
        .await;
    assert!(asked, "the sender is asked once the session is found");
    assert!(
        matches!(refused, Err(tunnel_router::Error::NotConnected)),
        "{refused:?}"
    );
    let not_here = hub
        .send_staged(&id, "no-such-session", numbered(1), || {
            panic!("asked although the session is not here")
        })
        .await;
    assert!(matches!(not_here, Err(tunnel_router::Error::NotConnected)));

    let staged = hub
        .send_staged(&id, &session, numbered(2), || true)
        .await
        .expect("staged");
    assert_eq!(staged.seq(), 1, "the disowned message took no number");
    // Sent after the staged one: held behind it.
    let behind = hub
        .send(&id, MessageType::Status, &json!({ "n": 3 }))
        .await
        .expect("accepted");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        at_agent.try_recv().is_err(),
        "a staged message went out before its release"
    );
    hub.release(&id, &session, staged.seq()).await;
    // The disowned message took no number and never goes out: 2, then 3, nothing else.
    for expected in [2, 3] {
        let got = tokio::time::timeout(SOON, at_agent.recv())
            .await
            .expect("released in time")
            .expect("channel");
        assert_eq!(got, expected);
    }
    assert_eq!(staged.delivered().await, Ok(()));
    assert_eq!(behind.delivered().await, Ok(()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(at_agent.try_recv().is_err(), "the disowned message arrived");
    agent.shutdown().await;
    hub.shutdown().await;
}

/// A JSON agent on a resumable hub (through `url`) whose received `n`s go to the
/// returned channel.
/// The message limit of [`json_agent`]'s connections.
const AGENT_LIMIT: usize = 64 * 1024;

fn json_agent(url: &str, id: &AgentId) -> (Agent, mpsc::UnboundedReceiver<u64>) {
    let (router, rx) = numbers();
    let mut config = client_config(id, Format::Json);
    config.connection.limits = tunnel_proto::Limits::default().max_message_size(AGENT_LIMIT);
    let agent = Agent::start(
        WsConnector::new(config),
        AgentConfig::new(url)
            .backoff(fast_backoff())
            .breaker(BreakerConfig::default().cooldown(Duration::from_millis(200))),
        router,
    )
    .expect("valid config");
    (agent, rx)
}

/// A MessagePack map with a binary key: valid MessagePack with no JSON form.
fn no_json_form() -> Box<tunnel_proto::Envelope> {
    let bytes: &[u8] = &[0x81, 0xc4, 0x01, 0x00, 0x01];
    let payload = tunnel_proto::Payload::from_encoded(Format::MsgPack, bytes.to_vec())
        .expect("valid MessagePack");
    Box::new(tunnel_proto::Envelope::new(0, MessageType::Command, 0).with_payload(payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_the_agents_codec_cannot_carry_is_refused_at_send_and_the_session_goes_on() {
    let hub = resumable_hub(Router::new(), HubSessions::default()).await;
    let id = AgentId::new("ws", "json");
    let (agent, mut at_agent) = json_agent(&hub.url().expect("url"), &id);
    agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;

    let refused = hub.send_envelope(&id, no_json_form()).await;
    assert!(
        matches!(refused, Err(tunnel_router::Error::Encode(_))),
        "{refused:?}"
    );
    // Refused before it took a number: what follows goes out as usual.
    let next = hub
        .send(&id, MessageType::Command, &json!({ "n": 1 }))
        .await
        .expect("accepted");
    assert_eq!(next.seq(), 1);
    assert_eq!(recv_soon(&mut at_agent).await, 1);
    assert_eq!(next.delivered().await, Ok(()));
    agent.shutdown().await;
    hub.shutdown().await;
}

/// An event whose JSON payload is `limit - 8` bytes: within `limit`, its envelope not.
fn just_under(limit: usize) -> Box<tunnel_proto::Envelope> {
    let payload =
        tunnel_proto::Payload::encode(Format::Json, &"x".repeat(limit - 10)).expect("encodes");
    assert_eq!(payload.len(), limit - 8);
    Box::new(tunnel_proto::Envelope::new(0, MessageType::Event, 0).with_payload(payload))
}

fn is_too_large(
    outcome: &Result<tunnel_router::Receipt, tunnel_router::Error>,
    limit: usize,
) -> bool {
    matches!(
        outcome,
        Err(tunnel_router::Error::Encode(tunnel_proto::EncodeError::TooLarge { size, limit: l }))
            if *size > limit && *l == limit
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_within_the_limit_whose_envelope_is_not_is_refused_at_send_and_no_connection_ends()
 {
    let (hub_router, mut at_hub) = numbers();
    let mut config = server_config();
    config.connection.limits = tunnel_proto::Limits::default().max_message_size(AGENT_LIMIT);
    let hub = Hub::bind_with(
        "127.0.0.1:0",
        config,
        hub_router,
        tunnel_router::HubConfig::default()
            .sessions(tunnel_router::SessionRegistry::new(HubSessions::default())),
    )
    .await
    .expect("bind");
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "near-limit");
    let (agent, mut at_agent) = json_agent(&proxy.ws_url(), &id);
    agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;
    let session = hub.session_of(&id).expect("a session").id;
    let reconnects = agent.reconnects();

    // Connected: refused on both sides before the session numbers it (taken, it would
    // end every connection it cannot be written on until it expires).
    let refused = agent.send_envelope(just_under(AGENT_LIMIT)).await;
    assert!(is_too_large(&refused, AGENT_LIMIT), "{refused:?}");
    let refused = hub.send_envelope(&id, just_under(AGENT_LIMIT)).await;
    assert!(is_too_large(&refused, AGENT_LIMIT), "{refused:?}");
    // Offline: the same against the session's last connection.
    go_offline(&proxy, &agent).await;
    eventually("the hub to notice", || {
        hub.sender(&id).is_none() && hub.session_of(&id).is_some_and(|s| !s.attached)
    })
    .await;
    let refused = agent.send_envelope(just_under(AGENT_LIMIT)).await;
    assert!(is_too_large(&refused, AGENT_LIMIT), "{refused:?}");
    let refused = hub.send_envelope(&id, just_under(AGENT_LIMIT)).await;
    assert!(is_too_large(&refused, AGENT_LIMIT), "{refused:?}");

    // Nothing refused took a number; the session resumes once and carries on.
    let up = agent
        .send(MessageType::Event, &json!({ "n": 1 }))
        .await
        .expect("held offline");
    assert_eq!(up.seq(), 1, "the refused messages took no number");
    let down = hub
        .send(&id, MessageType::Command, &json!({ "n": 1 }))
        .await
        .expect("held offline");
    assert_eq!(down.seq(), 1, "the refused messages took no number");
    proxy.set_refuse(false);
    assert_eq!(recv_soon(&mut at_hub).await, 1);
    assert_eq!(recv_soon(&mut at_agent).await, 1);
    assert_eq!(up.delivered().await, Ok(()));
    assert_eq!(down.delivered().await, Ok(()));
    assert_eq!(
        hub.session_of(&id).map(|s| s.id),
        Some(session),
        "resumed, not reset"
    );
    assert_eq!(
        agent.reconnects(),
        reconnects + 1,
        "one reconnect: after the cut, and none for a message it could not write"
    );
    agent.shutdown().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_the_agents_codec_cannot_carry_is_refused_while_it_is_offline_and_the_session_resumes()
 {
    let (hub_router, mut at_hub) = numbers();
    let hub = resumable_hub(hub_router, HubSessions::default()).await;
    let proxy = FaultProxy::start(hub.local_addr().expect("addr"))
        .await
        .expect("proxy");
    let id = AgentId::new("ws", "json-offline");
    let (agent, mut at_agent) = json_agent(&proxy.ws_url(), &id);
    agent.wait_connected(SOON).await.expect("connected");
    registered(&hub, &id).await;
    let session = hub.session_of(&id).expect("a session").id;
    go_offline(&proxy, &agent).await;
    // Both: the session is detached before the connection is unregistered, and a
    // registered connection would have the message fitted to it.
    eventually("the hub to notice", || {
        hub.sender(&id).is_none() && hub.session_of(&id).is_some_and(|s| !s.attached)
    })
    .await;

    // With no connection, the message is fitted to the session's last one: refused
    // before it took a number, as it would be on the connection.
    let refused = hub.send_envelope(&id, no_json_form()).await;
    assert!(
        matches!(refused, Err(tunnel_router::Error::Encode(_))),
        "{refused:?}"
    );
    // Offline too, on the agent's side: larger than its connection's message limit.
    let mut too_large = tunnel_proto::Envelope::new(0, MessageType::Event, 0).with_payload(
        tunnel_proto::Payload::encode(Format::Json, &"x".repeat(AGENT_LIMIT + 1)).expect("encodes"),
    );
    too_large.id = 0;
    let refused = agent.send_envelope(Box::new(too_large)).await;
    assert!(
        matches!(
            refused,
            Err(tunnel_router::Error::Encode(
                tunnel_proto::EncodeError::TooLarge { .. }
            ))
        ),
        "{refused:?}"
    );
    let down = hub
        .send(&id, MessageType::Command, &json!({ "n": 1 }))
        .await
        .expect("held offline");
    assert_eq!(down.seq(), 1, "the refused message took no number");
    let up = agent
        .send(MessageType::Event, &json!({ "n": 1 }))
        .await
        .expect("held offline");
    assert_eq!(up.seq(), 1, "the refused message took no number");

    // The session resumes (no reset) and both arrive.
    proxy.set_refuse(false);
    assert_eq!(recv_soon(&mut at_agent).await, 1);
    assert_eq!(recv_soon(&mut at_hub).await, 1);
    assert_eq!(down.delivered().await, Ok(()));
    assert_eq!(up.delivered().await, Ok(()));
    assert_eq!(
        hub.session_of(&id).map(|s| s.id),
        Some(session),
        "resumed, not reset"
    );
    agent.shutdown().await;
    hub.shutdown().await;
}
