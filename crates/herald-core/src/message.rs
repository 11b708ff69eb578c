//! The message model: what an outbox row holds and what travels on the wire.
//!
//! A [`Message`] maps onto CloudEvents 1.0 (see `docs/WIRE.md`): `id` is the CloudEvents `id` and the
//! deduplication key, `message_type` is `type`, `source` is `source`, `ordering_key` is the
//! `partitionkey` extension, `created_at` is `time`, `content_type` is `datacontenttype`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// W3C trace context header, carried from the producing transaction to the consumer.
pub const TRACEPARENT: &str = "traceparent";
/// Correlation id header: the same for every message of one business conversation.
pub const CORRELATION_ID: &str = "correlationid";
/// Causation id header: the id of the message whose handling produced this one.
pub const CAUSATION_ID: &str = "causationid";

/// Whether a message announces a fact or asks for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Something happened. Zero or many subscribers; the destination is a topic.
    Event,
    /// Something should be done. Exactly one owner; the destination is the owner's queue.
    Command,
}

impl Kind {
    /// The name stored in the outbox `kind` column and sent in the `heraldkind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Command => "command",
        }
    }

    /// Parses the stored name; anything other than `event` or `command` is rejected.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "event" => Some(Kind::Event),
            "command" => Some(Kind::Command),
            _ => None,
        }
    }
}

/// One message: the unit the outbox stores, the relay publishes and the inbox deduplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique id (UUIDv7 when created by herald); the deduplication key at consumers.
    pub id: Uuid,
    /// Event or command.
    pub kind: Kind,
    /// Type name, e.g. `OrderPlaced`.
    pub message_type: String,
    /// Producing service, a URI-reference such as `/orders`.
    pub source: String,
    /// Topic (events) or owning queue (commands).
    pub destination: String,
    /// Messages sharing a key are published in commit order. `None` means unordered.
    pub ordering_key: Option<String>,
    /// Extra headers: trace context, correlation and causation ids, and anything else.
    pub headers: BTreeMap<String, String>,
    /// Media type of the payload.
    pub content_type: String,
    /// The payload bytes, opaque to herald.
    pub payload: Vec<u8>,
    /// When the message was created, to the microsecond.
    pub created_at: SystemTime,
}

impl Message {
    /// An event for `topic`, with a fresh UUIDv7 id, JSON content type and the current time.
    pub fn event(
        topic: impl Into<String>,
        message_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Message {
        Message::new(
            Kind::Event,
            topic.into(),
            message_type.into(),
            payload.into(),
        )
    }

    /// A command for the owner's queue `queue`, otherwise like [`Message::event`].
    pub fn command(
        queue: impl Into<String>,
        message_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Message {
        Message::new(
            Kind::Command,
            queue.into(),
            message_type.into(),
            payload.into(),
        )
    }

    fn new(kind: Kind, destination: String, message_type: String, payload: Vec<u8>) -> Message {
        Message {
            id: Uuid::now_v7(),
            kind,
            message_type,
            source: String::new(),
            destination,
            ordering_key: None,
            headers: BTreeMap::new(),
            content_type: "application/json".to_owned(),
            payload,
            created_at: truncate_to_micros(SystemTime::now()),
        }
    }

    /// Sets the ordering key (usually the aggregate id).
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the source.
    pub fn with_source(mut self, source: impl Into<String>) -> Message {
        self.source = source.into();
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Message {
        self.content_type = content_type.into();
        self
    }

    /// Adds or replaces one header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Marks this message as caused by `cause`: copies its correlation id (or uses its id as one),
    /// its trace context, and records its id as the causation id.
    pub fn caused_by(mut self, cause: &Message) -> Message {
        let correlation = cause
            .header(CORRELATION_ID)
            .map(str::to_owned)
            .unwrap_or_else(|| cause.id.to_string());
        self.headers.insert(CORRELATION_ID.to_owned(), correlation);
        self.headers
            .insert(CAUSATION_ID.to_owned(), cause.id.to_string());
        if let Some(tp) = cause.header(TRACEPARENT) {
            self.headers.insert(TRACEPARENT.to_owned(), tp.to_owned());
        }
        self
    }

    /// The value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Total bytes this message puts on the wire, roughly: payload plus header names and values.
    pub fn wire_size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.payload.len()
            + headers
            + self.message_type.len()
            + self.source.len()
            + self.destination.len()
            + self.ordering_key.as_ref().map_or(0, String::len)
            + self.content_type.len()
            + 64
    }

    /// `created_at` as microseconds since the Unix epoch (the representation SQLite stores).
    pub fn created_at_micros(&self) -> i64 {
        to_micros(self.created_at)
    }
}

/// Microseconds since the Unix epoch; times before the epoch count as 0.
pub fn to_micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The inverse of [`to_micros`].
pub fn from_micros(micros: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64)
}

fn truncate_to_micros(t: SystemTime) -> SystemTime {
    from_micros(to_micros(t))
}

/// Formats a time as RFC 3339 in UTC with microseconds, as CloudEvents `time` wants.
pub fn rfc3339(t: SystemTime) -> String {
    let micros = to_micros(t);
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Parses what [`rfc3339`] writes (UTC, `Z` suffix, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut dp = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, d) = (dp.next()??, dp.next()??, dp.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut tp = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (tp.next()??, tp.next()??, tp.next()??);
    let frac6: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    let micros_frac: i64 = frac6.parse().ok()?;
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    Some(from_micros(secs * 1_000_000 + micros_frac))
}

// Howard Hinnant's civil calendar algorithms: no date crate needed for one format.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let t = from_micros(1_764_180_000_123_456);
        let s = rfc3339(t);
        assert_eq!(s, "2025-11-26T18:00:00.123456Z");
        assert_eq!(parse_rfc3339(&s), Some(t));
        assert_eq!(rfc3339(from_micros(0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59Z"),
            Some(from_micros(1_709_251_199_000_000))
        );
    }

    #[test]
    fn caused_by_carries_correlation_and_trace() {
        let first = Message::event("orders", "OrderPlaced", b"{}".to_vec()).with_header(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let next = Message::command("email", "SendEmail", b"{}".to_vec()).caused_by(&first);
        assert_eq!(
            next.header(CAUSATION_ID),
            Some(first.id.to_string().as_str())
        );
        assert_eq!(
            next.header(CORRELATION_ID),
            Some(first.id.to_string().as_str())
        );
        assert_eq!(next.header(TRACEPARENT), first.header(TRACEPARENT));
        let third = Message::event("email", "EmailSent", b"{}".to_vec()).caused_by(&next);
        assert_eq!(
            third.header(CORRELATION_ID),
            Some(first.id.to_string().as_str())
        );
    }

    #[test]
    fn ids_are_v7_and_increase() {
        let a = Message::event("t", "T", vec![]);
        let b = Message::event("t", "T", vec![]);
        assert_eq!(a.id.get_version_num(), 7);
        assert!(b.id > a.id);
    }
}
