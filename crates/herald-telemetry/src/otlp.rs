//! The OTLP trace exporter, configured the way every OpenTelemetry SDK is: by `OTEL_*`
//! environment variables.
//!
//! | variable | effect |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` | where spans go; tracing is off when neither is set |
//! | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` (the default) |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | the resource (service name default: the caller's) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampling (default: parent-based, always on) |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` | read by the exporter itself |
//! | `OTEL_TRACES_EXPORTER` | `otlp` (also in a list) turns tracing on, at `http://localhost:4318` (or `:4317` for gRPC) when no endpoint is set; `none` turns it off; any other exporter is refused at start-up |
//! | `OTEL_SDK_DISABLED=true` | tracing off |
//!
//! This build speaks plain `http://` to the endpoint (no TLS provider is compiled in): point it
//! at a collector beside the process.

#[cfg(feature = "otlp")]
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::Error;

/// OTLP's wire protocols that this build speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (usually port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (usually port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The endpoint, as given (the exporter appends `/v1/traces` to a generic HTTP endpoint).
    pub endpoint: String,
    /// The protocol.
    pub protocol: Protocol,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl OtlpConfig {
    /// Reads the `OTEL_*` variables: `None` when tracing is off (no endpoint, or disabled).
    pub fn from_env() -> Result<Option<OtlpConfig>, Error> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        // A comma-separated list (the spec's); `otlp` among them turns it on.
        let exporters: Option<Vec<String>> = var("OTEL_TRACES_EXPORTER").map(|v| {
            v.split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect()
        });
        let asked = match &exporters {
            None => false,
            Some(list) if list.iter().any(|e| e == "otlp") => true,
            Some(list) if list.iter().all(|e| e == "none") => return Ok(None),
            Some(list) => {
                return Err(Error::Config(format!(
                    "OTEL_TRACES_EXPORTER={}: this build exports traces with otlp only (or none)",
                    list.join(",")
                )));
            }
        };
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let (name, protocol) = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(p) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(p)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                var("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        let protocol = match protocol.map(|p| p.trim().to_ascii_lowercase()).as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                return Err(Error::Config(format!(
                    "{name}={other:?}: use grpc or http/protobuf (http/json is not built in)"
                )));
            }
        };
        // Without an endpoint, tracing is off unless asked for by name; then the spec's default.
        let endpoint = match (endpoint, asked, protocol) {
            (Some(e), _, _) => e,
            (None, false, _) => return Ok(None),
            (None, true, Protocol::Grpc) => "http://localhost:4317".to_owned(),
            (None, true, Protocol::HttpProtobuf) => "http://localhost:4318".to_owned(),
        };
        let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !scheme_ok {
            return Err(Error::Config(format!(
                "the OTLP endpoint {endpoint:?} must start with http:// (or https://)"
            )));
        }
        if endpoint.starts_with("https://") {
            return Err(Error::Config(format!(
                "the OTLP endpoint {endpoint:?} uses TLS, which this build does not include: export to a collector over http:// beside the process"
            )));
        }
        Ok(Some(OtlpConfig { endpoint, protocol }))
    }

    /// A tracer provider exporting in batches to this endpoint. For gRPC it must be called
    /// inside a Tokio runtime, which must outlive the provider.
    #[cfg(not(feature = "otlp"))]
    pub fn provider(&self, _service_name: &str) -> Result<SdkTracerProvider, Error> {
        Err(Error::Config(format!(
            "OTLP export to {} was asked for, but this build has no OTLP exporter (the `otlp` feature is off)",
            self.endpoint
        )))
    }

    /// A tracer provider exporting in batches to this endpoint. For gRPC it must be called
    /// inside a Tokio runtime, which must outlive the provider.
    #[cfg(feature = "otlp")]
    pub fn provider(&self, service_name: &str) -> Result<SdkTracerProvider, Error> {
        // The exporters read the endpoint (and headers, timeout) from the same variables; it
        // is set explicitly so that what was validated is what is used.
        let traces_specific = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
        let exporter = match self.protocol {
            Protocol::Grpc => SpanExporter::builder()
                .with_tonic()
                .with_endpoint(self.endpoint.clone())
                .build(),
            Protocol::HttpProtobuf => {
                let endpoint = if traces_specific {
                    self.endpoint.clone()
                } else {
                    format!("{}/v1/traces", self.endpoint.trim_end_matches('/'))
                };
                SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .build()
            }
        }
        .map_err(|e| Error::Exporter(e.to_string()))?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(service_name))
            .build())
    }
}

/// The resource: `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` when set, else
/// `service.name=<service_name>`.
pub(crate) fn resource(service_name: &str) -> Resource {
    let named = var("OTEL_SERVICE_NAME").is_some()
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, _)| k.trim() == "service.name")
            })
        });
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(service_name.to_owned()).build()
    }
}
