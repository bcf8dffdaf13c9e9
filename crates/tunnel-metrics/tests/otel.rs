//! The OpenTelemetry recorder, read back with exact counts.

use opentelemetry::KeyValue;
use tunnel_metrics::testing::TestMeter;
use tunnel_metrics::{Direction, Recorder};

use tunnel_proto::MessageType;

#[test]
fn records_exact_counts_with_units_and_attributes() {
    let meter = TestMeter::new();
    let recorder = meter.recorder();
    for _ in 0..3 {
        recorder.message(Direction::Inbound, &MessageType::Event, 200);
    }
    recorder.message(Direction::Outbound, &MessageType::Command, 50);
    recorder.message(Direction::Outbound, &MessageType::Command, 70);
    recorder.message(
        Direction::Inbound,
        &MessageType::from_wire("telemetry.v9"),
        10,
    );
    recorder.connection_opened();
    recorder.connection_opened();
    recorder.connection_closed();
    recorder.handshake_failed("version_mismatch");
    recorder.handshake_failed("version_mismatch");
    recorder.handshake_failed("handshake_timeout");

    let kv = |k: &'static str, v: &'static str| KeyValue::new(k, v);
    let messages = |attrs: &[KeyValue]| meter.sum("tunnel.messages", attrs);
    assert_eq!(
        messages(&[kv("direction", "in"), kv("message.type", "event")]),
        3
    );
    assert_eq!(
        messages(&[kv("direction", "out"), kv("message.type", "command")]),
        2
    );
    assert_eq!(messages(&[kv("message.type", "telemetry.v9")]), 1);
    assert_eq!(messages(&[]), 6);
    assert_eq!(meter.unit("tunnel.messages").as_deref(), Some("{message}"));

    let size = |attrs: &[KeyValue]| meter.sum("tunnel.message.size", attrs);
    assert_eq!(
        size(&[kv("direction", "in"), kv("message.type", "event")]),
        600
    );
    assert_eq!(size(&[kv("direction", "out")]), 120);
    assert_eq!(meter.unit("tunnel.message.size").as_deref(), Some("By"));

    assert_eq!(meter.sum("tunnel.connections.active", &[]), 1);
    assert_eq!(
        meter.sum(
            "tunnel.handshake.failures",
            &[kv("reason", "version_mismatch")]
        ),
        2
    );
    assert_eq!(meter.sum("tunnel.handshake.failures", &[]), 3);

    recorder.circuit_state("ws://a/", tunnel_metrics::CircuitState::Open);
    recorder.circuit_state("ws://b/", tunnel_metrics::CircuitState::Closed);
    recorder.circuit_state("ws://a/", tunnel_metrics::CircuitState::HalfOpen);
    recorder.session_reset();
    assert_eq!(
        meter.gauge("tunnel.circuit.state", &[kv("endpoint", "ws://a/")]),
        Some(1)
    );
    assert_eq!(
        meter.gauge("tunnel.circuit.state", &[kv("endpoint", "ws://b/")]),
        Some(0)
    );
    assert_eq!(meter.sum("tunnel.session.resets", &[]), 1);
}
