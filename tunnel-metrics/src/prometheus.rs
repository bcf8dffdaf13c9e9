//! Metrics exposed as Prometheus text, through opentelemetry-prometheus.

use std::sync::Arc;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::OtelRecorder;

/// An OpenTelemetry meter provider whose instruments are read by a Prometheus
/// registry, with an [`OtelRecorder`] on it.
///
/// ```
/// use tunnel_metrics::{Direction, Recorder, prometheus::PrometheusMetrics};
/// use tunnel_proto::MessageType;
///
/// let metrics = PrometheusMetrics::new().unwrap();
/// metrics.recorder().message(Direction::Inbound, &MessageType::Event, 120);
/// let text = metrics.render();
/// assert!(text.contains("tunnel_messages_total"));
/// ```
#[derive(Debug, Clone)]
pub struct PrometheusMetrics {
    registry: Registry,
    provider: SdkMeterProvider,
    recorder: Arc<OtelRecorder>,
}

/// The Prometheus exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("could not set up the Prometheus exporter: {0}")]
pub struct PrometheusError(String);

impl PrometheusMetrics {
    /// A provider with only the Prometheus reader.
    pub fn new() -> Result<Self, PrometheusError> {
        Self::with_provider(|builder| builder)
    }

    /// A provider with the Prometheus reader plus whatever `configure` adds to the
    /// builder (for example an OTLP periodic reader, or a resource).
    pub fn with_provider(
        configure: impl FnOnce(
            opentelemetry_sdk::metrics::MeterProviderBuilder,
        ) -> opentelemetry_sdk::metrics::MeterProviderBuilder,
    ) -> Result<Self, PrometheusError> {
        let registry = Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| PrometheusError(e.to_string()))?;
        let provider = configure(SdkMeterProvider::builder().with_reader(exporter)).build();
        let recorder = Arc::new(OtelRecorder::new(&provider.meter("tunnel")));
        Ok(PrometheusMetrics {
            registry,
            provider,
            recorder,
        })
    }

    /// The recorder to give hubs, agents and connections.
    pub fn recorder(&self) -> Arc<OtelRecorder> {
        self.recorder.clone()
    }

    /// The meter provider (to create more instruments, or to shut it down).
    pub fn provider(&self) -> &SdkMeterProvider {
        &self.provider
    }

    /// Everything recorded so far, in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
