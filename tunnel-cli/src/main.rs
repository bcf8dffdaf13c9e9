//! The `tunnel` command: runs a hub, an agent, the demo, `status` and `conformance`.
//! The benchmarks are the separate `tunnel-bench` binary.

mod conformance;
mod demo;
mod run;
mod status;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Many small buffers are allocated on one thread and freed on another (encoded frames
/// cross from senders to the writer task); mimalloc handles that far better than the
/// system allocator. It is built without transparent huge pages (the workspace
/// manifest says why).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tunnel_proto::Format;

/// A persistent, self-healing message tunnel over WebSocket between agents and a hub.
#[derive(Debug, Parser)]
#[command(name = "tunnel", version, about, long_about = None)]
struct Cli {
    /// Log filter in RUST_LOG syntax (for example `info` or `tunnel_router=debug`).
    /// Defaults to RUST_LOG, else `info` (`warn` for demo, `error` for bench).
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Export traces and metrics over OTLP/gRPC to this collector (for example
    /// `http://127.0.0.1:4317`); needs a build with the `otlp` feature.
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub that accepts agents.
    Hub(run::HubArgs),
    /// Run an agent that stays connected to a hub.
    Agent(run::AgentArgs),
    /// Run an embedded hub and a few agents on loopback, exchange messages, cut one
    /// agent's TCP connection half-way, and print a summary.
    Demo(demo::DemoArgs),
    /// Show a hub's connected agents (from its admin server's `/agents`).
    Status(status::StatusArgs),
    /// Check a hub (ours or another implementation) against every client-observable
    /// rule of PROTOCOL.md, over raw WebSocket frames; one line per rule.
    Conformance(conformance::ConformanceArgs),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The codec an agent asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Codec {
    /// MessagePack (binary frames), the default.
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

/// Reads a token file: the token is the file's content without surrounding whitespace.
pub(crate) fn read_token(path: &PathBuf) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Conformance(_) => "warn",
        _ => "info",
    };
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default_filter.to_owned());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // The demo prints a table on stdout; its log lines become lines of the table.
        let captured =
            matches!(cli.command, Command::Demo(_)).then(telemetry::CapturedLog::default);
        let telemetry = match telemetry::init(
            &filter,
            cli.log_format,
            cli.otlp_endpoint.as_deref(),
            captured.as_ref(),
        ) {
            Ok(telemetry) => telemetry,
            Err(e) => return Err(e),
        };
        let result = match cli.command {
            Command::Hub(args) => run::hub(args).await,
            Command::Agent(args) => run::agent(args).await,
            Command::Demo(args) => demo::run(args, captured.unwrap_or_default()).await,
            Command::Status(args) => status::run(args).await,
            Command::Conformance(args) => conformance::run(args).await,
        };
        telemetry.shutdown();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel: {e}");
            ExitCode::FAILURE
        }
    }
}
