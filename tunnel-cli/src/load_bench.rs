//! `tunnel bench fanout|load|storm|chaos|sustained`: many agents against one hub.
//!
//! The scenarios with thousands of agents run the hub as a child process (`tunnel hub`,
//! this same binary): its memory is measured on its own, it can be killed and
//! restarted like a real one, and each process stays within its open-file limit.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tower::{BoxError, service_fn};
use tunnel_proto::messages::{Gvr, Status};
use tunnel_proto::{Envelope, Format, MessageType, Payload};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::{Agent, AgentConfig, ConnectionState, Hub, HubSessions, Inbound, Router};
use tunnel_transport::fault::FaultProxy;
use tunnel_transport::{AgentId, AllowAll, ClientConfig, ServerConfig, WsConnector};

use crate::bench::{figure, median, percentile, sample_event};
use crate::demo::thousands;

// ---------------------------------------------------------------------------------
// Progress

/// A status line while a scenario runs: rewritten in place on a terminal, one line
/// every few seconds otherwise. On stderr, so figures on stdout stay clean.
pub(crate) struct Progress {
    scenario: &'static str,
    started: Instant,
    last: Option<Instant>,
    tty: bool,
}

impl Progress {
    pub(crate) fn new(scenario: &'static str) -> Self {
        Progress {
            scenario,
            started: Instant::now(),
            last: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Shows `what` unless a line went out very recently.
    pub(crate) fn update(&mut self, what: impl FnOnce() -> String) {
        let every = if self.tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        if self.last.is_some_and(|last| last.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let line = format!(
            "  [{} {:>5.1}s] {}",
            self.scenario,
            self.started.elapsed().as_secs_f64(),
            what()
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    /// Clears the status line.
    pub(crate) fn finish(self) {
        if self.tty && self.last.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

// ---------------------------------------------------------------------------------
// A hub in a child process

pub(crate) const TOKEN: &str = "bench-token";

/// `tunnel hub` running as a child process on a fixed loopback port, with its admin
/// server (for `/metrics`).
pub(crate) struct HubProcess {
    child: tokio::process::Child,
    pub(crate) port: u16,
    admin_port: u16,
    dir: PathBuf,
    sessions: bool,
    /// More `tunnel hub` arguments.
    extra: Vec<String>,
}

/// A free loopback port below Linux's ephemeral range (32768 and up), so no agent's
/// outgoing connection can take it while the hub is down during a restart.
fn free_port() -> Result<u16, String> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port in 20000-32000".into())
}

impl HubProcess {
    /// Starts a hub (with resumable sessions when `sessions`) and waits until it listens.
    pub(crate) async fn start(sessions: bool) -> Result<HubProcess, String> {
        Self::start_with(sessions, Vec::new()).await
    }

    /// [`HubProcess::start`] with more `tunnel hub` arguments.
    pub(crate) async fn start_with(
        sessions: bool,
        extra: Vec<String>,
    ) -> Result<HubProcess, String> {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let dir = std::env::temp_dir().join(format!(
            "tunnel-bench-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("token"), TOKEN).map_err(|e| e.to_string())?;
        let (port, admin_port) = (free_port()?, free_port()?);
        let child = Self::spawn(&dir, port, admin_port, sessions, &extra)?;
        let mut hub = HubProcess {
            child,
            port,
            admin_port,
            dir,
            sessions,
            extra,
        };
        hub.wait_listening().await?;
        Ok(hub)
    }

    fn spawn(
        dir: &std::path::Path,
        port: u16,
        admin_port: u16,
        sessions: bool,
        extra: &[String],
    ) -> Result<tokio::process::Child, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = tokio::process::Command::new(exe);
        command
            .args(["hub", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--log", "error", "--stats-interval", "3600"]);
        if !sessions {
            command.arg("--no-sessions");
        }
        command.args(extra);
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the hub process: {e}"))
    }

    async fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err()
            || TcpStream::connect(("127.0.0.1", self.admin_port))
                .await
                .is_err()
        {
            if Instant::now() > deadline {
                return Err("the hub process did not start listening".into());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the hub process exited: {status}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn pid(&self) -> Result<u32, String> {
        self.child
            .id()
            .ok_or_else(|| "the hub process is gone".into())
    }

    /// The hub's resident memory.
    pub(crate) fn rss_kib(&self) -> Result<u64, String> {
        crate::bench::rss_kib(self.pid()?)
    }

    /// Kills the hub (SIGKILL: a crash, no drain) and starts a new one on the same
    /// port; returns once it is started (it may take a moment to bind).
    pub(crate) async fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill().await;
        // The port may be busy for a moment; the new process retries binding.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = Self::spawn(
                &self.dir,
                self.port,
                self.admin_port,
                self.sessions,
                &self.extra,
            )?;
            match self.wait_listening().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The hub's `/metrics`, scraped over HTTP.
    pub(crate) async fn metrics(&self) -> Result<String, String> {
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            crate::status::http_get(&format!("http://127.0.0.1:{}/metrics", self.admin_port)),
        )
        .await
        .map_err(|_| "the hub's /metrics did not answer".to_string())??;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Messages of `kind` the hub has received, from its `/metrics`.
    pub(crate) async fn received(&self, kind: &str) -> Result<u64, String> {
        Ok(counter(
            &self.metrics().await?,
            "tunnel_messages_total",
            &[("direction", "in"), ("message_type", kind)],
        ))
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for HubProcess {
    /// Also on error paths: the hub process goes, and so does its token file.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sum of a Prometheus counter's series whose labels include `labels`.
pub(crate) fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

// ---------------------------------------------------------------------------------
// Many agents

/// Counts the agents' dial attempts after a drop (successful or not).
#[derive(Debug, Default)]
struct Attempts(AtomicU64);

impl tunnel_metrics::Recorder for Attempts {
    fn reconnect_attempt(&self, _reason: &'static str) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// An agent of a crowd: id `bench/<prefix>-<i>`, MessagePack, the given backoff, its
/// redials counted in `attempts`.
fn crowd_agent(
    url: &str,
    prefix: &str,
    i: usize,
    backoff: BackoffConfig,
    attempts: &Arc<Attempts>,
) -> Result<Agent, String> {
    let config = ClientConfig::new(AgentId::new("bench", format!("{prefix}-{i}")))
        .token(Some(TOKEN.into()))
        .format(Format::MsgPack);
    Agent::start(
        WsConnector::new(config),
        AgentConfig::new(url)
            .backoff(backoff)
            .recorder(attempts.clone()),
        Router::new(),
    )
    .map_err(|e| e.to_string())
}

fn is_up(state: &ConnectionState) -> bool {
    matches!(
        state,
        ConnectionState::Connected { .. }
            | ConnectionState::Resumed { .. }
            | ConnectionState::Reset { .. }
    )
}

/// Starts `n` agents, at most `parallel` dialling at once, and waits until all are
/// connected (or `limit` passes).
async fn start_crowd(
    url: &str,
    prefix: &str,
    n: usize,
    backoff: BackoffConfig,
    attempts: &Arc<Attempts>,
    progress: &mut Progress,
) -> Result<Vec<Agent>, String> {
    let mut agents = Vec::with_capacity(n);
    let parallel = Arc::new(Semaphore::new(256));
    let connected = Arc::new(AtomicUsize::new(0));
    for i in 0..n {
        let agent = crowd_agent(url, prefix, i, backoff, attempts)?;
        let permit = parallel
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (a, up) = (agent.clone(), connected.clone());
        tokio::spawn(async move {
            if a.wait_connected(Duration::from_secs(120)).await.is_ok() {
                up.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        agents.push(agent);
        progress.update(|| {
            format!(
                "{} of {} agents connected",
                thousands(connected.load(Ordering::Relaxed) as u64),
                thousands(n as u64)
            )
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} agents connected within 120 s",
                connected.load(Ordering::Relaxed)
            ));
        }
        progress.update(|| {
            format!(
                "{} of {} agents connected",
                thousands(connected.load(Ordering::Relaxed) as u64),
                thousands(n as u64)
            )
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(agents)
}

async fn stop_crowd(agents: Vec<Agent>) {
    let mut stops = tokio::task::JoinSet::new();
    for agent in agents {
        stops.spawn(async move { agent.shutdown().await });
        if stops.len() >= 512 {
            stops.join_next().await;
        }
    }
    while stops.join_next().await.is_some() {}
}

fn status_payload(i: usize, beat: u64) -> Result<Payload, String> {
    Payload::encode(
        Format::MsgPack,
        &Status {
            gvr: Gvr::new("tunnel.dev", "v1", "agents"),
            namespace: None,
            name: format!("agent-{i}"),
            status: serde_json::json!({"heartbeat": beat, "ready": true}),
            observed_generation: i64::try_from(beat).ok(),
        },
    )
    .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------
// load: N agents, a status each per second, for a while

pub(crate) async fn load(agents: usize, seconds: u64) -> Result<(), String> {
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
        &hub.url(),
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
            let held: usize = crowd.iter().filter_map(|a| a.held()).map(|(m, _)| m).sum();
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
    let half = backlogs.len() / 2;
    let first_half = backlogs[..half].iter().copied().max().unwrap_or(0);
    let second_half = backlogs[half..].iter().copied().max().unwrap_or(0);
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
        if second_half <= (2 * first_half).max(100) {
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
    Ok(())
}

// ---------------------------------------------------------------------------------
// storm: N agents connected, the hub restarted

pub(crate) async fn storm(agents: usize, accept_rate: Option<f64>) -> Result<(), String> {
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
        &hub.url(),
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
    let slots = samples
        .last()
        .map_or(0, |t| (t.as_millis() / 500) as usize + 1)
        .max(buckets.len());
    let mut completed = vec![0u64; slots];
    for t in &samples {
        completed[(t.as_millis() / 500) as usize] += 1;
    }
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
    let widest = buckets
        .iter()
        .chain(completed.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let rows = buckets.len().max(completed.len());
    let last_busy = (0..rows)
        .rev()
        .find(|&i| {
            buckets.get(i).copied().unwrap_or(0) + completed.get(i).copied().unwrap_or(0) > 0
        })
        .unwrap_or(0);
    for i in 0..=last_busy {
        let (a, b) = (
            buckets.get(i).copied().unwrap_or(0),
            completed.get(i).copied().unwrap_or(0),
        );
        println!(
            "  {:>5.1}s a {:>6} {:<25} b {:>6} {}",
            i as f64 * 0.5,
            thousands(a),
            "#".repeat((a * 25 / widest) as usize),
            thousands(b),
            "#".repeat((b * 25 / widest) as usize),
        );
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
    Ok(())
}

// ---------------------------------------------------------------------------------
// fanout: the hub sending to N agents

pub(crate) async fn fanout(agents: usize, per_agent: u64, runs: usize) -> Result<(), String> {
    println!(
        "\nfanout: one hub (in this process, resumable sessions) sending {} events to each of {} agents (MessagePack, {} bytes each), aggregate rate until every agent has all of its events, median of {} runs (each with a new hub and agents)",
        thousands(per_agent),
        thousands(agents as u64),
        Payload::encode(Format::MsgPack, &sample_event())
            .map_err(|e| e.to_string())?
            .len(),
        runs.max(1)
    );
    let mut rates = Vec::with_capacity(runs);
    for run in 1..=runs.max(1) {
        let rate = fanout_once(agents, per_agent).await?;
        println!("  run {run}: {} msg/s", thousands(rate as u64));
        rates.push(rate);
    }
    let rate = median(rates);
    println!(
        "  {} events per run: {} msg/s aggregate ({} the 500,000 bar)",
        thousands(per_agent * agents as u64),
        thousands(rate as u64),
        if rate >= 500_000.0 { "meets" } else { "BELOW" }
    );
    figure("fanout", "agents", agents as f64, "agents");
    figure("fanout", "aggregate_rate", rate, "msg/s");
    Ok(())
}

/// One fanout run: a new hub and `agents` agents; returns the aggregate rate.
async fn fanout_once(agents: usize, per_agent: u64) -> Result<f64, String> {
    let hub = crate::bench::resumable_hub(Router::new()).await?;
    let url = hub.url().ok_or("no hub address")?;
    let mut progress = Progress::new("fanout");
    let received = Arc::new(AtomicU64::new(0));
    let mut crowd = Vec::with_capacity(agents);
    for i in 0..agents {
        let received = received.clone();
        let router = Router::new().route(
            MessageType::Event,
            service_fn(move |_: Inbound| {
                received.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, BoxError>(()))
            }),
        );
        let config =
            ClientConfig::new(AgentId::new("bench", format!("fanout-{i}"))).format(Format::MsgPack);
        crowd.push(
            Agent::start(
                WsConnector::new(config),
                AgentConfig::new(url.clone()),
                router,
            )
            .map_err(|e| e.to_string())?,
        );
    }
    for agent in &crowd {
        agent
            .wait_connected(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
    }
    let ids: Vec<AgentId> = (0..agents)
        .map(|i| AgentId::new("bench", format!("fanout-{i}")))
        .collect();
    for id in &ids {
        hub.wait_for_agent(id, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
    }
    let payload = Payload::encode(Format::MsgPack, &sample_event()).map_err(|e| e.to_string())?;
    let total = per_agent * agents as u64;
    let started = Instant::now();
    // One sending task per core, each over half of the agents, round-robin so every
    // agent's queue has work at once.
    let mut senders = tokio::task::JoinSet::new();
    let workers = 2;
    for w in 0..workers {
        let (hub, payload) = (hub.clone(), payload.clone());
        let ids: Vec<AgentId> = ids.iter().skip(w).step_by(workers).cloned().collect();
        senders.spawn(async move {
            for _ in 0..per_agent {
                for id in &ids {
                    let mut env = Box::new(Envelope::new(0, MessageType::Event, 0));
                    env.payload = Some(payload.clone());
                    hub.send_envelope(id, env)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(())
        });
    }
    let deadline = started + Duration::from_secs(300);
    while received.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {total} events arrived within 300 s",
                received.load(Ordering::Relaxed)
            ));
        }
        if let Some(Ok(Err(e)) | Err(e)) = senders
            .try_join_next()
            .map(|r| r.map_err(|e| e.to_string()))
        {
            return Err(format!("fanout sender failed: {e}"));
        }
        progress.update(|| {
            format!(
                "{} of {} events delivered",
                thousands(received.load(Ordering::Relaxed)),
                thousands(total)
            )
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    progress.finish();
    while let Some(r) = senders.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    stop_crowd(crowd).await;
    hub.shutdown().await;
    Ok(total as f64 / elapsed.as_secs_f64())
}

// ---------------------------------------------------------------------------------
// chaos: the fault proxy cutting the connection under load

pub(crate) async fn chaos(seconds: u64, seed: u64) -> Result<(), String> {
    use rand::{Rng as _, SeedableRng as _};

    let (hub_seen, router) = checking_router();
    let hub = crate::bench::resumable_hub(router).await?;
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

// ---------------------------------------------------------------------------------
// sustained: one connection, the full stack

/// One-way events through the whole stack: a resumable hub, an agent with sessions (and
/// the same without sessions, to show what they cost),
/// OpenTelemetry metrics on both transports, and the metrics, timeout and tracing
/// layers on the agent's client.
pub(crate) fn sustained(n: u64, runs: usize, only: Option<crate::Codec>) -> Result<(), String> {
    if let Some(codec) = only {
        let (rate, _) = full_stack_run(n, codec.into(), true)?;
        println!("sustained {codec:?}: {} msg/s", thousands(rate as u64));
        return Ok(());
    }
    println!(
        "\nsustained: {} one-way events per run through the full stack (resumable session, OpenTelemetry metrics on both sides, metrics + timeout + tracing layers), median of {runs} runs, agent and hub on their own pinned cores",
        thousands(n)
    );
    for (format, bar) in [(Format::MsgPack, 2_000_000.0), (Format::Json, 1_400_000.0)] {
        for sessions in [true, false] {
            let mut rates = Vec::new();
            let mut size = 0;
            for _ in 0..runs {
                let (rate, bytes) = full_stack_run(n, format, sessions)?;
                rates.push(rate);
                size = bytes;
            }
            let rate = median(rates);
            let name = if sessions {
                format!("{format}, full stack")
            } else {
                format!("{format}, the same without sessions")
            };
            println!(
                "  {name:<36} ({size} B per event on the wire) {:>11} msg/s  ({} the {} bar)",
                thousands(rate as u64),
                if rate >= bar { "meets" } else { "BELOW" },
                thousands(bar as u64)
            );
            let key = if sessions { "" } else { "_no_sessions" };
            figure("sustained", &format!("{format}_rate{key}"), rate, "msg/s");
            figure(
                "sustained",
                &format!("{format}_event_bytes{key}"),
                size as f64,
                "By",
            );
        }
    }
    Ok(())
}

fn full_stack_run(n: u64, format: Format, sessions: bool) -> Result<(f64, u64), String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let bytes = wire_bytes.clone();
    let rate = crate::bench::two_sided(
        &crate::bench::THROUGHPUT_PLACEMENT,
        move |url_tx| {
            Box::pin(async move {
                let (router, all_in) = crate::bench::counting_router(n);
                let (recorder, _provider) = crate::stack_bench::otel_recorder();
                let mut config = ServerConfig::new(AllowAll);
                config.connection = config.connection.recorder(recorder);
                let hub = if sessions {
                    Hub::bind_resumable("127.0.0.1:0", config, router, HubSessions::default()).await
                } else {
                    Hub::bind("127.0.0.1:0", config, router).await
                };
                let Ok(hub) = hub else {
                    return;
                };
                crate::bench::serve_until_counted(hub, url_tx, done_tx, all_in).await;
            })
        },
        move |url| {
            Box::pin(async move {
                let (recorder, _provider) = crate::stack_bench::otel_recorder();
                let mut client =
                    ClientConfig::new(AgentId::new("bench", "sustained")).format(format);
                client.connection = client.connection.recorder(recorder.clone());
                let agent = crate::stack_bench::start_agent(&url, client).await?;
                let started = crate::stack_bench::drive_layered(&agent, recorder, n).await?;
                let finished = done_rx
                    .await
                    .map_err(|_| "not every message arrived".to_string())?;
                if let Some(sender) = agent.sender() {
                    let stats = sender.stats();
                    bytes.store(
                        stats.bytes_out / stats.messages_out.max(1),
                        Ordering::Relaxed,
                    );
                }
                agent.shutdown().await;
                Ok(n as f64 / (finished - started).as_secs_f64())
            })
        },
    )?;
    Ok((rate, wire_bytes.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_sums_the_matching_series_of_a_prometheus_counter() {
        let text = "\
# HELP tunnel_messages_total Messages sent and received
# TYPE tunnel_messages_total counter
tunnel_messages_total{direction=\"in\",message_type=\"status\",otel_scope_name=\"tunnel\"} 1200
tunnel_messages_total{direction=\"out\",message_type=\"status\",otel_scope_name=\"tunnel\"} 7
tunnel_messages_total{direction=\"in\",message_type=\"event\",otel_scope_name=\"tunnel\"} 30
tunnel_messages_total_created{direction=\"in\",message_type=\"status\"} 99
";
        let status_in = [("direction", "in"), ("message_type", "status")];
        assert_eq!(counter(text, "tunnel_messages_total", &status_in), 1200);
        assert_eq!(
            counter(text, "tunnel_messages_total", &[("direction", "in")]),
            1230
        );
        assert_eq!(counter(text, "tunnel_messages_total", &[]), 1237);
        assert_eq!(counter(text, "tunnel_errors_total", &[]), 0);
    }

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
