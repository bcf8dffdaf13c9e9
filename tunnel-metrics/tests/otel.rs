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
    recorder.connection_closed(std::time::Duration::from_secs(3));
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

#[test]
fn records_errors_reconnects_rtt_replay_and_pool_readiness() {
    use std::time::Duration;
    let meter = TestMeter::new();
    let recorder = meter.recorder();
    let kv = |k: &'static str, v: &'static str| KeyValue::new(k, v);

    recorder.error("decode");
    recorder.error("decode");
    recorder.error("dead_peer");
    assert_eq!(meter.sum("tunnel.errors", &[kv("error.kind", "decode")]), 2);
    assert_eq!(meter.sum("tunnel.errors", &[]), 3);

    recorder.reconnect_attempt("dropped");
    recorder.reconnect_attempt("connect_failed");
    recorder.reconnect_attempt("connect_failed");
    assert_eq!(
        meter.sum(
            "tunnel.reconnect.attempts",
            &[kv("reason", "connect_failed")]
        ),
        2
    );

    recorder.rtt(Duration::from_micros(300));
    recorder.rtt(Duration::from_millis(2));
    assert_eq!(meter.histogram_count("tunnel.rtt", &[]), 2);
    assert_eq!(meter.unit("tunnel.rtt").as_deref(), Some("s"));

    recorder.connection_opened();
    recorder.connection_closed(Duration::from_secs(90));
    assert_eq!(meter.histogram_count("tunnel.connection.duration", &[]), 1);
    assert_eq!(meter.sum("tunnel.connections.active", &[]), 0);

    recorder.replay_changed(5, 500);
    recorder.replay_changed(-2, -200);
    assert_eq!(meter.sum("tunnel.session.replay.messages", &[]), 3);
    assert_eq!(meter.sum("tunnel.session.replay.size", &[]), 300);

    recorder.pool_readiness(2, 3);
    assert_eq!(
        meter.gauge("tunnel.pool.connections", &[kv("state", "connected")]),
        Some(2)
    );
    assert_eq!(
        meter.gauge("tunnel.pool.connections", &[kv("state", "desired")]),
        Some(3)
    );

    recorder.request_started(&MessageType::Command);
    recorder.request_started(&MessageType::from_wire("custom"));
    assert_eq!(meter.sum("tunnel.requests.in_flight", &[]), 2);
    recorder.request_finished(&MessageType::Command, Duration::from_millis(3), Ok(()));
    recorder.request_finished(
        &MessageType::from_wire("custom"),
        Duration::from_millis(3),
        Err("timeout"),
    );
    assert_eq!(meter.sum("tunnel.requests.in_flight", &[]), 0);
    assert_eq!(
        meter.histogram_count("tunnel.request.duration", &[kv("message.type", "command")]),
        1
    );
    assert_eq!(
        meter.sum("tunnel.request.errors", &[kv("error.kind", "timeout")]),
        1
    );
    recorder.late_reply();
    assert_eq!(meter.sum("tunnel.replies.late", &[]), 1);
}

#[test]
fn tracked_tallies_are_summed_live_and_kept_after_their_connection_ends() {
    use std::sync::Arc;
    use tunnel_metrics::{MessageTally, TypeSlot};

    let meter = TestMeter::new();
    let recorder = meter.recorder();
    let event = TypeSlot::of(&MessageType::Event);
    let first = Arc::new(MessageTally::new());
    let second = Arc::new(MessageTally::new());
    assert!(recorder.track(&first));
    assert!(recorder.track(&second));
    first.record(Direction::Inbound, event, 100);
    first.record(Direction::Inbound, event, 100);
    second.record(Direction::Outbound, event, 30);
    // A direct call for a known type adds to the same series.
    recorder.message(Direction::Inbound, &MessageType::Event, 5);

    let kv = |k: &'static str, v: &'static str| KeyValue::new(k, v);
    let event_in = [kv("direction", "in"), kv("message.type", "event")];
    assert_eq!(meter.sum("tunnel.messages", &event_in), 3);
    assert_eq!(meter.sum("tunnel.message.size", &event_in), 205);

    // The first connection ends: what it counted stays, later counts still add up.
    drop(first);
    second.record(Direction::Outbound, event, 20);
    assert_eq!(meter.sum("tunnel.messages", &event_in), 3);
    assert_eq!(meter.sum("tunnel.message.size", &event_in), 205);
    let event_out = [kv("direction", "out"), kv("message.type", "event")];
    assert_eq!(meter.sum("tunnel.messages", &event_out), 2);
    assert_eq!(meter.sum("tunnel.message.size", &event_out), 50);

    // Many short connections that are never collected in between: counts stay exact.
    for _ in 0..1000 {
        let tally = Arc::new(MessageTally::new());
        recorder.track(&tally);
        tally.record(Direction::Inbound, TypeSlot::of(&MessageType::Status), 1);
    }
    let status_in = [kv("direction", "in"), kv("message.type", "status")];
    assert_eq!(meter.sum("tunnel.messages", &status_in), 1000);
}

#[test]
fn peer_chosen_type_names_are_bounded_in_length_and_number() {
    let meter = TestMeter::new();
    let recorder = meter.recorder();
    let huge = "x".repeat(1 << 20);
    for _ in 0..8 {
        recorder.message(Direction::Inbound, &MessageType::from_wire(&huge), 1);
    }
    for i in 0..100 {
        let kind = MessageType::from_wire(&format!("made.up.{i}"));
        recorder.message(Direction::Inbound, &kind, 1);
        recorder.request_started(&kind);
        recorder.request_finished(&kind, std::time::Duration::from_millis(1), Err("remote"));
    }
    let kv = |k: &'static str, v: String| KeyValue::new(k, v);
    // The first names get their own series, the rest and the huge one fold into one.
    assert_eq!(
        meter.sum("tunnel.messages", &[kv("message.type", "made.up.0".into())]),
        1
    );
    let own = tunnel_metrics::MAX_UNKNOWN_TYPES;
    assert_eq!(
        meter.sum(
            "tunnel.messages",
            &[kv("message.type", format!("made.up.{}", own - 1))]
        ),
        1
    );
    assert_eq!(
        meter.sum(
            "tunnel.messages",
            &[kv("message.type", format!("made.up.{own}"))]
        ),
        0
    );
    assert_eq!(
        meter.sum(
            "tunnel.messages",
            &[kv("message.type", tunnel_metrics::OTHER_TYPES.into())]
        ),
        8 + 100 - own as i128
    );
    assert_eq!(meter.sum("tunnel.messages", &[]), 108);
    assert_eq!(meter.sum("tunnel.request.errors", &[]), 100);
}
