//! Logging, and with the `otlp` feature, OTLP export of traces and metrics.

use std::io::IsTerminal as _;
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
/// With `captured`, log lines go there instead of stderr (the demo shows them as lines
/// of its table).
pub(crate) fn init(
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    captured: Option<&CapturedLog>,
) -> Result<Telemetry, String> {
    let filter = EnvFilter::new(filter);
    let fmt = match (format, captured) {
        (LogFormat::Text, Some(captured)) => {
            let captured = captured.clone();
            tracing_subscriber::fmt::layer()
                .without_time()
                .with_ansi(false)
                .with_writer(move || captured.writer())
                .boxed()
        }
        (LogFormat::Json, Some(captured)) => {
            let captured = captured.clone();
            tracing_subscriber::fmt::layer()
                .json()
                .with_ansi(false)
                .with_writer(move || captured.writer())
                .boxed()
        }
        (LogFormat::Text, None) => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .boxed(),
        (LogFormat::Json, None) => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
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

/// Log lines kept in memory until taken: at most [`CapturedLog::MAX_LINES`], each cut
/// at [`CapturedLog::MAX_LINE`] bytes; past the bound the oldest go and are counted.
#[derive(Debug, Clone, Default)]
pub(crate) struct CapturedLog {
    inner: std::sync::Arc<std::sync::Mutex<Captured>>,
}

#[derive(Debug, Default)]
struct Captured {
    lines: std::collections::VecDeque<String>,
    partial: Vec<u8>,
    dropped: u64,
}

impl CapturedLog {
    /// Lines kept before the oldest is dropped.
    pub(crate) const MAX_LINES: usize = 256;
    /// Bytes kept of one line.
    pub(crate) const MAX_LINE: usize = 1024;

    fn writer(&self) -> CaptureWriter {
        CaptureWriter(self.clone())
    }

    /// The complete lines so far, and how many were dropped since the last take.
    pub(crate) fn take(&self) -> (Vec<String>, u64) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut c.dropped);
        (c.lines.drain(..).collect(), dropped)
    }

    fn push(&self, bytes: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&c.partial).into_owned();
                c.partial.clear();
                if c.lines.len() == Self::MAX_LINES {
                    c.lines.pop_front();
                    c.dropped += 1;
                }
                c.lines.push_back(line);
            } else if c.partial.len() < Self::MAX_LINE {
                c.partial.push(b);
            }
        }
    }
}

/// One log event's writer (tracing-subscriber makes one per event).
struct CaptureWriter(CapturedLog);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether log lines carry ANSI colour: only on a terminal, and never with `NO_COLOR`
/// set to anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_lines_are_whole_bounded_and_counted_when_dropped() {
        use std::io::Write as _;
        let log = CapturedLog::default();
        let mut w = log.writer();
        w.write_all(b"first ").expect("write");
        assert_eq!(log.take(), (Vec::new(), 0), "a partial line waits");
        w.write_all(b"line\nsecond\n").expect("write");
        assert_eq!(
            log.take(),
            (vec!["first line".to_string(), "second".to_string()], 0)
        );
        for i in 0..CapturedLog::MAX_LINES + 3 {
            writeln!(w, "{i}").expect("write");
        }
        let (lines, dropped) = log.take();
        assert_eq!((lines.len(), dropped), (CapturedLog::MAX_LINES, 3));
        assert_eq!(lines[0], "3");
        w.write_all(&vec![b'x'; CapturedLog::MAX_LINE * 2])
            .expect("write");
        w.write_all(b"\n").expect("write");
        assert_eq!(log.take().0[0].len(), CapturedLog::MAX_LINE);
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
