//! An HTTP admin server for operators: health, readiness, metrics and agents.
//!
//! | path | answers |
//! |---|---|
//! | `GET /healthz` | `200 ok` while the process serves at all |
//! | `GET /readyz` | `200` when ready, `503` otherwise: a hub is ready while it accepts agents (not draining or shut down); an agent's pool while at least one connection is up. The body says why, with the pool's `connected/desired`. |
//! | `GET /metrics` | the Prometheus text exposition, when a renderer was given, else `404` |
//! | `GET /agents` | a hub's connected agents as JSON ([`AgentStatus`] array), else `404` |
//!
//! The server is bounded so that it can never take the process down: at most
//! [`Admin::max_connections`] connections at once (more are closed at once), request
//! headers must arrive within 5 s, a connection lives at most a minute, and request
//! bodies (no route reads one) are limited to 4 KiB.
//!
//! ```no_run
//! use tunnel_router::{Hub, Router, admin::Admin};
//! use tunnel_transport::{AllowAll, ServerConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = Hub::bind("0.0.0.0:7070", ServerConfig::new(AllowAll), Router::new()).await?;
//! let admin = Admin::new().hub(hub.clone()).bind("127.0.0.1:9090").await?;
//! println!("admin on http://{}/", admin.local_addr());
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio_util::sync::CancellationToken;

use crate::hub::{AgentStatus, Hub};
use crate::pool::Pool;

type Render = dyn Fn() -> String + Send + Sync;

/// What the admin server reports on. Build it, then [`Admin::bind`].
#[derive(Clone)]
pub struct Admin {
    hub: Option<Hub>,
    pool: Option<Pool>,
    metrics: Option<Arc<Render>>,
    checks: Vec<(String, Arc<Check>)>,
    max_connections: usize,
}

/// A readiness condition of [`Admin::ready_when`].
type Check = dyn Fn() -> bool + Send + Sync;

impl Default for Admin {
    fn default() -> Self {
        Admin {
            hub: None,
            pool: None,
            metrics: None,
            checks: Vec::new(),
            max_connections: 32,
        }
    }
}

/// Longest a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an admin connection stays open, requests included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request body accepted (no route reads one).
const MAX_BODY: usize = 4 * 1024;

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("hub", &self.hub.is_some())
            .field("pool", &self.pool.is_some())
            .field("metrics", &self.metrics.is_some())
            .field("checks", &self.checks.len())
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl Admin {
    /// An admin server reporting on nothing yet (`/healthz` only).
    pub fn new() -> Self {
        Admin::default()
    }

    /// Reports on `hub`: `/readyz` follows whether it accepts agents, `/agents` lists
    /// them.
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Reports on an agent's `pool`: `/readyz` follows its readiness.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Serves `/metrics` with what `render` returns (Prometheus text), for example
    /// `tunnel_metrics::prometheus::PrometheusMetrics::render`.
    pub fn metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// `/readyz` also needs `check` to hold; `name` says which failed (for example a
    /// cluster hub's NATS connection).
    pub fn ready_when(
        mut self,
        name: impl Into<String>,
        check: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name.into(), Arc::new(check)));
        self
    }

    /// Most admin connections at once (default 32); more are closed as they come.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Listens on `addr` and serves until the returned server is shut down or
    /// dropped.
    pub async fn bind(self, addr: impl ToSocketAddrs) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let places = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/agents", get(agents))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(Arc::new(self));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(serve(listener, app, places, stopped));
        Ok(AdminServer {
            local_addr,
            stop,
            task: Some(task),
        })
    }
}

/// Accepts within the connection cap and serves each connection under the timeouts.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    places: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, usually: wait instead of spinning.
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            // Full: closed at once, so idle clients cannot hold descriptors here.
            drop(tcp);
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _place = place;
            let service =
                hyper::service::service_fn(move |req| tower::ServiceExt::oneshot(app.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = lifetime => {}
                () = stop.cancelled() => {}
            }
            // Lets a request in progress finish, briefly.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        });
    }
    connections.close();
    connections.wait().await;
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let mut ready = true;
    let mut why = Vec::new();
    if let Some(hub) = &admin.hub {
        if hub.is_accepting() {
            why.push(format!("hub accepting, {} agents", hub.agents().len()));
        } else {
            ready = false;
            why.push("hub draining or shut down".to_owned());
        }
    }
    if let Some(pool) = &admin.pool {
        let readiness = pool.readiness();
        ready &= readiness.is_ready();
        why.push(format!("pool {readiness} connected"));
    }
    for (name, check) in &admin.checks {
        if check() {
            why.push(format!("{name} up"));
        } else {
            ready = false;
            why.push(format!("{name} down"));
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        "{}: {}\n",
        if ready { "ready" } else { "not ready" },
        why.join(", ")
    );
    (status, body).into_response()
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    match &admin.metrics {
        Some(render) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics configured\n").into_response(),
    }
}

async fn agents(State(admin): State<Arc<Admin>>) -> Response {
    match &admin.hub {
        Some(hub) => Json::<Vec<AgentStatus>>(hub.agent_statuses()).into_response(),
        None => (StatusCode::NOT_FOUND, "not a hub\n").into_response(),
    }
}

/// A running admin server (from [`Admin::bind`]). Dropping it stops it.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl AdminServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving (open requests finish) and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
