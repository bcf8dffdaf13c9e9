//! The OpenTelemetry recorder.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Meter, UpDownCounter};
use tunnel_proto::MessageType;

use crate::{Direction, Recorder};

/// Records into OpenTelemetry instruments created from a [`Meter`]:
///
/// | instrument | kind | unit | attributes |
/// |---|---|---|---|
/// | `tunnel.messages` | counter | `{message}` | `direction`, `message.type` |
/// | `tunnel.message.size` | counter | `By` | `direction`, `message.type` |
/// | `tunnel.connections.active` | up-down counter | `{connection}` | |
/// | `tunnel.handshake.failures` | counter | `{failure}` | `reason` |
/// | `tunnel.circuit.state` | gauge (0 closed, 1 half-open, 2 open) | `{state}` | `endpoint` |
/// | `tunnel.session.resets` | counter | `{reset}` | |
#[derive(Debug, Clone)]
pub struct OtelRecorder {
    messages: Counter<u64>,
    bytes: Counter<u64>,
    connections: UpDownCounter<i64>,
    handshake_failures: Counter<u64>,
    circuit: Gauge<i64>,
    resets: Counter<u64>,
}

impl OtelRecorder {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        OtelRecorder {
            messages: meter
                .u64_counter("tunnel.messages")
                .with_unit("{message}")
                .with_description("Messages sent and received")
                .build(),
            bytes: meter
                .u64_counter("tunnel.message.size")
                .with_unit("By")
                .with_description("Encoded bytes of messages sent and received")
                .build(),
            connections: meter
                .i64_up_down_counter("tunnel.connections.active")
                .with_unit("{connection}")
                .with_description("Established connections")
                .build(),
            handshake_failures: meter
                .u64_counter("tunnel.handshake.failures")
                .with_unit("{failure}")
                .with_description("Failed upgrades and handshakes by reason")
                .build(),
            circuit: meter
                .i64_gauge("tunnel.circuit.state")
                .with_unit("{state}")
                .with_description(
                    "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open",
                )
                .build(),
            resets: meter
                .u64_counter("tunnel.session.resets")
                .with_unit("{reset}")
                .with_description("Sessions that could not be resumed")
                .build(),
        }
    }
}

fn type_value(kind: &MessageType) -> opentelemetry::Value {
    match kind.static_name() {
        Some(name) => opentelemetry::Value::from(name),
        None => opentelemetry::Value::from(kind.as_str().to_owned()),
    }
}

impl Recorder for OtelRecorder {
    fn message(&self, direction: Direction, kind: &MessageType, bytes: usize) {
        let attrs = [
            KeyValue::new("direction", direction.as_str()),
            KeyValue::new("message.type", type_value(kind)),
        ];
        self.messages.add(1, &attrs);
        self.bytes
            .add(u64::try_from(bytes).unwrap_or(u64::MAX), &attrs);
    }

    fn connection_opened(&self) {
        self.connections.add(1, &[]);
    }

    fn connection_closed(&self) {
        self.connections.add(-1, &[]);
    }

    fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    fn circuit_state(&self, endpoint: &str, state: crate::CircuitState) {
        self.circuit.record(
            state.as_i64(),
            &[KeyValue::new("endpoint", endpoint.to_owned())],
        );
    }

    fn session_reset(&self) {
        self.resets.add(1, &[]);
    }
}
