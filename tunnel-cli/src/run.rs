//! `tunnel hub` and `tunnel agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use tower::{BoxError, service_fn};
use tower::{Service, ServiceExt};
use tunnel_proto::MessageType;
use tunnel_proto::messages::{Command, Gvr, Status};
use tunnel_router::{
    AgentConfig, Drain, Hub, HubSessions, Inbound, Pool, PoolMode, Request, Router,
};
use tunnel_transport::{AgentId, ClientConfig, ServerConfig, SharedToken, TokenFile, WsConnector};

use tunnel_cluster::{Cluster, ClusterConfig};
use tunnel_router::admin::{Admin, AdminServer};
use tunnel_router::layer::metrics::MetricsLayer;
use tunnel_router::layer::trace::TraceLayer;

use crate::{Codec, read_token};

#[derive(Debug, Args)]
pub(crate) struct HubArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the one bearer token every agent presents.
    #[arg(long, value_name = "FILE", required_unless_present = "tokens")]
    token_file: Option<PathBuf>,
    /// A token file granting each token the identities it may claim (lines of
    /// `token workspace [sync-targets...]`, `*` for any); reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", conflicts_with = "token_file")]
    tokens: Option<PathBuf>,
    /// Only admit agents of these workspaces (repeatable); default: any.
    #[arg(long = "allow-workspace", value_name = "WORKSPACE")]
    allow_workspaces: Vec<String>,
    /// Seconds between statistics lines.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Seconds a disconnected agent's session is kept for it to resume; later it is reset
    /// (default 60). With `--nats`, the cluster's grace: every hub must give the same,
    /// at most the up stream's duplicate window (2 min), and a session resumes on any
    /// hub when its hub drains, stops, crashes or hangs.
    #[arg(long, conflicts_with = "no_sessions")]
    session_grace: Option<u64>,
    /// Do not keep sessions: no resume, no replay (every connection starts afresh).
    #[arg(long)]
    no_sessions: bool,
    /// Most authenticated agent connections at once; more are answered `503` with
    /// `Retry-After`. Default: what the open-file limit leaves after the admin server
    /// and connections in their handshake (at most 16,384); a value over that is refused.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most authenticated connections taken in per second (one second of burst); the
    /// rest wait their turn, so a reconnect storm comes back at this rate.
    #[arg(long)]
    accept_rate: Option<f64>,
    /// On SIGTERM or Ctrl-C, seconds agents get to finish and move to another hub
    /// before the hub closes their connections (0: close at once).
    #[arg(long, default_value_t = 15)]
    drain_timeout: u64,
    /// On drain, point agents at this hub instead of their own list (repeatable; agents
    /// follow it only to hubs their own configuration allows).
    #[arg(long = "drain-to", value_name = "URL")]
    drain_to: Vec<String>,
    /// Serve /metrics, /healthz, /readyz and /agents over HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Join a hub cluster on this NATS server (`nats://host:port`): agents' messages go
    /// to the TUNNEL_UP stream, backends reach agents through TUNNEL_DOWN and calls
    /// (PROTOCOL.md section 10).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// This hub's name in the cluster, unique in it (default: `hub-<listen address>`).
    #[arg(long, value_name = "NAME", requires = "nats")]
    hub_id: Option<String>,
    /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require agents to present a certificate from this CA (PEM) naming their sync
    /// target (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// A hub's URL (repeatable: several hubs make a pool).
    #[arg(long = "url", default_value = "ws://127.0.0.1:7070/")]
    urls: Vec<String>,
    /// How several hubs are used: one connection moving on failure, or one per hub.
    #[arg(long, value_enum, default_value_t = Mode::Failover)]
    mode: Mode,
    /// This agent's sync target.
    #[arg(long)]
    sync_target: String,
    /// This agent's workspace.
    #[arg(long)]
    workspace: String,
    /// File holding the bearer token.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// Codec to use.
    #[arg(long, value_enum, default_value_t = Codec::Msgpack)]
    codec: Codec,
    /// Seconds between status heartbeats sent to the hub.
    #[arg(long, default_value_t = 5)]
    status_interval: u64,
    /// Serve /metrics, /healthz and /readyz (ready while a hub connection is up) over
    /// HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// For wss:// hubs: trust this CA (PEM) instead of the system roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Present this certificate chain (PEM) for mutual TLS; needs --client-key.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// A draining hub may send this agent to hubs of this origin (`wss://host:port`,
    /// repeatable) besides its own --url list; default: only its own list.
    #[arg(long = "follow-drain-to", value_name = "ORIGIN")]
    follow_drain_to: Vec<String>,
    /// Longest wait a hub can impose before a reconnect (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    max_hub_wait: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// One connection, to the first hub that works; moves on failure or drain.
    Failover,
    /// One connection per hub, messages balanced over those that are up.
    Spread,
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM (what an orchestrator sends).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The agent's TLS settings, when any hub is `wss://`.
fn agent_tls(args: &AgentArgs) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !args.urls.iter().any(|u| u.starts_with("wss://")) {
        return Ok(None);
    }
    let client = match (&args.client_cert, &args.client_key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        _ => None,
    };
    tunnel_transport::tls::client_config(args.ca_file.as_deref(), client)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Reloads the token file on SIGHUP (keeping the old grants if the file is bad).
async fn reload_on_sighup(tokens: Arc<TokenFile>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match tokens.reload() {
                Ok(grants) => tracing::info!(grants, "token file reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "token file not reloaded; keeping the previous grants")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokens;
}

/// Serves `admin` (plus `/metrics` from `metrics`) on `addr`, if one was given.
async fn serve_admin(
    admin: Admin,
    addr: Option<SocketAddr>,
    metrics: &tunnel_metrics::prometheus::PrometheusMetrics,
) -> Result<Option<AdminServer>, String> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let render = metrics.clone();
    let server = admin
        .metrics(move || render.render())
        .bind(addr)
        .await
        .map_err(|e| format!("cannot serve the admin endpoints on {addr}: {e}"))?;
    tracing::info!(url = %format!("http://{}/", server.local_addr()), "admin endpoints");
    Ok(Some(server))
}

/// Connections the admin server may hold.
const ADMIN_CONNECTIONS: usize = 32;

/// Descriptors kept for everything else (listeners, log files, the runtime, a spare).
const OTHER_DESCRIPTORS: u64 = 32;

/// How a hub's open-file limit is shared out: (agent connections, connections in
/// their handshake). Agent connections and handshakes together never take the
/// descriptors the admin server and the rest need, so exhausting one listener cannot
/// take the other down.
fn descriptor_plan(
    open_files: u64,
    max_connections: Option<usize>,
) -> Result<(usize, usize), String> {
    let usable = open_files.saturating_sub(OTHER_DESCRIPTORS + ADMIN_CONNECTIONS as u64);
    let usable = usize::try_from(usable).unwrap_or(usize::MAX);
    // A quarter for handshakes, at most the library's default.
    let handshakes = (usable / 4).clamp(1, 1024);
    let room = usable.saturating_sub(handshakes);
    if room == 0 {
        return Err(format!(
            "the open-file limit ({open_files}) leaves no room for agents; raise it (ulimit -n)"
        ));
    }
    match max_connections {
        Some(0) => Err("--max-connections 0 would refuse every agent".into()),
        Some(n) if n > room => Err(format!(
            "--max-connections {n} cannot take effect: the open-file limit ({open_files}) \
             leaves room for {room} agent connections; raise it (ulimit -n) or lower the flag"
        )),
        Some(n) => Ok((n, handshakes)),
        None => Ok((room.min(16_384), handshakes)),
    }
}

/// Refuses hub flags that could not take effect.
fn check_hub_args(args: &HubArgs) -> Result<(), String> {
    if !args.drain_to.is_empty() && args.drain_timeout == 0 {
        return Err(
            "--drain-to has no effect with --drain-timeout 0 (the hub closes at once)".into(),
        );
    }
    if let Some(rate) = args.accept_rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(format!(
            "--accept-rate must be a positive number, not {rate}"
        ));
    }
    if args.allow_workspaces.iter().any(|w| w.trim().is_empty()) {
        return Err("--allow-workspace needs a workspace name".into());
    }
    for url in &args.drain_to {
        check_hub_url("--drain-to", url)?;
    }
    Ok(())
}

fn check_hub_url(flag: &str, url: &str) -> Result<(), String> {
    if url.starts_with("ws://") || url.starts_with("wss://") {
        Ok(())
    } else {
        Err(format!(
            "{flag} {url}: a hub URL starts with ws:// or wss://"
        ))
    }
}

/// Refuses agent flags that could not take effect.
fn check_agent_args(args: &AgentArgs) -> Result<(), String> {
    for url in &args.urls {
        check_hub_url("--url", url)?;
    }
    for origin in &args.follow_drain_to {
        check_hub_url("--follow-drain-to", origin)?;
    }
    let tls = args.urls.iter().any(|u| u.starts_with("wss://"));
    if !tls && (args.ca_file.is_some() || args.client_cert.is_some()) {
        return Err("--ca-file and --client-cert need a wss:// --url".into());
    }
    if args.mode == Mode::Spread && !args.follow_drain_to.is_empty() {
        return Err(
            "--follow-drain-to has no effect with --mode spread (each connection stays on its hub)"
                .into(),
        );
    }
    Ok(())
}

/// A hub's default name in a cluster: its listen address, unique on one machine.
/// (On an ephemeral port, the process id stands in for the port.)
fn default_hub_id(listen: SocketAddr) -> String {
    if listen.port() == 0 {
        format!("hub-{}-pid{}", listen.ip(), std::process::id())
    } else {
        format!("hub-{listen}")
    }
}

pub(crate) async fn hub(args: HubArgs) -> Result<(), String> {
    check_hub_args(&args)?;
    let open_files = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    let (max_connections, max_handshakes) = descriptor_plan(open_files, args.max_connections)?;
    let auth: Arc<dyn tunnel_transport::Authenticator> = match (&args.tokens, &args.token_file) {
        (Some(path), _) => {
            let tokens = Arc::new(TokenFile::load(path).map_err(|e| e.to_string())?);
            tokio::spawn(reload_on_sighup(tokens.clone()));
            tokens
        }
        (None, Some(path)) => Arc::new(SharedToken::new(read_token(path)?)),
        (None, None) => return Err("give --token-file or --tokens".into()),
    };
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let metrics = crate::telemetry::metrics()?;
    // The sessions' grace, which in a cluster is the cluster's (its sessions bucket).
    let grace = Duration::from_secs(args.session_grace.unwrap_or(60));
    let cluster = match &args.nats {
        Some(url) => {
            let id = args
                .hub_id
                .clone()
                .unwrap_or_else(|| default_hub_id(args.listen));
            let cluster =
                Cluster::connect(ClusterConfig::new(url.clone(), id).session_grace(grace))
                    .await
                    .map_err(|e| e.to_string())?;
            tracing::info!(nats = %url, hub_id = %cluster.hub_id(), "joined the cluster");
            Some(cluster)
        }
        None => None,
    };
    let store = cluster.clone();
    // A span per handled message (continuing the agent's trace) and its latency. In a
    // cluster every message goes to the up stream; alone, it is counted and dropped.
    let router = Router::new()
        .fallback(service_fn(move |msg: Inbound| {
            counter.fetch_add(1, Ordering::Relaxed);
            let store = store.clone();
            async move {
                tracing::debug!(agent = %msg.agent(), kind = %tunnel_proto::text::Untrusted(msg.envelope.kind.as_str()), "message");
                match store {
                    Some(cluster) => cluster.store(&msg).await,
                    None => Ok::<_, BoxError>(()),
                }
            }
        }))
        .layer(TraceLayer::new())
        .layer(MetricsLayer::new(metrics.recorder()));
    // In a cluster, stores are pipelined: acknowledged when the stream has them.
    let router = if cluster.is_some() {
        router.acknowledge_later()
    } else {
        router
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            tunnel_transport::tls::server_config(cert, key, args.client_ca.as_deref())
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let mut config = ServerConfig::new(auth)
        .connection(tunnel_transport::ConnectionConfig::default().recorder(metrics.recorder()))
        .max_connections(Some(max_connections))
        .max_handshakes(max_handshakes)
        .accept_rate(args.accept_rate)
        .tls(tls);
    // An admission rule, whatever the authenticator.
    if !args.allow_workspaces.is_empty() {
        config = config.allow_workspaces(args.allow_workspaces.clone());
    }
    let hub = if args.no_sessions {
        Hub::bind_with(
            args.listen,
            config,
            router,
            tunnel_router::HubConfig::default().without_sessions(),
        )
        .await
    } else {
        let mut sessions = HubSessions::default().grace(grace);
        // In a cluster, sessions live in NATS, for any hub to resume.
        if let Some(cluster) = &cluster {
            sessions = sessions.store(cluster.session_store().map_err(|e| e.to_string())?);
        }
        Hub::bind_with(
            args.listen,
            config,
            router,
            tunnel_router::HubConfig::default()
                .sessions(tunnel_router::SessionRegistry::new(sessions)),
        )
        .await
    }
    .map_err(|e| e.to_string())?;
    tracing::info!(url = %hub.url().unwrap_or_default(), "hub listening");
    let serving = cluster.as_ref().map(|c| c.serve(&hub));
    let mut admin = Admin::new()
        .hub(hub.clone())
        .max_connections(ADMIN_CONNECTIONS);
    if let Some(cluster) = &cluster {
        // Without NATS the hub cannot store what agents send: not ready.
        let cluster = cluster.clone();
        admin = admin.ready_when("nats", move || cluster.is_connected());
    }
    let _admin = serve_admin(admin, args.admin_listen, &metrics).await?;
    let mut ticker = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    ticker.tick().await;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut last = 0;
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = ticker.tick() => {
                let now = received.load(Ordering::Relaxed);
                tracing::info!(agents = hub.agents().len(), received = now, per_second = (now - last) / args.stats_interval.max(1), "stats");
                last = now;
            }
        }
    }
    if args.drain_timeout > 0 {
        tracing::info!(
            timeout_s = args.drain_timeout,
            "draining: agents move, then the hub stops"
        );
        let drain = Drain::default()
            .timeout(Duration::from_secs(args.drain_timeout))
            .endpoints(args.drain_to.clone());
        hub.drain(drain).await;
    } else {
        tracing::info!("shutting down");
        hub.shutdown().await;
    }
    // Once the agents are gone (their sessions saved): the deletes of what they
    // acknowledged land before the process ends.
    if let Some(serving) = serving {
        serving.stop().await;
    }
    Ok(())
}

pub(crate) async fn agent(args: AgentArgs) -> Result<(), String> {
    check_agent_args(&args)?;
    // Read now to fail early, and again on every connect: a rotated token in the file
    // is used from the next reconnect on.
    let token = read_token(&args.token_file)?;
    let token_file = args.token_file.clone();
    let id = AgentId::new(args.workspace.clone(), args.sync_target.clone());
    let metrics = crate::telemetry::metrics()?;
    let format: tunnel_proto::Format = args.codec.into();
    let config = ClientConfig::new(id.clone())
        .token(Some(token))
        .token_source(move || read_token(&token_file).ok())
        .tls(agent_tls(&args)?)
        .format(format)
        .connection(tunnel_transport::ConnectionConfig::default().recorder(metrics.recorder()));
    let router = Router::new()
        .route(
            MessageType::Command,
            service_fn(|msg: Inbound| async move {
                let command = msg.envelope.decode_payload::<Command>()?;
                tracing::info!(command = %tunnel_proto::text::Untrusted(&command.name), args = %tunnel_proto::text::Untrusted(&format!("{:?}", command.args)), "command from hub");
                // The answer to a request (`expect: reply`); ignored otherwise.
                Ok::<_, BoxError>(msg.encode(&serde_json::json!({"done": command.name}))?)
            }),
        )
        .fallback(service_fn(|msg: Inbound| async move {
            tracing::info!(kind = %tunnel_proto::text::Untrusted(msg.envelope.kind.as_str()), "message from hub");
            Ok::<_, BoxError>(())
        }))
        .layer(TraceLayer::new());
    let mode = match args.mode {
        Mode::Failover => PoolMode::Failover,
        Mode::Spread => PoolMode::Spread,
    };
    let pool = Pool::start(
        mode,
        WsConnector::new(config),
        AgentConfig::with_endpoints(args.urls.clone())
            .recorder(metrics.recorder())
            .max_hub_wait(Duration::from_secs(args.max_hub_wait))
            .redirects(if args.follow_drain_to.is_empty() {
                tunnel_router::Redirects::Listed
            } else {
                tunnel_router::Redirects::Origins(args.follow_drain_to.clone())
            }),
        router,
    )
    .map_err(|e| e.to_string())?;
    let _admin = serve_admin(Admin::new().pool(pool.clone()), args.admin_listen, &metrics).await?;
    // Each heartbeat gets a span whose context travels to the hub.
    let mut client = tower::ServiceBuilder::new()
        .layer(MetricsLayer::new(metrics.recorder()))
        .layer(TraceLayer::new())
        .service(pool.client());
    let mut ticker = tokio::time::interval(Duration::from_secs(args.status_interval.max(1)));
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut beat = 0u64;
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = ticker.tick() => {
                beat += 1;
                let status = Status {
                    gvr: Gvr::new("tunnel.dev", "v1", "agents"),
                    namespace: None,
                    name: id.sync_target.clone(),
                    status: serde_json::json!({"heartbeat": beat}),
                    observed_generation: None,
                };
                // Held and replayed by the session while the hub is unreachable (in
                // spread mode, sent through a connection that is up).
                // Encoded in the connection's codec: not transcoded on the way.
                let sent = match tunnel_proto::Payload::encode(format, &status).map(|p| Request::encoded(MessageType::Status, p)) {
                    Ok(request) => match tokio::time::timeout(Duration::from_secs(5), client.ready()).await {
                        Ok(Ok(ready)) => ready.call(request).await.map(drop).map_err(|e| e.to_string()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no hub connection is up".into()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, readiness = %pool.readiness(), "status not accepted");
                }
            }
        }
    }
    pool.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Hub {
        #[command(flatten)]
        args: HubArgs,
    }

    #[derive(Debug, Parser)]
    struct AgentCli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn hub_args(extra: &[&str]) -> Result<HubArgs, String> {
        let argv = ["hub", "--token-file", "t"].iter().chain(extra);
        Hub::try_parse_from(argv)
            .map(|h| h.args)
            .map_err(|e| e.to_string())
    }

    fn agent_args(extra: &[&str]) -> AgentArgs {
        let argv = [
            "agent",
            "--workspace",
            "w",
            "--sync-target",
            "s",
            "--token-file",
            "t",
        ]
        .iter()
        .chain(extra);
        AgentCli::try_parse_from(argv).expect("parses").args
    }

    #[test]
    fn hub_flags_that_cannot_take_effect_are_refused() {
        assert!(check_hub_args(&hub_args(&[]).expect("parses")).is_ok());
        for bad in [
            &["--drain-to", "ws://b:1/", "--drain-timeout", "0"][..],
            &["--accept-rate", "0"],
            &["--accept-rate=-3"],
            &["--accept-rate", "NaN"],
            &["--drain-to", "http://b:1/"],
        ] {
            let args = hub_args(bad).expect("parses");
            assert!(check_hub_args(&args).is_err(), "{bad:?} accepted");
        }
        // Refused by the parser itself.
        assert!(hub_args(&["--no-sessions", "--session-grace", "5"]).is_err());
        assert!(
            hub_args(&["--tokens", "f"]).is_err(),
            "--tokens with --token-file"
        );
    }

    #[test]
    fn agent_flags_that_cannot_take_effect_are_refused() {
        assert!(check_agent_args(&agent_args(&[])).is_ok());
        assert!(check_agent_args(&agent_args(&["--ca-file", "ca.pem"])).is_err());
        assert!(check_agent_args(&agent_args(&["--url", "http://h/"])).is_err());
        assert!(
            check_agent_args(&agent_args(&[
                "--mode",
                "spread",
                "--follow-drain-to",
                "ws://h:1"
            ]))
            .is_err()
        );
        assert!(
            check_agent_args(&agent_args(&["--url", "wss://h/", "--ca-file", "ca.pem"])).is_ok()
        );
    }

    #[test]
    fn the_open_file_limit_is_shared_so_no_listener_starves_another() {
        // 256 descriptors: 64 for the admin server and the rest, 48 for handshakes.
        assert_eq!(descriptor_plan(256, None), Ok((144, 48)));
        assert_eq!(descriptor_plan(256, Some(100)), Ok((100, 48)));
        assert!(
            descriptor_plan(256, Some(145)).is_err(),
            "over what the limit allows"
        );
        assert!(descriptor_plan(256, Some(0)).is_err());
        assert!(descriptor_plan(64, None).is_err(), "no room at all");
        assert_eq!(descriptor_plan(1 << 20, None), Ok((16_384, 1024)));
    }
}
