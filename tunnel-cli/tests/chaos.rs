//! Cluster chaos: three `tunnel hub --nats` processes on a real nats-server, 20 agents
//! sending numbered events up and receiving numbered commands down, while a seeded
//! schedule kills (SIGKILL) and restarts hubs, stops (SIGSTOP) and continues them, and
//! restarts nats-server. Every message must arrive exactly once and in order per agent
//! and direction, every receipt must resolve `Ok`, and no session may be reset.
//!
//! nats-server restarts (SIGKILL, then a start on the same port and storage) are in the
//! schedule; `CHAOS_NATS=0` leaves them out. In CI the schedule runs for 10 s (seed 14:
//! a nats-server restart, a SIGSTOP and three SIGKILLs of hubs); `CHAOS_SECS=60
//! cargo nextest run -p tunnel-cli --test chaos` runs a long one, and `CHAOS_SEED=n`
//! another schedule (each action is printed with the seed, so a failing run can be
//! replayed). `TUNNEL_TEST_LOGS=dir` keeps every hub's log, and
//! `TUNNEL_TEST_LOG=info,tunnel_cluster=debug` logs each down message's path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tower::{BoxError, service_fn};
use tunnel_cluster::Backend;
use tunnel_cluster::testing::Nats;
use tunnel_proto::MessageType;
use tunnel_router::{Agent, AgentConfig, Inbound, Receipt, Router};
use tunnel_transport::AgentId;

mod support;

use support::{Dir, Process};

const AGENTS: usize = 20;
const HUBS: usize = 3;

/// How long the end waits for every message to arrive.
const SETTLE: Duration = Duration::from_secs(60);

/// SplitMix64: a seeded schedule, the same for one seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// Prints, per agent that got anything else than `1..=sent` once each in order, what
/// differed: (missing, repeated, out of order).
fn print_anomalies(
    seed: u64,
    direction: &str,
    ids: &[AgentId],
    sent: &[u64],
    got: &HashMap<AgentId, Vec<u64>>,
) {
    let summary: Vec<_> = ids
        .iter()
        .zip(sent)
        .map(|(id, n)| anomalies(got.get(id).map_or(&[][..], Vec::as_slice), *n))
        .filter(|a| *a != (0, 0, 0))
        .collect();
    eprintln!(
        "chaos seed {seed}: {direction} anomalies (missing, repeated, out of order) per agent: {summary:?}"
    );
    // Where each agent's sequence first breaks, to tell a block sent again from a
    // single message out of place.
    for id in ids {
        let got = got.get(id).map_or(&[][..], Vec::as_slice);
        if let Some(i) = got.windows(2).position(|w| w[1] != w[0] + 1) {
            let around = &got[i.saturating_sub(2)..(i + 4).min(got.len())];
            eprintln!(
                "chaos seed {seed}: {direction} {id} breaks after {} of {}: {around:?}",
                i + 1,
                got.len()
            );
        }
    }
}

/// What differs from `1..=n` once each in order: (missing, repeated, out of order).
fn anomalies(got: &[u64], n: u64) -> (usize, usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let repeated = got.iter().filter(|m| !seen.insert(**m)).count();
    let missing = (1..=n).filter(|m| !seen.contains(m)).count();
    let out_of_order = got.windows(2).filter(|w| w[1] < w[0]).count();
    (missing, repeated, out_of_order)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One hub of the cluster: its process, name and port (it restarts on the same one).
struct ClusterHub {
    name: String,
    port: u16,
    process: Option<Process>,
}

impl ClusterHub {
    fn start(dir: &Dir, nats: &str, name: &str, port: u16) -> (Process, u16) {
        let process = support::cluster_hub(dir, nats, name, port, "0");
        let url = process.wait_for("hub listening")["url"]
            .as_str()
            .expect("url")
            .to_owned();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("port in the url");
        (process, port)
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        if let Some(p) = &self.process {
            p.signal(signal);
        }
    }
}

/// What one agent received: the commands' numbers, in arrival order.
type Received = Arc<Mutex<HashMap<AgentId, Vec<u64>>>>;

/// Per agent and command number, the down stream sequences it came from: one command
/// stored twice (two sequences) tells apart from one delivered twice (one).
type Origins = Arc<Mutex<HashMap<(AgentId, u64), Vec<u64>>>>;

fn agent(id: &AgentId, urls: &[String], received: &Received, origins: &Origins) -> Agent {
    let (received, origins) = (received.clone(), origins.clone());
    let me = id.clone();
    let router = Router::new().route(
        MessageType::Command,
        service_fn(move |msg: Inbound| {
            let (received, origins, me) = (received.clone(), origins.clone(), me.clone());
            async move {
                let v: serde_json::Value = msg.envelope.decode_payload()?;
                let n = v["n"].as_u64().unwrap_or_default();
                let from = msg
                    .envelope
                    .headers
                    .get(tunnel_cluster::subject::HEADER_DOWN_SEQ)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_default();
                origins
                    .lock()
                    .expect("lock")
                    .entry((me.clone(), n))
                    .or_default()
                    .push(from);
                received
                    .lock()
                    .expect("lock")
                    .entry(me)
                    .or_default()
                    .push(n);
                Ok::<_, BoxError>(())
            }
        }),
    );
    let connector = support::quick_connector(id);
    Agent::start(
        connector,
        AgentConfig::with_endpoints(urls.iter().cloned()).backoff(
            tunnel_reconnect::BackoffConfig::default()
                .base(Duration::from_millis(20))
                .cap(Duration::from_millis(300)),
        ),
        router,
    )
    .expect("agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chaos_every_message_once_in_order_no_reset() {
    let seed = env_u64("CHAOS_SEED", 14);
    let secs = env_u64("CHAOS_SECS", 10);
    let with_nats = env_u64("CHAOS_NATS", 1) == 1;
    let mut rng = Rng(seed);
    let mut nats = Nats::start("chaos");
    let dir = Dir::new("chaos");
    let url = nats.url();
    let mut hubs: Vec<ClusterHub> = (0..HUBS)
        .map(|i| {
            let name = format!("hub-{i}");
            let (process, port) = ClusterHub::start(&dir, &url, &name, 0);
            ClusterHub {
                name,
                port,
                process: Some(process),
            }
        })
        .collect();
    let urls: Vec<String> = hubs.iter().map(ClusterHub::url).collect();
    let received: Received = Arc::default();
    let origins: Origins = Arc::default();
    let ids: Vec<AgentId> = (0..AGENTS)
        .map(|i| AgentId::new("root:chaos", format!("agent-{i}")))
        .collect();
    let agents: Vec<Agent> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            // Each agent prefers another hub first, so all three carry agents.
            let mut mine = urls.clone();
            mine.rotate_left(i % HUBS);
            agent(id, &mine, &received, &origins)
        })
        .collect();
    for a in &agents {
        a.wait_connected(Duration::from_secs(20))
            .await
            .expect("connected");
    }
    let resets: Vec<_> = agents.iter().map(Agent::session_events).collect();
    let backend = Backend::connect(&url).await.expect("backend");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Up: each agent sends numbered events until the chaos ends.
    let senders: Vec<tokio::task::JoinHandle<Vec<Receipt>>> = agents
        .iter()
        .map(|a| {
            let (a, stop) = (a.clone(), stop.clone());
            tokio::spawn(async move {
                let mut receipts = Vec::new();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let receipt = a
                        .send(MessageType::Event, &serde_json::json!({"n": n}))
                        .await
                        .expect("accepted");
                    receipts.push(receipt);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                receipts
            })
        })
        .collect();
    // Down: a backend sends each agent numbered commands, retrying a failed publish
    // under the same message id (stored once) until NATS takes it.
    // Each command's stream sequence is kept: a missing one tells whether the stream
    // took it, and a sequence lower than the agent's previous one that the stream
    // lost messages it had acknowledged.
    let commanders: Vec<tokio::task::JoinHandle<Vec<u64>>> = ids
        .iter()
        .map(|id| {
            let (backend, id, stop) = (backend.clone(), id.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = seqs.len() as u64 + 1;
                    let msg_id = format!("{}-{n}", id.sync_target);
                    let seq = loop {
                        match backend
                            .send_with_id(
                                &id,
                                MessageType::Command,
                                &serde_json::json!({"n": n}),
                                &msg_id,
                            )
                            .await
                        {
                            Ok(seq) => break seq,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    };
                    if let Some(last) = seqs.last().filter(|last| **last >= seq) {
                        eprintln!(
                            "chaos: {id}'s command {n} stored as down seq {seq}, its previous as {last}: the stream went back"
                        );
                    }
                    seqs.push(seq);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                seqs
            })
        })
        .collect();

    // The schedule: one fault at a time, each undone before the next.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut step = 0;
    while tokio::time::Instant::now() < deadline {
        step += 1;
        tokio::time::sleep(rng.millis(300, 1200)).await;
        let h = usize::try_from(rng.below(HUBS as u64)).expect("small");
        match rng.below(if with_nats { 4 } else { 3 }) {
            0 => {
                eprintln!(
                    "chaos seed {seed} step {step}: SIGKILL {} and restart it",
                    hubs[h].name
                );
                hubs[h].signal("KILL");
                drop(hubs[h].process.take());
                tokio::time::sleep(rng.millis(200, 1000)).await;
                let (process, _) = ClusterHub::start(&dir, &url, &hubs[h].name, hubs[h].port);
                hubs[h].process = Some(process);
            }
            1 => {
                let hang = rng.millis(1500, 3500);
                eprintln!(
                    "chaos seed {seed} step {step}: SIGSTOP {} for {hang:?}",
                    hubs[h].name
                );
                hubs[h].signal("STOP");
                tokio::time::sleep(hang).await;
                hubs[h].signal("CONT");
            }
            3 => {
                eprintln!("chaos seed {seed} step {step}: restart nats-server");
                nats.restart();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => {
                eprintln!("chaos seed {seed} step {step}: calm");
                tokio::time::sleep(rng.millis(500, 1500)).await;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    // Every receipt, within one deadline for all; every agent's unresolved and failed
    // ones are reported before the test fails, so that causes can be told apart (one
    // agent or all, a tail or a hole, what each agent still holds).
    let mut sent_up = Vec::new();
    let mut receipt_faults = Vec::new();
    let receipts_by = tokio::time::Instant::now() + SETTLE;
    for ((s, id), a) in senders.into_iter().zip(&ids).zip(&agents) {
        let receipts = s.await.expect("sender");
        sent_up.push(receipts.len() as u64);
        let mut unresolved = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in receipts.into_iter().enumerate() {
            match tokio::time::timeout_at(receipts_by, r.delivered()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("#{}: {e}", i + 1)),
                Err(_) => unresolved.push(i + 1),
            }
        }
        if !unresolved.is_empty() || !failed.is_empty() {
            receipt_faults.push(format!(
                "{id}: {} unresolved (first {:?}, last {:?}), failed {:?} (first 8); the agent is {:?}, holding {:?}",
                unresolved.len(),
                unresolved.first(),
                unresolved.last(),
                failed.iter().take(8).collect::<Vec<_>>(),
                *a.state().borrow(),
                a.held(),
            ));
        }
    }
    for fault in &receipt_faults {
        eprintln!("chaos seed {seed}: receipts: {fault}");
    }
    assert!(
        receipt_faults.is_empty(),
        "seed {seed}: event receipts not all Ok: {receipt_faults:?}"
    );
    let mut sent_down = Vec::new();
    let mut down_seqs = Vec::new();
    for c in commanders {
        let seqs = c.await.expect("commander");
        sent_down.push(seqs.len() as u64);
        down_seqs.push(seqs);
    }

    // Down: every command once, in order, per agent.
    let all_arrived = || {
        let got = received.lock().expect("lock");
        ids.iter()
            .zip(&sent_down)
            .all(|(id, n)| got.get(id).map_or(0, Vec::len) as u64 >= *n)
    };
    let settle = tokio::time::Instant::now() + SETTLE;
    while !all_arrived() && tokio::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything delivered twice would come within this wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Missing commands still in the stream were not read; gone, they were deleted.
    let left = down_left(&url).await;
    {
        let got = received.lock().expect("lock");
        print_anomalies(seed, "down", &ids, &sent_down, &got);
        eprintln!("chaos seed {seed}: the down stream still holds {left}");
        let twice: Vec<_> = origins
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, from)| from.len() > 1)
            .map(|((id, n), from)| format!("{id} #{n} from down seqs {from:?}"))
            .collect();
        if !twice.is_empty() {
            eprintln!("chaos seed {seed}: commands received more than once: {twice:?}");
        }
        for ((id, n), seqs) in ids.iter().zip(&sent_down).zip(&down_seqs) {
            let mine: std::collections::HashSet<u64> =
                got.get(id).into_iter().flatten().copied().collect();
            let missing: Vec<String> = (1..=*n)
                .filter(|c| !mine.contains(c))
                .take(8)
                .map(|c| format!("#{c} (down seq {})", seqs[c as usize - 1]))
                .collect();
            if !missing.is_empty() {
                eprintln!("chaos seed {seed}: {id} misses {missing:?}");
            }
        }
        for (id, n) in ids.iter().zip(&sent_down) {
            let want: Vec<u64> = (1..=*n).collect();
            assert_eq!(
                got.get(id).cloned().unwrap_or_default(),
                want,
                "seed {seed}: {id}'s commands, each once and in order"
            );
        }
    }

    // Up: every event once, in order, per agent.
    let mut up = Box::pin(backend.messages("chaos", None).await.expect("consumer"));
    let mut events: HashMap<AgentId, Vec<u64>> = HashMap::new();
    let total: u64 = sent_up.iter().sum();
    let mut seen = 0u64;
    while seen < total {
        let msg = tokio::time::timeout(SETTLE, up.next())
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: {seen} of {total} events in the stream"))
            .expect("stream")
            .expect("message");
        if msg.kind == MessageType::Event {
            let v: serde_json::Value = msg.decode().expect("json");
            events
                .entry(msg.agent.clone())
                .or_default()
                .push(v["n"].as_u64().expect("n"));
            seen += 1;
        }
        msg.ack().await.expect("ack");
    }
    let more = tokio::time::timeout(Duration::from_secs(1), up.next()).await;
    print_anomalies(seed, "up", &ids, &sent_up, &events);
    assert!(more.is_err(), "seed {seed}: nothing stored twice: {more:?}");
    for (id, n) in ids.iter().zip(&sent_up) {
        let want: Vec<u64> = (1..=*n).collect();
        assert_eq!(
            events.get(id).cloned().unwrap_or_default(),
            want,
            "seed {seed}: {id}'s events, each once and in order"
        );
    }
    for (id, mut r) in ids.iter().zip(resets) {
        assert!(
            matches!(
                r.try_recv(),
                Err(tokio::sync::broadcast::error::TryRecvError::Empty)
            ),
            "seed {seed}: {id}'s session was reset"
        );
    }
    eprintln!(
        "chaos seed {seed}: {step} steps in {secs} s; {total} events up and {} commands down, each once and in order; no reset",
        sent_down.iter().sum::<u64>()
    );
    for a in agents {
        a.shutdown().await;
    }
    for h in &mut hubs {
        drop(h.process.take());
    }
}

/// How many messages the down stream holds, and its first and last sequence.
async fn down_left(url: &str) -> String {
    let Ok(client) = async_nats::connect(url).await else {
        return "(unknown: no connection)".into();
    };
    let js = async_nats::jetstream::new(client);
    match js.get_stream(tunnel_cluster::subject::DOWN_STREAM).await {
        Ok(mut stream) => match stream.info().await {
            Ok(i) => format!(
                "{} messages (seqs {} to {})",
                i.state.messages, i.state.first_sequence, i.state.last_sequence
            ),
            Err(e) => format!("(unknown: {e})"),
        },
        Err(e) => format!("(unknown: {e})"),
    }
}
