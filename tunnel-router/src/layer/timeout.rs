//! Timeouts: tower's [`TimeoutLayer`](tower::timeout::TimeoutLayer), with the timer
//! armed only for a call that has to wait.
//!
//! tower's `Timeout` reads the clock and builds a timer for every call. A tunnel client
//! answers most calls on their first poll (a one-way message is accepted at once), so
//! on most calls that timer is built for nothing.
//! [`Timeout`] polls the inner future first and starts the timer only when it is not
//! ready: the deadline counts from the first poll that had to wait, not from `call`
//! (a future is normally polled right after `call`, so the difference is the time the
//! caller leaves it unpolled). A request waiting for its reply, or a message waiting
//! for room in a full queue, gets the same bound and the same error as with tower's
//! layer, measured from the first poll that waits.
//!
//! The error is the same as tower's: a [`tower::BoxError`] holding
//! [`Elapsed`] when the timeout fires, the inner error boxed otherwise, so code that
//! checks `err.is::<tower::timeout::error::Elapsed>()` works with either layer.
//!
//! ```
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//! use tunnel_router::layer::timeout::TimeoutLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut slow = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(1)))
//!     .service(tower::service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_secs(60)).await;
//!         Ok::<_, BoxError>("late")
//!     }));
//! let err = slow.ready().await.unwrap().call(()).await.unwrap_err();
//! assert!(err.is::<tower::timeout::error::Elapsed>());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Layer, Service};

/// Fails a call that has waited longer than a timeout with [`Elapsed`].
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// Calls may wait at most `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, self.timeout)
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`: its calls may wait at most `timeout`.
    pub const fn new(inner: S, timeout: Duration) -> Self {
        Timeout { inner, timeout }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, to change.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for Timeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
            timeout: self.timeout,
            sleep: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Timeout`]: the inner future, with a timer started the first
    /// time it is not ready.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        timeout: Duration,
        // Boxed: only calls that wait pay for the timer, and the future stays small
        // for those that do not.
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeout", &self.timeout)
            .field("armed", &self.sleep.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out.map_err(Into::into));
        }
        let timeout = *this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed::new().into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;

    fn slow(delay: Duration) -> impl Service<(), Response = &'static str, Error = BoxError> {
        tower::service_fn(move |()| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, BoxError>("done")
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_too_long_fails_with_elapsed_at_the_deadline() {
        let mut svc = TimeoutLayer::new(Duration::from_secs(1)).layer(slow(Duration::MAX));
        let started = tokio::time::Instant::now();
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is::<Elapsed>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_answered_within_the_timeout_succeeds() {
        let mut svc =
            TimeoutLayer::new(Duration::from_secs(1)).layer(slow(Duration::from_millis(999)));
        assert_eq!(svc.ready().await.unwrap().call(()).await.unwrap(), "done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_call_succeeds_even_with_a_zero_timeout_and_arms_no_timer() {
        let mut svc = TimeoutLayer::new(Duration::ZERO)
            .layer(tower::service_fn(|()| async { Ok::<_, BoxError>(7) }));
        let mut fut = std::pin::pin!(svc.ready().await.unwrap().call(()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(7))));
        assert!(format!("{fut:?}").contains("armed: false"), "{fut:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waits_with_a_zero_timeout_fails_at_once() {
        let mut svc = TimeoutLayer::new(Duration::ZERO).layer(slow(Duration::from_millis(1)));
        let started = tokio::time::Instant::now();
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is::<Elapsed>(), "{err}");
        assert!(started.elapsed() < Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_are_passed_on_boxed() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let mut svc =
            TimeoutLayer::new(Duration::from_secs(1)).layer(tower::service_fn(move |()| {
                counted.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(std::io::Error::other("refused")) }
            }));
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is::<std::io::Error>(), "{err}");
        assert!(!err.is::<Elapsed>());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_first_poll_that_waits() {
        // The inner call is answered 1.5 s after `call`, whatever happens in between.
        let mut svc = TimeoutLayer::new(Duration::from_secs(1)).layer(tower::service_fn(|()| {
            let answer_at = tokio::time::Instant::now() + Duration::from_millis(1500);
            async move {
                tokio::time::sleep_until(answer_at).await;
                Ok::<_, BoxError>("done")
            }
        }));
        let fut = svc.ready().await.unwrap().call(());
        // Left unpolled for 0.7 s: the timer starts at the first poll (it would fire
        // at 1.0 s, before the answer, had it started at `call`).
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(fut.await.unwrap(), "done");
        // And a call polled at once still times out 1 s after it.
        let started = tokio::time::Instant::now();
        let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
        assert!(err.is::<Elapsed>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
