//! `tunnel hub` and `tunnel agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use tower::{BoxError, service_fn};
use tunnel_proto::MessageType;
use tunnel_proto::messages::{Command, Gvr, Status};
use tunnel_router::{Agent, AgentConfig, Hub, HubSessions, Inbound, Router};
use tunnel_transport::{AgentId, ClientConfig, ServerConfig, SharedToken, WsConnector};

use crate::{Codec, read_token};

#[derive(Debug, Args)]
pub(crate) struct HubArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the bearer token agents must present.
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// Only admit agents of these workspaces (repeatable); default: any.
    #[arg(long = "allow-workspace", value_name = "WORKSPACE")]
    allow_workspaces: Vec<String>,
    /// Seconds between statistics lines.
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Seconds a disconnected agent's session is kept for it to resume; later it is reset.
    #[arg(long, default_value_t = 60)]
    session_grace: u64,
    /// Do not keep sessions: no resume, no replay (every connection starts afresh).
    #[arg(long)]
    no_sessions: bool,
}

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The hub's URL.
    #[arg(long, default_value = "ws://127.0.0.1:7070/")]
    url: String,
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

pub(crate) async fn hub(args: HubArgs) -> Result<(), String> {
    let token = read_token(&args.token_file)?;
    let mut auth = SharedToken::new(token);
    if !args.allow_workspaces.is_empty() {
        auth = auth.allow_workspaces(args.allow_workspaces.clone());
    }
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let router = Router::new()
        .route(
            MessageType::Reply,
            service_fn(|msg: Inbound| async move {
                tracing::info!(agent = %msg.agent(), corr = ?msg.envelope.correlation, "reply");
                Ok::<_, BoxError>(())
            }),
        )
        .fallback(service_fn(move |msg: Inbound| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move {
                tracing::debug!(agent = %msg.agent(), kind = %msg.envelope.kind, "message");
                Ok::<_, BoxError>(())
            }
        }));
    let config = ServerConfig::new(auth);
    let hub = if args.no_sessions {
        Hub::bind(args.listen, config, router).await
    } else {
        let sessions = HubSessions::default().grace(Duration::from_secs(args.session_grace));
        Hub::bind_resumable(args.listen, config, router, sessions).await
    }
    .map_err(|e| e.to_string())?;
    tracing::info!(url = %hub.url().unwrap_or_default(), "hub listening");
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
    tracing::info!("shutting down");
    hub.shutdown().await;
    Ok(())
}

pub(crate) async fn agent(args: AgentArgs) -> Result<(), String> {
    let token = read_token(&args.token_file)?;
    let id = AgentId::new(args.workspace.clone(), args.sync_target.clone());
    let config = ClientConfig::new(id.clone())
        .token(Some(token))
        .format(args.codec.into());
    let router = Router::new()
        .route(
            MessageType::Command,
            service_fn(|msg: Inbound| async move {
                let command = msg.envelope.decode_payload::<Command>()?;
                tracing::info!(command = %command.name, args = ?command.args, "command from hub");
                let sender = msg.sender();
                let reply = sender
                    .envelope(MessageType::Reply)
                    .with_correlation(msg.envelope.id)
                    .with_payload(sender.payload(&serde_json::json!({"done": command.name}))?);
                sender.send(&reply).await?;
                Ok::<_, BoxError>(())
            }),
        )
        .fallback(service_fn(|msg: Inbound| async move {
            tracing::info!(kind = %msg.envelope.kind, "message from hub");
            Ok::<_, BoxError>(())
        }));
    let agent = Agent::start(
        WsConnector::new(config),
        AgentConfig::new(&args.url),
        router,
    )
    .map_err(|e| e.to_string())?;
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
                // Held and replayed by the session while the hub is unreachable.
                if let Err(e) = agent.send(MessageType::Status, &status).await {
                    tracing::warn!(error = %e, "status not accepted");
                }
            }
        }
    }
    agent.shutdown().await;
    Ok(())
}
