//! Every in-process scenario of the load tool at a small size: each must finish, print
//! its figures and exit 0, which it does only when its correctness check passes
//! (chaos: nothing lost, duplicated or out of order). Speed is not asserted here; the
//! figures of a debug build mean nothing.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-bench"))
        .args(args)
        .output()
        .expect("run tunnel-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tunnel-bench {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn chaos_loses_nothing_and_exits_zero() {
    let out = bench(&["chaos", "--chaos-seconds", "2", "--seed", "3"]);
    assert!(
        out.contains("lost 0, duplicated 0, out of order 0"),
        "{out}"
    );
}

#[test]
fn the_throughput_latency_session_and_stack_scenarios_run_to_the_end() {
    let out = bench(&["throughput", "--messages", "2000", "--runs", "1"]);
    assert!(out.contains("tunnel agent -> hub, msgpack"), "{out}");
    let out = bench(&["latency", "--round-trips", "200"]);
    assert!(out.contains("p99"), "{out}");
    let out = bench(&[
        "session",
        "--messages",
        "2000",
        "--runs",
        "1",
        "--cuts",
        "3",
    ]);
    assert!(out.contains("with sessions"), "{out}");
    let out = bench(&[
        "stack",
        "--messages",
        "2000",
        "--runs",
        "1",
        "--round-trips",
        "200",
        "--kills",
        "2",
    ]);
    assert!(out.contains("failover"), "{out}");
}

#[test]
fn the_sustained_and_fanout_scenarios_run_to_the_end() {
    let out = bench(&["sustained", "--sustained-messages", "2000", "--runs", "1"]);
    assert!(out.contains("msgpack, full stack"), "{out}");
    let out = bench(&[
        "fanout",
        "--fanout-agents",
        "5",
        "--per-agent",
        "50",
        "--runs",
        "1",
    ]);
    assert!(out.contains("fanout"), "{out}");
}

#[test]
fn json_figures_are_written_for_comparing_runs() {
    let path = std::env::temp_dir().join(format!("tunnel-bench-smoke-{}.json", std::process::id()));
    bench(&[
        "throughput",
        "--messages",
        "1000",
        "--runs",
        "1",
        "--json",
        path.to_str().expect("utf-8"),
    ]);
    let text = std::fs::read_to_string(&path).expect("figures written");
    let _ = std::fs::remove_file(&path);
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(doc["scenario"], "throughput");
    let figures = doc["figures"].as_array().expect("figures");
    assert!(
        figures.iter().any(|f| f["name"] == "msgpack_rate"),
        "{text}"
    );
}
