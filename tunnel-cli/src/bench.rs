//! `tunnel bench`: throughput, latency and idle memory, measured on loopback, each
//! beside a baseline written directly on tokio-tungstenite in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tower::{BoxError, service_fn};
use tunnel_proto::messages::{Event, Gvr, ObjectRef};
use tunnel_proto::{Format, MessageType, Payload};
use tunnel_router::{Hub, Inbound, Router};
use tunnel_transport::{
    AgentId, AllowAll, ClientConfig, ConnectionSender, Connector, ServerConfig, WsConnector,
    WsListener,
};

use crate::demo::thousands;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Which scenario to run.
    #[arg(value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Messages per throughput run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// Agents for the idle, load and storm scenarios.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Agents the fanout scenario sends to.
    #[arg(long, default_value_t = 1_000)]
    fanout_agents: usize,
    /// Events the fanout scenario sends to each agent.
    #[arg(long, default_value_t = 1_000)]
    per_agent: u64,
    /// How long the load scenario runs, in seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// How long the chaos scenario sends, in seconds.
    #[arg(long, default_value_t = 20)]
    chaos_seconds: u64,
    /// The hub's accept rate (connections per second) in the storm scenario; default
    /// none.
    #[arg(long)]
    accept_rate: Option<f64>,
    /// Seed of the chaos scenario's cut intervals.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Events per run of the sustained scenario.
    #[arg(long, default_value_t = 5_000_000)]
    sustained_messages: u64,
    /// Also write every figure as JSON to this file (for comparing runs).
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// Runs per rate figure (throughput, session, stack, sustained, fanout); the median
    /// is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Connection cuts measured by the session scenario.
    #[arg(long, default_value_t = 40)]
    cuts: usize,
    /// Hub kills measured by the stack scenario's failover.
    #[arg(long, default_value_t = 40)]
    kills: usize,
    /// Only run tunnel's side of the throughput scenario, or the sustained scenario's full
    /// stack, with this codec (for profiling).
    #[arg(long, value_enum, hide = true)]
    profile: Option<crate::Codec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// One-way messages per second, agent to hub.
    Throughput,
    /// Request/reply round trips, p50 and p99.
    Latency,
    /// Hub memory per idle agent connection.
    Idle,
    /// Resumable sessions: throughput beside transport-only, cut-to-resume time,
    /// replay memory.
    Session,
    /// The router's tower stack: throughput and latency with layers, failover time.
    Stack,
    /// The hub sending to many agents (`--fanout-agents`), aggregate messages/s.
    Fanout,
    /// Many agents (`--agents`) each sending a status per second for `--seconds`: hub
    /// backlog and memory.
    Load,
    /// Many agents connected, the hub process killed and restarted: time until all are
    /// back, connect attempts per second.
    Storm,
    /// A fault proxy cutting the connection under load both ways: lost and duplicated.
    Chaos,
    /// One connection through the full stack for longer runs, MessagePack and JSON.
    Sustained,
    /// Every scenario except the long `load` (run that one by name).
    All,
}

pub(crate) async fn run(args: BenchArgs) -> Result<(), String> {
    let result = run_scenarios(&args).await;
    if let Some(path) = &args.json {
        write_figures(path, &args)?;
        println!("\nfigures written to {}", path.display());
    }
    result
}

async fn run_scenarios(args: &BenchArgs) -> Result<(), String> {
    let all = args.scenario == Scenario::All;
    // These run their own pinned runtimes on their own threads.
    if all || args.scenario == Scenario::Throughput {
        tokio::task::block_in_place(|| throughput(args))?;
    }
    if all || args.scenario == Scenario::Latency {
        tokio::task::block_in_place(|| latency(args))?;
    }
    if all || args.scenario == Scenario::Session {
        tokio::task::block_in_place(|| crate::session_bench::throughput(args.messages, args.runs))?;
        crate::session_bench::resume_time(args.cuts).await?;
    }
    if all || args.scenario == Scenario::Stack {
        tokio::task::block_in_place(|| crate::stack_bench::throughput(args.messages, args.runs))?;
        tokio::task::block_in_place(|| crate::stack_bench::latency(args.round_trips))?;
        crate::stack_bench::failover(args.kills).await?;
    }
    if all || args.scenario == Scenario::Sustained {
        tokio::task::block_in_place(|| {
            crate::load_bench::sustained(args.sustained_messages, args.runs, args.profile)
        })?;
    }
    if all || args.scenario == Scenario::Idle {
        idle(args).await?;
    }
    if all || args.scenario == Scenario::Fanout {
        crate::load_bench::fanout(args.fanout_agents, args.per_agent, args.runs).await?;
    }
    if all || args.scenario == Scenario::Chaos {
        crate::load_bench::chaos(args.chaos_seconds, args.seed).await?;
    }
    if all || args.scenario == Scenario::Storm {
        crate::load_bench::storm(args.agents, args.accept_rate).await?;
    }
    if args.scenario == Scenario::Load {
        crate::load_bench::load(args.agents, args.seconds).await?;
    }
    Ok(())
}

/// One measured figure, for `--json`.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    scenario: String,
    name: String,
    value: f64,
    unit: String,
}

static FIGURES: std::sync::Mutex<Vec<Figure>> = std::sync::Mutex::new(Vec::new());

/// Keeps a figure for `--json` (scenarios print their own tables as well).
pub(crate) fn figure(scenario: &str, name: &str, value: f64, unit: &str) {
    FIGURES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Figure {
            scenario: scenario.into(),
            name: name.into(),
            value,
            unit: unit.into(),
        });
}

fn write_figures(path: &std::path::Path, args: &BenchArgs) -> Result<(), String> {
    let figures = FIGURES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let doc = serde_json::json!({
        "tool": format!("tunnel {}", env!("CARGO_PKG_VERSION")),
        "scenario": format!("{:?}", args.scenario).to_lowercase(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "figures": figures,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------
// Throughput

/// The original design's envelope: uuid string id, RFC 3339 timestamp, a payload that
/// the sender serializes from its type and the receiver parses into a JSON value.
#[derive(Debug, Serialize, Deserialize)]
struct OriginalEnvelope<P> {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    timestamp: String,
    payload: Option<P>,
    error: Option<String>,
}

pub(crate) fn sample_event() -> Event {
    Event {
        event_type: "Normal".into(),
        reason: "ScalingReplicaSet".into(),
        message: "Scaled up replica set web-7d4b9c8f5 to 3".into(),
        regarding: Some(ObjectRef {
            gvr: Gvr::new("apps", "v1", "deployments"),
            namespace: Some("default".into()),
            name: "web".into(),
        }),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn throughput(args: &BenchArgs) -> Result<(), String> {
    let n = args.messages;
    if let Some(codec) = args.profile {
        let rate = tunnel_throughput(n, codec.into())?;
        println!("tunnel {:?}: {} msg/s", codec, thousands(rate as u64));
        return Ok(());
    }
    println!(
        "throughput: {} one-way messages agent -> hub per run, median of {} runs, loopback;\n  client on core 0 and server on core 1, each a single-thread runtime",
        thousands(n),
        args.runs
    );
    let mut typed = Vec::new();
    let mut untyped = Vec::new();
    for _ in 0..args.runs {
        untyped.push(raw_throughput(n, false)?);
        typed.push(raw_throughput(n, true)?);
    }
    let baseline = median(typed);
    let untyped = median(untyped);
    figure("throughput", "baseline_rate", baseline, "msg/s");
    figure("throughput", "baseline_value_rate", untyped, "msg/s");
    println!(
        "  {:<58} {:>10} msg/s  (the bars are against this one)",
        "baseline: tokio-tungstenite + serde_json, payload to its struct",
        thousands(baseline as u64)
    );
    println!(
        "  {:<58} {:>10} msg/s",
        "baseline: the same, payload to a serde_json::Value",
        thousands(untyped as u64)
    );
    for (format, bar) in [(Format::Json, 1.5), (Format::MsgPack, 2.0)] {
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            runs.push(tunnel_throughput(n, format)?);
        }
        let rate = median(runs);
        let ratio = rate / baseline;
        figure("throughput", &format!("{format}_rate"), rate, "msg/s");
        figure("throughput", &format!("{format}_vs_baseline"), ratio, "x");
        let verdict = if ratio >= bar { "meets" } else { "BELOW" };
        println!(
            "  {:<58} {:>10} msg/s  {ratio:.2}x baseline ({verdict} the {bar}x bar), {:.2}x the Value baseline",
            format!("tunnel agent -> hub, {format}"),
            thousands(rate as u64),
            rate / untyped,
        );
    }
    // The cost of recording metrics on the hot path, measured side by side: at least
    // five pairs, alternating which goes first, so drift on the machine (run-to-run
    // noise is about 5% here) falls on both sides alike.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 0..args.runs.max(5) {
        for metrics in [run % 2 == 1, run % 2 == 0] {
            let rate = tunnel_throughput_with(n, Format::MsgPack, metrics)?;
            if metrics { &mut on } else { &mut off }.push(rate);
        }
    }
    let (off, on) = (median(off), median(on));
    let ratio = on / off;
    figure("throughput", "msgpack_metrics_off_rate", off, "msg/s");
    figure("throughput", "msgpack_metrics_on_rate", on, "msg/s");
    figure("throughput", "metrics_on_vs_off", ratio, "x");
    println!(
        "  {:<58} {:>10} msg/s  metrics off (median of {} alternating pairs)",
        "tunnel agent -> hub, msgpack",
        thousands(off as u64),
        args.runs.max(5)
    );
    println!(
        "  {:<58} {:>10} msg/s  {ratio:.2}x metrics off ({} the 0.95x bar)",
        "  the same with OpenTelemetry metrics on both sides",
        thousands(on as u64),
        if ratio >= 0.95 { "meets" } else { "BELOW" }
    );
    Ok(())
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

async fn raw_sink_server(
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

async fn raw_source_client(
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

/// Client on core 0, server on core 1, each a single-thread runtime: as if agent and hub
/// ran on two machines. Both the baseline and tunnel are measured this way.
pub(crate) const THROUGHPUT_PLACEMENT: Placement = Placement {
    name: "cross core",
    client_core: 0,
    server_core: 1,
};

pub(crate) fn tunnel_throughput(n: u64, format: Format) -> Result<f64, String> {
    tunnel_throughput_with(n, format, false)
}

/// With `metrics`, each side records into its own OpenTelemetry SDK meter provider
/// (what `/metrics` reads), as two processes would.
pub(crate) fn tunnel_throughput_with(n: u64, format: Format, metrics: bool) -> Result<f64, String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    two_sided(
        &THROUGHPUT_PLACEMENT,
        move |url_tx| Box::pin(tunnel_sink_server(url_tx, done_tx, n, metrics)),
        move |url| Box::pin(tunnel_source_client(url, done_rx, n, format, metrics)),
    )
}

/// A connection config recording into a fresh Prometheus-backed meter provider, or the
/// no-op default.
fn connection_metrics(
    metrics: bool,
) -> (
    tunnel_transport::ConnectionConfig,
    Option<tunnel_metrics::prometheus::PrometheusMetrics>,
) {
    let config = tunnel_transport::ConnectionConfig::default();
    if !metrics {
        return (config, None);
    }
    match tunnel_metrics::prometheus::PrometheusMetrics::new() {
        Ok(m) => (config.recorder(m.recorder()), Some(m)),
        Err(_) => (config, None),
    }
}

async fn tunnel_sink_server(
    url_tx: mpsc::Sender<String>,
    done: tokio::sync::oneshot::Sender<Instant>,
    n: u64,
    metrics: bool,
) {
    let (router, all_in) = counting_router(n);
    let (connection, _metrics) = connection_metrics(metrics);
    let config = ServerConfig::new(AllowAll).connection(connection);
    let Ok(hub) = Hub::bind("127.0.0.1:0", config, router).await else {
        return;
    };
    serve_until_counted(hub, url_tx, done, all_in).await;
}

/// A hub with resumable sessions on an ephemeral loopback port, open to any agent.
pub(crate) async fn resumable_hub(router: Router) -> Result<Hub, String> {
    Hub::bind_resumable(
        "127.0.0.1:0",
        ServerConfig::new(AllowAll),
        router,
        tunnel_router::HubSessions::default(),
    )
    .await
    .map_err(|e| e.to_string())
}

/// A router that counts events and notifies once `n` have arrived.
pub(crate) fn counting_router(n: u64) -> (Router, Arc<Notify>) {
    let received = Arc::new(AtomicU64::new(0));
    let all_in = Arc::new(Notify::new());
    let notify = all_in.clone();
    let router = Router::new().route(
        MessageType::Event,
        service_fn(move |_: Inbound| {
            if received.fetch_add(1, Ordering::Relaxed) + 1 == n {
                notify.notify_one();
            }
            std::future::ready(Ok::<_, BoxError>(()))
        }),
    );
    (router, all_in)
}

/// Reports the hub's URL, reports when `all_in` fires, lets the agent leave, stops.
pub(crate) async fn serve_until_counted(
    hub: Hub,
    url_tx: mpsc::Sender<String>,
    done: tokio::sync::oneshot::Sender<Instant>,
    all_in: Arc<Notify>,
) {
    let _ = url_tx.send(hub.url().unwrap_or_default()).await;
    if tokio::time::timeout(Duration::from_secs(120), all_in.notified())
        .await
        .is_ok()
    {
        let _ = done.send(Instant::now());
    }
    for _ in 0..1000 {
        if hub.agents().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hub.shutdown().await;
}

async fn tunnel_source_client(
    url: String,
    done: tokio::sync::oneshot::Receiver<Instant>,
    n: u64,
    format: Format,
    metrics: bool,
) -> Result<f64, String> {
    let (connection, _metrics) = connection_metrics(metrics);
    let config = ClientConfig::new(AgentId::new("bench", "agent"))
        .format(format)
        .connection(connection);
    let conn = WsConnector::new(config)
        .connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, mut receiver) = conn.split();
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = receiver.recv().await {} });
    let event = sample_event();
    let started = Instant::now();
    for _ in 0..n {
        let env = sender
            .envelope(MessageType::Event)
            .with_payload(Payload::encode(format, &event).map_err(|e| e.to_string())?);
        sender.send(&env).await.map_err(|e| e.to_string())?;
    }
    let finished = done
        .await
        .map_err(|_| "not every message arrived".to_string())?;
    let rate = n as f64 / (finished - started).as_secs_f64();
    sender.close(tunnel_proto::CloseCode::NORMAL, "done").await;
    let _ = drain.await;
    Ok(rate)
}

// ---------------------------------------------------------------------------------
// Latency

pub(crate) struct Placement {
    pub(crate) name: &'static str,
    pub(crate) client_core: usize,
    pub(crate) server_core: usize,
}

/// Pins the calling thread to `core` and builds a single-thread runtime for it (its
/// `block_on` runs on this thread).
fn pinned_runtime(core: usize) -> Result<tokio::runtime::Runtime, String> {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    if let Some(id) = ids.get(core % ids.len().max(1)) {
        core_affinity::set_for_current(*id);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Runs `server` on its own thread and runtime pinned to one core, and `client` on
/// another pinned to another (or the same) core.
pub(crate) fn two_sided<S, C, T>(placement: &Placement, server: S, client: C) -> Result<T, String>
where
    S: FnOnce(mpsc::Sender<String>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
        + Send
        + 'static,
    C: FnOnce(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>>>>
        + Send
        + 'static,
    T: Send + 'static,
{
    let (url_tx, mut url_rx) = mpsc::channel(1);
    let server_core = placement.server_core;
    let server_thread = std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            if let Ok(rt) = pinned_runtime(server_core) {
                rt.block_on(server(url_tx));
            }
        })
        .map_err(|e| e.to_string())?;
    let client_core = placement.client_core;
    let result = std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let rt = pinned_runtime(client_core)?;
            rt.block_on(async move {
                let url = url_rx.recv().await.ok_or("server did not start")?;
                client(url).await
            })
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "client thread panicked".to_string())?;
    let _ = server_thread.join();
    result
}

/// Both sides on one core, and (with a second core) on two: a latency figure is
/// reported for each, since a cross-core wake-up dominates a loopback round trip.
pub(crate) fn latency_placements() -> Vec<Placement> {
    let cores = core_affinity::get_core_ids().map_or(1, |c| c.len());
    let mut placements = vec![Placement {
        name: "same core",
        client_core: 0,
        server_core: 0,
    }];
    if cores > 1 {
        placements.push(THROUGHPUT_PLACEMENT);
    }
    placements
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn latency(args: &BenchArgs) -> Result<(), String> {
    let n = args.round_trips;
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

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Listens on a loopback port, reports its URL, and upgrades the first connection with
/// tokio-tungstenite's defaults.
async fn accept_raw(url_tx: mpsc::Sender<String>) -> Option<WebSocketStream<TcpStream>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = listener.local_addr().ok()?;
    url_tx.send(format!("ws://{addr}/")).await.ok()?;
    let (tcp, _) = listener.accept().await.ok()?;
    let _ = tcp.set_nodelay(true);
    tokio_tungstenite::accept_async(tcp).await.ok()
}

/// Connects to `url` with tokio-tungstenite's defaults.
async fn connect_raw(url: String) -> Result<WebSocketStream<TcpStream>, String> {
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

// ---------------------------------------------------------------------------------
// Idle memory

pub(crate) fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc status".to_string())
}

/// Hub RSS per idle agent, for a hub without sessions (the connection alone: the bar)
/// and with sessions (what the session state adds).
async fn idle(args: &BenchArgs) -> Result<(), String> {
    let bare = idle_one(args.agents, false).await?;
    let with_sessions = idle_one(args.agents, true).await?;
    let verdict = if bare <= 16.0 { "meets" } else { "ABOVE" };
    println!("  connection only: {bare:.1} KiB per idle agent ({verdict} the 16 KiB bar)");
    figure("idle", "hub_rss_per_agent", bare, "KiB");
    figure(
        "idle",
        "hub_rss_per_agent_with_sessions",
        with_sessions,
        "KiB",
    );
    println!(
        "  with sessions:   {with_sessions:.1} KiB per idle agent (session state adds {:.1} KiB; replay buffers are empty when idle and bounded by 16 MiB each)",
        with_sessions - bare
    );
    Ok(())
}

async fn idle_one(n: usize, sessions: bool) -> Result<f64, String> {
    let hub = crate::load_bench::HubProcess::start(sessions).await?;
    let pid = hub.pid()?;
    let url = hub.url();
    // Warm the hub with one connection so one-off allocations are in the baseline.
    let warm = connect_idle(&url, usize::MAX).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = hub.rss_kib()?;
    println!(
        "\nidle: {} idle agents on one hub process (pid {pid}, sessions {}), hub RSS before {} KiB",
        thousands(n as u64),
        if sessions { "on" } else { "off" },
        thousands(before)
    );
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let (tx, mut rx) = mpsc::channel(256);
    let url2 = url.clone();
    let dialer = tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(128));
        for i in 0..n {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let (tx, url) = (tx.clone(), url2.clone());
            tokio::spawn(async move {
                let r = connect_idle(&url, i).await;
                drop(permit);
                let _ = tx.send(r).await;
            });
        }
    });
    let mut failures = 0;
    while conns.len() + failures < n {
        match rx.recv().await {
            Some(Ok(c)) => conns.push(c),
            Some(Err(e)) => {
                failures += 1;
                if failures == 1 {
                    eprintln!("  first connection failure: {e}");
                }
            }
            None => break,
        }
    }
    let _ = dialer.await;
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = hub.rss_kib()?;
    let per_agent = (after.saturating_sub(before)) as f64 / conns.len().max(1) as f64;
    println!(
        "  connected {} agents in {:.1}s ({} failed); hub RSS after {} KiB",
        thousands(conns.len() as u64),
        connect_time.as_secs_f64(),
        failures,
        thousands(after)
    );
    drop(conns);
    hub.stop().await;
    // Let the closed sockets' ports settle before a second run.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(per_agent)
}

/// An idle agent: an established connection whose receiver is kept (so the socket
/// stays open) but not polled.
async fn connect_idle(url: &str, i: usize) -> Result<tunnel_transport::Connection, String> {
    let config = ClientConfig::new(AgentId::new("bench", format!("idle-{i}")))
        .token(Some(crate::load_bench::TOKEN.into()));
    WsConnector::new(config)
        .connect(url)
        .await
        .map_err(|e| e.to_string())
}
