//! `tunnel demo`: an embedded hub and a few agents on loopback.

use crate::telemetry::CapturedLog;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use tower::{BoxError, service_fn};
use tunnel_metrics::prometheus::PrometheusMetrics;
use tunnel_proto::messages::{Command, Event, Gvr, Resource, ResourceOp, Status};
use tunnel_proto::{Format, MessageType, Payload};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::{Agent, AgentConfig, Hub, Inbound, Request, Router};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{
    AgentId, ClientConfig, ConnectionConfig, ServerConfig, SharedToken, WsConnector,
};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Number of agents (1 to 100). Odd-numbered agents use JSON, the others MessagePack.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// How long to exchange messages, in seconds (2 to 600).
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// Messages per second each agent sends to the hub (1 to 1,000,000).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
}

/// Tells the traffic loops to stop.
#[derive(Debug, Default)]
struct StopFlag(std::sync::atomic::AtomicBool);

impl StopFlag {
    fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Stats {
    sent_to_hub: AtomicU64,
    received_by_hub: AtomicU64,
    sent_to_agents: AtomicU64,
    received_by_agents: AtomicU64,
    replies_received: AtomicU64,
    send_errors: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    /// The last demo sequence number seen on each stream (sender -> receiver).
    last_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// The header carrying each stream's own count, so receivers can spot a duplicate or
/// a gap independently of the protocol's sequence numbers.
const DEMO_SEQ: &str = "x-demo-seq";

impl Stats {
    /// Checks one arriving message of `stream` against the last one seen.
    fn arrived(&self, stream: String, env: &tunnel_proto::Envelope, delivered: &AtomicU64) {
        let Some(n) = env
            .headers
            .get(DEMO_SEQ)
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        let mut last = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.entry(stream).or_insert(0);
        if n <= *prev {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            if n != *prev + 1 {
                self.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            *prev = n;
            delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Stats {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints the log lines captured since the last call as lines of the table.
fn print_log(log: &CapturedLog, started: Instant) {
    let (lines, dropped) = log.take();
    let at = started.elapsed().as_secs_f64();
    for line in lines {
        println!("[{at:>4.1}s] log: {}", line.trim());
    }
    if dropped > 0 {
        println!("[{at:>4.1}s] log: ({dropped} more lines dropped)");
    }
}

/// A handler that counts the messages it gets in one of the stats' counters.
fn counting(
    stats: Arc<Stats>,
    counter: fn(&Stats) -> &AtomicU64,
) -> impl tower::Service<
    Inbound,
    Response = (),
    Error = BoxError,
    Future = std::future::Ready<Result<(), BoxError>>,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |_: Inbound| {
        counter(&stats).fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(()))
    })
}

/// Runs the demo; log lines written to `log` are shown as lines of its table.
pub(crate) async fn run(args: DemoArgs, log: CapturedLog) -> Result<(), String> {
    if !(1..=100).contains(&args.agents)
        || !(2..=600).contains(&args.seconds)
        || !(1..=1_000_000).contains(&args.rate)
    {
        return Err("--agents must be 1..=100, --seconds 2..=600, --rate 1..=1000000".into());
    }
    let stats = Arc::new(Stats::default());
    let token = uuid::Uuid::new_v4().simple().to_string();
    let keepalive = ConnectionConfig::default()
        .ping_interval(Duration::from_secs(1))
        .pong_timeout(Duration::from_secs(2));

    let hub_metrics = PrometheusMetrics::new().map_err(|e| e.to_string())?;
    let at_hub = stats.clone();
    let hub_router = Router::new().fallback(service_fn(move |msg: Inbound| {
        at_hub.arrived(
            format!("{}->hub", msg.agent()),
            &msg.envelope,
            &at_hub.received_by_hub,
        );
        std::future::ready(Ok::<_, BoxError>(()))
    }));
    let hub = Hub::bind(
        "127.0.0.1:0",
        ServerConfig::new(SharedToken::new(token.clone()))
            .connection(keepalive.clone().recorder(hub_metrics.recorder())),
        hub_router,
    )
    .await
    .map_err(|e| e.to_string())?;
    let hub_addr = hub.local_addr().ok_or("hub has no address")?;
    let proxy = FaultProxy::start(hub_addr)
        .await
        .map_err(|e| e.to_string())?;

    let on_command = stats.clone();
    let agent_router = Router::new()
        .route(
            MessageType::Command,
            service_fn(move |msg: Inbound| {
                on_command.arrived(
                    format!("hub->{}", msg.agent()),
                    &msg.envelope,
                    &on_command.received_by_agents,
                );
                // The command is a request: this is its reply.
                std::future::ready(
                    msg.encode(&serde_json::json!({"ok": true}))
                        .map_err(BoxError::from),
                )
            }),
        )
        .fallback(counting(stats.clone(), |s| &s.received_by_agents));

    println!("tunnel demo: hub on ws://{hub_addr}/");
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let id = AgentId::new("root:demo", format!("cluster-{i}"));
        let format = if i % 2 == 1 {
            Format::Json
        } else {
            Format::MsgPack
        };
        let url = if i == 0 {
            proxy.ws_url()
        } else {
            format!("ws://{hub_addr}/")
        };
        let config = ClientConfig::new(id.clone())
            .token(Some(token.clone()))
            .format(format)
            .connection(keepalive.clone());
        let backoff = BackoffConfig::default()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(2));
        let agent = Agent::start(
            WsConnector::new(config),
            AgentConfig::new(&url).backoff(backoff),
            agent_router.clone(),
        )
        .map_err(|e| e.to_string())?;
        let via = if i == 0 { " through a fault proxy" } else { "" };
        println!("  agent {id} ({format}){via}");
        agents.push((id, agent));
    }
    for (id, agent) in &agents {
        agent
            .wait_connected(Duration::from_secs(10))
            .await
            .map_err(|e| format!("{id}: {e}"))?;
    }

    let stop = Arc::new(StopFlag::default());
    let mut workers = Vec::new();
    for (id, agent) in &agents {
        workers.push(tokio::spawn(agent_traffic(
            id.clone(),
            agent.clone(),
            args.rate,
            stats.clone(),
            stop.clone(),
        )));
    }
    workers.push(tokio::spawn(hub_traffic(
        hub.clone(),
        agents.iter().map(|(id, _)| id.clone()).collect(),
        stats.clone(),
        stop.clone(),
    )));

    let started = Instant::now();
    let cut_at = Duration::from_secs(args.seconds) / 2;
    let mut cut_done = false;
    let mut last_to_hub = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        tokio::select! {
            _ = ticker.tick() => {
                let to_hub = Stats::get(&stats.received_by_hub);
                let connected = agents.iter().filter(|(_, a)| a.sender().is_some_and(|s| !s.is_closed())).count();
                let reconnects: u64 = agents.iter().map(|(_, a)| a.reconnects()).sum();
                println!(
                    "[{:>4.1}s] agents {connected}/{} connected | to hub {} ({}/s) | to agents {} | replies {} | reconnects {reconnects} | send errors {}",
                    started.elapsed().as_secs_f64(),
                    agents.len(),
                    thousands(to_hub),
                    thousands(to_hub - last_to_hub),
                    thousands(Stats::get(&stats.received_by_agents)),
                    thousands(Stats::get(&stats.replies_received)),
                    thousands(Stats::get(&stats.send_errors)),
                );
                last_to_hub = to_hub;
                print_log(&log, started);
            }
            () = tokio::time::sleep(cut_at.saturating_sub(started.elapsed())), if !cut_done => {
                cut_done = true;
                let cut = proxy.cut_all();
                println!("[{:>4.1}s] cutting {}'s TCP connection ({cut} cut)", started.elapsed().as_secs_f64(), agents[0].0);
            }
        }
    }
    print_log(&log, started);
    stop.stop();
    for w in workers {
        let _ = w.await;
    }
    // Let what is in flight (and anything replayed) arrive: at most 10 s.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(10)
        && (Stats::get(&stats.received_by_hub) < Stats::get(&stats.sent_to_hub)
            || Stats::get(&stats.received_by_agents) < Stats::get(&stats.sent_to_agents))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reconnects: u64 = agents.iter().map(|(_, a)| a.reconnects()).sum();
    let all_connected = agents
        .iter()
        .all(|(_, a)| a.sender().is_some_and(|s| !s.is_closed()));

    let sent_up = Stats::get(&stats.sent_to_hub);
    let got_up = Stats::get(&stats.received_by_hub);
    let sent_down = Stats::get(&stats.sent_to_agents);
    let got_down = Stats::get(&stats.received_by_agents);
    let duplicates = Stats::get(&stats.duplicates);
    let out_of_order = Stats::get(&stats.out_of_order);
    let lost = sent_up.saturating_sub(got_up) + sent_down.saturating_sub(got_down);
    println!("\nsummary after {elapsed:.1}s");
    println!(
        "  agents -> hub : {} sent, {} delivered ({:.0} msg/s)",
        thousands(sent_up),
        thousands(got_up),
        got_up as f64 / elapsed
    );
    println!(
        "  hub -> agents : {} commands sent, {} delivered, {} replies received",
        thousands(sent_down),
        thousands(got_down),
        thousands(Stats::get(&stats.replies_received))
    );
    println!("  duplicated    : {}", thousands(duplicates));
    println!("  lost          : {}", thousands(lost));
    println!("  out of order  : {}", thousands(out_of_order));
    println!(
        "  reconnects    : {reconnects} (sessions resumed: nothing was resent by the application)"
    );
    println!(
        "  send errors   : {}",
        thousands(Stats::get(&stats.send_errors))
    );
    println!("\n  connected agents (as `tunnel status` shows them):");
    for line in crate::status::render(&hub.agent_statuses(), None).lines() {
        println!("  {line}");
    }
    println!("\n  hub metrics (Prometheus, as /metrics serves them; non-zero series, no buckets):");
    for line in metrics_summary(&hub_metrics.render()) {
        println!("    {line}");
    }

    for (_, agent) in &agents {
        agent.shutdown().await;
    }
    hub.shutdown().await;
    if got_up == 0 || got_down == 0 {
        return Err("no messages were delivered".into());
    }
    if reconnects == 0 || !all_connected {
        return Err("the cut agent did not come back".into());
    }
    if duplicates + lost + out_of_order > 0 {
        return Err("messages were lost, duplicated or reordered".into());
    }
    Ok(())
}

/// The interesting lines of a Prometheus exposition: tunnel series with a non-zero
/// value, without histogram buckets and scope labels.
fn metrics_summary(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("tunnel_") && !l.contains("_bucket{"))
        .filter(|l| l.rsplit(' ').next().is_some_and(|v| v != "0"))
        .map(|l| {
            l.replace(",otel_scope_name=\"tunnel\"", "")
                .replace("{otel_scope_name=\"tunnel\"}", "")
                .replace("otel_scope_name=\"tunnel\",", "")
        })
        .collect()
}

async fn agent_traffic(
    id: AgentId,
    agent: Agent,
    rate: u64,
    stats: Arc<Stats>,
    stop: Arc<StopFlag>,
) {
    let gvr = Gvr::new("apps", "v1", "deployments");
    let per_tick = rate.div_ceil(100);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut n: u64 = 0;
    while !stop.is_set() {
        ticker.tick().await;
        // The session accepts messages while disconnected too; they are replayed.
        let format = agent
            .sender()
            .map_or(tunnel_proto::Format::MsgPack, |s| s.info().format);
        for _ in 0..per_tick {
            n += 1;
            let name = format!("web-{}", n % 16);
            let (kind, payload) = match n % 3 {
                0 => (
                    MessageType::Resource,
                    Payload::encode(
                        format,
                        &Resource {
                            op: ResourceOp::Update,
                            gvr: gvr.clone(),
                            namespace: Some("default".into()),
                            name,
                            object: Some(serde_json::json!({"spec": {"replicas": n % 5}})),
                        },
                    ),
                ),
                1 => (
                    MessageType::Status,
                    Payload::encode(
                        format,
                        &Status {
                            gvr: gvr.clone(),
                            namespace: Some("default".into()),
                            name,
                            status: serde_json::json!({"readyReplicas": n % 5}),
                            observed_generation: Some(i64::try_from(n).unwrap_or(i64::MAX)),
                        },
                    ),
                ),
                _ => (
                    MessageType::Event,
                    Payload::encode(
                        format,
                        &Event {
                            event_type: "Normal".into(),
                            reason: "Synced".into(),
                            message: format!("{} synced {name}", id.sync_target),
                            regarding: None,
                        },
                    ),
                ),
            };
            let Ok(payload) = payload else { continue };
            let env = tunnel_proto::Envelope::new(0, kind, tunnel_transport::unix_millis())
                .with_header(DEMO_SEQ, n.to_string())
                .with_payload(payload);
            match agent.send_envelope(env).await {
                Ok(_) => stats.sent_to_hub.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.send_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

async fn hub_traffic(hub: Hub, agents: Vec<AgentId>, stats: Arc<Stats>, stop: Arc<StopFlag>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut n: u64 = 0;
    while !stop.is_set() {
        ticker.tick().await;
        n += 1;
        for id in &agents {
            let command = Command::new("sync").arg("round", n);
            let Ok(payload) = Payload::encode(tunnel_proto::Format::MsgPack, &command) else {
                continue;
            };
            let env = tunnel_proto::Envelope::new(
                0,
                MessageType::Command,
                tunnel_transport::unix_millis(),
            )
            .with_header(DEMO_SEQ, n.to_string())
            .with_payload(payload)
            .expecting_reply();
            // A request: the agent's reply comes back through its session, even across
            // the forced disconnect.
            let request = Request::from_envelope(env).timeout(Duration::from_secs(10));
            stats.sent_to_agents.fetch_add(1, Ordering::Relaxed);
            let (hub, id, stats) = (hub.clone(), id.clone(), stats.clone());
            tokio::spawn(async move {
                match hub.call(&id, request).await {
                    Ok(_) => stats.replies_received.fetch_add(1, Ordering::Relaxed),
                    Err(_) => stats.send_errors.fetch_add(1, Ordering::Relaxed),
                };
            });
        }
    }
}
