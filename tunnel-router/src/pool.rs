//! A pool of connections over several hub endpoints, with failover.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, ReusableBoxFuture};
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PendingRequests};
use tunnel_transport::Connector;

use crate::Error;
use crate::agent::{Agent, AgentClient, AgentConfig, InvalidAgentConfig, ResponseFuture};
use crate::request::{Request, Response};
use crate::router::Router;

/// How a [`Pool`] uses its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolMode {
    /// One connection at a time, to the first endpoint that works; on failure (or a
    /// drain) it moves to the next. Desired connections: 1.
    Failover,
    /// One connection per endpoint, all at once; messages go to the least loaded of
    /// two ready connections picked at random (tower's power-of-two-choices, by
    /// requests in flight). Desired connections: one per endpoint.
    Spread,
}

/// Connections up out of connections wanted, for example `2/3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Connections established now.
    pub connected: usize,
    /// Connections the pool wants.
    pub desired: usize,
}

impl Readiness {
    /// At least one connection is up: messages can flow.
    pub fn is_ready(&self) -> bool {
        self.connected > 0
    }

    /// Every wanted connection is up.
    pub fn is_complete(&self) -> bool {
        self.connected >= self.desired
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.connected, self.desired)
    }
}

type Factory = dyn Fn(AgentConfig) -> Result<Agent, InvalidAgentConfig> + Send + Sync;

struct Inner {
    mode: PoolMode,
    /// The member agents by endpoint (spread), or the one agent (failover).
    members: watch::Sender<BTreeMap<String, Agent>>,
    factory: Box<Factory>,
    template: AgentConfig,
    stop: CancellationToken,
}

/// Agents over several hub endpoints, as one tower [`Service`] ([`Pool::client`]).
///
/// In [`PoolMode::Failover`] the pool is one [`Agent`] with all the endpoints; in
/// [`PoolMode::Spread`] it is one agent per endpoint, each pinned to its hub, behind
/// tower's power-of-two-choices balancer. Either way each connection keeps its own
/// session: messages accepted by a connection whose hub dies are replayed when it comes
/// back within the hub's grace period, or their receipts fail with a reset (the
/// application is told; see [`SessionEvent`](crate::SessionEvent)). A connection
/// whose endpoint's circuit breaker is open is not ready, so traffic goes to the
/// others. Endpoints come from [`AgentConfig::endpoints`] and, for discovery,
/// [`AgentConfig::endpoint_updates`] (each update replaces the list: new endpoints
/// get a connection, removed ones are shut down).
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{Service, ServiceExt};
/// use tunnel_proto::{MessageType, messages::Command};
/// use tunnel_router::{AgentConfig, Pool, PoolMode, Request, Router};
/// use tunnel_transport::{AgentId, ClientConfig, WsConnector};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let connector = WsConnector::new(ClientConfig::new(AgentId::new("root:org", "cluster-1")));
/// let config = AgentConfig::with_endpoints(["ws://hub-a:7070/", "ws://hub-b:7070/", "ws://hub-c:7070/"]);
/// let pool = Pool::start(PoolMode::Spread, connector, config, Router::new())?;
/// let mut client = pool.client();
/// let reply = client.ready().await?.call(Request::new(MessageType::Command, &Command::new("sync"))?.expect_reply()).await?;
/// println!("{} connected", pool.readiness()); // for example 3/3
/// pool.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("mode", &self.inner.mode)
            .field("readiness", &self.readiness())
            .finish()
    }
}

impl Pool {
    /// Starts the pool's agents.
    pub fn start<C>(
        mode: PoolMode,
        connector: C,
        config: AgentConfig,
        router: Router,
    ) -> Result<Pool, InvalidAgentConfig>
    where
        C: Connector + Clone + 'static,
    {
        if config.endpoints.is_empty() {
            return Err(InvalidAgentConfig::NoEndpoints);
        }
        let factory: Box<Factory> =
            Box::new(move |config| Agent::start(connector.clone(), config, router.clone()));
        let mut template = config;
        let updates = template.endpoint_updates.take();
        let pool = Pool {
            inner: Arc::new(Inner {
                mode,
                members: watch::Sender::new(BTreeMap::new()),
                factory,
                template,
                stop: CancellationToken::new(),
            }),
        };
        match mode {
            PoolMode::Failover => {
                let mut config = pool.inner.template.clone();
                config.endpoint_updates = updates;
                let agent = (pool.inner.factory)(config)?;
                pool.inner
                    .members
                    .send_modify(|m| drop(m.insert("failover".into(), agent)));
            }
            PoolMode::Spread => {
                pool.set_endpoints(&pool.inner.template.endpoints)?;
                if let Some(updates) = updates {
                    tokio::spawn(follow_updates(pool.clone(), updates));
                }
            }
        }
        tokio::spawn(report_readiness(pool.clone()));
        Ok(pool)
    }

    /// In spread mode, makes `endpoints` the pool's endpoints: starts a connection to
    /// each new one and shuts down those no longer listed.
    fn set_endpoints(&self, endpoints: &[String]) -> Result<(), InvalidAgentConfig> {
        let wanted: HashSet<&String> = endpoints.iter().collect();
        let mut removed = Vec::new();
        let mut added = Vec::new();
        {
            let members = self.inner.members.borrow();
            for endpoint in members.keys() {
                if !wanted.contains(endpoint) {
                    removed.push(endpoint.clone());
                }
            }
            for endpoint in endpoints {
                if !members.contains_key(endpoint) && !added.iter().any(|(e, _)| e == endpoint) {
                    let mut config = self.inner.template.clone();
                    config.endpoints = vec![endpoint.clone()];
                    config.endpoint_updates = None;
                    // Two connections of one agent identity on one hub would replace
                    // each other: each member stays on its own hub.
                    config.redirects = crate::Redirects::Never;
                    added.push((endpoint.clone(), (self.inner.factory)(config)?));
                }
            }
        }
        let mut gone = Vec::new();
        self.inner.members.send_modify(|members| {
            for endpoint in &removed {
                gone.extend(members.remove(endpoint));
            }
            members.extend(added);
        });
        for agent in gone {
            tokio::spawn(async move { agent.shutdown().await });
        }
        Ok(())
    }

    /// The pool's mode.
    pub fn mode(&self) -> PoolMode {
        self.inner.mode
    }

    /// Connections up out of connections wanted (for example `2/3`).
    pub fn readiness(&self) -> Readiness {
        let members = self.inner.members.borrow();
        Readiness {
            connected: members.values().filter(|a| a.is_connected()).count(),
            desired: members.len(),
        }
    }

    /// The member agents, by endpoint (in failover mode, one agent under `failover`).
    pub fn members(&self) -> Vec<(String, Agent)> {
        self.inner
            .members
            .borrow()
            .iter()
            .map(|(e, a)| (e.clone(), a.clone()))
            .collect()
    }

    /// A tower [`Service`] sending [`Request`]s through the pool. In spread mode each
    /// client balances over the connections that are up (it is not ready while none
    /// is: put a timeout layer above it); in failover mode it is the one agent's
    /// client, which holds messages while it moves.
    pub fn client(&self) -> PoolClient {
        let kind = match self.inner.mode {
            PoolMode::Failover => {
                let agent = self
                    .inner
                    .members
                    .borrow()
                    .values()
                    .next()
                    .cloned()
                    .map(|a| a.client());
                match agent {
                    Some(client) => ClientKind::Single(client),
                    None => ClientKind::Spread(Box::new(self.balance())),
                }
            }
            PoolMode::Spread => ClientKind::Spread(Box::new(self.balance())),
        };
        PoolClient {
            pool: self.clone(),
            kind,
        }
    }

    fn balance(&self) -> Balance<MemberDiscover, Request> {
        let mut members = self.inner.members.subscribe();
        members.mark_changed();
        Balance::new(MemberDiscover {
            members,
            known: HashSet::new(),
            queue: VecDeque::new(),
            changed: None,
        })
    }

    /// Shuts every member down (closing their connections gracefully).
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        let members: Vec<Agent> = self.inner.members.borrow().values().cloned().collect();
        for agent in members {
            agent.shutdown().await;
        }
    }
}

/// Reports readiness to the recorder when it changes (checked twice a second).
async fn report_readiness(pool: Pool) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut last = None;
    loop {
        tokio::select! {
            () = pool.inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = pool.readiness();
        if last != Some(now) {
            pool.inner
                .template
                .recorder
                .pool_readiness(now.connected, now.desired);
            last = Some(now);
        }
    }
}

async fn follow_updates(pool: Pool, mut updates: watch::Receiver<Vec<String>>) {
    loop {
        tokio::select! {
            () = pool.inner.stop.cancelled() => return,
            changed = updates.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let endpoints = updates.borrow_and_update().clone();
        if endpoints.is_empty() {
            tracing::warn!("ignoring an empty endpoint list from discovery");
            continue;
        }
        tracing::info!(?endpoints, "pool endpoints changed");
        if let Err(e) = pool.set_endpoints(&endpoints) {
            tracing::warn!(error = %e, "could not apply the endpoint update");
        }
    }
}

/// A pool member as the balancer sees it: ready while its agent is connected.
struct Member {
    agent: Agent,
    client: AgentClient,
    changed: Option<ReusableBoxFuture<'static, bool>>,
}

impl Service<Request> for Member {
    type Response = Response;
    type Error = Error;
    type Future = <AgentClient as Service<Request>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if self.agent.is_connected() {
                self.changed = None;
                return Poll::Ready(Ok(()));
            }
            let fut = match &mut self.changed {
                Some(fut) => fut,
                None => {
                    let mut rx = self.agent.connection_watch();
                    rx.borrow_and_update();
                    if self.agent.is_connected() {
                        continue;
                    }
                    self.changed.insert(ReusableBoxFuture::new(async move {
                        rx.changed().await.is_ok()
                    }))
                }
            };
            let alive = std::task::ready!(fut.poll(cx));
            self.changed = None;
            if !alive {
                return Poll::Ready(Err(Error::ShutDown));
            }
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.client.call(request)
    }
}

type Balanced = PendingRequests<Member, CompleteOnResponse>;

/// Discovers pool members from the pool's member map.
struct MemberDiscover {
    members: watch::Receiver<BTreeMap<String, Agent>>,
    known: HashSet<String>,
    queue: VecDeque<Change<String, Balanced>>,
    changed: Option<ReusableBoxFuture<'static, bool>>,
}

impl MemberDiscover {
    fn diff(&mut self) {
        let members = self.members.borrow_and_update().clone();
        for endpoint in self.known.iter() {
            if !members.contains_key(endpoint) {
                self.queue.push_back(Change::Remove(endpoint.clone()));
            }
        }
        self.known.retain(|e| members.contains_key(e));
        for (endpoint, agent) in members {
            if self.known.insert(endpoint.clone()) {
                let member = Member {
                    client: agent.client(),
                    agent,
                    changed: None,
                };
                self.queue.push_back(Change::Insert(
                    endpoint,
                    PendingRequests::new(member, CompleteOnResponse::default()),
                ));
            }
        }
    }
}

impl Stream for MemberDiscover {
    type Item = Result<Change<String, Balanced>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(change) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if this.members.has_changed().unwrap_or(false) {
                this.diff();
                continue;
            }
            let fut = this.changed.get_or_insert_with(|| {
                let mut rx = this.members.clone();
                ReusableBoxFuture::new(async move { rx.changed().await.is_ok() })
            });
            let alive = std::task::ready!(fut.poll(cx));
            this.changed = None;
            if !alive {
                // The pool is gone: no more changes.
                return Poll::Pending;
            }
        }
    }
}

enum ClientKind {
    Single(AgentClient),
    Spread(Box<Balance<MemberDiscover, Request>>),
}

/// The tower [`Service`] of a [`Pool`] (from [`Pool::client`]).
pub struct PoolClient {
    pool: Pool,
    kind: ClientKind,
}

impl fmt::Debug for PoolClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolClient")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Clone for PoolClient {
    fn clone(&self) -> Self {
        self.pool.client()
    }
}

fn from_box(e: tower::BoxError) -> Error {
    match e.downcast::<Error>() {
        Ok(e) => *e,
        // tower's balancer adds no errors of its own for a discover stream that cannot
        // fail: whatever else arrives means no member could take the request.
        Err(_) => Error::NotConnected,
    }
}

impl Service<Request> for PoolClient {
    type Response = Response;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match &mut self.kind {
            ClientKind::Single(client) => client.poll_ready(cx),
            ClientKind::Spread(balance) => balance.poll_ready(cx).map_err(from_box),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match &mut self.kind {
            ClientKind::Single(client) => client.call(request),
            ClientKind::Spread(balance) => {
                let fut = balance.call(request);
                ResponseFuture::boxed(async move { fut.await.map_err(from_box) })
            }
        }
    }
}
