//! tower layers for tunnel services.
//!
//! Each layer works on the client side (a [`Service<Request>`](tower::Service) such as
//! [`Agent::client`](crate::Agent::client) or [`Hub::client`](crate::Hub::client)) and,
//! where it means something, on the handler side (a `Service<Inbound>` given to a
//! [`Router`](crate::Router)):
//!
//! | module | feature | client side | handler side |
//! |---|---|---|---|
//! | [`compression`] | `compression` | deflates payloads above a threshold | (inflating is the router's job) |
//! | [`trace`] | `trace` | a span per message, `traceparent` injected | a span per message, parent extracted |
//! | [`metrics`] | `metrics` | latency, errors, in flight per type | the same for handlers |
//! | [`timeout`] | (always) | fails a call that waits too long | the same for handlers |
//!
//! [`timeout::TimeoutLayer`] stands in for tower's `TimeoutLayer` (the same
//! [`Elapsed`](tower::timeout::error::Elapsed) error) but starts its timer only for a
//! call that has to wait, and counts the deadline from then: most calls never wait, so
//! most never build a timer. Concurrency limits are tower's own (`ConcurrencyLimitLayer`). A
//! dropped request future stops waiting for its reply.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tunnel_metrics::NoopRecorder;
//! use tunnel_router::layer::timeout::TimeoutLayer;
//! # use tunnel_router::Request;
//! # fn stack<S>(client: S)
//! # where S: tower::Service<Request, Response = tunnel_router::Response, Error = tunnel_router::Error> + Clone {
//! let client = ServiceBuilder::new()
//!     .layer(tunnel_router::layer::metrics::MetricsLayer::new(Arc::new(NoopRecorder)))
//!     .layer(TimeoutLayer::new(Duration::from_secs(5)))
//!     .concurrency_limit(256)
//!     .layer(tunnel_router::layer::compression::CompressionLayer::default())
//!     .service(client);
//! # }
//! ```

use tunnel_metrics::Direction;
use tunnel_proto::Envelope;
use tunnel_transport::AgentId;

use crate::request::Request;
use crate::router::Inbound;

#[cfg(feature = "compression")]
pub mod compression;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod timeout;
#[cfg(feature = "trace")]
pub mod trace;

/// What the layers need of a message: a [`Request`] on its way out, or an [`Inbound`]
/// message on its way to a handler.
pub trait TunnelMessage {
    /// The envelope.
    fn envelope(&self) -> &Envelope;
    /// The envelope, to change (for example its headers).
    fn envelope_mut(&mut self) -> &mut Envelope;
    /// Outbound for a request being sent, inbound for a message being handled.
    fn direction(&self) -> Direction;
    /// The agent at the other end, when known (a handler knows it; a client sending
    /// through an agent talks to its hub).
    fn peer(&self) -> Option<&AgentId>;
}

impl TunnelMessage for Request {
    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
    fn envelope_mut(&mut self) -> &mut Envelope {
        &mut self.envelope
    }
    fn direction(&self) -> Direction {
        Direction::Outbound
    }
    fn peer(&self) -> Option<&AgentId> {
        None
    }
}

impl TunnelMessage for Inbound {
    fn envelope(&self) -> &Envelope {
        &self.envelope
    }
    fn envelope_mut(&mut self) -> &mut Envelope {
        &mut self.envelope
    }
    fn direction(&self) -> Direction {
        Direction::Inbound
    }
    fn peer(&self) -> Option<&AgentId> {
        Some(self.agent())
    }
}

/// A short label for an error, for metrics (`timeout`, `remote`, ...).
pub trait ErrorKind {
    /// The label.
    fn error_kind(&self) -> &'static str;
}

impl ErrorKind for crate::Error {
    fn error_kind(&self) -> &'static str {
        self.kind()
    }
}

impl ErrorKind for tower::BoxError {
    fn error_kind(&self) -> &'static str {
        if let Some(e) = self.downcast_ref::<crate::Error>() {
            e.kind()
        } else if self.is::<tower::timeout::error::Elapsed>() {
            "timeout"
        } else {
            "other"
        }
    }
}
