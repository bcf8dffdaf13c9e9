//! Request metrics: latency per message type, errors by kind, requests in flight.
//!
//! [`MetricsLayer`] reports to a [`Recorder`]: [`Recorder::request_started`] when a
//! message's future first has to wait (it is then in flight), and
//! [`Recorder::request_finished`] with the elapsed time (from `call`) and the outcome
//! (`Ok`, the error's [`ErrorKind`], or `cancelled` when the future was dropped) when it
//! ends; one that never waited (a one-way message accepted at once, or a future dropped
//! before it was polled) is reported once, with [`Recorder::request_completed`]. With
//! `tunnel_metrics::OtelRecorder` (feature `otel`) these are the
//! `tunnel.request.duration` histogram, the `tunnel.request.errors` counter and the
//! `tunnel.requests.in_flight` up-down counter. It works on both sides: around a client
//! (`Service<Request>`) and around a handler (`Service<Inbound>`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quanta::Instant;
use tower::{Layer, Service};
use tunnel_metrics::Recorder;
use tunnel_proto::MessageType;

use super::{ErrorKind, TunnelMessage};

/// Records request metrics into a [`Recorder`].
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    recorder: Arc<dyn Recorder>,
}

impl MetricsLayer {
    /// Records into `recorder`.
    pub fn new(recorder: Arc<dyn Recorder>) -> Self {
        MetricsLayer { recorder }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
    recorder: Arc<dyn Recorder>,
}

impl<S, M> Service<M> for Metrics<S>
where
    S: Service<M>,
    S::Error: ErrorKind,
    M: TunnelMessage,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, message: M) -> Self::Future {
        let kind = message.envelope().kind.clone();
        ResponseFuture {
            inner: self.inner.call(message),
            open: Some(Open {
                kind,
                start: Instant::now(),
                recorder: self.recorder.clone(),
                in_flight: false,
            }),
        }
    }
}

struct Open {
    kind: MessageType,
    start: Instant,
    recorder: Arc<dyn Recorder>,
    /// Reported as in flight: its future had to wait. One answered on its first poll
    /// (a one-way message accepted at once) never is, which spares two counter
    /// updates per message.
    in_flight: bool,
}

impl Open {
    fn waiting(&mut self) {
        if !self.in_flight {
            self.in_flight = true;
            self.recorder.request_started(&self.kind);
        }
    }

    fn finish(self, outcome: Result<(), &'static str>) {
        // quanta reads the CPU's time stamp counter: a few ns where the system clock
        // costs tens, on every request.
        let elapsed = self.start.elapsed();
        if self.in_flight {
            self.recorder.request_finished(&self.kind, elapsed, outcome);
        } else {
            self.recorder
                .request_completed(&self.kind, elapsed, outcome);
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metrics`]: the inner future, timed. Dropped before it finishes,
    /// it records the outcome `cancelled`.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        open: Option<Open>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(open) = this.project().open.take() {
                open.finish(Err("cancelled"));
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: ErrorKind,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Poll::Ready(output) = this.inner.poll(cx) else {
            if let Some(open) = this.open.as_mut() {
                open.waiting();
            }
            return Poll::Pending;
        };
        if let Some(open) = this.open.take() {
            open.finish(output.as_ref().map(drop).map_err(ErrorKind::error_kind));
        }
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, Request};
    use std::sync::Mutex;
    use std::time::Duration;
    use tower::{ServiceExt, service_fn};

    #[derive(Debug, Default)]
    struct Log(Mutex<Vec<String>>);

    impl Recorder for Log {
        fn request_started(&self, kind: &MessageType) {
            self.0.lock().unwrap().push(format!("start {kind}"));
        }
        fn request_finished(
            &self,
            kind: &MessageType,
            _: Duration,
            outcome: Result<(), &'static str>,
        ) {
            self.0
                .lock()
                .unwrap()
                .push(format!("end {kind} {outcome:?}"));
        }
    }

    #[tokio::test]
    async fn records_outcomes_and_cancellation() {
        let log = Arc::new(Log::default());
        let inner = service_fn(|r: Request| async move {
            match r.envelope.kind {
                MessageType::Event => Ok(()),
                MessageType::Command => Err(Error::Timeout(Duration::from_secs(1))),
                _ => std::future::pending().await,
            }
        });
        let mut svc = MetricsLayer::new(log.clone()).layer(inner);
        let event = Request::new(MessageType::Event, &1).unwrap();
        let command = Request::new(MessageType::Command, &1)
            .unwrap()
            .expect_reply();
        let stuck = Request::new(MessageType::Status, &1).unwrap();
        svc.ready().await.unwrap().call(event).await.unwrap();
        svc.ready().await.unwrap().call(command).await.unwrap_err();
        drop(svc.ready().await.unwrap().call(stuck));
        assert_eq!(
            *log.0.lock().unwrap(),
            [
                "start event",
                "end event Ok(())",
                "start command",
                "end command Err(\"timeout\")",
                "start status",
                "end status Err(\"cancelled\")",
            ]
        );
    }

    /// Tells requests that completed on their first poll from those that waited.
    #[derive(Debug, Default)]
    struct SplitLog(Log);

    impl Recorder for SplitLog {
        fn request_started(&self, kind: &MessageType) {
            self.0.request_started(kind);
        }
        fn request_finished(
            &self,
            kind: &MessageType,
            elapsed: Duration,
            outcome: Result<(), &'static str>,
        ) {
            self.0.request_finished(kind, elapsed, outcome);
        }
        fn request_completed(
            &self,
            kind: &MessageType,
            _: Duration,
            outcome: Result<(), &'static str>,
        ) {
            let mut log = self.0.0.lock().unwrap();
            log.push(format!("done {kind} {outcome:?}"));
        }
    }

    /// Polls `fut` once.
    async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
    }

    #[tokio::test]
    async fn only_requests_that_wait_are_in_flight() {
        let log = Arc::new(SplitLog::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut rx = Some(rx);
        let inner = service_fn(move |r: Request| {
            let wait = (r.envelope.kind == MessageType::Command).then(|| rx.take());
            async move {
                match wait {
                    Some(Some(rx)) => rx.await.map_err(|_| Error::ShutDown),
                    Some(None) => std::future::pending().await,
                    None => Ok(()),
                }
            }
        });
        let mut svc = MetricsLayer::new(log.clone()).layer(inner);
        let send = |kind| Request::new(kind, &1).unwrap();
        let event = svc.ready().await.unwrap().call(send(MessageType::Event));
        event.await.unwrap();
        // Never polled, then dropped: cancelled, never in flight.
        drop(svc.ready().await.unwrap().call(send(MessageType::Status)));
        let mut waiting = Box::pin(svc.ready().await.unwrap().call(send(MessageType::Command)));
        assert!(poll_once(&mut waiting).await.is_pending(), "waits");
        assert!(poll_once(&mut waiting).await.is_pending(), "still waits");
        tx.send(()).unwrap();
        waiting.await.unwrap();
        // Polled once while waiting, then dropped.
        let mut stuck = Box::pin(svc.ready().await.unwrap().call(send(MessageType::Command)));
        assert!(poll_once(&mut stuck).await.is_pending());
        drop(stuck);
        assert_eq!(
            *log.0.0.lock().unwrap(),
            [
                "done event Ok(())",
                "done status Err(\"cancelled\")",
                "start command",
                "end command Ok(())",
                "start command",
                "end command Err(\"cancelled\")",
            ]
        );
    }
}
