//! The process's `tracing` subscriber: logs on stderr (text or JSON) and, when configured,
//! spans exported over OTLP.

use std::fmt;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

use crate::Error;
use crate::otlp::OtlpConfig;

/// How log lines look on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object a line, with `trace_id` and `span_id` when emitted inside a span.
    Json,
}

/// Client crates whose logs can hold what herald must never log: lapin logs a returned message
/// with its headers and body at WARN and every frame (the PLAIN login with its password) at
/// TRACE; the others log frames, statements or connection strings at DEBUG and TRACE. herald
/// reports their errors itself, so they are capped by a global filter of their own that
/// `HERALD_LOG` or `RUST_LOG` cannot lift (even `lapin::channel=trace`).
pub fn capped_crates() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("lapin", LevelFilter::OFF)
        .with_target("amq_protocol", LevelFilter::OFF)
        .with_target("amq_protocol_tcp", LevelFilter::OFF)
        .with_target("amq_protocol_types", LevelFilter::OFF)
        .with_target("async_nats", LevelFilter::ERROR)
        .with_target("redis", LevelFilter::ERROR)
        .with_target("rdkafka", LevelFilter::ERROR)
        .with_target("sqlx", LevelFilter::WARN)
        .with_target("rustls", LevelFilter::ERROR)
        .with_target("tokio_rustls", LevelFilter::ERROR)
        // The exporters' own transports: an unreachable collector is reported by the SDK.
        .with_target("tonic", LevelFilter::WARN)
        .with_target("h2", LevelFilter::WARN)
        .with_target("hyper", LevelFilter::WARN)
        .with_target("hyper_util", LevelFilter::WARN)
        .with_target("reqwest", LevelFilter::WARN)
        .with_target("opentelemetry_sdk", LevelFilter::WARN)
        .with_target("opentelemetry-otlp", LevelFilter::WARN)
        .with_target("opentelemetry", LevelFilter::WARN)
}

/// The installed telemetry. Call [`shutdown`](Self::shutdown) before the process exits (and
/// before its Tokio runtime is dropped) so the last spans are exported.
#[must_use = "dropping it without shutdown() may lose the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    exporting: Option<OtlpConfig>,
    spans: Option<reload::Handle<LevelFilter, Registry>>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.exporting)
            .finish()
    }
}

/// How [`Telemetry`] is set up; [`Telemetry::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    service_name: String,
    format: LogFormat,
    default_filter: String,
    otlp: Option<Option<OtlpConfig>>,
    spans_on: bool,
}

impl Builder {
    /// The service name when `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) does not give one. Default `herald`.
    pub fn service_name(mut self, name: impl Into<String>) -> Builder {
        self.service_name = name.into();
        self
    }

    /// The log format. Default text.
    pub fn format(mut self, format: LogFormat) -> Builder {
        self.format = format;
        self
    }

    /// The log filter when neither `HERALD_LOG` nor `RUST_LOG` is set (an `EnvFilter`
    /// directive such as `warn,herald=info`). Default `info`.
    pub fn default_filter(mut self, filter: impl Into<String>) -> Builder {
        self.default_filter = filter.into();
        self
    }

    /// Export to `otlp` (or nowhere, with `None`) instead of what the `OTEL_*` variables say.
    pub fn otlp(mut self, otlp: Option<OtlpConfig>) -> Builder {
        self.otlp = Some(otlp);
        self
    }

    /// Start with spans off: nothing is recorded or exported until
    /// [`Telemetry::set_spans`] turns them on (for measuring their cost).
    pub fn spans_off(mut self) -> Builder {
        self.spans_on = false;
        self
    }

    /// Installs the global `tracing` subscriber: logs filtered by `HERALD_LOG`, else
    /// `RUST_LOG`, else the default filter; and, when an OTLP endpoint is configured, an
    /// OpenTelemetry layer exporting spans at INFO and above, whatever the log filter. Turns on
    /// the relay's per-message spans ([`herald_core::trace::enable`]). With JSON logs and no
    /// endpoint, spans still get ids (for the log lines) and go nowhere.
    ///
    /// Must be called inside a Tokio runtime when the protocol is gRPC.
    pub fn init(self) -> Result<Telemetry, Error> {
        let default_filter = self.default_filter.as_str();
        let requested = ["HERALD_LOG", "RUST_LOG"]
            .iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()));
        let filter = match requested.as_deref() {
            Some(spec) => tracing_subscriber::EnvFilter::try_new(spec).unwrap_or_else(|e| {
                eprintln!(
                    "warning: ignoring the log filter {spec:?} ({e}); using {default_filter:?}"
                );
                tracing_subscriber::EnvFilter::new(default_filter)
            }),
            None => tracing_subscriber::EnvFilter::try_new(default_filter)
                .map_err(|e| Error::Config(format!("log filter {default_filter:?}: {e}")))?,
        };
        let exporting = match self.otlp {
            Some(explicit) => explicit,
            None => OtlpConfig::from_env()?,
        };
        let service = self.service_name.as_str();
        let provider = match (&exporting, self.format) {
            (Some(otlp), _) => Some(otlp.provider(service)?),
            (None, LogFormat::Json) => Some(
                SdkTracerProvider::builder()
                    .with_resource(crate::otlp::resource(service))
                    .build(),
            ),
            (None, LogFormat::Text) => None,
        };
        let level = if self.spans_on {
            LevelFilter::INFO
        } else {
            LevelFilter::OFF
        };
        let (spans_filter, spans) = reload::Layer::new(level);
        let otel = provider.as_ref().map(|p| {
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("herald"))
                .with_filter(spans_filter.and(filter_fn(|m| m.is_span())))
        });
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = match self.format {
            LogFormat::Json => fmt
                .event_format(WithTraceIds(Format::default().json()))
                .fmt_fields(JsonFields::new())
                .with_filter(filter)
                .boxed(),
            LogFormat::Text => {
                use std::io::IsTerminal;
                fmt.with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter)
                    .boxed()
            }
        };
        tracing_subscriber::registry()
            .with(otel)
            .with(fmt)
            .with(capped_crates())
            .try_init()
            .map_err(|_| Error::AlreadyInstalled("a tracing subscriber"))?;
        // Spans are only made parents of what herald sends when they are exported; with JSON
        // logs alone they exist for their ids in the log lines.
        if exporting.is_some() && self.spans_on {
            herald_core::trace::enable();
        }
        if let Some(otlp) = &exporting {
            tracing::info!(endpoint = %otlp.endpoint, protocol = ?otlp.protocol, "exporting traces over OTLP");
        }
        Ok(Telemetry {
            spans: provider.is_some().then_some(spans),
            provider,
            exporting,
        })
    }
}

impl Telemetry {
    /// The default set-up: service `herald`, text logs at `info`, OTLP from the environment.
    pub fn builder() -> Builder {
        Builder {
            service_name: "herald".to_owned(),
            format: LogFormat::Text,
            default_filter: "info".to_owned(),
            otlp: None,
            spans_on: true,
        }
    }

    /// [`builder`](Self::builder) with `format` and `default_filter`, installed.
    pub fn init(format: LogFormat, default_filter: &str) -> Result<Telemetry, Error> {
        Self::builder()
            .format(format)
            .default_filter(default_filter)
            .init()
    }

    /// The OTLP export in force, if any.
    pub fn exporting(&self) -> Option<&OtlpConfig> {
        self.exporting.as_ref()
    }

    /// Turns spans (recording, export, the relay's per-message spans) on or off. Does nothing
    /// when no OpenTelemetry layer was installed.
    pub fn set_spans(&self, on: bool) {
        if let Some(handle) = &self.spans {
            let level = if on {
                LevelFilter::INFO
            } else {
                LevelFilter::OFF
            };
            if handle.modify(|f| *f = level).is_ok() && self.exporting.is_some() {
                herald_core::trace::set_enabled(on);
            }
        }
    }

    /// Exports the spans not yet sent and stops the exporter. Blocks for at most the exporter's
    /// timeout; call it outside async code (or from `spawn_blocking`).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: exporting the last spans failed: {e}");
        }
    }

    /// Exports the spans not yet sent, keeping the exporter running.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            eprintln!("warning: exporting spans failed: {e}");
        }
    }
}

/// The stock JSON line with `trace_id` and `span_id` first, when the event is inside a span
/// that OpenTelemetry knows.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The event's span: its explicit parent, else the current one, asked of the dispatcher
        // rather than of this layer's context, which hides spans the log filter disabled.
        let ids = tracing::dispatcher::get_default(|d| {
            let id = event
                .parent()
                .cloned()
                .or_else(|| d.current_span().id().cloned())?;
            let cx = tracing_opentelemetry::get_otel_context(&id, d)?;
            use opentelemetry::trace::TraceContextExt;
            let sc = cx.span().span_context().clone();
            sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
        });
        match ids {
            Some((trace, span)) if line.starts_with('{') => write!(
                writer,
                "{{\"trace_id\":\"{trace}\",\"span_id\":\"{span}\",{}",
                &line[1..]
            ),
            _ => writer.write_str(&line),
        }
    }
}
