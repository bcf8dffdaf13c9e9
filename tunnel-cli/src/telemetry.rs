//! Logging, and with the `otlp` feature, OTLP export of traces and metrics.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use tunnel_metrics::prometheus::PrometheusMetrics;

use crate::LogFormat;

/// The OTLP endpoint, once telemetry is set up with one.
static OTLP_ENDPOINT: OnceLock<String> = OnceLock::new();

/// What must be flushed before the process exits.
pub(crate) struct Telemetry {
    #[cfg(feature = "otlp")]
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Sets up logging (`filter` in `RUST_LOG` syntax, lines in `format`) and, with an
/// OTLP endpoint, trace export: spans, including the router's per-message spans with
/// their W3C context, go to the collector. Call inside the runtime.
pub(crate) fn init(
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, String> {
    let filter = EnvFilter::new(filter);
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    #[cfg(feature = "otlp")]
    {
        let mut filter = filter;
        let mut tracer = None;
        let mut otel = None;
        if let Some(endpoint) = otlp_endpoint {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig;
            // The exporter's own logs must not feed back into the exporter.
            for quiet in [
                "h2=off",
                "tonic=off",
                "tower=off",
                "hyper=off",
                "opentelemetry_sdk=warn",
                "opentelemetry_otlp=warn",
            ] {
                if let Ok(directive) = quiet.parse() {
                    filter = filter.add_directive(directive);
                }
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| format!("OTLP trace exporter: {e}"))?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource())
                .build();
            otel = Some(tracing_opentelemetry::layer().with_tracer(provider.tracer("tunnel")));
            tracer = Some(provider);
            let _ = OTLP_ENDPOINT.set(endpoint.to_owned());
        }
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .try_init();
        Ok(Telemetry { tracer })
    }
    #[cfg(not(feature = "otlp"))]
    {
        if otlp_endpoint.is_some() {
            return Err("--otlp-endpoint needs a build with the `otlp` feature".into());
        }
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init();
        let _ = &OTLP_ENDPOINT;
        Ok(Telemetry {})
    }
}

#[cfg(feature = "otlp")]
fn resource() -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder()
        .with_service_name("tunnel")
        .build()
}

/// The metrics of a hub or agent: Prometheus text for `/metrics`, and with an OTLP
/// endpoint, pushed to the collector every 10 s as well.
pub(crate) fn metrics() -> Result<PrometheusMetrics, String> {
    #[cfg(feature = "otlp")]
    if let Some(endpoint) = OTLP_ENDPOINT.get() {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("OTLP metric exporter: {e}"))?;
        let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
            .with_interval(std::time::Duration::from_secs(10))
            .build();
        return PrometheusMetrics::with_provider(|b| {
            b.with_reader(reader).with_resource(resource())
        })
        .map_err(|e| e.to_string());
    }
    PrometheusMetrics::new().map_err(|e| e.to_string())
}

impl Telemetry {
    /// Flushes what is buffered for export.
    pub(crate) fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(tracer) = self.tracer
            && let Err(e) = tracer.shutdown()
        {
            eprintln!("tunnel: flushing traces failed: {e}");
        }
    }
}
