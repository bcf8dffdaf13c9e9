//! The OpenTelemetry recorder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundHistogram, Counter, Gauge, Histogram, Meter, ObservableCounter, ObservableUpDownCounter,
};
use tunnel_proto::MessageType;

use crate::{Direction, KNOWN_TYPES, MessageTally, Recorder, TypeSlot};

/// Records into OpenTelemetry instruments created from a [`Meter`]:
///
/// | instrument | kind | unit | attributes |
/// |---|---|---|---|
/// | `tunnel.messages` | counter | `{message}` | `direction`, `message.type` |
/// | `tunnel.message.size` | counter | `By` | `direction`, `message.type` |
/// | `tunnel.errors` | counter | `{error}` | `error.kind` |
/// | `tunnel.connections.active` | up-down counter | `{connection}` | |
/// | `tunnel.connection.duration` | histogram | `s` | |
/// | `tunnel.reconnect.attempts` | counter | `{attempt}` | `reason` |
/// | `tunnel.handshake.failures` | counter | `{failure}` | `reason` |
/// | `tunnel.rtt` | histogram | `s` | |
/// | `tunnel.request.duration` | histogram (successes and failures) | `s` | `message.type` |
/// | `tunnel.request.errors` | counter | `{error}` | `message.type`, `error.kind` |
/// | `tunnel.requests.in_flight` (waiting for their response) | up-down counter | `{request}` | `message.type` |
/// | `tunnel.replies.late` | counter | `{reply}` | |
/// | `tunnel.session.replay.messages` | up-down counter | `{message}` | |
/// | `tunnel.session.replay.size` | up-down counter | `By` | |
/// | `tunnel.session.resets` | counter | `{reset}` | |
/// | `tunnel.circuit.state` | gauge (0 closed, 1 half-open, 2 open) | `{state}` | `endpoint` |
/// | `tunnel.pool.connections` | gauge | `{connection}` | `state` (`connected`, `desired`) |
///
/// The hot paths stay cheap: messages are counted in each connection's own
/// [`MessageTally`] (tracked through [`Recorder::track`] and summed at collection time,
/// so a message costs plain stores on counters its connection owns), requests use
/// atomics per known type and a histogram bound to each type.
#[derive(Clone)]
pub struct OtelRecorder {
    errors: Counter<u64>,
    connection_duration: Histogram<f64>,
    reconnects: Counter<u64>,
    handshake_failures: Counter<u64>,
    rtt: Histogram<f64>,
    circuit: Gauge<i64>,
    pool: Gauge<i64>,
    resets: Counter<u64>,
    request_duration: Histogram<f64>,
    /// `request_duration` bound to each known message type.
    durations: Arc<[BoundHistogram<f64>]>,
    request_errors: Counter<u64>,
    late_replies: Counter<u64>,
    /// Values read at collection time.
    live: Arc<Live>,
    _observers: Arc<Observers>,
}

/// Values kept in atomics on the hot path and observed at collection.
#[derive(Default)]
struct Live {
    /// `tunnel.messages` and `tunnel.message.size` for known types: the tallies of
    /// connections (see [`Recorder::track`]) and what finished ones counted.
    tallies: Mutex<Tallies>,
    /// The same for types this version does not know (rare): (messages, bytes).
    other_messages: Mutex<HashMap<(Direction, String), (u64, u64)>>,
    connections: AtomicI64,
    in_flight: [AtomicI64; KNOWN_TYPES.len()],
    /// Requests in flight of types this version does not know (rare).
    in_flight_other: Mutex<HashMap<String, i64>>,
    /// The names of unknown types that get a label value of their own.
    unknown_types: Mutex<std::collections::HashSet<String>>,
    replay_messages: AtomicI64,
    replay_bytes: AtomicI64,
}

/// (messages, bytes) per direction and known type.
type Counts = [[(u64, u64); KNOWN_TYPES.len()]; 2];

/// Connection tallies being tracked.
#[derive(Default)]
struct Tallies {
    tracked: Vec<Arc<MessageTally>>,
    /// What tallies of ended connections counted, plus direct [`Recorder::message`]
    /// calls for known types.
    finished: Counts,
    /// Fold ended tallies when `tracked` reaches this length, so memory stays bounded
    /// even if nothing ever collects.
    fold_at: usize,
}

impl Tallies {
    /// Moves the counts of tallies nobody else holds (their connections ended) into
    /// `finished`.
    fn fold_finished(&mut self) {
        let mut i = 0;
        while i < self.tracked.len() {
            // `get_mut` succeeds only when this is the last reference, and synchronises
            // with the writers' drops, so their last counts are visible.
            if let Some(tally) = Arc::get_mut(&mut self.tracked[i]) {
                add_counts(&mut self.finished, tally);
                self.tracked.swap_remove(i);
            } else {
                i += 1;
            }
        }
        self.fold_at = (self.tracked.len() * 2).max(64);
    }

    /// Everything counted so far.
    fn snapshot(&mut self) -> Counts {
        self.fold_finished();
        let mut counts = self.finished;
        for tally in &self.tracked {
            add_counts(&mut counts, tally);
        }
        counts
    }
}

fn add_counts(counts: &mut Counts, tally: &MessageTally) {
    for (direction, slot, messages, bytes) in tally.nonzero() {
        if let Some(i) = slot.index() {
            let entry = &mut counts[direction_index(direction)][i];
            entry.0 = entry.0.wrapping_add(messages);
            entry.1 = entry.1.wrapping_add(bytes);
        }
    }
}

/// Keeps the observable instruments registered.
struct Observers {
    _messages: ObservableCounter<u64>,
    _bytes: ObservableCounter<u64>,
    _connections: ObservableUpDownCounter<i64>,
    _in_flight: ObservableUpDownCounter<i64>,
    _replay_messages: ObservableUpDownCounter<i64>,
    _replay_bytes: ObservableUpDownCounter<i64>,
}

impl std::fmt::Debug for OtelRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtelRecorder").finish_non_exhaustive()
    }
}

/// The index of `kind` in [`KNOWN_TYPES`].
fn slot(kind: &MessageType) -> Option<usize> {
    TypeSlot::of(kind).index()
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

impl OtelRecorder {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let request_duration = meter
            .f64_histogram("tunnel.request.duration")
            .with_unit("s")
            .with_description("Time from a request entering the metrics layer to its outcome")
            .with_boundaries(latency_buckets())
            .build();
        let durations = KNOWN_TYPES
            .iter()
            .map(|name| request_duration.bind(&[KeyValue::new("message.type", *name)]))
            .collect();
        let live = Arc::new(Live::default());
        let observers = Observers {
            _messages: {
                let live = live.clone();
                meter
                    .u64_observable_counter("tunnel.messages")
                    .with_unit("{message}")
                    .with_description("Messages sent and received")
                    .with_callback(move |o| live.observe_messages(o, |(m, _)| m))
                    .build()
            },
            _bytes: {
                let live = live.clone();
                meter
                    .u64_observable_counter("tunnel.message.size")
                    .with_unit("By")
                    .with_description("Encoded bytes of messages sent and received")
                    .with_callback(move |o| live.observe_messages(o, |(_, b)| b))
                    .build()
            },
            _connections: {
                let live = live.clone();
                meter
                    .i64_observable_up_down_counter("tunnel.connections.active")
                    .with_unit("{connection}")
                    .with_description("Established connections")
                    .with_callback(move |o| {
                        o.observe(live.connections.load(Ordering::Relaxed), &[])
                    })
                    .build()
            },
            _in_flight: {
                let live = live.clone();
                meter
                    .i64_observable_up_down_counter("tunnel.requests.in_flight")
                    .with_unit("{request}")
                    .with_description("Requests started and not yet finished")
                    .with_callback(move |o| {
                        for (name, count) in KNOWN_TYPES.iter().zip(live.in_flight.iter()) {
                            let count = count.load(Ordering::Relaxed);
                            if count != 0 {
                                o.observe(count, &[KeyValue::new("message.type", *name)]);
                            }
                        }
                        let other = live
                            .in_flight_other
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        for (name, count) in other.iter() {
                            o.observe(*count, &[KeyValue::new("message.type", name.clone())]);
                        }
                    })
                    .build()
            },
            _replay_messages: {
                let live = live.clone();
                meter
                    .i64_observable_up_down_counter("tunnel.session.replay.messages")
                    .with_unit("{message}")
                    .with_description("Messages held in replay buffers until acknowledged")
                    .with_callback(move |o| {
                        o.observe(live.replay_messages.load(Ordering::Relaxed), &[])
                    })
                    .build()
            },
            _replay_bytes: {
                let live = live.clone();
                meter
                    .i64_observable_up_down_counter("tunnel.session.replay.size")
                    .with_unit("By")
                    .with_description("Bytes held in replay buffers until acknowledged")
                    .with_callback(move |o| {
                        o.observe(live.replay_bytes.load(Ordering::Relaxed), &[])
                    })
                    .build()
            },
        };
        OtelRecorder {
            errors: meter
                .u64_counter("tunnel.errors")
                .with_unit("{error}")
                .with_description("Errors by kind")
                .build(),
            connection_duration: meter
                .f64_histogram("tunnel.connection.duration")
                .with_unit("s")
                .with_description("How long established connections lasted")
                .with_boundaries(vec![
                    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0,
                ])
                .build(),
            reconnects: meter
                .u64_counter("tunnel.reconnect.attempts")
                .with_unit("{attempt}")
                .with_description("Agent redials by reason")
                .build(),
            handshake_failures: meter
                .u64_counter("tunnel.handshake.failures")
                .with_unit("{failure}")
                .with_description("Failed upgrades and handshakes by reason")
                .build(),
            rtt: meter
                .f64_histogram("tunnel.rtt")
                .with_unit("s")
                .with_description("Keepalive round trip times")
                .with_boundaries(latency_buckets())
                .build(),
            circuit: meter
                .i64_gauge("tunnel.circuit.state")
                .with_unit("{state}")
                .with_description(
                    "Circuit breaker state per endpoint: 0 closed, 1 half-open, 2 open",
                )
                .build(),
            pool: meter
                .i64_gauge("tunnel.pool.connections")
                .with_unit("{connection}")
                .with_description("A pool's connections: connected and desired")
                .build(),
            resets: meter
                .u64_counter("tunnel.session.resets")
                .with_unit("{reset}")
                .with_description("Sessions that could not be resumed")
                .build(),
            request_duration,
            durations,
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
            live,
            _observers: Arc::new(observers),
        }
    }

    fn add_other(&self, kind: &MessageType, delta: i64) {
        let label = self.live.unknown_label(kind);
        let mut other = self
            .live
            .in_flight_other
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let count = other.entry(label.to_owned()).or_insert(0);
        *count += delta;
        if *count == 0 {
            other.remove(label);
        }
    }

    /// The `message.type` label value of `kind`.
    fn type_value(&self, kind: &MessageType) -> opentelemetry::Value {
        match kind.static_name() {
            Some(name) => opentelemetry::Value::from(name),
            None => opentelemetry::Value::from(self.live.unknown_label(kind).to_owned()),
        }
    }
}

impl Live {
    /// The label value of a type this version does not know: its own name for the
    /// first [`MAX_UNKNOWN_TYPES`](crate::MAX_UNKNOWN_TYPES) names of at most
    /// [`MAX_TYPE_LABEL_LEN`](crate::MAX_TYPE_LABEL_LEN) bytes, else
    /// [`OTHER_TYPES`](crate::OTHER_TYPES). Type names come from peers: neither
    /// their length nor their number may reach the metrics unbounded.
    fn unknown_label<'a>(&self, kind: &'a MessageType) -> &'a str {
        let name = kind.as_str();
        if name.len() > crate::MAX_TYPE_LABEL_LEN {
            return crate::OTHER_TYPES;
        }
        let mut known = self.unknown_types.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(name) {
            return name;
        }
        if known.len() < crate::MAX_UNKNOWN_TYPES {
            known.insert(name.to_owned());
            return name;
        }
        crate::OTHER_TYPES
    }
}

impl Live {
    /// Observes one of the per-message counters: the known types from `counts`, the
    /// others through `pick` from the map. Series that never moved are left out.
    fn observe_messages(
        &self,
        observer: &dyn opentelemetry::metrics::AsyncInstrument<u64>,
        pick: fn((u64, u64)) -> u64,
    ) {
        let counts = self
            .tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        for (direction, per_type) in [Direction::Inbound, Direction::Outbound]
            .into_iter()
            .zip(counts.iter())
        {
            for (name, pair) in KNOWN_TYPES.iter().zip(per_type.iter()) {
                let value = pick(*pair);
                if pair.0 == 0 {
                    continue;
                }
                observer.observe(
                    value,
                    &[
                        KeyValue::new("direction", direction.as_str()),
                        KeyValue::new("message.type", *name),
                    ],
                );
            }
        }
        let other = self
            .other_messages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for ((direction, name), counts) in other.iter() {
            observer.observe(
                pick(*counts),
                &[
                    KeyValue::new("direction", direction.as_str()),
                    KeyValue::new("message.type", name.clone()),
                ],
            );
        }
    }
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

fn saturating_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Recorder for OtelRecorder {
    fn message(&self, direction: Direction, kind: &MessageType, bytes: usize) {
        match slot(kind) {
            Some(i) => {
                let mut tallies = self.live.tallies.lock().unwrap_or_else(|e| e.into_inner());
                let entry = &mut tallies.finished[direction_index(direction)][i];
                entry.0 += 1;
                entry.1 += saturating_u64(bytes);
            }
            None => {
                let label = self.live.unknown_label(kind);
                let mut other = self
                    .live
                    .other_messages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let entry = other.entry((direction, label.to_owned())).or_insert((0, 0));
                entry.0 += 1;
                entry.1 += saturating_u64(bytes);
            }
        }
    }

    fn track(&self, tally: &Arc<MessageTally>) -> bool {
        let mut tallies = self.live.tallies.lock().unwrap_or_else(|e| e.into_inner());
        tallies.tracked.push(tally.clone());
        if tallies.tracked.len() >= tallies.fold_at {
            tallies.fold_finished();
        }
        true
    }

    fn connection_opened(&self) {
        self.live.connections.fetch_add(1, Ordering::Relaxed);
    }

    fn connection_closed(&self, lifetime: Duration) {
        self.live.connections.fetch_sub(1, Ordering::Relaxed);
        self.connection_duration.record(lifetime.as_secs_f64(), &[]);
    }

    fn rtt(&self, rtt: Duration) {
        self.rtt.record(rtt.as_secs_f64(), &[]);
    }

    fn error(&self, kind: &'static str) {
        self.errors.add(1, &[KeyValue::new("error.kind", kind)]);
    }

    fn reconnect_attempt(&self, reason: &'static str) {
        self.reconnects.add(1, &[KeyValue::new("reason", reason)]);
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

    fn replay_changed(&self, messages: i64, bytes: i64) {
        self.live
            .replay_messages
            .fetch_add(messages, Ordering::Relaxed);
        self.live.replay_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn pool_readiness(&self, connected: usize, desired: usize) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.pool
            .record(count(connected), &[KeyValue::new("state", "connected")]);
        self.pool
            .record(count(desired), &[KeyValue::new("state", "desired")]);
    }

    fn request_started(&self, kind: &MessageType) {
        match slot(kind) {
            Some(i) => {
                self.live.in_flight[i].fetch_add(1, Ordering::Relaxed);
            }
            None => self.add_other(kind, 1),
        }
    }

    fn request_finished(
        &self,
        kind: &MessageType,
        elapsed: Duration,
        outcome: Result<(), &'static str>,
    ) {
        match slot(kind) {
            Some(i) => {
                self.live.in_flight[i].fetch_sub(1, Ordering::Relaxed);
            }
            None => self.add_other(kind, -1),
        }
        self.request_completed(kind, elapsed, outcome);
    }

    fn request_completed(
        &self,
        kind: &MessageType,
        elapsed: Duration,
        outcome: Result<(), &'static str>,
    ) {
        match slot(kind) {
            Some(i) => self.durations[i].record(elapsed.as_secs_f64()),
            None => self.request_duration.record(
                elapsed.as_secs_f64(),
                &[KeyValue::new("message.type", self.type_value(kind))],
            ),
        }
        if let Err(error) = outcome {
            self.request_errors.add(
                1,
                &[
                    KeyValue::new("message.type", self.type_value(kind)),
                    KeyValue::new("error.kind", error),
                ],
            );
        }
    }

    fn late_reply(&self) {
        self.late_replies.add(1, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_tallies_are_folded_so_tracking_stays_bounded_without_collections() {
        let meter = opentelemetry::global::meter("tally-bound");
        let recorder = OtelRecorder::new(&meter);
        for _ in 0..10_000 {
            let tally = Arc::new(MessageTally::new());
            recorder.track(&tally);
            tally.record(Direction::Inbound, TypeSlot::of(&MessageType::Ack), 3);
        }
        let mut tallies = recorder.live.tallies.lock().unwrap();
        assert!(tallies.tracked.len() <= 64, "{}", tallies.tracked.len());
        let counts = tallies.snapshot();
        assert_eq!(counts[0][10], (10_000, 30_000));
    }
}
