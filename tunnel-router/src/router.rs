//! Dispatch of inbound messages by type to tower `Service`s.

use std::fmt;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};
use tunnel_proto::{Envelope, MessageType, Payload};
use tunnel_transport::{AgentId, ConnectionInfo, ConnectionSender};

/// A message from the peer, as handed to a handler.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The message (boxed: a message is handed on by value through layers and
    /// handlers, and a box moves for a pointer's cost).
    pub envelope: Box<Envelope>,
    sender: ConnectionSender,
    /// Where [`Inbound::acknowledge_later`] reports, for a message of a session.
    deferral: Option<(u64, mpsc::UnboundedSender<Deferral>)>,
}

/// What a handler that acknowledges later tells its connection's reader.
#[derive(Debug)]
pub(crate) enum Deferral {
    /// Message `seq` is acknowledged later.
    Taken(u64),
    /// Message `seq` is done: taken (`Ok`), or not ([`crate::Unavailable`], the reason).
    Done(u64, Result<(), String>),
}

/// The promise of a handler that returned before it was done with a message
/// ([`Inbound::acknowledge_later`]). [`AckLater::done`] lets the session acknowledge
/// it; [`AckLater::unavailable`] (or dropping the handle) has it replayed instead, as
/// when a handler returns [`crate::Unavailable`].
#[derive(Debug)]
pub struct AckLater {
    seq: u64,
    tx: Option<mpsc::UnboundedSender<Deferral>>,
}

impl AckLater {
    /// The message was handled (stored, say): the session may acknowledge it.
    pub fn done(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Deferral::Done(self.seq, Ok(())));
        }
    }

    /// The message could not be taken: it is not acknowledged, the connection closes
    /// with `1013`, and the peer replays it.
    pub fn unavailable(mut self, reason: impl Into<String>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Deferral::Done(self.seq, Err(reason.into())));
        }
    }
}

impl Drop for AckLater {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Deferral::Done(
                self.seq,
                Err("the handler dropped the message unfinished".into()),
            ));
        }
    }
}

impl Inbound {
    /// A message received on the connection whose sender is `sender`.
    pub fn new(envelope: impl Into<Box<Envelope>>, sender: ConnectionSender) -> Self {
        Inbound {
            envelope: envelope.into(),
            sender,
            deferral: None,
        }
    }

    /// This message of a session, numbered `seq`, may be acknowledged later.
    pub(crate) fn deferrable(mut self, seq: u64, tx: mpsc::UnboundedSender<Deferral>) -> Self {
        self.deferral = Some((seq, tx));
        self
    }

    /// Lets the handler return before it is done with the message, so that the next
    /// ones are handed over meanwhile (a hub storing messages pipelines its writes):
    /// the session does not acknowledge this message, nor any after it, until the
    /// returned handle says [`AckLater::done`]. Call it before the handler returns (a
    /// later call may come after the message was acknowledged: the connection is then
    /// closed with `1011`). Only on a router made with [`Router::acknowledge_later`]. `None` for a message without a session
    /// (nothing to acknowledge): handle it before returning. At most 1,024 messages of
    /// a connection wait like this; then the connection reads no more until some are
    /// done.
    ///
    /// ```
    /// use tower::{BoxError, service_fn};
    /// use tunnel_router::Inbound;
    ///
    /// let handler = service_fn(|msg: Inbound| async move {
    ///     // (on a router made with `Router::new().acknowledge_later()`)
    ///     if let Some(later) = msg.acknowledge_later() {
    ///         tokio::spawn(async move {
    ///             // ... store the message, then:
    ///             later.done();
    ///         });
    ///     }
    ///     Ok::<_, BoxError>(())
    /// });
    /// # drop(handler);
    /// ```
    pub fn acknowledge_later(&self) -> Option<AckLater> {
        let (seq, tx) = self.deferral.as_ref()?;
        tx.send(Deferral::Taken(*seq)).ok()?;
        Some(AckLater {
            seq: *seq,
            tx: Some(tx.clone()),
        })
    }

    /// The agent at the other end (on an agent: the agent itself).
    pub fn agent(&self) -> &AgentId {
        &self.sender.info().agent
    }

    /// What is known about the connection the message came on.
    pub fn connection(&self) -> &ConnectionInfo {
        self.sender.info()
    }

    /// A handle to send on the same connection. (To answer a request, return the
    /// reply from the handler instead: it then goes through the session.)
    pub fn sender(&self) -> &ConnectionSender {
        &self.sender
    }

    /// Whether the peer waits for a reply to this message.
    pub fn expects_reply(&self) -> bool {
        self.envelope.expects_reply()
    }

    /// Encodes `value` in the connection's payload format, for example as a reply.
    pub fn encode<T: serde::Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<Payload, tunnel_proto::EncodeError> {
        self.sender.payload(value)
    }
}

/// What a handler's response turns into: the payload of the reply to a request.
///
/// `()` answers with an empty reply; a [`Payload`] (see [`Inbound::encode`]) or
/// `Option<Payload>` with that payload. A handler's error becomes a reply whose
/// `error` carries its message. Messages that are not requests get no reply, whatever
/// the handler returns.
pub trait IntoReply {
    /// The reply's payload, if any.
    fn into_reply(self) -> Option<Payload>;
}

impl IntoReply for () {
    fn into_reply(self) -> Option<Payload> {
        None
    }
}

impl IntoReply for Payload {
    fn into_reply(self) -> Option<Payload> {
        Some(self)
    }
}

impl IntoReply for Option<Payload> {
    fn into_reply(self) -> Option<Payload> {
        self
    }
}

/// A boxed handler, as a [`Router`] holds them.
pub type Handler = BoxCloneSyncService<Inbound, Option<Payload>, BoxError>;

/// What [`Router::dispatch`] did with a message.
#[derive(Debug)]
pub enum Dispatched {
    /// No route and no fallback took it.
    Unrouted,
    /// A handler took it and answered this (the reply payload, if any).
    Handled(Option<Payload>),
}

/// Routes inbound messages to handlers by [`MessageType`].
///
/// Each handler is a tower `Service<Inbound>` whose response is [`IntoReply`] (`()` for
/// most); messages of a type with no route go to the fallback, or are dropped (and
/// logged) if there is none. A request (`expect: reply`) always gets exactly one reply:
/// the handler's response, its error (`handler_error`), or `no_handler`. A
/// connection's messages are handled one at a time, in order, so a handler must not
/// wait for a reply from the peer whose message it is handling (spawn that instead).
///
/// ```
/// use tower::{BoxError, service_fn};
/// use tunnel_proto::MessageType;
/// use tunnel_router::{Inbound, Router};
///
/// let router = Router::new()
///     .route(MessageType::Command, service_fn(|msg: Inbound| async move {
///         println!("command from {}", msg.agent());
///         Ok::<_, BoxError>(())
///     }))
///     .fallback(service_fn(|_: Inbound| async { Ok::<_, BoxError>(()) }));
/// assert!(router.has_route(&MessageType::Command));
/// ```
#[derive(Clone, Default)]
pub struct Router {
    routes: Vec<(MessageType, Handler)>,
    fallback: Option<Handler>,
    /// Whether handlers may call [`Inbound::acknowledge_later`].
    defers: bool,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

fn boxed<S>(service: S) -> Handler
where
    S: Service<Inbound> + Clone + Send + Sync + 'static,
    S::Response: IntoReply,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(Replying(service))
}

/// Turns a handler's response into a reply payload and its error into a `BoxError`,
/// in one wrapper (one future layer on the per-message path instead of two).
#[derive(Clone)]
struct Replying<S>(S);

impl<S> Service<Inbound> for Replying<S>
where
    S: Service<Inbound>,
    S::Response: IntoReply,
    S::Error: Into<BoxError>,
{
    type Response = Option<Payload>;
    type Error = BoxError;
    type Future = ReplyingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Inbound) -> Self::Future {
        ReplyingFuture {
            inner: self.0.call(msg),
        }
    }
}

pin_project_lite::pin_project! {
    struct ReplyingFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> std::future::Future for ReplyingFuture<F>
where
    F: std::future::Future<Output = Result<T, E>>,
    T: IntoReply,
    E: Into<BoxError>,
{
    type Output = Result<Option<Payload>, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .inner
            .poll(cx)
            .map(|r| r.map(IntoReply::into_reply).map_err(Into::into))
    }
}

impl Router {
    /// A router with no routes.
    pub fn new() -> Self {
        Router::default()
    }

    /// Sends messages of `kind` to `service`, replacing an earlier route for it.
    pub fn route<S>(mut self, kind: MessageType, service: S) -> Self
    where
        S: Service<Inbound> + Clone + Send + Sync + 'static,
        S::Response: IntoReply,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.routes.retain(|(k, _)| *k != kind);
        self.routes.push((kind, boxed(service)));
        self
    }

    /// Sends messages of every type without a route to `service`.
    pub fn fallback<S>(mut self, service: S) -> Self
    where
        S: Service<Inbound> + Clone + Send + Sync + 'static,
        S::Response: IntoReply,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.fallback = Some(boxed(service));
        self
    }

    /// Wraps every handler added so far (routes and fallback) in `layer`, as axum's
    /// `Router::layer` does: for example tracing or metrics for all handlers.
    ///
    /// ```
    /// use tower::{BoxError, service_fn, limit::ConcurrencyLimitLayer};
    /// use tunnel_proto::MessageType;
    /// use tunnel_router::{Inbound, Router};
    ///
    /// let router = Router::new()
    ///     .route(MessageType::Event, service_fn(|_: Inbound| async { Ok::<_, BoxError>(()) }))
    ///     .layer(ConcurrencyLimitLayer::new(1));
    /// ```
    pub fn layer<L>(self, layer: L) -> Self
    where
        L: tower::Layer<Handler>,
        L::Service: Service<Inbound> + Clone + Send + Sync + 'static,
        <L::Service as Service<Inbound>>::Response: IntoReply,
        <L::Service as Service<Inbound>>::Error: Into<BoxError>,
        <L::Service as Service<Inbound>>::Future: Send + 'static,
    {
        Router {
            routes: self
                .routes
                .into_iter()
                .map(|(kind, h)| (kind, boxed(layer.layer(h))))
                .collect(),
            fallback: self.fallback.map(|h| boxed(layer.layer(h))),
            defers: self.defers,
        }
    }

    /// Lets this router's handlers acknowledge messages later
    /// ([`Inbound::acknowledge_later`]); without it that returns `None`, and the
    /// connection's reader does none of the bookkeeping it needs.
    pub fn acknowledge_later(mut self) -> Self {
        self.defers = true;
        self
    }

    /// Whether handlers may acknowledge later (see [`Router::acknowledge_later`]).
    pub(crate) fn defers(&self) -> bool {
        self.defers
    }

    /// Whether `kind` has its own route.
    pub fn has_route(&self, kind: &MessageType) -> bool {
        self.routes.iter().any(|(k, _)| k == kind)
    }

    fn handler_mut(&mut self, kind: &MessageType) -> Option<&mut Handler> {
        match self.routes.iter().position(|(k, _)| k == kind) {
            Some(i) => Some(&mut self.routes[i].1),
            None => self.fallback.as_mut(),
        }
    }

    /// Handles one message in place: waits for the handler to be ready, then calls it.
    pub async fn dispatch(&mut self, msg: Inbound) -> Result<Dispatched, BoxError> {
        let Some(handler) = self.handler_mut(&msg.envelope.kind) else {
            return Ok(Dispatched::Unrouted);
        };
        let reply = handler.ready().await?.call(msg).await?;
        Ok(Dispatched::Handled(reply))
    }
}

impl Service<Inbound> for Router {
    type Response = Option<Payload>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Option<Payload>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call readies its own clone of the chosen handler.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Inbound) -> Self::Future {
        match self.handler_mut(&msg.envelope.kind).cloned() {
            Some(handler) => Box::pin(handler.oneshot(msg)),
            None => Box::pin(async { Ok(None) }),
        }
    }
}
