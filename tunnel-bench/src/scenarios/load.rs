//! `load`: many agents each sending a status per second to a hub process; a backlog that
//! grows fails the run.

use crate::harness::{Attempts, HubProcess, start_crowd, status_payload, stop_crowd};
use crate::report::{Progress, figure, thousands};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tunnel_proto::{Envelope, MessageType};
use tunnel_reconnect::BackoffConfig;

pub(crate) async fn run(agents: usize, seconds: u64) -> Result<(), String> {
    let hub = HubProcess::start(true).await?;
    let baseline = hub.rss_kib()?;
    println!(
        "\nload: {} agents on one hub process (pid {}, resumable sessions), each sending a status message every second for {seconds} s",
        thousands(agents as u64),
        hub.pid()?
    );
    let mut progress = Progress::new("load");
    let started = Instant::now();
    let crowd = start_crowd(
        &[hub.url()],
        "load",
        agents,
        BackoffConfig::default(),
        &Arc::new(Attempts::default()),
        &mut progress,
    )
    .await?;
    let connect_time = started.elapsed();
    let connected_rss = hub.rss_kib()?;
    // Sends are spread over the second: every 10 ms a hundredth of the agents send.
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let ticks = seconds * 100;
    let driver = {
        let (crowd, sent, failed) = (crowd.clone(), sent.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for t in 0..ticks {
                tick.tick().await;
                let beat = t / 100;
                let slot = (t % 100) as usize;
                for (i, agent) in crowd.iter().enumerate().skip(slot).step_by(100) {
                    let Ok(payload) = status_payload(i, beat) else {
                        continue;
                    };
                    let env =
                        Box::new(Envelope::new(0, MessageType::Status, 0).with_payload(payload));
                    match agent.send_envelope(env).await {
                        Ok(_) => sent.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        })
    };
    // Every 5 s: what the hub has received, the backlog (sent, not yet received),
    // what agents hold unacknowledged, the hub's memory.
    struct Sample {
        at: f64,
        sent: u64,
        received: u64,
        held: usize,
        rss: u64,
    }
    let mut samples = Vec::new();
    let send_started = Instant::now();
    while !driver.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if samples.len() as u64 * 5 <= send_started.elapsed().as_secs() {
            // Received first: `sent` read afterwards is never behind it.
            let received = hub.received("status").await?;
            let sent_now = sent.load(Ordering::Relaxed);
            let held: usize = crowd
                .iter()
                .filter_map(|a| a.held())
                .map(|h| h.messages)
                .sum();
            let rss = hub.rss_kib()?;
            samples.push(Sample {
                at: send_started.elapsed().as_secs_f64(),
                sent: sent_now,
                received,
                held,
                rss,
            });
        }
        progress.update(|| {
            let last = samples.last();
            format!(
                "sent {}, hub received {}, backlog {}, hub RSS {} KiB",
                thousands(sent.load(Ordering::Relaxed)),
                thousands(last.map_or(0, |s| s.received)),
                thousands(last.map_or(0, |s| s.sent.saturating_sub(s.received))),
                thousands(last.map_or(0, |s| s.rss)),
            )
        });
    }
    driver.await.map_err(|e| e.to_string())?;
    let elapsed = send_started.elapsed().as_secs_f64();
    let total_sent = sent.load(Ordering::Relaxed);
    // Let the last second arrive, then count.
    let mut received = 0;
    for _ in 0..50 {
        received = hub.received("status").await?;
        if received >= total_sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.finish();
    let backlogs: Vec<u64> = samples
        .iter()
        .map(|s| s.sent.saturating_sub(s.received))
        .collect();
    let backlog = Backlog::of(&backlogs);
    let (first_half, second_half) = (backlog.first_half, backlog.second_half);
    let max_held = samples.iter().map(|s| s.held).max().unwrap_or(0);
    let peak_rss = samples.iter().map(|s| s.rss).max().unwrap_or(connected_rss);
    let per_agent = connected_rss.saturating_sub(baseline) as f64 / agents as f64;
    let per_agent_loaded = peak_rss.saturating_sub(baseline) as f64 / agents as f64;
    println!(
        "  connected {} agents in {:.1} s; hub RSS {} KiB before, {} KiB connected ({per_agent:.1} KiB per agent, {} the 16 KiB bar), peak under load {} KiB ({per_agent_loaded:.1} KiB per agent)",
        thousands(agents as u64),
        connect_time.as_secs_f64(),
        thousands(baseline),
        thousands(connected_rss),
        if per_agent <= 16.0 { "meets" } else { "ABOVE" },
        thousands(peak_rss)
    );
    println!(
        "  sent {} status messages in {elapsed:.0} s ({} msg/s, {} failed), hub received {}",
        thousands(total_sent),
        thousands((total_sent as f64 / elapsed) as u64),
        thousands(failed.load(Ordering::Relaxed)),
        thousands(received)
    );
    println!(
        "  backlog (sent, not yet received by the hub), sampled every 5 s: max {} in the first half, {} in the second half ({}); most held unacknowledged by agents at once: {}",
        thousands(first_half),
        thousands(second_half),
        if !backlog.growing() {
            "not growing: the hub keeps up"
        } else {
            "GROWING: the hub falls behind"
        },
        thousands(max_held as u64)
    );
    println!(
        "  {:>6} {:>12} {:>12} {:>9} {:>10}",
        "t (s)", "sent", "backlog", "held", "hub KiB"
    );
    let step = (samples.len() / 12).max(1);
    for s in samples.iter().step_by(step) {
        println!(
            "  {:>6.0} {:>12} {:>12} {:>9} {:>10}",
            s.at,
            thousands(s.sent),
            thousands(s.sent.saturating_sub(s.received)),
            thousands(s.held as u64),
            thousands(s.rss)
        );
    }
    figure("load", "agents", agents as f64, "agents");
    figure("load", "hub_rss_per_agent_connected", per_agent, "KiB");
    figure("load", "hub_rss_per_agent_loaded", per_agent_loaded, "KiB");
    figure("load", "status_rate", total_sent as f64 / elapsed, "msg/s");
    figure(
        "load",
        "backlog_max_first_half",
        first_half as f64,
        "messages",
    );
    figure(
        "load",
        "backlog_max_second_half",
        second_half as f64,
        "messages",
    );
    figure(
        "load",
        "lost",
        total_sent.saturating_sub(received) as f64,
        "messages",
    );
    stop_crowd(crowd).await;
    hub.stop().await;
    let lost = total_sent.saturating_sub(received);
    if backlog.growing() || lost > 0 {
        // A benchmark whose correctness check fails exits non-zero.
        return Err(format!(
            "load: backlog max {first_half} in the first half, {second_half} in the second (growing: {}), {lost} sent but never received",
            backlog.growing()
        ));
    }
    Ok(())
}

/// The backlog samples of a run, halved: a hub that keeps up has a second half no
/// worse than the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backlog {
    /// The largest backlog sampled in the first half of the run.
    first_half: u64,
    /// The largest in the second half.
    second_half: u64,
}

impl Backlog {
    fn of(samples: &[u64]) -> Backlog {
        let (first, second) = samples.split_at(samples.len() / 2);
        Backlog {
            first_half: first.iter().copied().max().unwrap_or(0),
            second_half: second.iter().copied().max().unwrap_or(0),
        }
    }

    /// Growing: the second half's peak is more than twice the first's, and more than
    /// 100 messages (a few in flight at a sample are noise, not a trend).
    fn growing(&self) -> bool {
        self.second_half > (2 * self.first_half).max(100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_is_growing_only_when_the_second_half_is_well_above_the_first() {
        let steady = Backlog::of(&[40, 90, 60, 70, 95, 80]);
        assert_eq!((steady.first_half, steady.second_half), (90, 95));
        assert!(!steady.growing());
        // Within noise: 100 messages in flight is not a trend.
        assert!(!Backlog::of(&[0, 0, 0, 100]).growing());
        let falling_behind = Backlog::of(&[100, 300, 900, 2_700]);
        assert_eq!(falling_behind.second_half, 2_700);
        assert!(falling_behind.growing());
        // No samples, or one: nothing to compare, nothing growing.
        assert_eq!(
            Backlog::of(&[]),
            Backlog {
                first_half: 0,
                second_half: 0
            }
        );
        assert!(!Backlog::of(&[50]).growing());
    }
}
