//! Metrics for tunnel.
//!
//! The transport and router report what happens through the [`Recorder`] trait:
//! messages and bytes by type and direction, connections opened and closed, handshake
//! failures by reason. [`NoopRecorder`] (the default) discards everything; with the
//! `otel` feature, [`OtelRecorder`] records into OpenTelemetry instruments; the
//! `testing` feature adds `testing::TestMeter` to read them back in tests.
//!
//! # Example
//! ```
//! use tunnel_metrics::{Direction, Recorder, NoopRecorder};
//! use tunnel_proto::MessageType;
//!
//! let recorder = NoopRecorder;
//! recorder.message(Direction::Inbound, &MessageType::Event, 200);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tunnel_proto::MessageType;

mod tally;
pub use tally::{KNOWN_TYPES, MessageTally, TypeSlot};

/// Message types this version does not know get a `message.type` label value of their
/// own for the first this many distinct names; later ones are counted under
/// [`OTHER_TYPES`]. Type names are chosen by peers, so their number is bounded.
pub const MAX_UNKNOWN_TYPES: usize = 16;

/// Longest unknown type name used as a label value; longer ones count under
/// [`OTHER_TYPES`].
pub const MAX_TYPE_LABEL_LEN: usize = 64;

/// The `message.type` label value of unknown types past [`MAX_UNKNOWN_TYPES`] or
/// [`MAX_TYPE_LABEL_LEN`] (the leading underscore keeps it apart from real type names,
/// which are lower-case words).
pub const OTHER_TYPES: &str = "_other";

#[cfg(feature = "otel")]
mod otel;
#[cfg(feature = "otel")]
pub use otel::OtelRecorder;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "testing")]
pub mod testing;

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received from the peer.
    Inbound,
    /// Sent to the peer.
    Outbound,
}

impl Direction {
    /// `in` or `out`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "in",
            Direction::Outbound => "out",
        }
    }
}

/// Receives measurements. Every method has an empty default, so an implementation
/// records only what it cares about. Calls happen on hot paths: keep them cheap.
pub trait Recorder: Send + Sync + fmt::Debug + 'static {
    /// One message of `bytes` encoded bytes went `direction`. Not called for the
    /// known types of a connection whose tally this recorder tracks (see
    /// [`Recorder::track`]).
    fn message(&self, direction: Direction, kind: &MessageType, bytes: usize) {
        let _ = (direction, kind, bytes);
    }

    /// A connection starts counting its messages in `tally`. A recorder that returns
    /// `true` keeps the tally and reads it when it reports (the counts only grow; a
    /// tally nobody else holds any more belongs to a connection that ended); the
    /// transport then calls [`Recorder::message`] only for types outside
    /// [`KNOWN_TYPES`]. With `false` (the default) `message` is called for every
    /// message. Tracking keeps the per-message cost to plain stores on counters the
    /// connection owns. A recorder that wraps another must forward `track` as well as
    /// `message`, or the inner one is told of every message one by one (slower, and for
    /// `OtelRecorder` a lock per message).
    fn track(&self, tally: &Arc<MessageTally>) -> bool {
        let _ = tally;
        false
    }

    /// A connection was established (after the handshake).
    fn connection_opened(&self) {}

    /// An established connection ended after `lifetime`.
    fn connection_closed(&self, lifetime: Duration) {
        let _ = lifetime;
    }

    /// A keepalive round trip took `rtt`.
    fn rtt(&self, rtt: Duration) {
        let _ = rtt;
    }

    /// Something went wrong; `kind` is a short label such as `decode`, `dead_peer` or
    /// `session_violation`.
    fn error(&self, kind: &'static str) {
        let _ = kind;
    }

    /// An agent is about to dial again; `reason` says why: `dropped` (the connection
    /// failed), `closed` (the hub closed it), `drained`, `connect_failed`.
    fn reconnect_attempt(&self, reason: &'static str) {
        let _ = reason;
    }

    /// The messages and bytes held in replay buffers changed by these amounts.
    fn replay_changed(&self, messages: i64, bytes: i64) {
        let _ = (messages, bytes);
    }

    /// A pool has `connected` of its `desired` connections up.
    fn pool_readiness(&self, connected: usize, desired: usize) {
        let _ = (connected, desired);
    }

    /// An agent's upgrade or handshake failed; `reason` is a short label such as
    /// `handshake_timeout` or `version_mismatch`.
    fn handshake_failed(&self, reason: &'static str) {
        let _ = reason;
    }

    /// An endpoint's circuit breaker is now in `state`.
    fn circuit_state(&self, endpoint: &str, state: CircuitState) {
        let _ = (endpoint, state);
    }

    /// A session could not be resumed and was reset.
    fn session_reset(&self) {}

    /// A request (or message) of type `kind` is in flight: its future in a metrics
    /// layer had to wait for the response.
    fn request_started(&self, kind: &MessageType) {
        let _ = kind;
    }

    /// A request of type `kind` ended without ever waiting (for example a one-way
    /// message accepted at once): it took `elapsed` and ended with `outcome`, and was
    /// never in flight. The default reports it as started and finished; override it to
    /// skip the in-flight count (and forward it in a recorder that wraps another).
    fn request_completed(
        &self,
        kind: &MessageType,
        elapsed: Duration,
        outcome: Result<(), &'static str>,
    ) {
        self.request_started(kind);
        self.request_finished(kind, elapsed, outcome);
    }

    /// A request of type `kind` that started took `elapsed` and ended with `outcome`:
    /// `Ok` or the error's kind, a short label such as `timeout`, `remote` or
    /// `cancelled`.
    fn request_finished(
        &self,
        kind: &MessageType,
        elapsed: Duration,
        outcome: Result<(), &'static str>,
    ) {
        let _ = (kind, elapsed, outcome);
    }

    /// A reply arrived that nobody waited for any more (its request timed out or was
    /// cancelled) and was discarded.
    fn late_reply(&self) {}
}

/// A circuit breaker's state, for [`Recorder::circuit_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Attempts go through.
    Closed,
    /// One probe is allowed.
    HalfOpen,
    /// Attempts are refused until a cooldown ends.
    Open,
}

impl CircuitState {
    /// 0 closed, 1 half-open, 2 open (the gauge's value).
    pub fn as_i64(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

/// Discards every measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopRecorder;

impl Recorder for NoopRecorder {}
