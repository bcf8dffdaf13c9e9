//! Reading recorded metrics back in tests (feature `testing`).
//!
//! ```
//! use opentelemetry::KeyValue;
//! use tunnel_metrics::{Direction, Recorder, testing::TestMeter};
//! use tunnel_proto::MessageType;
//!
//! let meter = TestMeter::new();
//! let recorder = meter.recorder();
//! recorder.message(Direction::Inbound, &MessageType::Event, 200);
//! assert_eq!(meter.sum("tunnel.messages", &[KeyValue::new("message.type", "event")]), 1);
//! assert_eq!(meter.unit("tunnel.message.size").as_deref(), Some("By"));
//! ```

use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

use crate::OtelRecorder;

/// A manual reader that stays readable after the provider took it.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// An in-memory meter provider whose sums can be read back at any time.
#[derive(Debug, Clone)]
pub struct TestMeter {
    reader: SharedReader,
    provider: SdkMeterProvider,
}

impl Default for TestMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl TestMeter {
    /// A fresh provider with a manual reader.
    pub fn new() -> Self {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        TestMeter { reader, provider }
    }

    /// An [`OtelRecorder`] recording into this provider.
    pub fn recorder(&self) -> Arc<OtelRecorder> {
        Arc::new(OtelRecorder::new(&self.provider.meter("tunnel-test")))
    }

    fn collect(&self) -> ResourceMetrics {
        let mut rm = ResourceMetrics::default();
        // A manual reader registered with a live provider always collects.
        let _ = self.reader.collect(&mut rm);
        rm
    }

    /// The sum of the counter or up-down counter `name` over the data points whose
    /// attributes include all of `attrs` (0 if there are none).
    pub fn sum(&self, name: &str, attrs: &[KeyValue]) -> i128 {
        let rm = self.collect();
        let mut total = 0i128;
        for metric in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if metric.name() != name {
                continue;
            }
            let points: Vec<(Vec<KeyValue>, i128)> = match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(s)) => s
                    .data_points()
                    .map(|p| (p.attributes().cloned().collect(), i128::from(p.value())))
                    .collect(),
                AggregatedMetrics::I64(MetricData::Sum(s)) => s
                    .data_points()
                    .map(|p| (p.attributes().cloned().collect(), i128::from(p.value())))
                    .collect(),
                _ => Vec::new(),
            };
            total += points
                .into_iter()
                .filter(|(point, _)| attrs.iter().all(|a| point.contains(a)))
                .map(|(_, v)| v)
                .sum::<i128>();
        }
        total
    }

    /// The last value of gauge `name` at the data point whose attributes include all
    /// of `attrs`.
    pub fn gauge(&self, name: &str, attrs: &[KeyValue]) -> Option<i64> {
        let rm = self.collect();
        for metric in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if metric.name() != name {
                continue;
            }
            if let AggregatedMetrics::I64(MetricData::Gauge(g)) = metric.data() {
                for point in g.data_points() {
                    let point_attrs: Vec<KeyValue> = point.attributes().cloned().collect();
                    if attrs.iter().all(|a| point_attrs.contains(a)) {
                        return Some(point.value());
                    }
                }
            }
        }
        None
    }

    /// The number of values recorded by histogram `name` at the data points whose
    /// attributes include all of `attrs`.
    pub fn histogram_count(&self, name: &str, attrs: &[KeyValue]) -> u64 {
        let rm = self.collect();
        let mut total = 0;
        for metric in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if metric.name() != name {
                continue;
            }
            if let AggregatedMetrics::F64(MetricData::Histogram(h)) = metric.data() {
                for point in h.data_points() {
                    let point_attrs: Vec<KeyValue> = point.attributes().cloned().collect();
                    if attrs.iter().all(|a| point_attrs.contains(a)) {
                        total += point.count();
                    }
                }
            }
        }
        total
    }

    /// The unit of instrument `name`, once it has recorded something.
    pub fn unit(&self, name: &str) -> Option<String> {
        self.collect()
            .scope_metrics()
            .flat_map(|s| s.metrics())
            .find(|m| m.name() == name)
            .map(|m| m.unit().to_owned())
    }
}
