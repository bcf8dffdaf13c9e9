//! The OpenTelemetry recorder.

use opentelemetry::KeyValue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{
    BoundHistogram, Counter, Gauge, Histogram, Meter, ObservableUpDownCounter, UpDownCounter,
};
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
/// | `tunnel.request.duration` | histogram (successes and failures) | `s` | `message.type` |
/// | `tunnel.request.errors` | counter | `{error}` | `message.type`, `error.kind` |
/// | `tunnel.requests.in_flight` | up-down counter | `{request}` | `message.type` |
/// | `tunnel.replies.late` | counter | `{reply}` | |
#[derive(Clone)]
pub struct OtelRecorder {
    messages: Counter<u64>,
    bytes: Counter<u64>,
    connections: UpDownCounter<i64>,
    handshake_failures: Counter<u64>,
    circuit: Gauge<i64>,
    resets: Counter<u64>,
    request_duration: Histogram<f64>,
    /// `request_duration` bound to each known message type: no attribute lookup per
    /// record on the hot path.
    durations: Arc<[BoundHistogram<f64>]>,
    request_errors: Counter<u64>,
    /// Requests in flight per known message type: plain atomics on the hot path,
    /// observed at collection time.
    in_flight: Arc<[AtomicI64; KNOWN_TYPES.len()]>,
    /// Requests in flight of types this version does not know (rare).
    in_flight_other: Arc<Mutex<HashMap<String, i64>>>,
    _in_flight_observer: ObservableUpDownCounter<i64>,
    late_replies: Counter<u64>,
}

impl std::fmt::Debug for OtelRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelRecorder").finish_non_exhaustive()
    }
}

/// The message types whose in-flight counts are kept in atomics.
const KNOWN_TYPES: [&str; 12] = [
    "handshake",
    "handshake_ack",
    "ping",
    "pong",
    "close",
    "resource",
    "status",
    "event",
    "command",
    "reply",
    "ack",
    "window",
];

fn slot(kind: &MessageType) -> Option<usize> {
    let name = kind.static_name()?;
    KNOWN_TYPES
        .iter()
        .position(|known| std::ptr::eq(*known, name) || *known == name)
}

impl OtelRecorder {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let in_flight: Arc<[AtomicI64; KNOWN_TYPES.len()]> =
            Arc::new(std::array::from_fn(|_| AtomicI64::new(0)));
        let in_flight_other = Arc::new(Mutex::new(HashMap::new()));
        let observed = in_flight.clone();
        let observed_other = in_flight_other.clone();
        let request_duration = meter
            .f64_histogram("tunnel.request.duration")
            .with_unit("s")
            .with_description("Time from a request entering the metrics layer to its outcome")
            .with_boundaries(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .build();
        let durations = KNOWN_TYPES
            .iter()
            .map(|name| request_duration.bind(&[KeyValue::new("message.type", *name)]))
            .collect();
        OtelRecorder {
            request_duration,
            durations,
            in_flight,
            in_flight_other,
            _in_flight_observer: meter
                .i64_observable_up_down_counter("tunnel.requests.in_flight")
                .with_unit("{request}")
                .with_description("Requests started and not yet finished")
                .with_callback(move |observer| {
                    for (name, count) in KNOWN_TYPES.iter().zip(observed.iter()) {
                        let count = count.load(Ordering::Relaxed);
                        if count != 0 {
                            observer.observe(count, &[KeyValue::new("message.type", *name)]);
                        }
                    }
                    let other = observed_other.lock().unwrap_or_else(|e| e.into_inner());
                    for (name, count) in other.iter() {
                        observer.observe(*count, &[KeyValue::new("message.type", name.clone())]);
                    }
                })
                .build(),
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
            request_errors: meter
                .u64_counter("tunnel.request.errors")
                .with_unit("{error}")
                .with_description("Failed requests by error kind")
                .build(),
            late_replies: meter
                .u64_counter("tunnel.replies.late")
                .with_unit("{reply}")
                .with_description("Replies discarded because nobody waited for them")
                .build(),
        }
    }
}

impl OtelRecorder {
    fn add_other(&self, kind: &MessageType, delta: i64) {
        let mut other = self
            .in_flight_other
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let count = other.entry(kind.as_str().to_owned()).or_insert(0);
        *count += delta;
        if *count == 0 {
            other.remove(kind.as_str());
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

    fn request_started(&self, kind: &MessageType) {
        match slot(kind) {
            Some(i) => {
                self.in_flight[i].fetch_add(1, Ordering::Relaxed);
            }
            None => self.add_other(kind, 1),
        }
    }

    fn request_finished(
        &self,
        kind: &MessageType,
        elapsed: std::time::Duration,
        outcome: Result<(), &'static str>,
    ) {
        let slot = slot(kind);
        match slot {
            Some(i) => {
                self.in_flight[i].fetch_sub(1, Ordering::Relaxed);
                self.durations[i].record(elapsed.as_secs_f64());
            }
            None => {
                self.add_other(kind, -1);
                self.request_duration.record(
                    elapsed.as_secs_f64(),
                    &[KeyValue::new("message.type", type_value(kind))],
                );
            }
        }
        if let Err(error) = outcome {
            self.request_errors.add(
                1,
                &[
                    KeyValue::new("message.type", type_value(kind)),
                    KeyValue::new("error.kind", error),
                ],
            );
        }
    }

    fn late_reply(&self) {
        self.late_replies.add(1, &[]);
    }
}
