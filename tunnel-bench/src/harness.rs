//! The harness the scenarios share: a real `tunnel hub` process, in-process hubs and
//! agents, core placement, memory readings and the Prometheus reader.

use crate::report::{Progress, thousands};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, mpsc};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use tunnel_metrics::OtelRecorder;
use tunnel_proto::messages::{Event, Gvr, ObjectRef, Status};
use tunnel_proto::{Format, MessageType, Payload};
use tunnel_reconnect::BackoffConfig;
use tunnel_router::layer::metrics::MetricsLayer;
use tunnel_router::layer::timeout::TimeoutLayer;
use tunnel_router::layer::trace::TraceLayer;
use tunnel_router::{Agent, AgentConfig, ConnectionState, Hub, Inbound, Request, Response, Router};
use tunnel_transport::{AgentId, AllowAll, ClientConfig, Connector, ServerConfig, WsConnector};

pub(crate) fn sample_event() -> Event {
    Event {
        event_type: "Normal".into(),
        reason: "ScalingReplicaSet".into(),
        message: "Scaled up replica set web-7d4b9c8f5 to 3".into(),
        regarding: Some(ObjectRef {
            gvr: Gvr::new("apps", "v1", "deployments"),
            namespace: Some("default".into()),
            name: "web".into(),
        }),
    }
}

pub(crate) struct Placement {
    pub(crate) name: &'static str,
    pub(crate) client_core: usize,
    pub(crate) server_core: usize,
}

/// Client on core 0, server on core 1, each a single-thread runtime: as if agent and hub
/// ran on two machines. Both the baseline and tunnel are measured this way.
pub(crate) const THROUGHPUT_PLACEMENT: Placement = Placement {
    name: "cross core",
    client_core: 0,
    server_core: 1,
};

/// Pins the calling thread to `core` and builds a single-thread runtime for it (its
/// `block_on` runs on this thread).
pub(crate) fn pinned_runtime(core: usize) -> Result<tokio::runtime::Runtime, String> {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    if let Some(id) = ids.get(core % ids.len().max(1)) {
        core_affinity::set_for_current(*id);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Runs `server` on its own thread and runtime pinned to one core, and `client` on
/// another pinned to another (or the same) core.
pub(crate) fn two_sided<S, C, T>(placement: &Placement, server: S, client: C) -> Result<T, String>
where
    S: FnOnce(mpsc::Sender<String>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
        + Send
        + 'static,
    C: FnOnce(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>>>>
        + Send
        + 'static,
    T: Send + 'static,
{
    let (url_tx, mut url_rx) = mpsc::channel(1);
    let server_core = placement.server_core;
    let server_thread = std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            if let Ok(rt) = pinned_runtime(server_core) {
                rt.block_on(server(url_tx));
            }
        })
        .map_err(|e| e.to_string())?;
    let client_core = placement.client_core;
    let result = std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let rt = pinned_runtime(client_core)?;
            rt.block_on(async move {
                let url = url_rx.recv().await.ok_or("server did not start")?;
                client(url).await
            })
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "client thread panicked".to_string())?;
    let _ = server_thread.join();
    result
}

/// Both sides on one core, and (with a second core) on two: a latency figure is
/// reported for each, since a cross-core wake-up dominates a loopback round trip.
pub(crate) fn latency_placements() -> Vec<Placement> {
    let cores = core_affinity::get_core_ids().map_or(1, |c| c.len());
    let mut placements = vec![Placement {
        name: "same core",
        client_core: 0,
        server_core: 0,
    }];
    if cores > 1 {
        placements.push(THROUGHPUT_PLACEMENT);
    }
    placements
}

pub(crate) fn rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc status".to_string())
}

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
pub(crate) fn free_port() -> Result<u16, String> {
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
        let mut command = tokio::process::Command::new(hub_binary()?);
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
        rss_kib(self.pid()?)
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
            http_get(&format!("http://127.0.0.1:{}/metrics", self.admin_port)),
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

    /// Stops the hub in order (SIGTERM: it drains, its agents move), waiting at most
    /// `limit` for it to exit (then kills it); returns whether it exited by itself.
    pub(crate) async fn terminate(mut self, limit: Duration) -> Result<bool, String> {
        let pid = self.pid()?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -TERM {pid} failed: {sent}"));
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(_) => Ok(true),
            Err(_) => {
                let _ = self.child.kill().await;
                Ok(false)
            }
        }
    }
}

impl Drop for HubProcess {
    /// Also on error paths: the hub process goes, and so does its token file.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `tunnel` binary the hub processes run, once `main` has chosen it.
static HUB_BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Chooses the `tunnel` binary hub processes run: `given`, or else `tunnel` next to this
/// binary (where `cargo build` puts both). Only the scenarios that start a hub process
/// need it to exist.
pub(crate) fn set_hub_binary(given: Option<PathBuf>) -> Result<(), String> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this binary's folder: {e}"))?
            .with_file_name(format!("tunnel{}", std::env::consts::EXE_SUFFIX)),
    };
    let _ = HUB_BINARY.set(path);
    Ok(())
}

fn hub_binary() -> Result<&'static PathBuf, String> {
    let path = HUB_BINARY
        .get()
        .ok_or_else(|| "no hub binary chosen (set_hub_binary was not called)".to_string())?;
    if !path.is_file() {
        return Err(format!(
            "no `tunnel` binary at {}: build it (`cargo build --release -p tunnel-cli`) or pass --hub-binary",
            path.display()
        ));
    }
    Ok(path)
}

/// GETs `url` (plain `http://`, as the hub's admin server speaks) and returns the body,
/// at most 16 MiB, within 10 s.
pub(crate) async fn http_get(url: &str) -> Result<Bytes, String> {
    const MAX_BODY: usize = 16 << 20;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("no host in {url}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map_or_else(|| host.to_owned(), ToString::to_string);
    let fetch = async {
        let stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: HTTP {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| format!("{url}: no answer within 10 s"))?
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

/// A hub with resumable sessions on an ephemeral loopback port, open to any agent.
pub(crate) async fn resumable_hub(router: Router) -> Result<Hub, String> {
    Hub::bind("127.0.0.1:0", ServerConfig::new(AllowAll), router)
        .await
        .map_err(|e| e.to_string())
}

/// A router that counts events and notifies once `n` have arrived.
pub(crate) fn counting_router(n: u64) -> (Router, Arc<Notify>) {
    let received = Arc::new(AtomicU64::new(0));
    let all_in = Arc::new(Notify::new());
    let notify = all_in.clone();
    let router = Router::new().route(
        MessageType::Event,
        service_fn(move |_: Inbound| {
            if received.fetch_add(1, Ordering::Relaxed) + 1 == n {
                notify.notify_one();
            }
            std::future::ready(Ok::<_, BoxError>(()))
        }),
    );
    (router, all_in)
}

/// Reports the hub's URL, reports when `all_in` fires, lets the agent leave, stops.
pub(crate) async fn serve_until_counted(
    hub: Hub,
    url_tx: mpsc::Sender<String>,
    done: tokio::sync::oneshot::Sender<Instant>,
    all_in: Arc<Notify>,
) {
    let _ = url_tx.send(hub.url().unwrap_or_default()).await;
    if tokio::time::timeout(Duration::from_secs(120), all_in.notified())
        .await
        .is_ok()
    {
        let _ = done.send(Instant::now());
    }
    for _ in 0..1000 {
        if hub.agents().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hub.shutdown().await;
}

pub(crate) fn tunnel_throughput(n: u64, format: Format) -> Result<f64, String> {
    tunnel_throughput_with(n, format, false)
}

/// With `metrics`, each side records into its own OpenTelemetry SDK meter provider
/// (what `/metrics` reads), as two processes would.
pub(crate) fn tunnel_throughput_with(n: u64, format: Format, metrics: bool) -> Result<f64, String> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    two_sided(
        &THROUGHPUT_PLACEMENT,
        move |url_tx| Box::pin(tunnel_sink_server(url_tx, done_tx, n, metrics)),
        move |url| Box::pin(tunnel_source_client(url, done_rx, n, format, metrics)),
    )
}

/// A connection config recording into a fresh Prometheus-backed meter provider, or the
/// no-op default.
pub(crate) fn connection_metrics(
    metrics: bool,
) -> (
    tunnel_transport::ConnectionConfig,
    Option<tunnel_metrics::prometheus::PrometheusMetrics>,
) {
    let config = tunnel_transport::ConnectionConfig::default();
    if !metrics {
        return (config, None);
    }
    match tunnel_metrics::prometheus::PrometheusMetrics::new() {
        Ok(m) => (config.recorder(m.recorder()), Some(m)),
        Err(_) => (config, None),
    }
}

pub(crate) async fn tunnel_sink_server(
    url_tx: mpsc::Sender<String>,
    done: tokio::sync::oneshot::Sender<Instant>,
    n: u64,
    metrics: bool,
) {
    let (router, all_in) = counting_router(n);
    let (connection, _metrics) = connection_metrics(metrics);
    let config = ServerConfig::new(AllowAll).connection(connection);
    let Ok(hub) = Hub::bind_with(
        "127.0.0.1:0",
        config,
        router,
        tunnel_router::HubConfig::default().without_sessions(),
    )
    .await
    else {
        return;
    };
    serve_until_counted(hub, url_tx, done, all_in).await;
}

pub(crate) async fn tunnel_source_client(
    url: String,
    done: tokio::sync::oneshot::Receiver<Instant>,
    n: u64,
    format: Format,
    metrics: bool,
) -> Result<f64, String> {
    let (connection, _metrics) = connection_metrics(metrics);
    let config = ClientConfig::new(AgentId::new("bench", "agent"))
        .format(format)
        .connection(connection);
    let conn = WsConnector::new(config)
        .connect(&url)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, mut receiver) = conn.split();
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = receiver.recv().await {} });
    let event = sample_event();
    let started = Instant::now();
    for _ in 0..n {
        let env = sender
            .envelope(MessageType::Event)
            .with_payload(Payload::encode(format, &event).map_err(|e| e.to_string())?);
        sender.send(&env).await.map_err(|e| e.to_string())?;
    }
    let finished = done
        .await
        .map_err(|_| "not every message arrived".to_string())?;
    let rate = n as f64 / (finished - started).as_secs_f64();
    sender.close(tunnel_proto::CloseCode::NORMAL, "done").await;
    let _ = drain.await;
    Ok(rate)
}

/// An OpenTelemetry recorder on a real SDK meter provider (aggregating in memory, as
/// it would before an exporter collects).
pub(crate) fn otel_recorder() -> (Arc<OtelRecorder>, SdkMeterProvider) {
    let provider = SdkMeterProvider::builder()
        .with_reader(ManualReader::builder().build())
        .build();
    let recorder = Arc::new(OtelRecorder::new(&provider.meter("tunnel-bench")));
    (recorder, provider)
}

/// Starts an agent on `url` and waits until it is connected.
pub(crate) async fn start_agent(url: &str, config: ClientConfig) -> Result<Agent, String> {
    let agent = Agent::start(
        WsConnector::new(config),
        AgentConfig::new(url),
        Router::new(),
    )
    .map_err(|e| e.to_string())?;
    agent
        .wait_connected(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    Ok(agent)
}

/// Sends `n` one-way events through the agent's client behind the metrics (recording
/// into `recorder`), timeout and tracing layers: the full stack of the benchmarks.
pub(crate) async fn drive_layered(
    agent: &Agent,
    recorder: Arc<OtelRecorder>,
    n: u64,
) -> Result<Instant, String> {
    drive(layered(agent, recorder), agent.format(), n).await
}

/// The agent's client behind the metrics (recording into `recorder`), timeout and
/// tracing layers: the benchmarks' full client stack.
pub(crate) fn layered(
    agent: &Agent,
    recorder: Arc<OtelRecorder>,
) -> impl Service<Request, Response = Response, Error = BoxError> {
    ServiceBuilder::new()
        .layer(MetricsLayer::new(recorder))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(TraceLayer::new())
        .service(agent.client())
}

/// Sends `n` one-way events through `svc`, one call at a time, their payloads encoded
/// in the connection's `format` (as `Request::encoded` advises).
pub(crate) async fn drive<S>(mut svc: S, format: Format, n: u64) -> Result<Instant, String>
where
    S: Service<Request, Response = Response>,
    S::Error: std::fmt::Display,
{
    let event = sample_event();
    let started = Instant::now();
    for _ in 0..n {
        let request = Request::encoded(
            MessageType::Event,
            Payload::encode(format, &event).map_err(|e| e.to_string())?,
        );
        svc.ready()
            .await
            .map_err(|e| e.to_string())?
            .call(request)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(started)
}

/// Counts the agents' dial attempts after a drop (successful or not).
#[derive(Debug, Default)]
pub(crate) struct Attempts(pub(crate) AtomicU64);

impl tunnel_metrics::Recorder for Attempts {
    fn reconnect_attempt(&self, _reason: &'static str) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// An agent of a crowd: id `bench/<prefix>-<i>`, MessagePack, the given backoff, its
/// redials counted in `attempts`; it dials `urls` in order, starting at the `i`-th (so
/// a crowd spreads over several hubs).
pub(crate) fn crowd_agent(
    urls: &[String],
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
        AgentConfig::with_endpoints((0..urls.len()).map(|k| urls[(i + k) % urls.len()].clone()))
            .backoff(backoff)
            .recorder(attempts.clone()),
        Router::new(),
    )
    .map_err(|e| e.to_string())
}

pub(crate) fn is_up(state: &ConnectionState) -> bool {
    matches!(
        state,
        ConnectionState::Connected { .. }
            | ConnectionState::Resumed { .. }
            | ConnectionState::Reset { .. }
    )
}

/// Starts `n` agents, at most `parallel` dialling at once, and waits until all are
/// connected (or `limit` passes).
pub(crate) async fn start_crowd(
    urls: &[String],
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
        let agent = crowd_agent(urls, prefix, i, backoff, attempts)?;
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

pub(crate) async fn stop_crowd(agents: Vec<Agent>) {
    let mut stops = tokio::task::JoinSet::new();
    for agent in agents {
        stops.spawn(async move { agent.shutdown().await });
        if stops.len() >= 512 {
            stops.join_next().await;
        }
    }
    while stops.join_next().await.is_some() {}
}

pub(crate) fn status_payload(i: usize, beat: u64) -> Result<Payload, String> {
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
}
