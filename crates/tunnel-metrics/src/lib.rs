//! Metrics for tunnel: a small `Recorder` trait with a no-op default and an
//! OpenTelemetry implementation (messages and bytes by type and direction, open
//! connections, handshake failures by reason).
//!
//! Filled by the transport issue; this crate exists so the layering is fixed from the
//! start.
