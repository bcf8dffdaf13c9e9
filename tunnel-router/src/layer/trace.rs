//! Tracing: a span per message, and W3C trace context carried across the tunnel.
//!
//! [`TraceLayer`] opens a `tracing` span around every message it sees:
//! `tunnel.send` for a [`Request`](crate::Request) on its way out, `tunnel.handle` for
//! an [`Inbound`](crate::Inbound) message on its way to a handler, with the fields
//! `message.type`, `message.id` (inbound), `message.size` (payload bytes) and `peer`.
//!
//! With a `tracing-opentelemetry` layer installed, the sending side injects the span's
//! context into the envelope's `traceparent` (and `tracestate`) headers, and the
//! handling side extracts it as the parent of its span: a trace started in an agent
//! continues in the hub's handler, and the other way round. Without one (or with the
//! span disabled), nothing is injected and the layer costs a disabled span.
//!
//! The future is the inner future [`Instrumented`] with the span; the error is the
//! inner service's.

use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tunnel_metrics::Direction;
use tunnel_proto::Headers;

use super::TunnelMessage;

/// Opens a span per message and propagates W3C trace context in the headers.
#[derive(Debug, Clone, Default)]
pub struct TraceLayer {
    propagator: TraceContextPropagator,
}

impl TraceLayer {
    /// A layer with the W3C trace-context propagator.
    pub fn new() -> Self {
        TraceLayer::default()
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            propagator: self.propagator.clone(),
        }
    }
}

/// The service of [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    propagator: TraceContextPropagator,
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

impl<S, M> Service<M> for Trace<S>
where
    S: Service<M>,
    M: TunnelMessage,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut message: M) -> Self::Future {
        let env = message.envelope();
        let size = env.payload.as_ref().map_or(0, tunnel_proto::Payload::len);
        let peer = message.peer().map(tracing::field::display);
        let span = match message.direction() {
            Direction::Outbound => tracing::info_span!(
                "tunnel.send",
                otel.kind = "producer",
                "message.type" = env.kind.as_str(),
                message.size = size,
                peer = peer,
            ),
            Direction::Inbound => tracing::info_span!(
                "tunnel.handle",
                otel.kind = "consumer",
                // The peer chose it: bounded like a metric label.
                "message.type" = tunnel_proto::text::truncate(env.kind.as_str(), 64),
                message.id = env.id,
                message.size = size,
                peer = peer,
            ),
        };
        if !span.is_disabled() {
            match message.direction() {
                Direction::Outbound => {
                    let headers = &mut message.envelope_mut().headers;
                    self.propagator
                        .inject_context(&span.context(), &mut HeaderInjector(headers));
                }
                Direction::Inbound => {
                    let parent = self
                        .propagator
                        .extract(&HeaderExtractor(&message.envelope().headers));
                    if let Err(e) = span.set_parent(parent) {
                        tracing::debug!(error = %e, "could not set the remote parent");
                    }
                }
            }
        }
        self.inner.call(message).instrument(span)
    }
}
