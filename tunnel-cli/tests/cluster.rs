//! Two `tunnel hub --nats` processes and a `tunnel agent` on a real nats-server: a
//! backend finds the agent in presence, calls it through its hub, and reads what it
//! sent from the up stream.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt as _;
use tunnel_cluster::Backend;
use tunnel_cluster::testing::Nats;
use tunnel_proto::MessageType;
use tunnel_transport::AgentId;

const SOON: Duration = Duration::from_secs(20);

mod support;

use support::{Dir, Process};

/// `tunnel` with JSON logs at info and `args`, as a process.
fn spawn(args: &[&str]) -> Process {
    Process::spawn(
        support::tunnel()
            .args(["--log", "info", "--log-format", "json"])
            .args(args),
    )
}

/// `tunnel hub` in the cluster on `nats`, named `name`, on any port.
fn cluster_hub(dir: &Dir, nats: &str, name: &str, drain_timeout: &str) -> Process {
    support::cluster_hub(dir, nats, name, 0, drain_timeout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reaches_an_agent_of_a_two_hub_cluster_and_reads_what_it_sent() {
    let nats = Nats::start("cli");
    let dir = Dir::new("cluster");
    let url = nats.url();
    let hub = |name: &str| cluster_hub(&dir, &url, name, "1");
    let (hub_a, hub_b) = (hub("hub-a"), hub("hub-b"));
    for h in [&hub_a, &hub_b] {
        h.wait_for("joined the cluster");
    }
    let _ = hub_a.wait_for("hub listening");
    let b_url = hub_b.wait_for("hub listening")["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let token = dir.token();
    let agent = spawn(&[
        "agent",
        "--url",
        &b_url,
        "--workspace",
        "root:e2e",
        "--sync-target",
        "c1",
        "--token-file",
        token.to_str().expect("utf-8"),
        "--status-interval",
        "1",
    ]);
    agent.wait_for("connected");

    let backend = Backend::connect(&url).await.expect("backend");
    let id = AgentId::new("root:e2e", "c1");
    let presence = tokio::time::timeout(SOON, async {
        loop {
            let all = backend.presence().await.expect("presence");
            if let Some((_, p)) = all.into_iter().find(|(a, _)| *a == id) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent appears in presence");
    assert_eq!(presence.hub, "hub-b");
    // What an operator sees: every agent of the cluster and its hub.
    let status = Command::new(env!("CARGO_BIN_EXE_tunnel"))
        .args(["status", "--nats", &url])
        .output()
        .expect("tunnel status");
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("root:e2e/c1"))
        .unwrap_or_else(|| panic!("no row for the agent in:\n{table}"));
    assert!(row.contains("hub-b"), "{table}");
    assert!(table.contains("1 agents connected to 1 hubs"), "{table}");

    // A call through NATS, answered by the agent through hub-b.
    let reply = backend
        .call(
            &id,
            MessageType::Command,
            &serde_json::json!({"name": "ping"}),
            Duration::from_secs(5),
        )
        .await;
    assert!(reply.is_ok(), "{reply:?}");

    // The agent's status heartbeats are in the up stream.
    let mut up = Box::pin(backend.messages("e2e", Some(&id)).await.expect("consumer"));
    let first = tokio::time::timeout(SOON, up.next())
        .await
        .expect("a status in time")
        .expect("stream")
        .expect("message");
    assert_eq!(
        (first.agent.clone(), first.kind.clone()),
        (id.clone(), MessageType::Status)
    );
    first.ack().await.expect("ack");

    assert!(agent.terminate().success());
    assert!(hub_a.terminate().success());
    assert!(hub_b.terminate().success());
}

/// A hub killed (SIGKILL) under load both ways: the agent resumes its session on the
/// other hub. No reset; every receipt resolves `Ok`; every event is in the up stream
/// once, in order; every command reaches the agent once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_under_load_both_ways_hands_its_session_on_with_nothing_lost_or_repeated() {
    hub_fails_under_load("kill", Fault::Kill).await;
}

/// A hub stopped (SIGSTOP) under load both ways long enough for its agent to move, then
/// continued: the agent's session goes on on the other hub as after a kill, and the
/// continued hub, fenced, delivers and stores nothing of it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopped_under_load_and_continued_after_its_agent_moved_repeats_nothing() {
    hub_fails_under_load("stop", Fault::Stop).await;
}

/// How the first hub fails.
#[derive(Clone, Copy)]
enum Fault {
    Kill,
    /// SIGSTOP, then SIGCONT once the agent is back on the other hub.
    Stop,
}

async fn hub_fails_under_load(name: &str, fault: Fault) {
    use tower::{BoxError, service_fn};
    use tunnel_router::{Agent, AgentConfig, ConnectionState, Inbound, Router};

    let nats = Nats::start(name);
    let dir = Dir::new(name);
    let url = nats.url();
    let hub = |name: &str| cluster_hub(&dir, &url, name, "0");
    let (hub_a, hub_b) = (hub("hub-a"), hub("hub-b"));
    let a_url = hub_a.wait_for("hub listening")["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let b_url = hub_b.wait_for("hub listening")["url"]
        .as_str()
        .expect("url")
        .to_owned();

    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel();
    let router = Router::new().route(
        MessageType::Command,
        service_fn(move |msg: Inbound| {
            let tx = tx.clone();
            async move {
                let v: serde_json::Value = msg.envelope.decode_payload()?;
                let _ = tx.send(v["n"].as_u64().unwrap_or_default());
                Ok::<_, BoxError>(())
            }
        }),
    );
    let id = AgentId::new("root:e2e", "survivor");
    let connector = support::quick_connector(&id);
    let agent = Agent::start(
        connector,
        AgentConfig::with_endpoints([a_url, b_url]).backoff(
            tunnel_reconnect::BackoffConfig::default()
                .base(Duration::from_millis(20))
                .cap(Duration::from_millis(200)),
        ),
        router,
    )
    .expect("agent");
    agent.wait_connected(SOON).await.expect("up");
    let mut resets = agent.session_events();
    let backend = Backend::connect(&url).await.expect("backend");

    // Down: 300 commands, stored one after another while the hub fails (and, stopped,
    // after it continues).
    let spacing = match fault {
        Fault::Kill => Duration::from_millis(2),
        Fault::Stop => Duration::from_millis(15),
    };
    let down = {
        let (backend, id) = (backend.clone(), id.clone());
        tokio::spawn(async move {
            for n in 1..=300u64 {
                backend
                    .send(&id, MessageType::Command, &serde_json::json!({"n": n}))
                    .await
                    .expect("stored");
                tokio::time::sleep(spacing).await;
            }
        })
    };
    // Up: 3,000 events; hub-a fails after the first 1,000. Stopped, it continues once
    // the agent resumed on hub-b, before the last 500.
    let mut receipts = Vec::new();
    let mut hub_a = Some(hub_a);
    let mut continued = None;
    for n in 1..=3000u64 {
        receipts.push((
            n,
            agent
                .send(MessageType::Event, &serde_json::json!({"n": n}))
                .await
                .expect("accepted"),
        ));
        if n == 1000
            && let Some(hub) = hub_a.take()
        {
            match fault {
                Fault::Kill => {
                    hub.signal("KILL");
                    drop(hub);
                }
                Fault::Stop => {
                    hub.signal("STOP");
                    let mut state = agent.state();
                    state.borrow_and_update();
                    continued = Some(tokio::spawn(async move {
                        // The agent leaves the stopped hub, then resumes on the other.
                        let mut left = false;
                        loop {
                            state.changed().await.expect("agent alive");
                            let now = state.borrow_and_update().clone();
                            match now {
                                ConnectionState::Resumed { .. } if left => break,
                                ConnectionState::Connected { .. }
                                | ConnectionState::Resumed { .. }
                                | ConnectionState::Reset { .. } => {}
                                _ => left = true,
                            }
                        }
                        hub.signal("CONT");
                        hub
                    }));
                }
            }
        }
        if n == 2500
            && let Some(task) = continued.take()
        {
            let hub = tokio::time::timeout(SOON, task)
                .await
                .expect("the agent moved in time")
                .expect("watcher");
            // Kept running (continued, fenced) to the end.
            hub_a = Some(hub);
        }
        if n % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    down.await.expect("commands stored");
    for (n, r) in receipts {
        let outcome = tokio::time::timeout(SOON, r.delivered())
            .await
            .expect("every receipt resolves");
        assert_eq!(outcome, Ok(()), "event {n}");
    }
    // Every event is in the stream once, in order.
    let mut up = Box::pin(backend.messages("kill", Some(&id)).await.expect("consumer"));
    let mut numbers = Vec::new();
    while numbers.len() < 3000 {
        let msg = tokio::time::timeout(SOON, up.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 3000 events in the stream", numbers.len()))
            .expect("stream")
            .expect("message");
        let v: serde_json::Value = msg.decode().expect("json");
        numbers.push(v["n"].as_u64().expect("n"));
        msg.ack().await.expect("ack");
    }
    assert_eq!(
        numbers,
        (1..=3000).collect::<Vec<_>>(),
        "each event once, in order"
    );
    let more = tokio::time::timeout(Duration::from_millis(500), up.next()).await;
    assert!(more.is_err(), "nothing stored twice: {more:?}");
    // Every command arrives once, in order.
    let mut got = Vec::new();
    while got.len() < 300 {
        got.push(
            tokio::time::timeout(SOON, commands.recv())
                .await
                .unwrap_or_else(|_| panic!("{} of 300 commands arrived", got.len()))
                .expect("command"),
        );
    }
    // Anything sent twice would come within this wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(n) = commands.try_recv() {
        got.push(n);
    }
    assert_eq!(
        got,
        (1..=300).collect::<Vec<_>>(),
        "each command once, in order"
    );
    assert!(
        matches!(
            resets.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "the session was not reset"
    );
    let holder = backend
        .presence()
        .await
        .expect("presence")
        .into_iter()
        .find(|(a, _)| *a == id)
        .map(|(_, p)| p.hub);
    assert_eq!(
        holder.as_deref(),
        Some("hub-b"),
        "the other hub holds the agent"
    );
    agent.shutdown().await;
    assert!(hub_b.terminate().success());
    drop(hub_a);
}
