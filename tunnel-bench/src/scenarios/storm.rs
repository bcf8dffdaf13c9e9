//! `storm`: many agents connected, the hub process killed and restarted: time until all
//! are back, connect attempts per second.

use crate::harness::{Attempts, HubProcess, is_up, start_crowd, stop_crowd};
use crate::report::{Progress, figure, percentile, thousands};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::ConnectionState;

pub(crate) async fn run(agents: usize, accept_rate: Option<f64>) -> Result<(), String> {
    let extra = match accept_rate {
        Some(rate) => vec!["--accept-rate".to_string(), rate.to_string()],
        None => Vec::new(),
    };
    let mut hub = HubProcess::start_with(true, extra).await?;
    // The agents' default backoff: 200 ms base, 30 s cap, full jitter.
    let backoff = BackoffConfig::default();
    println!(
        "\nstorm: {} agents connected to a hub process, which is killed (SIGKILL) and started again on the same port; agents use the default backoff ({} ms base, {} s cap, full jitter); hub accept rate: {}",
        thousands(agents as u64),
        backoff.base.as_millis(),
        backoff.cap.as_secs(),
        accept_rate.map_or("no limit".to_string(), |r| format!("{r} per second"))
    );
    let mut progress = Progress::new("storm");
    let attempts = Arc::new(Attempts::default());
    let crowd = start_crowd(
        &[hub.url()],
        "storm",
        agents,
        backoff,
        &attempts,
        &mut progress,
    )
    .await?;
    let attempts_before = attempts.0.load(Ordering::Relaxed);
    // One watcher per agent: the time it is up again after the kill.
    let killed_at = Instant::now();
    let back = Arc::new(AtomicUsize::new(0));
    let mut times = tokio::task::JoinSet::new();
    for agent in &crowd {
        let mut state = agent.state();
        state.mark_unchanged();
        let back = back.clone();
        times.spawn(async move {
            // Down, then up again.
            state.wait_for(|s| !is_up(s)).await.ok()?;
            state.wait_for(is_up).await.ok()?;
            back.fetch_add(1, Ordering::Relaxed);
            Some(killed_at.elapsed())
        });
    }
    // Attempts per 500 ms since the kill, sampled every 50 ms alongside the restart
    // and bucketed by when each sample was taken.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (attempts, stop) = (attempts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buckets: Vec<u64> = Vec::new();
            let mut last = attempts_before;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = attempts.0.load(Ordering::Relaxed);
                let i = (killed_at.elapsed().as_millis() / 500) as usize;
                if buckets.len() <= i {
                    buckets.resize(i + 1, 0);
                }
                buckets[i] += now - last;
                last = now;
            }
            (buckets, last - attempts_before)
        })
    };
    hub.restart().await?;
    let restarted_after = killed_at.elapsed();
    let limit = Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = back.load(Ordering::Relaxed);
        progress.update(|| {
            format!(
                "{} of {} agents back",
                thousands(n as u64),
                thousands(agents as u64)
            )
        });
        if n >= agents || killed_at.elapsed() > limit {
            break;
        }
    }
    // A short grace for attempts still being counted, then stop sampling and watching.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (buckets, total_attempts) = sampler.await.map_err(|e| e.to_string())?;
    progress.finish();
    times.abort_all();
    let mut samples = Vec::new();
    while let Some(r) = times.join_next().await {
        if let Ok(Some(t)) = r {
            samples.push(t);
        }
    }
    samples.sort();
    let all_back = samples.last().copied();
    let states = crowd
        .iter()
        .fold((0, 0), |(resumed, reset), a| match &*a.state().borrow() {
            ConnectionState::Resumed { .. } => (resumed + 1, reset),
            ConnectionState::Reset { .. } | ConnectionState::Connected { .. } => {
                (resumed, reset + 1)
            }
            _ => (resumed, reset),
        });
    let peak = buckets.iter().copied().max().unwrap_or(0) * 2;
    println!(
        "  hub listening again {:.2} s after the kill; {} of {} agents back ({} reset: a restarted hub has no sessions, {} resumed), {} gave up",
        restarted_after.as_secs_f64(),
        thousands(samples.len() as u64),
        thousands(agents as u64),
        thousands(states.1),
        thousands(states.0),
        thousands((agents - samples.len()) as u64),
    );
    if let Some(all) = all_back {
        println!(
            "  time until back: p50 {:.1} s, p99 {:.1} s, all {:.1} s ({} the 60 s bar)",
            percentile(&samples, 0.5).as_secs_f64(),
            percentile(&samples, 0.99).as_secs_f64(),
            all.as_secs_f64(),
            if all <= Duration::from_secs(60) && samples.len() == agents {
                "meets"
            } else {
                "MISSES"
            }
        );
        figure("storm", "all_back", all.as_secs_f64(), "s");
        figure(
            "storm",
            "p50_back",
            percentile(&samples, 0.5).as_secs_f64(),
            "s",
        );
    }
    println!(
        "  connect attempts: {} in all ({:.2} per agent), peak {} per second",
        thousands(total_attempts),
        total_attempts as f64 / agents as f64,
        thousands(peak)
    );
    // Agents back per 500 ms since the kill, from their times.
    let completed = per_slot(&samples, SLOT, buckets.len());
    let peak_back = completed.iter().copied().max().unwrap_or(0) * 2;
    println!(
        "  agents back: peak {} per second (the hub takes them from its listen backlog {})",
        thousands(peak_back),
        accept_rate.map_or(
            "as fast as it completes handshakes".to_string(),
            |r| format!("at its accept rate, {r} per second after a one-second burst")
        ),
    );
    println!("  per 500 ms after the kill: attempts started (a) and agents back (b)");
    for row in histogram(&buckets, &completed, SLOT) {
        println!("  {row}");
    }
    figure("storm", "agents", agents as f64, "agents");
    figure("storm", "back", samples.len() as f64, "agents");
    figure("storm", "peak_attempt_rate", peak as f64, "attempts/s");
    figure("storm", "peak_back_rate", peak_back as f64, "agents/s");
    figure(
        "storm",
        "attempts_per_agent",
        total_attempts as f64 / agents as f64,
        "attempts",
    );
    stop_crowd(crowd).await;
    hub.stop().await;
    if samples.len() < agents {
        // A benchmark whose correctness check fails exits non-zero.
        return Err(format!(
            "storm: only {} of {agents} agents came back within {} s",
            samples.len(),
            limit.as_secs()
        ));
    }
    Ok(())
}

/// The width of one histogram slot.
const SLOT: Duration = Duration::from_millis(500);

/// How many of `times` fall in each `slot` from zero; at least `at_least` slots.
fn per_slot(times: &[Duration], slot: Duration, at_least: usize) -> Vec<u64> {
    let index = |t: &Duration| (t.as_nanos() / slot.as_nanos().max(1)) as usize;
    let slots = times.iter().map(|t| index(t) + 1).max().unwrap_or(0);
    let mut counts = vec![0u64; slots.max(at_least)];
    for t in times {
        counts[index(t)] += 1;
    }
    counts
}

/// One row per slot up to the last busy one: the slot's start, then `a` and `b` as
/// counts and bars scaled together to 25 characters.
fn histogram(a: &[u64], b: &[u64], slot: Duration) -> Vec<String> {
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    let widest = a.iter().chain(b).copied().max().unwrap_or(1).max(1);
    let rows = a.len().max(b.len());
    let Some(last_busy) = (0..rows).rev().find(|&i| at(a, i) + at(b, i) > 0) else {
        return Vec::new();
    };
    (0..=last_busy)
        .map(|i| {
            let (x, y) = (at(a, i), at(b, i));
            format!(
                "{:>5.1}s a {:>6} {:<25} b {:>6} {}",
                (slot * i as u32).as_secs_f64(),
                thousands(x),
                "#".repeat((x * 25 / widest) as usize),
                thousands(y),
                "#".repeat((y * 25 / widest) as usize),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_slot_counts_each_time_in_its_half_second() {
        let ms = Duration::from_millis;
        let times = [ms(0), ms(499), ms(500), ms(1_700)];
        assert_eq!(per_slot(&times, SLOT, 0), vec![2, 1, 0, 1]);
        assert_eq!(per_slot(&times, SLOT, 6), vec![2, 1, 0, 1, 0, 0]);
        assert_eq!(per_slot(&[], SLOT, 2), vec![0, 0]);
    }

    #[test]
    fn the_histogram_scales_both_columns_together_and_stops_at_the_last_busy_slot() {
        let rows = histogram(&[10, 5, 0, 0], &[0, 10, 0], SLOT);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            rows[0],
            format!("  0.0s a     10 {:<25} b      0 ", "#".repeat(25))
        );
        assert_eq!(
            rows[1],
            format!(
                "  0.5s a      5 {:<25} b     10 {}",
                "#".repeat(12),
                "#".repeat(25)
            )
        );
        assert!(histogram(&[0, 0], &[], SLOT).is_empty());
    }
}
