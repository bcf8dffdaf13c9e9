//! `chaos`: a fault proxy cutting the connection under load both ways; anything lost,
//! duplicated or out of order fails the run.

use crate::harness::resumable_hub;
use crate::report::{Progress, figure, thousands};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{BoxError, service_fn};
use tunnel_proto::{Format, MessageType};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::{Agent, AgentConfig, Hub, Inbound, Router};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, ClientConfig, WsConnector};

pub(crate) async fn run(seconds: u64, seed: u64) -> Result<(), String> {
    use rand::{Rng as _, SeedableRng as _};

    let (hub_seen, router) = checking_router();
    let hub = resumable_hub(router).await?;
    let proxy = FaultProxy::start(hub.local_addr().ok_or("no address")?)
        .await
        .map_err(|e| e.to_string())?;
    let (agent_seen, agent_router) = checking_router();
    let id = AgentId::new("bench", "chaos");
    let backoff = BackoffConfig::default()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(100));
    let agent = Agent::start(
        WsConnector::new(ClientConfig::new(id.clone()).format(Format::MsgPack)),
        AgentConfig::new(proxy.ws_url()).backoff(backoff),
        agent_router,
    )
    .map_err(|e| e.to_string())?;
    agent
        .wait_connected(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    hub.wait_for_agent(&id, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "\nchaos: events each way, as fast as they are accepted, for {seconds} s between an agent and a hub (resumable sessions) through a fault proxy that cuts the connection every 50-500 ms (seed {seed}); backoff 10 ms base, 100 ms cap"
    );
    let mut progress = Progress::new("chaos");
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(seconds);
    let up = tokio::spawn(send_until(Side::Agent(agent.clone()), stop_at));
    let down = tokio::spawn(send_until(Side::Hub(hub.clone(), id.clone()), stop_at));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cuts = 0u64;
    let deadline = stop_at + Duration::from_secs(120);
    while !(up.is_finished() && down.is_finished()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..=500))).await;
        if up.is_finished() && down.is_finished() {
            break;
        }
        proxy.cut_all();
        cuts += 1;
        progress.update(|| {
            let (h, a) = (
                hub_seen.lock().unwrap_or_else(|e| e.into_inner()).distinct,
                agent_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .distinct,
            );
            format!(
                "{cuts} cuts; the hub has {}, the agent {}",
                thousands(h),
                thousands(a),
            )
        });
    }
    let (sent_up, failed_up) = up.await.map_err(|e| e.to_string())??;
    let (sent_down, failed_down) = down.await.map_err(|e| e.to_string())??;
    // A receipt resolves when the peer has acknowledged the message, which can be a
    // moment before its handler has seen it: wait (boundedly) for the last ones.
    let all_in = Instant::now() + Duration::from_secs(10);
    while Instant::now() < all_in
        && (hub_seen.lock().unwrap_or_else(|e| e.into_inner()).distinct < sent_up
            || agent_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .distinct
                < sent_down)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    progress.finish();
    let hub_seen = hub_seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let agent_seen = agent_seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let lost = hub_seen.lost(sent_up) + agent_seen.lost(sent_down);
    let duplicated = hub_seen.duplicates + agent_seen.duplicates;
    let out_of_order = hub_seen.out_of_order
        + agent_seen.out_of_order
        + hub_seen.undecodable
        + agent_seen.undecodable;
    println!(
        "  {} cuts in {:.1} s; agent -> hub: {} sent, {} arrived; hub -> agent: {} sent, {} arrived; receipts that failed (reported to the sender): {}",
        cuts,
        elapsed.as_secs_f64(),
        thousands(sent_up),
        thousands(hub_seen.distinct),
        thousands(sent_down),
        thousands(agent_seen.distinct),
        failed_up + failed_down
    );
    let correct = lost == 0 && duplicated == 0 && out_of_order == 0;
    println!(
        "  lost {lost}, duplicated {duplicated}, out of order {out_of_order} ({})",
        if correct {
            "as it must be"
        } else {
            "WRONG: all three must be 0"
        }
    );
    figure("chaos", "cuts", cuts as f64, "cuts");
    figure("chaos", "sent", (sent_up + sent_down) as f64, "messages");
    figure("chaos", "lost", lost as f64, "messages");
    figure("chaos", "duplicated", duplicated as f64, "messages");
    figure("chaos", "out_of_order", out_of_order as f64, "messages");
    figure(
        "chaos",
        "failed_receipts",
        (failed_up + failed_down) as f64,
        "messages",
    );
    agent.shutdown().await;
    hub.shutdown().await;
    if correct {
        Ok(())
    } else {
        // A benchmark whose correctness check fails exits non-zero.
        Err(format!(
            "chaos: lost {lost}, duplicated {duplicated}, out of order {out_of_order}: all three must be 0"
        ))
    }
}

/// A router that checks every numbered event it is given into the returned [`Seen`].
fn checking_router() -> (Arc<std::sync::Mutex<Seen>>, Router) {
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let checked = seen.clone();
    let router = Router::new().route(
        MessageType::Event,
        service_fn(move |msg: Inbound| {
            let n = msg.envelope.decode_payload::<u64>().ok();
            checked.lock().unwrap_or_else(|e| e.into_inner()).see(n);
            std::future::ready(Ok::<_, BoxError>(()))
        }),
    );
    (seen, router)
}

/// One end of the chaos scenario.
enum Side {
    Agent(Agent),
    Hub(Hub, AgentId),
}

/// Sends 0, 1, 2, ... from `side` until `stop_at`, as fast as they are accepted;
/// returns how many were sent and how many receipts failed. At most 50,000 receipts
/// are held: beyond that the oldest is awaited first.
async fn send_until(side: Side, stop_at: Instant) -> Result<(u64, u64), String> {
    let mut receipts = std::collections::VecDeque::new();
    let mut failed = 0u64;
    let mut n = 0u64;
    while Instant::now() < stop_at {
        let receipt = match &side {
            Side::Agent(agent) => agent
                .send(MessageType::Event, &n)
                .await
                .map_err(|e| e.to_string())?,
            Side::Hub(hub, id) => hub
                .send(id, MessageType::Event, &n)
                .await
                .map_err(|e| e.to_string())?,
        };
        n += 1;
        receipts.push_back(receipt);
        if receipts.len() > 50_000
            && let Some(oldest) = receipts.pop_front()
            && oldest.delivered().await.is_err()
        {
            failed += 1;
        }
    }
    for receipt in receipts {
        if receipt.delivered().await.is_err() {
            failed += 1;
        }
    }
    Ok((n, failed))
}

/// What one side received of the numbers `0, 1, 2, ...`, sent in that order.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Arrivals, duplicates included.
    count: u64,
    /// Distinct numbers that arrived.
    distinct: u64,
    /// Arrivals of a number already seen.
    duplicates: u64,
    /// First arrivals of a number lower than one that arrived before it.
    out_of_order: u64,
    /// Payloads that were not a number.
    undecodable: u64,
    /// One more than the highest number seen.
    above: u64,
    /// Which numbers arrived (a bit each).
    bits: Vec<u64>,
}

impl Seen {
    fn see(&mut self, n: Option<u64>) {
        self.count += 1;
        let Some(n) = n else {
            self.undecodable += 1;
            return;
        };
        let (word, bit) = ((n / 64) as usize, 1u64 << (n % 64));
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.bits[word] |= bit;
        self.distinct += 1;
        if n < self.above {
            self.out_of_order += 1;
        }
        self.above = self.above.max(n + 1);
    }

    /// Of `sent` numbers, how many never arrived.
    fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.distinct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_tells_lost_duplicated_and_out_of_order_apart() {
        let mut clean = Seen::default();
        (0..200).for_each(|n| clean.see(Some(n)));
        assert_eq!(
            (clean.lost(200), clean.duplicates, clean.out_of_order),
            (0, 0, 0)
        );

        // Reordered: nothing lost or duplicated, one arrival out of order.
        let mut reordered = Seen::default();
        for n in [0, 2, 1, 3] {
            reordered.see(Some(n));
        }
        assert_eq!(
            (
                reordered.lost(4),
                reordered.duplicates,
                reordered.out_of_order
            ),
            (0, 0, 1)
        );

        let mut broken = Seen::default();
        for n in [0, 1, 1, 3, 4] {
            broken.see(Some(n));
        }
        assert_eq!(broken.duplicates, 1);
        assert_eq!(broken.out_of_order, 0);
        assert_eq!(broken.lost(5), 1, "2 never came");
        broken.see(None);
        assert_eq!((broken.undecodable, broken.lost(5)), (1, 1));
    }
}
