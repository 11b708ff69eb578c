//! Trace context through the outbox (W3C Trace Context, OpenTelemetry).
//!
//! One trace follows a message from the producer to the consumer's effects, and on to what the
//! consumer sends in turn:
//!
//! * **Enqueue** ([`stamp`], called by every outbox writer): when the caller is inside a span that
//!   OpenTelemetry knows, its context goes into the row's `traceparent` (and `tracestate`)
//!   headers, unless the message already carries one. A plain-SQL producer may write its own.
//! * **Relay** ([`publish_span`]): each message is published inside a `herald.publish` span whose
//!   parent is the row's `traceparent` (a new trace when the row has none, or an invalid one),
//!   and the message leaves with the `traceparent` of that span. Only while [`enabled`].
//! * **Consumer** ([`handle_span`], [`Cause`]): the handler runs inside a `herald.handle` span
//!   whose parent is the message's `traceparent`; any message it enqueues carries that span's
//!   `traceparent`, the incoming `correlationid` (or the incoming id when it had none) and the
//!   incoming id as `causationid`.
//!
//! A `traceparent` that is not valid W3C (a plain-SQL row may hold anything) is ignored: the
//! span starts a new trace and the header is not copied on. Without an OpenTelemetry layer in the
//! `tracing` subscriber nothing here costs more than an empty span.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{CAUSATION_ID, CORRELATION_ID, Message, TRACEPARENT};

/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Says that spans are exported: the relay's per-message `herald.publish` spans are created,
/// and outbox writers and handlers put the current span's context in what they send.
/// `herald_telemetry` calls it when it exports over OTLP; call it yourself if you install your
/// own `tracing-opentelemetry` layer. Until then messages keep the trace context they came
/// with (a span that is never exported must not become anyone's parent).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Turns the relay's per-message spans on or off (for measuring their cost).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Parses a W3C `traceparent` (version 00, or a later version read as 00), refusing all-zero ids,
/// upper-case hex and wrong lengths.
pub fn parse_traceparent(value: &str, state: Option<&str>) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four fields; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8();
    let state = state
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        state,
    ))
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn format_traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// The OpenTelemetry span context of `span`, if it has a valid one (an OpenTelemetry layer is
/// installed and the span is enabled).
pub fn span_context(span: &Span) -> Option<SpanContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The trace id of `span` as 32 hex digits, if it has one.
pub fn trace_id(span: &Span) -> Option<String> {
    span_context(span).map(|sc| sc.trace_id().to_string())
}

/// Sets `span`'s parent to the message's `traceparent`, when it is valid. Call before anything
/// else reads the span's context.
fn continue_from(span: &Span, m: &Message) {
    if let Some(parent) = m
        .header(TRACEPARENT)
        .and_then(|tp| parse_traceparent(tp, m.header(TRACESTATE)))
    {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// Writes `span`'s context into `headers` as `traceparent` (and `tracestate`), replacing what
/// was there. Does nothing when the span has no valid context.
fn inject(span: &Span, headers: &mut BTreeMap<String, String>) {
    if let Some(sc) = span_context(span) {
        headers.insert(TRACEPARENT.to_owned(), format_traceparent(&sc));
        let state = sc.trace_state().header();
        if state.is_empty() {
            headers.remove(TRACESTATE);
        } else {
            headers.insert(TRACESTATE.to_owned(), state);
        }
    }
}

/// The relay's span for publishing `m`, a child of the row's `traceparent`, or `None` when
/// tracing is not [`enabled`]. `m`'s headers get the span's `traceparent`, so the consumer's
/// span becomes the publish span's child.
pub fn publish_span(m: &mut Message) -> Option<Span> {
    if !enabled() {
        return None;
    }
    let span = tracing::info_span!(
        "herald.publish",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.destination.name = %m.destination,
        messaging.message.id = %m.id,
        herald.message_type = %m.message_type,
    );
    continue_from(&span, m);
    inject(&span, &mut m.headers);
    Some(span)
}

/// The consumer's span for handling `m` in `service`, a child of the message's `traceparent`.
pub fn handle_span(m: &Message, service: &str) -> Span {
    let span = tracing::info_span!(
        "herald.handle",
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.destination.name = %m.destination,
        messaging.message.id = %m.id,
        messaging.consumer.group.name = %service,
        herald.message_type = %m.message_type,
    );
    continue_from(&span, m);
    span
}

/// Marks a [`publish_span`] or [`handle_span`] as failed, with the error (which carries no
/// payload or secret).
pub fn failed(span: &Span, error: &crate::error::Error) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", error.chain().as_str());
}

/// The message being handled, for the messages its handler sends ([`stamp`]).
#[derive(Debug, Clone)]
pub struct Cause {
    id: String,
    correlation: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

tokio::task_local! {
    static CAUSE: Cause;
}

impl Cause {
    /// The cause that `m` is for what its handler sends: its id, its correlation id (or its id),
    /// its trace context. Only values the relay would publish are carried on: a correlation id
    /// with a control character or over 256 bytes is replaced by the id, a `tracestate` that is
    /// not W3C is dropped (whoever wrote the incoming message may have written anything).
    pub fn of(m: &Message) -> Cause {
        let id = m.id.to_string();
        let valid_tp = m
            .header(TRACEPARENT)
            .filter(|tp| parse_traceparent(tp, None).is_some());
        let sane = |v: &&str| !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control);
        Cause {
            correlation: m
                .header(CORRELATION_ID)
                .filter(sane)
                .map_or_else(|| id.clone(), str::to_owned),
            id,
            traceparent: valid_tp.map(str::to_owned),
            tracestate: valid_tp
                .and(m.header(TRACESTATE))
                .filter(|s| sane(s) && s.parse::<TraceState>().is_ok())
                .map(str::to_owned),
        }
    }

    /// Runs `fut` with this cause in scope: messages enqueued inside it are stamped with it.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CAUSE.scope(self, fut).await
    }
}

/// The headers `m` should be written with: `traceparent`/`tracestate` of the current span (when
/// spans are exported, see [`enable`]; else of the message being handled) unless `m` has a
/// `traceparent`, and `correlationid`/`causationid` of the message being handled unless `m` sets
/// them. `None` when nothing changes (the common case without tracing or a cause).
pub fn stamp(m: &Message) -> Option<BTreeMap<String, String>> {
    let cause = CAUSE.try_with(Cause::clone).ok();
    let has_tp = m.headers.contains_key(TRACEPARENT);
    let current = if has_tp || !enabled() {
        None
    } else {
        span_context(&Span::current())
    };
    if cause.is_none() && current.is_none() {
        return None;
    }
    let mut headers = m.headers.clone();
    if let Some(sc) = current {
        headers.insert(TRACEPARENT.to_owned(), format_traceparent(&sc));
        let state = sc.trace_state().header();
        if !state.is_empty() {
            headers.insert(TRACESTATE.to_owned(), state);
        }
    }
    if let Some(c) = cause {
        if !has_tp
            && !headers.contains_key(TRACEPARENT)
            && let Some(tp) = c.traceparent
        {
            headers.insert(TRACEPARENT.to_owned(), tp);
            if let Some(ts) = c.tracestate {
                headers.insert(TRACESTATE.to_owned(), ts);
            }
        }
        headers
            .entry(CORRELATION_ID.to_owned())
            .or_insert(c.correlation);
        headers.entry(CAUSATION_ID.to_owned()).or_insert(c.id);
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_rejects_what_w3c_rejects() {
        let sc = parse_traceparent(TP, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(format_traceparent(&sc), TP);
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
        for bad in [
            "",
            "00",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é1",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?} accepted");
        }
        // A later version may carry more fields; the first four are read as version 00.
        assert!(parse_traceparent(&format!("01{}-more", &TP[2..]), None).is_some());
    }

    #[tokio::test]
    async fn a_handler_s_messages_carry_the_cause() {
        let incoming = Message::raw_command("billing", "ChargeCard", b"{}".to_vec())
            .with_header(TRACEPARENT, TP)
            .with_header(CORRELATION_ID, "order-7");
        let outgoing = Message::raw_event("billing", "CardCharged", b"{}".to_vec());
        assert!(stamp(&outgoing).is_none(), "no cause, no span: unchanged");
        let headers = Cause::of(&incoming)
            .scope(async { stamp(&outgoing).expect("stamped") })
            .await;
        assert_eq!(headers[CORRELATION_ID], "order-7");
        assert_eq!(headers[CAUSATION_ID], incoming.id.to_string());
        assert_eq!(
            headers[TRACEPARENT], TP,
            "no span: the incoming trace goes on"
        );

        // Without a correlation id the incoming id is one; a message's own values win.
        let plain = Message::raw_command("billing", "ChargeCard", b"{}".to_vec())
            .with_header(TRACEPARENT, "not-a-traceparent");
        let own = Message::raw_event("x", "Y", b"{}".to_vec()).with_header(CORRELATION_ID, "mine");
        let headers = Cause::of(&plain)
            .scope(async { stamp(&own).expect("stamped") })
            .await;
        assert_eq!(headers[CORRELATION_ID], "mine");
        assert_eq!(headers[CAUSATION_ID], plain.id.to_string());
        assert!(
            !headers.contains_key(TRACEPARENT),
            "an invalid traceparent is not copied on"
        );

        // A correlation id the relay would refuse is not copied on; the cause's id stands in.
        let hostile = Message::raw_command("billing", "ChargeCard", b"{}".to_vec())
            .with_header(TRACEPARENT, TP)
            .with_header(TRACESTATE, "not a\ttracestate")
            .with_header(CORRELATION_ID, "line\nbreak");
        let headers = Cause::of(&hostile)
            .scope(async { stamp(&outgoing).expect("stamped") })
            .await;
        assert_eq!(headers[CORRELATION_ID], hostile.id.to_string());
        assert!(!headers.contains_key(TRACESTATE));
        assert_eq!(headers[TRACEPARENT], TP);
    }
}
