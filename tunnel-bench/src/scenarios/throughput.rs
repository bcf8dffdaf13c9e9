//! `throughput`: one-way messages per second agent to hub, beside the baseline.

use crate::baseline::raw_throughput;
use crate::harness::{tunnel_throughput, tunnel_throughput_with};
use crate::report::{figure, median, thousands};
use tunnel_proto::Format;

pub(crate) fn run(n: u64, runs: usize, profile: Option<Format>) -> Result<(), String> {
    if let Some(codec) = profile {
        let rate = tunnel_throughput(n, codec)?;
        println!("tunnel {:?}: {} msg/s", codec, thousands(rate as u64));
        return Ok(());
    }
    println!(
        "throughput: {} one-way messages agent -> hub per run, median of {} runs, loopback;\n  client on core 0 and server on core 1, each a single-thread runtime",
        thousands(n),
        runs
    );
    let mut typed = Vec::new();
    let mut untyped = Vec::new();
    for _ in 0..runs {
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
        let mut rates = Vec::new();
        for _ in 0..runs {
            rates.push(tunnel_throughput(n, format)?);
        }
        let rate = median(rates);
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
    for run in 0..runs.max(5) {
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
        runs.max(5)
    );
    println!(
        "  {:<58} {:>10} msg/s  {ratio:.2}x metrics off ({} the 0.95x bar)",
        "  the same with OpenTelemetry metrics on both sides",
        thousands(on as u64),
        if ratio >= 0.95 { "meets" } else { "BELOW" }
    );
    Ok(())
}
