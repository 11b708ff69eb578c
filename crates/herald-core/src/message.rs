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
    /// An event for `topic` with a payload already in bytes (typed payloads:
    /// [`Message::event`]), with a fresh UUIDv7 id, JSON content type and the current time.
    pub fn raw_event(
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

    /// A command for the owner's queue `queue`, otherwise like [`Message::raw_event`] (typed
    /// payloads: [`Message::command`]).
    pub fn raw_command(
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

    /// Checks what every broker needs, whatever its wire: the CloudEvents rules (see
    /// `docs/OUTBOX.md`, "What the relay refuses"). Header names must be CloudEvents extension
    /// names (1 to 64 lowercase ASCII letters or digits) other than the attributes herald sets
    /// itself; `message_type` and `destination` must not be empty; no string may hold a control
    /// character (a newline would break header-based wires); `created_at` must lie in the years
    /// 1 to 9999 (RFC 3339). The error is the reason for the dead-letter table; it names the
    /// field but never quotes a header value or the payload.
    pub fn check_cloudevents(&self) -> Result<(), String> {
        if self.message_type.is_empty() {
            return Err("message_type is empty".to_owned());
        }
        if self.destination.is_empty() {
            return Err("destination is empty".to_owned());
        }
        for (field, value) in [
            ("message_type", self.message_type.as_str()),
            ("source", self.source.as_str()),
            ("destination", self.destination.as_str()),
            ("content_type", self.content_type.as_str()),
            ("ordering_key", self.ordering_key.as_deref().unwrap_or("")),
        ] {
            if let Some(at) = control_char_at(value) {
                return Err(format!(
                    "{field} holds a control character at byte {at} (CloudEvents strings cannot)"
                ));
            }
        }
        for (name, value) in &self.headers {
            check_extension_name(name)?;
            if let Some(at) = control_char_at(value) {
                return Err(format!(
                    "header {name:?} holds a control character at byte {at} (CloudEvents strings cannot)"
                ));
            }
        }
        let micros = self.created_at_micros();
        if !(MIN_TIME_MICROS..=MAX_TIME_MICROS).contains(&micros) {
            return Err("created_at is outside the years 1 to 9999 (RFC 3339)".to_owned());
        }
        Ok(())
    }
}

/// Longest header name herald accepts (CloudEvents advises 20; AMQP allows 252 after `ce-`).
pub const MAX_HEADER_NAME: usize = 64;

/// Checks a header name against the CloudEvents extension naming rule, without echoing more than
/// a bounded prefix of it.
fn check_extension_name(name: &str) -> Result<(), String> {
    let shown: String = name.chars().take(40).collect();
    if name.is_empty() || name.len() > MAX_HEADER_NAME {
        return Err(format!(
            "header name {shown:?} ({} bytes) is not 1 to {MAX_HEADER_NAME} bytes long",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "header name {shown:?} is not a CloudEvents extension name: use lowercase letters a-z and digits only"
        ));
    }
    if crate::cloudevents::RESERVED.contains(&name) {
        return Err(format!(
            "header name {name:?} is a CloudEvents attribute herald sets itself"
        ));
    }
    Ok(())
}

/// The byte offset of the first control character (C0, DEL or C1), if any.
fn control_char_at(s: &str) -> Option<usize> {
    s.char_indices()
        .find(|(_, c)| c.is_control())
        .map(|(i, _)| i)
}

/// Microseconds since the Unix epoch (negative before it), saturating at the ends of `i64`.
pub fn to_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

/// The inverse of [`to_micros`].
pub fn from_micros(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    let t = if micros >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    // Every i64 of microseconds fits a SystemTime on the platforms herald runs on.
    t.unwrap_or(UNIX_EPOCH)
}

/// First instant CloudEvents `time` (RFC 3339, four-digit years) can carry: 0001-01-01T00:00:00Z.
pub const MIN_TIME_MICROS: i64 = -62_135_596_800_000_000;
/// Last instant CloudEvents `time` can carry: 9999-12-31T23:59:59.999999Z.
pub const MAX_TIME_MICROS: i64 = 253_402_300_799_999_999;

/// Parses the text PostgreSQL prints for `extract(epoch FROM t)` (`1764180000.123456`,
/// `-0.5`, `Infinity`) into microseconds, refusing what no CloudEvents `time` can carry.
pub fn micros_from_epoch_text(text: &str) -> Result<i64, String> {
    let bad = || format!("created_at {text:?} is not a time between the years 1 and 9999");
    let t = text.trim();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || whole.len() > 13 {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let secs: i64 = whole.parse().map_err(|_| bad())?;
    let frac6: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    let sub: i64 = frac6.parse().map_err(|_| bad())?;
    let magnitude = secs
        .checked_mul(1_000_000)
        .and_then(|m| m.checked_add(sub))
        .ok_or_else(bad)?;
    let micros = if negative { -magnitude } else { magnitude };
    if !(MIN_TIME_MICROS..=MAX_TIME_MICROS).contains(&micros) {
        return Err(bad());
    }
    Ok(micros)
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
        let first = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec()).with_header(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let next = Message::raw_command("email", "SendEmail", b"{}".to_vec()).caused_by(&first);
        assert_eq!(
            next.header(CAUSATION_ID),
            Some(first.id.to_string().as_str())
        );
        assert_eq!(
            next.header(CORRELATION_ID),
            Some(first.id.to_string().as_str())
        );
        assert_eq!(next.header(TRACEPARENT), first.header(TRACEPARENT));
        let third = Message::raw_event("email", "EmailSent", b"{}".to_vec()).caused_by(&next);
        assert_eq!(
            third.header(CORRELATION_ID),
            Some(first.id.to_string().as_str())
        );
    }

    #[test]
    fn times_before_the_epoch_and_at_the_ends_round_trip() {
        for micros in [MIN_TIME_MICROS, -1, 0, 1, MAX_TIME_MICROS] {
            assert_eq!(to_micros(from_micros(micros)), micros);
        }
        assert_eq!(
            rfc3339(from_micros(MIN_TIME_MICROS)),
            "0001-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339(from_micros(MAX_TIME_MICROS)),
            "9999-12-31T23:59:59.999999Z"
        );
        assert_eq!(
            rfc3339(from_micros(-500_000)),
            "1969-12-31T23:59:59.500000Z"
        );
    }

    #[test]
    fn epoch_text_is_parsed_or_refused() {
        assert_eq!(
            micros_from_epoch_text("1764180000.123456"),
            Ok(1_764_180_000_123_456)
        );
        assert_eq!(
            micros_from_epoch_text("1764180000"),
            Ok(1_764_180_000_000_000)
        );
        assert_eq!(micros_from_epoch_text("-0.5"), Ok(-500_000));
        for bad in [
            "Infinity",
            "-Infinity",
            "NaN",
            "",
            "9223372036854.775807",
            "1e9",
            "1.2.3",
            "-",
        ] {
            assert!(micros_from_epoch_text(bad).is_err(), "{bad}");
        }
        // '294276-01-01': within PostgreSQL's range, beyond RFC 3339's.
        assert!(micros_from_epoch_text("9224286739200").is_err());
    }

    #[test]
    fn cloudevents_rules_refuse_what_wires_cannot_carry() {
        let ok = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())
            .with_key("k")
            .with_header("traceparent", "00-ab-cd-01");
        assert_eq!(ok.check_cloudevents(), Ok(()));
        let cases: Vec<(Message, &str)> = vec![
            (
                ok.clone().with_header("X-Tenant", "a"),
                "not a CloudEvents extension name",
            ),
            (
                ok.clone().with_header("a b", "a"),
                "not a CloudEvents extension name",
            ),
            (ok.clone().with_header("", "a"), "not 1 to 64"),
            (ok.clone().with_header("a".repeat(65), "a"), "not 1 to 64"),
            (ok.clone().with_header("id", "x"), "herald sets itself"),
            (
                ok.clone().with_header("tenant", "a\nb"),
                "control character",
            ),
            (ok.clone().with_key("k\r\n"), "ordering_key holds a control"),
            (
                Message::raw_event("orders", "Order\nPlaced", vec![]),
                "message_type holds",
            ),
            (
                Message::raw_event("orders", "", vec![]),
                "message_type is empty",
            ),
            (Message::raw_event("", "T", vec![]), "destination is empty"),
        ];
        for (m, want) in cases {
            let err = m.check_cloudevents().unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
        }
        let mut far = ok.clone();
        far.created_at = from_micros(MAX_TIME_MICROS) + Duration::from_secs(1);
        assert!(far.check_cloudevents().unwrap_err().contains("created_at"));
    }

    #[test]
    fn ids_are_v7_and_increase() {
        let a = Message::raw_event("t", "T", vec![]);
        let b = Message::raw_event("t", "T", vec![]);
        assert_eq!(a.id.get_version_num(), 7);
        assert!(b.id > a.id);
    }
}
