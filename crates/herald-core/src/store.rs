//! The relay's side of the outbox: heartbeats, reading rows, marking them published,
//! dead-lettering poison.
//!
//! Contracts every implementation keeps (the conformance tests in `herald-testkit` check them):
//!
//! * **Partitions, one owner each.** Every ordering key belongs to one partition; a relay reads
//!   only the partitions its live incarnation holds ([`crate::membership`]), and a heartbeat takes
//!   a partition only when it is free or its owner stopped heart-beating and was marked taken
//!   over, in a statement the database orders against that owner's renewal.
//! * **Reads write nothing.** [`OutboxStore::claim`] selects the oldest publishable rows of the
//!   given partitions, in id order; it changes no row (an undecodable one is moved to the dead
//!   letters). The owner reads, publishes and marks its partitions one batch at a time, so the
//!   rows of one key it holds are always the key's oldest pending ones.
//! * **Retry delays hold the key.** A rejected row waits out its delay (`lease_until`), and no
//!   later row of its key is read meanwhile.
//! * **No high-water mark.** Every pending row is read whatever its id, so a transaction that
//!   took a low id and committed late is published all the same.
//! * **Fencing.** [`OutboxStore::complete`], [`OutboxStore::release`] and
//!   [`OutboxStore::record_rejection`] do nothing for an incarnation that was taken over or
//!   stopped; they report how many rows they touched so the relay can tell.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use async_trait::async_trait;

use crate::error::Result;
use crate::membership::{Heartbeat, Holdings, RelayStatus, Standing};
use crate::message::Message;

/// What one batch may read, and the fence its marks carry.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The relay incarnation holding the partitions: the fencing token.
    pub token: i64,
    /// The partitions to read, `None` for all of them.
    pub partitions: Option<Vec<u32>>,
    /// The outbox's partition count.
    pub of: u32,
    standing: Arc<Standing>,
}

impl Lease {
    /// A batch of incarnation `token` over `partitions` (of `of`), publishable while `standing`
    /// says so.
    pub fn new(
        token: i64,
        partitions: Option<Vec<u32>>,
        of: u32,
        standing: Arc<Standing>,
    ) -> Lease {
        Lease {
            token,
            partitions,
            of,
            standing,
        }
    }

    /// A batch over every partition, publishable until `deadline` (for tests and tools).
    pub fn until(token: i64, deadline: Instant) -> Lease {
        Lease::new(token, None, 1, Standing::new(token, deadline))
    }

    /// Whether the relay may still publish this batch: its incarnation still holds the
    /// partitions and its deadline has not passed. A paused relay wakes past its deadline and
    /// drops the batch instead of publishing out of turn.
    pub fn usable(&self) -> bool {
        self.standing.may_publish(self.token)
    }
}

/// One claimed outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The row's sequence number (outbox `id` column), assigned at insert time.
    pub seq: i64,
    /// How many times the broker already rejected this row.
    pub attempts: u32,
    /// The message to publish.
    pub message: Message,
}

/// Rows read for one batch, in id order.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    /// The rows, in ascending `seq`.
    pub rows: Vec<OutboxRow>,
    /// Rows the claim found undecodable and moved to the dead-letter table with the reason
    /// (counted by the relay as dead-lettered).
    pub parked: usize,
}

/// What happened to a rejected row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionOutcome {
    /// The attempt was counted and the row waits for a later retry.
    WillRetry,
    /// Attempts are exhausted: the row moved to the dead-letter table.
    DeadLettered,
    /// The incarnation was taken over (or the row is gone); nothing was changed.
    LeaseLost,
}

/// Outbox depth for one destination, for `herald status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationStats {
    /// Topic or queue.
    pub destination: String,
    /// Rows waiting to be published.
    pub pending: u64,
    /// Creation time of the oldest pending row.
    pub oldest: Option<SystemTime>,
    /// Rows in the dead-letter table.
    pub dead_letters: u64,
}

/// The relay-facing outbox. See the module docs for the contracts.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Registers (`joining`) or renews a relay incarnation, gives up `release`, takes free
    /// partitions and those of relays that stopped heart-beating up to the fair share
    /// ([`crate::membership::plan`]), and returns what the incarnation holds. A renewal of an
    /// incarnation that was taken over returns `alive: false` and changes nothing.
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Holdings>;

    /// Ends incarnation `incarnation` gracefully: releases its partitions at once (another relay
    /// takes them at its next heartbeat) and records the stop.
    async fn leave(&self, incarnation: i64) -> Result<()>;

    /// Reads up to `max` publishable rows of `lease`'s partitions, oldest first: rows not waiting
    /// out a retry delay, whose key has no row waiting out one (head of key). Writes nothing but
    /// the dead-letter move of rows that cannot be decoded. `hold_cap` bounds a retry delay: a
    /// `lease_until` further ahead was not written by a relay and is ignored. Rows in `exclude`
    /// (a batch still in flight, when the relay reads ahead) are skipped.
    async fn claim(
        &self,
        lease: &Lease,
        max: usize,
        hold_cap: Duration,
        exclude: &[i64],
    ) -> Result<Claim>;

    /// Marks rows published (deletes them) unless `lease`'s incarnation was taken over. Returns
    /// the number of rows touched; fewer than `seqs.len()` means the rest are not this relay's
    /// any more (or were deleted by hand).
    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64>;

    /// Leaves rows unpublished (after a broker outage, an unknown outcome, or because an
    /// earlier row of their key was not confirmed), without counting an attempt, and records
    /// `reason` as their `last_error` so that an operator sees why they wait. Returns the number
    /// of rows touched.
    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64>;

    /// Records that the broker rejected the row: counts an attempt with `reason`, and moves the row
    /// to the dead-letter table once `max_attempts` is reached (or at once when `max_attempts` is 1).
    /// Otherwise the row is not read again for `retry_after`; since it stays the head of its key,
    /// the key's later rows wait too, so a retried message is not overtaken.
    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> Result<RejectionOutcome>;

    /// Pending and dead-lettered counts per destination.
    async fn stats(&self) -> Result<Vec<DestinationStats>>;

    /// The relays recorded in the outbox, live ones and those that ended recently.
    async fn relays(&self) -> Result<Vec<RelayStatus>>;

    /// Durability settings under which a published message could vanish in a crash of the
    /// database (a phantom). Each entry is a sentence saying what to change. Empty when safe.
    async fn durability_warnings(&self) -> Result<Vec<String>>;
}

/// An outbox row as the database returned it, before validation. Backends select their columns
/// into this and call [`RawRow::decode`], so every backend validates rows the same way.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct RawRow {
    /// `id`
    pub seq: i64,
    /// `message_id`, as text
    pub message_id: String,
    /// `kind`
    pub kind: String,
    /// `message_type`
    pub message_type: String,
    /// `source`
    pub source: String,
    /// `destination`
    pub destination: String,
    /// `ordering_key`
    pub ordering_key: Option<String>,
    /// `headers`, as JSON text
    pub headers: String,
    /// `content_type`
    pub content_type: String,
    /// `payload`
    pub payload: Vec<u8>,
    /// `created_at`, microseconds since the Unix epoch
    pub created_at_micros: i64,
    /// `attempts`
    pub attempts: i32,
}

impl RawRow {
    /// Validates the row. The error is the reason it cannot be published, for the dead-letter
    /// table: such a row is parked, never silently dropped.
    pub fn decode(self) -> std::result::Result<OutboxRow, String> {
        let id = uuid::Uuid::parse_str(self.message_id.trim())
            .map_err(|e| format!("message_id {:?} is not a UUID: {e}", self.message_id))?;
        let kind = crate::message::Kind::parse(&self.kind)
            .ok_or_else(|| format!("kind {:?} is neither \"event\" nor \"command\"", self.kind))?;
        if self.message_type.is_empty() {
            return Err("message_type is empty".to_owned());
        }
        if self.destination.is_empty() {
            return Err("destination is empty".to_owned());
        }
        let headers = decode_headers(&self.headers)?;
        Ok(OutboxRow {
            seq: self.seq,
            attempts: self.attempts.max(0) as u32,
            message: Message {
                id,
                kind,
                message_type: self.message_type,
                source: self.source,
                destination: self.destination,
                ordering_key: self.ordering_key.filter(|k| !k.is_empty()),
                headers,
                content_type: self.content_type,
                payload: self.payload,
                created_at: crate::message::from_micros(self.created_at_micros),
            },
        })
    }
}

/// Reads the `headers` column: a JSON object whose values are strings. The error names what is
/// wrong (the JSON type found, where the syntax breaks) but never quotes a value: it goes into
/// logs and the dead-letter reason, and header values may be secrets.
fn decode_headers(
    text: &str,
) -> std::result::Result<std::collections::BTreeMap<String, String>, String> {
    let kind = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "headers are not a JSON object of strings: invalid JSON at line {} column {}",
            e.line(),
            e.column()
        )
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!(
            "headers are not a JSON object of strings: found {}",
            kind(&value)
        ));
    };
    map.into_iter()
        .map(|(name, v)| match v {
            serde_json::Value::String(s) => Ok((name, s)),
            other => Err(format!(
                "headers are not a JSON object of strings: header {:?} is {}",
                name.chars().take(40).collect::<String>(),
                kind(&other)
            )),
        })
        .collect()
}

/// Columns every outbox table has, in the order backends select them into [`RawRow`].
#[doc(hidden)]
pub const OUTBOX_COLUMNS: [&str; 16] = [
    "id",
    "message_id",
    "kind",
    "message_type",
    "source",
    "destination",
    "ordering_key",
    "headers",
    "content_type",
    "payload",
    "created_at",
    "attempts",
    "last_error",
    "lease_owner",
    "lease_token",
    "lease_until",
];

/// Adds per-destination dead-letter counts to pending counts (destinations with only dead letters
/// get a row of their own), sorted by destination. Shared by the stores' `stats`.
#[doc(hidden)]
pub fn with_dead_letters(
    mut stats: Vec<DestinationStats>,
    dead: impl IntoIterator<Item = (String, u64)>,
) -> Vec<DestinationStats> {
    for (destination, n) in dead {
        match stats.iter_mut().find(|s| s.destination == destination) {
            Some(s) => s.dead_letters = n,
            None => stats.push(DestinationStats {
                destination,
                pending: 0,
                oldest: None,
                dead_letters: n,
            }),
        }
    }
    stats.sort_by(|a, b| a.destination.cmp(&b.destination));
    stats
}

#[cfg(test)]
mod tests {
    use super::decode_headers;

    #[test]
    fn header_errors_name_the_problem_never_the_value() {
        assert_eq!(decode_headers(r#"{"a":"x"}"#).unwrap()["a"], "x");
        for (text, want) in [
            (r#"{"token":123456789}"#, "header \"token\" is a number"),
            (r#"["s3cret-value"]"#, "found an array"),
            (r#"{"a":"s3cret-value""#, "invalid JSON at line 1"),
            (r#"{"a":{"b":"s3cret-value"}}"#, "header \"a\" is an object"),
        ] {
            let err = decode_headers(text).unwrap_err();
            assert!(err.contains(want), "{err}");
            assert!(
                !err.contains("s3cret") && !err.contains("123456789"),
                "{err}"
            );
        }
    }
}
