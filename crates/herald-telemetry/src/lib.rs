//! herald-telemetry: what an operator sees of herald.
//!
//! * **Traces**: [`init`] installs a `tracing` subscriber whose OpenTelemetry layer exports
//!   spans over OTLP (gRPC or HTTP/protobuf), configured by the standard `OTEL_*` environment
//!   variables, and off when no OTLP endpoint is set. herald's spans (`herald.publish`,
//!   `herald.handle`) continue the trace that each outbox row carries; see
//!   [`herald_core::trace`].
//! * **Metrics**: [`Metrics::install`] makes the `metrics` facade record into a Prometheus
//!   registry; [`Endpoints`] serves it at `/metrics` beside `/healthz` and `/readyz`.
//! * **Logs**: text or JSON lines on stderr; a JSON line emitted inside a span carries its
//!   `trace_id` and `span_id`.
//!
//! ```no_run
//! # async fn doc(relay: herald_core::Relay) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use herald_telemetry::{Endpoints, LogFormat, Metrics, Telemetry};
//!
//! let telemetry = Telemetry::init(LogFormat::Json, "info")?; // OTLP if OTEL_EXPORTER_OTLP_ENDPOINT is set
//! let metrics = Metrics::install()?;
//! let thresholds = relay.thresholds(Duration::from_secs(60), Duration::from_secs(10));
//! let endpoints = Endpoints::new().metrics(metrics).relay(relay.health(), thresholds);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! tokio::spawn(endpoints.serve(listener, std::future::pending()));
//! // ... run the relay ...
//! telemetry.shutdown(); // flushes the spans not yet exported
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod http;
mod logs;
mod otlp;
pub mod process;
mod prometheus;
#[cfg(feature = "otlp")]
pub mod sink;

pub use http::Endpoints;
pub use logs::{Builder, LogFormat, Telemetry, capped_crates};
pub use otlp::{OtlpConfig, Protocol};
pub use prometheus::Metrics;

/// What can go wrong setting telemetry up. The messages name the variable or value to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An `OTEL_*` variable or a filter has a value herald cannot use.
    #[error("telemetry configuration: {0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// A `tracing` subscriber or a `metrics` recorder was already installed in this process.
    #[error("{0} is already installed in this process")]
    AlreadyInstalled(&'static str),
}
