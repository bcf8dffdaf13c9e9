//! Project automation, run as `cargo xtask <command>` from anywhere in the workspace.
//!
//! - `cargo xtask ci`: everything CI checks, in order, failing fast.
//! - `cargo xtask deps`: the dependency rules of ARCHITECTURE.md, checked against
//!   `cargo metadata`.
//! - `cargo xtask tidy`: source checks (every file opens with `//!`; no wall-clock
//!   reads in tunnel-proto, tunnel-reconnect and the session driver; no unexplained
//!   `unwrap`/`expect`).
//! - `cargo xtask coverage`: line coverage of the workspace's tests (cargo-tarpaulin;
//!   not part of CI).
//! - `cargo xtask bench`: the benchmarks, printing figures.
//! - `cargo xtask sim [--seeds N | --seed S]`: the deterministic simulation with more
//!   seeds than CI runs (release build), or one seed replayed with its log.
//! - `cargo xtask fuzz <target> --seconds N`: a cargo-fuzz target for N seconds
//!   (needs a nightly toolchain and cargo-fuzz; not part of CI).

mod deps;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci      fmt check, clippy, tests, docs and dependency rules (what CI runs)
  deps    check the crate layering written in ARCHITECTURE.md
  tidy    source checks: module docs, no wall-clock reads on the session path
  coverage  line coverage of every test, with cargo-tarpaulin (not part of ci)
  bench   run the benchmarks and print their figures (extra arguments go to `tunnel-bench`)
  sim     sim [--seeds N | --seed S]: the simulation suite with N seeds (default 20,000,
          release build), or seed S alone with its fault log
  fuzz    fuzz <target> [--seconds N]: run a cargo-fuzz target (decode_json, decode_msgpack,
          handshake, inflate) for N seconds (default 60); needs nightly and cargo-fuzz
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("deps") => deps::check(&root),
        Some("tidy") => tidy::check(&root),
        Some("bench") => bench(&root, &args[1..]),
        Some("coverage") => coverage(&root, &args[1..]),
        Some("fuzz") => fuzz(&root, &args[1..]),
        Some("sim") => sim(&root, &args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        other => {
            eprint!("unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command from the project root, logging it first; fails if it fails.
fn run(root: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let shown: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(std::iter::once(program.to_string()))
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    eprintln!("\n==> {}", shown.join(" "));
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    eprintln!("<== {:.1}s", started.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed with {status}", shown.join(" ")))
    }
}

/// The cluster tests start their own `nats-server`: say what to install before the
/// build, not after it.
fn nats_server() -> Result<(), String> {
    let given = std::env::var_os("NATS_SERVER").map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let found = given
        .into_iter()
        .chain(on_path)
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|p| p.is_file());
    match found {
        Some(path) => {
            eprintln!("==> nats-server: {}", path.display());
            Ok(())
        }
        None => Err("the cluster tests need nats-server (2.9.10 or newer): `apt-get install -y nats-server`, or set NATS_SERVER to its path".into()),
    }
}

fn ci(root: &Path) -> Result<(), String> {
    let started = Instant::now();
    run(root, "cargo", &["fmt", "--all", "--check"], &[])?;
    deps::check(root)?;
    tidy::check(root)?;
    nats_server()?;
    run(
        root,
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    run(
        root,
        "cargo",
        &["test", "--workspace", "--all-features"],
        &[],
    )?;
    run(
        root,
        "cargo",
        &["doc", "--workspace", "--no-deps", "--all-features"],
        &[("RUSTDOCFLAGS", "-D warnings")],
    )?;
    eprintln!(
        "\nci: all steps passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The codec micro-benchmarks (criterion), then the load tool `tunnel-bench` (every
/// scenario on loopback, each beside a raw tokio-tungstenite baseline). Extra arguments
/// go to `tunnel-bench`, for example `cargo xtask bench throughput`. The `tunnel` binary
/// is built first: the hub-process scenarios start it as `tunnel hub`.
fn bench(root: &Path, extra: &[String]) -> Result<(), String> {
    run(
        root,
        "cargo",
        &["bench", "-p", "tunnel-proto", "--bench", "codec"],
        &[],
    )?;
    run(
        root,
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "tunnel-cli",
            "-p",
            "tunnel-bench",
        ],
        &[],
    )?;
    let mut args = vec!["run", "--release", "-p", "tunnel-bench", "--"];
    args.extend(extra.iter().map(String::as_str));
    run(root, "cargo", &args, &[])
}

/// Line coverage of the workspace's tests (unit, integration, doc, the binary's
/// end-to-end tests), measured by cargo-tarpaulin with its LLVM engine, in its own
/// target directory; prints each file's figure and the total. Extra arguments go to
/// tarpaulin (for example `--out Html`).
fn coverage(root: &Path, extra: &[String]) -> Result<(), String> {
    let installed = Command::new("cargo")
        .args(["tarpaulin", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return Err(
            "cargo-tarpaulin is not installed: `cargo install cargo-tarpaulin` (it needs nothing else)"
                .into(),
        );
    }
    let mut args = vec![
        "tarpaulin",
        "--engine",
        "llvm",
        "--workspace",
        "--exclude",
        "xtask",
        "--exclude-files",
        "fuzz/*",
        "--target-dir",
        "target/coverage",
        "--skip-clean",
        "--timeout",
        "900",
        "--out",
        "Stdout",
    ];
    args.extend(extra.iter().map(String::as_str));
    run(root, "cargo", &args, &[])
}

/// The simulation suite (`tests/tests/simulation.rs`) with more seeds, or one seed.
fn sim(root: &Path, args: &[String]) -> Result<(), String> {
    let number = |s: Option<&String>| {
        s.and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| "a number is needed".to_owned())
    };
    let (var, value) = match args.first().map(String::as_str) {
        None => ("SIM_SEEDS", 20_000),
        Some("--seeds") => ("SIM_SEEDS", number(args.get(1))?),
        Some("--seed") => ("SIM_SEED", number(args.get(1))?),
        Some(other) => return Err(format!("unexpected argument {other}")),
    };
    let value = value.to_string();
    run(
        root,
        "cargo",
        &[
            "test",
            "--release",
            "-p",
            "tunnel-tests",
            "--test",
            "simulation",
            "--",
            "seeded_schedules",
            "--nocapture",
        ],
        &[(var, &value)],
    )
}

/// Runs one cargo-fuzz target for a bounded time. Crash inputs land in
/// `fuzz/artifacts/<target>/`; copy them into the proptest suites as regression cases.
fn fuzz(root: &Path, args: &[String]) -> Result<(), String> {
    const TARGETS: [&str; 4] = ["decode_json", "decode_msgpack", "handshake", "inflate"];
    let target = args
        .first()
        .filter(|t| TARGETS.contains(&t.as_str()))
        .ok_or_else(|| format!("name a target: {}", TARGETS.join(", ")))?;
    let seconds = match args.get(1).map(String::as_str) {
        Some("--seconds") => args
            .get(2)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("--seconds needs a number")?,
        Some(other) => return Err(format!("unexpected argument {other}")),
        None => 60,
    };
    let max_time = format!("-max_total_time={seconds}");
    run(
        &root.join("fuzz"),
        "cargo",
        &["+nightly", "fuzz", "run", target, "--", &max_time],
        &[],
    )
}
