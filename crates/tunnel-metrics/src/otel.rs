//! The OpenTelemetry recorder.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter, UpDownCounter};
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
#[derive(Debug, Clone)]
pub struct OtelRecorder {
    messages: Counter<u64>,
    bytes: Counter<u64>,
    connections: UpDownCounter<i64>,
    handshake_failures: Counter<u64>,
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
}
