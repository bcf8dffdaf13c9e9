//! `cluster-scale`: many agents over three `tunnel hub --nats` processes on one
//! nats-server (started here): each hub's memory per agent it holds; then one hub
//! killed (SIGKILL) and restarted on its port, the other two up (its agents back,
//! resumed); then another killed for good and the time until every presence entry
//! names a live hub again and its agents are back with their sessions resumed; then the
//! first killed and restarted again, now with a dead hub on every agent's list; then
//! one drained (SIGTERM): how many of its agents resume their sessions on the last hub.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tunnel_cluster::Backend;
use tunnel_cluster::testing::Nats;
use tunnel_reconnect::BackoffConfig;
use tunnel_transport::AgentId;

use crate::harness::{Attempts, HubProcess, is_up, start_crowd, stop_crowd};
use crate::report::{Progress, figure, thousands};

/// Hubs in the cluster.
const HUBS: usize = 3;
/// The bar for a cluster hub's memory per agent.
const BAR_KIB: f64 = 20.0;
/// Longest wait for presence to be right, at the start and after the kill.
const LIMIT: Duration = Duration::from_secs(180);

pub(crate) async fn run(agents: usize) -> Result<(), String> {
    let mut nats = Nats::start("bench-scale");
    let mut hubs = Vec::with_capacity(HUBS);
    for k in 0..HUBS {
        let extra = vec![
            "--nats".to_string(),
            nats.url(),
            "--hub-id".to_string(),
            hub_id(k),
        ];
        hubs.push(HubProcess::start_with(true, extra).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = hubs
        .iter()
        .map(HubProcess::rss_kib)
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "\ncluster-scale: {} agents over {HUBS} hub processes on one nats-server {} (JetStream, file storage), resumable sessions; each agent lists all hubs, starting at a different one",
        thousands(agents as u64),
        nats.url()
    );
    let owners = watch_owners(&nats.url()).await?;
    let urls: Vec<String> = hubs.iter().map(HubProcess::url).collect();
    let mut progress = Progress::new("cluster-scale");
    let started = Instant::now();
    let crowd = start_crowd(
        &urls,
        "scale",
        agents,
        BackoffConfig::default(),
        &Arc::new(Attempts::default()),
        &mut progress,
    )
    .await?;
    let connected = started.elapsed();
    let all_listed = wait_until(&owners, LIMIT, |table| table.len() == agents).await;
    let Some(listed) = all_listed else {
        return Err(format!(
            "presence lists {} of {agents} agents after {} s",
            owners.lock().unwrap_or_else(|e| e.into_inner()).len(),
            LIMIT.as_secs()
        ));
    };
    println!(
        "  all connected in {:.1} s, all in presence in {:.1} s",
        connected.as_secs_f64(),
        (connected + listed).as_secs_f64()
    );
    // Let the hubs' per-agent work settle before reading memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = per_hub(&owners);
    let mut worst: f64 = 0.0;
    for (k, hub) in hubs.iter().enumerate() {
        let after = hub.rss_kib()?;
        let n = held.get(&hub_id(k)).copied().unwrap_or(0);
        let per = (after.saturating_sub(before[k])) as f64 / n.max(1) as f64;
        worst = worst.max(per);
        println!(
            "  {}: {} agents, RSS {} -> {} KiB: {per:.1} KiB per agent",
            hub_id(k),
            thousands(n as u64),
            thousands(before[k]),
            thousands(after)
        );
    }
    figure("cluster-scale", "hub_rss_per_agent", worst, "KiB");
    println!(
        "  hub RSS per agent, the largest of the {HUBS}: {worst:.1} KiB ({} the {BAR_KIB} KiB bar)",
        if worst <= BAR_KIB { "meets" } else { "ABOVE" }
    );

    // Kill one and restart it on its port, the other two up: its agents come back to
    // it or to the next hub on their lists, resumed.
    let ids: Vec<AgentId> = (0..crowd.len())
        .map(|i| AgentId::new("bench", format!("scale-{i}")))
        .collect();
    let restarted = hub_id(2);
    let watching = Watching::start(&crowd, &ids, &held_by(&owners, &restarted));
    hubs[2].restart().await?;
    watching.report("restart", &restarted).await?;
    // Presence catches up with the moves (their claims follow within a second or two)
    // before the next phase reads who holds whom.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Kill the first hub: its agents move to the next hub on their lists, except a
    // tenth of them, which go down with it (as if on its machine): their entries must
    // go too, swept once the hub stops beating.
    let killed = hub_id(0);
    let moving = held.get(&killed).copied().unwrap_or(0);
    let (mut crowd, mut lost, mut ids) = (crowd, Vec::new(), ids);
    for i in (0..crowd.len()).rev() {
        if i % (HUBS * 10) == 0 {
            lost.push((ids.swap_remove(i), crowd.swap_remove(i)));
        }
    }
    let remaining = agents - lost.len();
    let gone: std::collections::HashSet<AgentId> = lost.iter().map(|(id, _)| id.clone()).collect();
    let moving_ids: Vec<AgentId> = held_by(&owners, &killed)
        .into_iter()
        .filter(|agent| !gone.contains(agent))
        .collect();
    let watching = Watching::start(&crowd, &ids, &moving_ids);
    let killed_at = Instant::now();
    hubs.remove(0).stop().await;
    for (_, agent) in lost {
        agent.shutdown().await;
    }
    let mut moved_at = None;
    let Some(_) = wait_until(&owners, LIMIT, |table| {
        // The agents that stayed up are all listed, on live hubs.
        let (mut staying, mut on_live) = (0, true);
        for (_, hub) in table.iter().filter(|(agent, _)| !gone.contains(*agent)) {
            staying += 1;
            on_live &= *hub != killed;
        }
        let moved = staying == remaining && on_live;
        if moved && moved_at.is_none() {
            moved_at = Some(Instant::now());
        }
        table.len() == remaining && table.values().all(|hub| *hub != killed)
    })
    .await
    else {
        let table = owners.lock().unwrap_or_else(|e| e.into_inner());
        return Err(format!(
            "after the kill, presence was still wrong after {} s: {} entries, {} naming the killed hub",
            LIMIT.as_secs(),
            table.len(),
            table.values().filter(|hub| **hub == killed).count()
        ));
    };
    let correct = killed_at.elapsed();
    let moved = moved_at.map_or(correct, |at| at - killed_at);
    let up = crowd.iter().filter(|a| is_up(&a.state().borrow())).count();
    figure(
        "cluster-scale",
        "presence_moved_after_kill",
        moved.as_secs_f64(),
        "s",
    );
    figure(
        "cluster-scale",
        "presence_correct_after_kill",
        correct.as_secs_f64(),
        "s",
    );
    println!(
        "  {killed} killed (SIGKILL) holding {} agents, {} of them gone with it: the others' entries name their new hubs {:.2} s later; every entry is right {:.2} s later (the gone agents' entries swept: a hub is dead three 5 s heartbeats after its last); {} of {} agents connected",
        thousands(moving as u64),
        thousands(gone.len() as u64),
        moved.as_secs_f64(),
        correct.as_secs_f64(),
        thousands(up as u64),
        thousands(remaining as u64)
    );
    watching.report("kill", &killed).await?;
    // The restarted one again, the killed hub still dead and first or second on every
    // agent's list, and the agents that just moved still backing off from it (their
    // connections are younger than the 30 s that start a backoff over).
    let leaving = held_by(&owners, &restarted);
    let watching = Watching::start(&crowd, &ids, &leaving);
    hubs[1].restart().await?;
    watching
        .report("restart_with_a_hub_dead", &restarted)
        .await?;
    drain_one(&mut hubs, &owners, &crowd, &ids).await?;
    stop_crowd(crowd).await;
    for hub in hubs {
        hub.stop().await;
    }
    nats.kill();
    Ok(())
}

/// Stops the first remaining hub in order (SIGTERM: it drains): its agents move to
/// the other one, their sessions through the cluster's session bucket. Prints how many
/// resumed and how long until all were back and listed on the other hub.
async fn drain_one(
    hubs: &mut Vec<HubProcess>,
    owners: &Owners,
    crowd: &[tunnel_router::Agent],
    ids: &[AgentId],
) -> Result<(), String> {
    let drained = hub_id(1);
    let leaving: std::collections::HashSet<AgentId> =
        held_by(owners, &drained).into_iter().collect();
    let started = Instant::now();
    let exited = hubs.remove(0).terminate(LIMIT).await?;
    let stopped = started.elapsed();
    let Some(_) = wait_until(owners, LIMIT, |table| {
        leaving
            .iter()
            .all(|agent| table.get(agent).is_some_and(|hub| *hub != drained))
    })
    .await
    else {
        return Err(format!(
            "after the drain, agents of {drained} were not all listed elsewhere after {} s",
            LIMIT.as_secs()
        ));
    };
    let back = started.elapsed();
    // A new session without a reset: the agent had nothing unacknowledged either way
    // when it left (a clean handover), so there was nothing to resume.
    let (mut resumed, mut fresh, mut reset, mut other) = (0usize, 0usize, 0usize, 0usize);
    for (agent, id) in crowd.iter().zip(ids) {
        if !leaving.contains(id) {
            continue;
        }
        match &*agent.state().borrow() {
            tunnel_router::ConnectionState::Resumed { .. } => resumed += 1,
            tunnel_router::ConnectionState::Connected { .. } => fresh += 1,
            tunnel_router::ConnectionState::Reset { .. } => reset += 1,
            _ => other += 1,
        }
    }
    figure("cluster-scale", "drain_resumed", resumed as f64, "agents");
    figure("cluster-scale", "drain_reset", reset as f64, "agents");
    figure("cluster-scale", "drain_all_back", back.as_secs_f64(), "s");
    println!(
        "  {drained} drained (SIGTERM) holding {} agents: it {} after {:.2} s; all listed on the other hub {:.2} s after the signal (their redials, default backoff, a dead hub on many lists); {} resumed their session, {} moved with nothing owed (a new session, no reset), {} reset, {} not connected yet",
        thousands(leaving.len() as u64),
        if exited { "exited" } else { "was killed" },
        stopped.as_secs_f64(),
        back.as_secs_f64(),
        thousands(resumed as u64),
        thousands(fresh as u64),
        thousands(reset as u64),
        thousands(other as u64)
    );
    Ok(())
}

/// The agents of a hub about to fail, watched (from before the failure, by a task of
/// their own) until they are back.
struct Watching {
    task: tokio::task::JoinHandle<Option<AllBack>>,
    agents: usize,
}

/// When the last watched agent was back, and each one's outcome and time back.
type AllBack = (Duration, Vec<(Outcome, Duration)>);

/// How an agent came back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Resumed,
    Fresh,
    Reset,
}

/// How long the agents of a failed hub have to be back.
const BACK_BAR: Duration = Duration::from_secs(10);

impl Watching {
    /// Starts watching `which` of `crowd`; the failure follows at once.
    fn start(crowd: &[tunnel_router::Agent], ids: &[AgentId], which: &[AgentId]) -> Watching {
        let which: std::collections::HashSet<&AgentId> = which.iter().collect();
        let mut agents: Vec<_> = crowd
            .iter()
            .zip(ids)
            .filter(|(_, id)| which.contains(id))
            .map(|(agent, _)| {
                let mut state = agent.state();
                state.borrow_and_update();
                (state, agent.session_events())
            })
            .collect();
        let count = agents.len();
        let since = Instant::now();
        let task = tokio::spawn(async move {
            // When each was first seen back (within one 20 ms look).
            let mut back_at: Vec<Option<Duration>> = vec![None; agents.len()];
            while since.elapsed() < LIMIT {
                // Each changed since the failure (it noticed), and is up now.
                let now = since.elapsed();
                for ((state, _), at) in agents.iter_mut().zip(back_at.iter_mut()) {
                    if at.is_none()
                        && state.has_changed().unwrap_or(false)
                        && is_up(&state.borrow())
                    {
                        *at = Some(now);
                    }
                }
                if back_at.iter().all(Option::is_some) {
                    let back = since.elapsed();
                    let outcomes = agents
                        .iter_mut()
                        .zip(back_at)
                        .map(|((state, events), at)| {
                            // Any session event is a reset (or many: lagged).
                            let reset = !matches!(
                                events.try_recv(),
                                Err(tokio::sync::broadcast::error::TryRecvError::Empty)
                            );
                            let outcome = match &*state.borrow() {
                                _ if reset => Outcome::Reset,
                                tunnel_router::ConnectionState::Resumed { .. } => Outcome::Resumed,
                                tunnel_router::ConnectionState::Connected { .. } => Outcome::Fresh,
                                _ => Outcome::Reset,
                            };
                            (outcome, at.unwrap_or(back))
                        })
                        .collect();
                    return Some((back, outcomes));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        });
        Watching {
            task,
            agents: count,
        }
    }

    /// Waits (at most [`LIMIT`] from the failure) until every watched agent is back;
    /// prints how long that took and how many resumed their sessions.
    async fn report(self, phase: &str, hub: &str) -> Result<(), String> {
        let Some((back, outcomes)) = self.task.await.map_err(|e| e.to_string())? else {
            return Err(format!(
                "{phase}: not all {} agents of {hub} back after {} s",
                self.agents,
                LIMIT.as_secs()
            ));
        };
        let count = |o: Outcome| outcomes.iter().filter(|(x, _)| *x == o).count();
        let mut times: Vec<Duration> = outcomes.iter().map(|(_, at)| *at).collect();
        times.sort_unstable();
        let (p50, p90) = (
            crate::report::percentile(&times, 0.5),
            crate::report::percentile(&times, 0.9),
        );
        let (resumed, fresh, reset) = (
            count(Outcome::Resumed),
            count(Outcome::Fresh),
            count(Outcome::Reset),
        );
        figure(
            "cluster-scale",
            &format!("{phase}_resumed"),
            resumed as f64,
            "agents",
        );
        figure(
            "cluster-scale",
            &format!("{phase}_reset"),
            reset as f64,
            "agents",
        );
        figure(
            "cluster-scale",
            &format!("{phase}_all_back"),
            back.as_secs_f64(),
            "s",
        );
        let bar = reset == 0 && fresh == 0 && back <= BACK_BAR;
        println!(
            "  {phase} of {hub}: its {} agents all back {:.2} s after it (half by {:.2} s, 90% by {:.2} s); {} resumed their session, {} started a new one, {} reset ({} the bar: 0 resets, all resumed and back within {} s)",
            thousands(self.agents as u64),
            back.as_secs_f64(),
            p50.as_secs_f64(),
            p90.as_secs_f64(),
            thousands(resumed as u64),
            thousands(fresh as u64),
            thousands(reset as u64),
            if bar { "meets" } else { "MISSES" },
            BACK_BAR.as_secs()
        );
        Ok(())
    }
}

fn hub_id(k: usize) -> String {
    format!("hub-{k}")
}

type Owners = Arc<Mutex<HashMap<AgentId, String>>>;

/// Which hub holds each agent, kept current from the presence bucket by a task.
async fn watch_owners(url: &str) -> Result<Owners, String> {
    let backend = Backend::connect(url).await.map_err(|e| e.to_string())?;
    let mut changes = backend.watch_presence().await.map_err(|e| e.to_string())?;
    let owners: Owners = Arc::default();
    let table = owners.clone();
    tokio::spawn(async move {
        let _backend = backend;
        while let Some(change) = changes.next().await {
            let mut table = table.lock().unwrap_or_else(|e| e.into_inner());
            match change.presence {
                Some(p) => table.insert(change.agent, p.hub),
                None => table.remove(&change.agent),
            };
        }
    });
    Ok(owners)
}

/// Waits (at most `limit`) until `done` holds for the owners table; how long it took.
async fn wait_until(
    owners: &Owners,
    limit: Duration,
    mut done: impl FnMut(&HashMap<AgentId, String>) -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done(&owners.lock().unwrap_or_else(|e| e.into_inner())) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The agents `hub` holds now.
fn held_by(owners: &Owners, hub: &str) -> Vec<AgentId> {
    owners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, h)| *h == hub)
        .map(|(agent, _)| agent.clone())
        .collect()
}

/// Agents per hub.
fn per_hub(owners: &Owners) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for hub in owners.lock().unwrap_or_else(|e| e.into_inner()).values() {
        *counts.entry(hub.clone()).or_default() += 1;
    }
    counts
}
