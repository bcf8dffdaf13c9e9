//! `tunnel-bench`: the load tool. Every scenario measures tunnel on loopback beside a
//! baseline written directly on tokio-tungstenite, prints its figures (and with `--json`
//! writes them to a file), and exits non-zero when its correctness check fails.
//!
//! The modules depend one way: `report` (figures, medians, progress), then `harness`
//! (hub process, placement, memory readings), then `baseline`, then one module per
//! scenario under `scenarios`.

mod baseline;
mod harness;
mod report;
mod scenarios;

use std::process::ExitCode;

use clap::{Args, Parser, ValueEnum};
use tunnel_proto::Format;

use crate::report::write_figures;

/// Many small buffers are allocated on one thread and freed on another, as in the
/// `tunnel` binary: the benchmarks measure with the allocator operators run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measures throughput, latency, memory and recovery of tunnel on loopback.
#[derive(Debug, Parser)]
#[command(name = "tunnel-bench", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

/// The codec of a `--profile` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Codec {
    /// MessagePack (binary frames).
    Msgpack,
    /// JSON (text frames).
    Json,
}

impl From<Codec> for Format {
    fn from(c: Codec) -> Format {
        match c {
            Codec::Msgpack => Format::MsgPack,
            Codec::Json => Format::Json,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Figures only: connection cuts are part of the scenarios, so errors only.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(report::colour_on_stderr())
        .init();
    if let Err(e) = harness::set_hub_binary(cli.args.hub_binary.clone()) {
        eprintln!("tunnel-bench: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnel-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Args)]
struct BenchArgs {
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
    /// Events per run of the cluster scenario.
    #[arg(long, default_value_t = 200_000)]
    cluster_messages: u64,
    /// Calls the cluster scenario times (one in flight).
    #[arg(long, default_value_t = 2_000)]
    calls: usize,
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
    profile: Option<Codec>,
    /// The `tunnel` binary the hub-process scenarios (idle, load, storm) start as
    /// `tunnel hub`; default: `tunnel` next to this binary.
    #[arg(long, value_name = "PATH")]
    hub_binary: Option<std::path::PathBuf>,
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
    /// A hub on a nats-server it starts: agent to stream beside a plain JetStream
    /// publisher, backend calls beside plain NATS requests (needs nats-server; run it
    /// by name).
    Cluster,
    /// `--agents` agents over three `tunnel hub --nats` processes: hub memory per agent,
    /// time until presence is right after one hub is killed (needs nats-server; run it
    /// by name).
    ClusterScale,
    /// Every scenario except the long `load` and `cluster` (run those by name).
    All,
}

async fn run(args: BenchArgs) -> Result<(), String> {
    let result = run_scenarios(&args).await;
    if let Some(path) = &args.json {
        write_figures(path, &format!("{:?}", args.scenario).to_lowercase())?;
        println!("\nfigures written to {}", path.display());
    }
    result
}

async fn run_scenarios(args: &BenchArgs) -> Result<(), String> {
    let all = args.scenario == Scenario::All;
    let profile = args.profile.map(Format::from);
    // These run their own pinned runtimes on their own threads.
    if all || args.scenario == Scenario::Throughput {
        tokio::task::block_in_place(|| {
            scenarios::throughput::run(args.messages, args.runs, profile)
        })?;
    }
    if all || args.scenario == Scenario::Latency {
        tokio::task::block_in_place(|| scenarios::latency::run(args.round_trips))?;
    }
    if all || args.scenario == Scenario::Session {
        tokio::task::block_in_place(|| scenarios::session::throughput(args.messages, args.runs))?;
        scenarios::session::resume_time(args.cuts).await?;
    }
    if all || args.scenario == Scenario::Stack {
        tokio::task::block_in_place(|| scenarios::stack::throughput(args.messages, args.runs))?;
        tokio::task::block_in_place(|| scenarios::stack::latency(args.round_trips))?;
        scenarios::stack::failover(args.kills).await?;
    }
    if all || args.scenario == Scenario::Sustained {
        tokio::task::block_in_place(|| {
            scenarios::sustained::run(args.sustained_messages, args.runs, profile)
        })?;
    }
    if all || args.scenario == Scenario::Idle {
        scenarios::idle::run(args.agents).await?;
    }
    if all || args.scenario == Scenario::Fanout {
        scenarios::fanout::run(args.fanout_agents, args.per_agent, args.runs).await?;
    }
    if all || args.scenario == Scenario::Chaos {
        scenarios::chaos::run(args.chaos_seconds, args.seed).await?;
    }
    if all || args.scenario == Scenario::Storm {
        scenarios::storm::run(args.agents, args.accept_rate).await?;
    }
    if args.scenario == Scenario::Cluster {
        scenarios::cluster::run(args.cluster_messages, args.runs, args.calls).await?;
    }
    if args.scenario == Scenario::ClusterScale {
        scenarios::cluster_scale::run(args.agents).await?;
    }
    if args.scenario == Scenario::Load {
        scenarios::load::run(args.agents, args.seconds).await?;
    }
    Ok(())
}
