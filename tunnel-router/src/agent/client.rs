//! The agent as a tower `Service` of requests.

use super::*;

/// A tower [`Service`](tower::Service) that sends [`Request`]s through an [`Agent`]
/// (from [`Agent::client`]). Always ready: back-pressure comes from the session's
/// replay buffer policy, and a concurrency limit is tower's `ConcurrencyLimitLayer`.
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tunnel_proto::{MessageType, messages::Command};
/// use tunnel_router::layer::timeout::TimeoutLayer;
/// use tunnel_router::{Agent, Request};
///
/// # async fn run(agent: Agent) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let mut client = ServiceBuilder::new()
///     .layer(TimeoutLayer::new(Duration::from_secs(5)))
///     .concurrency_limit(64)
///     .service(agent.client());
/// let reply = client.ready().await?.call(Request::new(MessageType::Command, &Command::new("sync"))?.expect_reply()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub(super) agent: Agent,
}

impl AgentClient {
    /// The agent this client sends through.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }
}

impl tower::Service<Request> for AgentClient {
    type Response = Response;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    /// The message is handed to the session (or connection) here, as [`Agent::call`]
    /// would, when there is room at once: calls go on the wire in the order they are
    /// made, and dropping the future afterwards does not take a message back (a
    /// request's future then only waits for the reply). A message that has to wait for
    /// room (a full replay buffer, or without sessions a full connection queue) is sent
    /// when its future is polled, and messages from later calls may overtake it: where
    /// order matters under back-pressure, await each call before making the next. When
    /// the connection's queue is full, the future also sends the session's backlog;
    /// dropped unpolled, that waits for the next send or reconnect.
    fn call(&mut self, request: Request) -> ResponseFuture {
        if !request.expects_reply() {
            // The common case, kept short: a one-way message has no reply to register,
            // so it skips `begin` and `Started`.
            let env = self.agent.stamp(request.envelope);
            return match self.agent.try_transmit(env) {
                Transmit::Done(receipt) => ResponseFuture::ready(Ok(Response::Accepted(receipt))),
                Transmit::Failed(e) => ResponseFuture::ready(Err(e)),
                waiting => {
                    ResponseFuture::boxed(
                        async move { Ok(Response::Accepted(waiting.finish().await?)) },
                    )
                }
            };
        }
        match self.agent.begin(request).map(Started::now) {
            Err(e) => ResponseFuture::ready(Err(e)),
            Ok(Ok(response)) => ResponseFuture::ready(response),
            Ok(Err(started)) => ResponseFuture::boxed(started.finish()),
        }
    }
}

/// The future of [`AgentClient`]'s (and [`PoolClient`](crate::PoolClient)'s) `call`: the
/// response, at once when the message could be sent without waiting.
pub struct ResponseFuture {
    state: ResponseState,
}

enum ResponseState {
    Ready(Option<Result<Response, Error>>),
    Waiting(futures_util::future::BoxFuture<'static, Result<Response, Error>>),
}

impl ResponseFuture {
    pub(crate) fn ready(result: Result<Response, Error>) -> Self {
        ResponseFuture {
            state: ResponseState::Ready(Some(result)),
        }
    }

    pub(crate) fn boxed(
        future: impl std::future::Future<Output = Result<Response, Error>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            state: ResponseState::Waiting(Box::pin(future)),
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            ResponseState::Ready(_) => "ready",
            ResponseState::Waiting(_) => "waiting",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response, Error>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.get_mut().state {
            ResponseState::Waiting(future) => future.as_mut().poll(cx),
            ResponseState::Ready(result) => {
                // A caller sending in a loop never waits here: spend the task's budget
                // so that it still yields to the other tasks on its thread now and then.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                coop.made_progress();
                std::task::Poll::Ready(
                    result
                        .take()
                        .unwrap_or(Err(Error::Lost("response polled after completion".into()))),
                )
            }
        }
    }
}
