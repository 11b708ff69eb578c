//! The poison suite: rows and messages no producer should write, and what herald must do with
//! them. Every row ends in exactly one of three states (published; waiting for a retry with its
//! error on the row; dead-lettered with a reason), the relay never fails or panics on one, and
//! the other keys, including the bad row's own key, keep flowing in order.
//!
//! Two halves, so that every store and every transport runs the cases without a matrix of
//! servers: [`rows_end_published_or_dead_lettered`] drives bad rows inserted with plain SQL through
//! a store's claim, decoding and the relay (each store runs it), and
//! [`messages_are_refused_alone`] sends bad messages through a real broker binding (each
//! transport runs it). A seeded generator adds arbitrary strings, sizes and headers to both; the
//! seed is printed, and `HERALD_POISON_SEED` replays one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use herald_core::memory::MemoryTransport;
use herald_core::{
    Error, Kind, Message, Relay, RelayConfig, Result, Subscriber, Subscription, Transport,
};

use crate::consumer_suite::ConsumerHarness;
use crate::suite::StoreHarness;

/// One outbox row written with plain SQL, every column as a producer in any language could set
/// it (only within the column types).
#[derive(Debug, Clone)]
pub struct RawInsert {
    /// `message_id`; `None` leaves the column's default.
    pub message_id: Option<String>,
    /// `kind`.
    pub kind: String,
    /// `message_type`.
    pub message_type: String,
    /// `destination`.
    pub destination: String,
    /// `ordering_key`.
    pub ordering_key: Option<String>,
    /// `headers`, as JSON text (a store whose column type checks JSON may refuse the insert; the
    /// suite then skips the row).
    pub headers: String,
    /// `content_type`.
    pub content_type: String,
    /// `payload`.
    pub payload: Vec<u8>,
}

/// The `INSERT` of a [`RawInsert`] for a database: `placeholder(n)` spells the n-th bind
/// parameter, `default_id` is the `message_id` to use when the row sets none. Bind the values
/// with [`crate::bind_raw_insert!`], in the same order.
pub fn insert_sql(placeholder: impl Fn(usize) -> String, default_id: &str) -> String {
    let p: Vec<String> = (1..=8).map(placeholder).collect();
    format!(
        "INSERT INTO herald_outbox (message_id, kind, message_type, destination, ordering_key, headers, content_type, payload) \
         VALUES (COALESCE({}, {default_id}), {}, {}, {}, {}, {}, {}, {})",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    )
}

/// Binds the columns of a [`RawInsert`] to a query built from [`insert_sql`], for any sqlx
/// database.
#[macro_export]
macro_rules! bind_raw_insert {
    ($query:expr, $row:expr) => {
        $query
            .bind($row.message_id.as_deref())
            .bind(&$row.kind)
            .bind(&$row.message_type)
            .bind(&$row.destination)
            .bind($row.ordering_key.as_deref())
            .bind(&$row.headers)
            .bind(&$row.content_type)
            .bind(&$row.payload)
    };
}

impl RawInsert {
    fn event(destination: &str, key: Option<&str>, payload: &[u8]) -> RawInsert {
        RawInsert {
            message_id: None,
            kind: "event".to_owned(),
            message_type: "Fine".to_owned(),
            destination: destination.to_owned(),
            ordering_key: key.map(str::to_owned),
            headers: "{}".to_owned(),
            content_type: "application/json".to_owned(),
            payload: payload.to_vec(),
        }
    }
}

/// Rows only some databases accept; a harness inserts those it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativePoison {
    /// PostgreSQL: `created_at = 'infinity'`.
    InfiniteTime,
    /// PostgreSQL: `created_at = '294276-01-01'`, past what RFC 3339 can write.
    FarFutureTime,
    /// SQLite: bytes that are not UTF-8 in a text column (`message_type`).
    InvalidUtf8Text,
    /// SQLite: a BLOB in a text column (`ordering_key`).
    BlobInTextColumn,
    /// SQLite: text in the integer `created_at` column.
    TextInIntegerColumn,
    /// Any database: an undecodable row whose `id` (a column the relay owns) is set by hand to
    /// the id of an existing dead letter.
    ReusedDeadLetterId,
}

impl NativePoison {
    /// Every native case.
    pub const ALL: [NativePoison; 5] = [
        NativePoison::InfiniteTime,
        NativePoison::FarFutureTime,
        NativePoison::InvalidUtf8Text,
        NativePoison::BlobInTextColumn,
        NativePoison::TextInIntegerColumn,
    ];
}

/// What a bad row must end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Published (after a rejection and a retry), in its key's order.
    Published,
    /// Dead-lettered, the reason containing this.
    Dead(&'static str),
    /// Published or dead-lettered (depends on the transport's limits); never left pending.
    Either,
}

fn cases(tag: &str) -> Vec<(RawInsert, End)> {
    let d = |n: usize| format!("{tag}-p{n}");
    let base = |n: usize| RawInsert::event(&d(n), None, b"{}");
    let mut out = Vec::new();
    let mut add = |n: usize, f: &dyn Fn(&mut RawInsert), end: End| {
        let mut r = base(n);
        f(&mut r);
        out.push((r, end));
    };
    add(0, &|r| r.kind = "weird".into(), End::Dead("kind"));
    add(
        1,
        &|r| r.message_id = Some("not-a-uuid".into()),
        End::Dead("message_id"),
    );
    add(2, &|r| r.headers = "[1,2]".into(), End::Dead("headers"));
    add(
        3,
        &|r| r.headers = r#"{"n":1}"#.into(),
        End::Dead("headers"),
    );
    add(4, &|r| r.message_type = "T".repeat(300), End::Either);
    add(
        5,
        &|r| r.message_type = "Order\nPlaced".into(),
        End::Dead("control character"),
    );
    add(
        6,
        &|r| r.ordering_key = Some("k\r\n1".into()),
        End::Dead("control character"),
    );
    add(
        7,
        &|r| r.headers = r#"{"X-Tenant":"a"}"#.into(),
        End::Dead("extension name"),
    );
    add(
        8,
        &|r| r.headers = r#"{"a b":"a"}"#.into(),
        End::Dead("extension name"),
    );
    add(
        9,
        &|r| r.headers = r#"{"tenant":"a\nb"}"#.into(),
        End::Dead("control character"),
    );
    add(
        10,
        &|r| r.headers = format!(r#"{{"big":"{}"}}"#, "v".repeat(200_000)),
        End::Either,
    );
    add(
        11,
        &|r| r.message_type = String::new(),
        End::Dead("message_type is empty"),
    );
    add(
        12,
        &|r| r.payload = vec![0; 2 * 1024 * 1024],
        End::Dead("max_message_bytes"),
    );
    add(
        13,
        &|r| r.headers = r#"{"id":"x"}"#.into(),
        End::Dead("herald sets itself"),
    );
    add(
        14,
        &|r| r.content_type = "text/\u{7}plain".into(),
        End::Dead("control character"),
    );
    add(15, &|r| r.content_type = "c".repeat(300), End::Either);
    add(16, &|r| r.ordering_key = Some(String::new()), End::Either);
    add(
        17,
        &|r| r.message_type = "Ünïcødé ✓ 注文".into(),
        End::Either,
    );
    add(
        18,
        &|r| r.headers = format!(r#"{{"{}":"x"}}"#, "a".repeat(300)),
        End::Dead("header name"),
    );
    // The strict broker refuses a command's first attempt (its owner is not there yet) and takes
    // the second: the later rows of its key must wait for it, not overtake it.
    add(
        19,
        &|r| {
            r.kind = "command".into();
            r.destination = format!("{tag}-late-owner");
            r.payload = format!("{tag}-command").into_bytes();
        },
        End::Published,
    );
    out
}

/// A seeded generator of rows and messages within the column types: strings from a pool of
/// hostile pieces (control characters, non-ASCII, long runs, separators of every wire), random
/// header maps and payload sizes.
struct Gen(fastrand::Rng);

impl Gen {
    fn new(what: &str) -> Gen {
        let seed = std::env::var("HERALD_POISON_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("poison {what}: seed {seed} (HERALD_POISON_SEED={seed} replays it)");
        Gen(fastrand::Rng::with_seed(seed))
    }

    fn piece(&mut self) -> String {
        const PIECES: [&str; 18] = [
            "a", "Z", "0", " ", ":", "\n", "\r", "\t", "\u{1}", "\u{7f}", "\u{85}", "é", "注", "✓",
            "\"", "\\", "ce-", ".",
        ];
        match self.0.u8(..10) {
            0 => "x".repeat(self.0.usize(200..400)),
            _ => PIECES[self.0.usize(..PIECES.len())].to_owned(),
        }
    }

    fn string(&mut self, max_pieces: usize) -> String {
        (0..self.0.usize(..=max_pieces))
            .map(|_| self.piece())
            .collect()
    }

    fn headers(&mut self) -> std::collections::BTreeMap<String, String> {
        (0..self.0.usize(..4))
            .map(|_| {
                let name = if self.0.bool() {
                    ["tenant", "traceparent", "x1", "zz9"][self.0.usize(..4)].to_owned()
                } else {
                    self.string(3)
                };
                (name, self.string(4))
            })
            .collect()
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = match self.0.u8(..20) {
            0 => self.0.usize(100_000..300_000),
            _ => self.0.usize(..64),
        };
        (0..n).map(|_| self.0.u8(..)).collect()
    }

    fn row(&mut self, destination: &str) -> RawInsert {
        RawInsert {
            message_id: None,
            kind: "event".to_owned(),
            message_type: self.string(4),
            destination: destination.to_owned(),
            ordering_key: self.0.bool().then(|| self.string(3)),
            headers: json_object(&self.headers()),
            content_type: if self.0.bool() {
                "application/json".to_owned()
            } else {
                self.string(3)
            },
            payload: self.payload(),
        }
    }

    fn message(&mut self, destination: &str) -> Message {
        let mut m = Message::raw_event(destination, self.string(4), self.payload());
        m.ordering_key = self.0.bool().then(|| self.string(3));
        m.headers = self.headers();
        if self.0.bool() {
            m.content_type = self.string(3);
        }
        m
    }
}

/// A JSON object of strings, escaped by hand (the suite needs no JSON library for this).
fn json_object(map: &std::collections::BTreeMap<String, String>) -> String {
    fn quote(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }
    let fields: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{}:{}", quote(k), quote(v)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// Applies the CloudEvents checks, and refuses each command's first attempt as unowned (its owner
/// is deployed a moment later), like a strict broker.
#[derive(Clone, Default)]
struct StrictBroker(MemoryTransport, Arc<std::sync::Mutex<HashSet<uuid::Uuid>>>);

#[async_trait]
impl Transport for StrictBroker {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(batch.len());
        for m in batch {
            results.push(match (self.validate(m), m.kind) {
                (Err(e), _) => Err(e),
                (Ok(()), Kind::Command)
                    if self.1.lock().expect("strict broker lock").insert(m.id) =>
                {
                    Err(Error::rejected("no owner for this command queue yet"))
                }
                (Ok(()), _) => {
                    self.0.publish(std::slice::from_ref(m)).await;
                    Ok(())
                }
            });
        }
        results
    }

    async fn subscribe(&self, s: &Subscription) -> Result<Box<dyn Subscriber>> {
        self.0.subscribe(s).await
    }

    fn describe(&self) -> String {
        "strict-memory".to_owned()
    }
}

/// Bad rows written with plain SQL (the table of known cases, the harness's native ones, and
/// seeded arbitrary rows), interleaved with good rows of five keys, some bad rows on those same
/// keys. The relay must never fail; every good row must be published, in order per key; every
/// known case must end as its table says; nothing may be left pending.
pub async fn rows_end_published_or_dead_lettered(h: &dyn StoreHarness) -> Result<()> {
    let tag = crate::unique("poison");
    let good_topic = format!("{tag}-good");
    let keys: Vec<String> = (0..5).map(|k| format!("key-{k}")).collect();
    let mut expected: HashMap<String, End> = HashMap::new();
    let mut good: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut bad: Vec<(RawInsert, End)> = cases(&tag);
    let mut generator = Gen::new("rows");
    for i in 0..40 {
        bad.push((generator.row(&format!("{tag}-g{i}")), End::Either));
    }
    let mut round = 0;
    for (i, (mut row, end)) in bad.into_iter().enumerate() {
        if (i % 3 == 0 || row.kind == "command") && row.ordering_key.is_none() {
            // Some bad rows sit on a good key: the key must go on past them, in order.
            row.ordering_key = Some(keys[i % keys.len()].clone());
        }
        insert_good_round(h, &good_topic, &keys, round, &mut good).await?;
        round += 1;
        match h.insert_raw(&row).await {
            Ok(()) => {
                if end == End::Published
                    && let Some(k) = &row.ordering_key
                {
                    good.entry(k.clone()).or_default().push(row.payload.clone());
                }
                expected.insert(row.destination.clone(), end);
            }
            // A database that checks more (MySQL's JSON column, utf8mb4) refuses the row itself:
            // nothing to relay, nothing to lose.
            Err(e) => eprintln!(
                "the database refused a poison row for {}: {}",
                row.destination,
                e.chain()
            ),
        }
    }
    for case in NativePoison::ALL {
        let destination = format!("{tag}-native-{case:?}");
        if h.insert_native(case, &destination).await? {
            expected.insert(destination, End::Either);
        }
    }
    insert_good_round(h, &good_topic, &keys, round, &mut good).await?;

    let broker = StrictBroker::default();
    let config = RelayConfig {
        relay_id: "poison".to_owned(),
        batch_size: 16,
        workers: 1,
        max_attempts: 2,
        retry_window: Duration::ZERO,
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(4),
        retry_delay_max: Duration::from_millis(4),
        ..RelayConfig::default()
    };
    let store = h.store().await;
    let relay = Relay::new(store.clone(), Arc::new(broker.clone()), config)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Every tick must succeed: a bad row is never an error of the relay.
        let report = relay.tick().await?;
        if report.claimed == 0 {
            let pending: u64 = store.stats().await?.iter().map(|s| s.pending).sum();
            if pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} rows still pending after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    let published = broker.0.published();
    let mut seen: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut published_destinations = HashSet::new();
    let tracked: HashSet<&Vec<u8>> = good.values().flatten().collect();
    for m in &published {
        if m.destination != good_topic {
            published_destinations.insert(m.destination.clone());
        }
        if let Some(key) = &m.ordering_key
            && tracked.contains(&m.payload)
        {
            let rows = seen.entry(key.clone()).or_default();
            if !rows.contains(&m.payload) {
                rows.push(m.payload.clone());
            }
        }
    }
    assert_eq!(
        seen, good,
        "every good row (and the retried command) published, in order per key"
    );
    // Then a row written with the id of an existing dead letter: moving it must not fail.
    let reused = format!("{tag}-reused-id");
    if h.insert_native(NativePoison::ReusedDeadLetterId, &reused)
        .await?
    {
        loop {
            let report = relay.tick().await?;
            if report.claimed == 0 {
                break;
            }
        }
        expected.insert(reused, End::Dead("headers"));
    }
    let reasons: HashMap<String, String> = h.dead_letter_reasons().await?.into_iter().collect();
    for (destination, end) in &expected {
        let dead = reasons.get(destination);
        let out = published_destinations.contains(destination);
        match (end, dead) {
            (End::Dead(want), Some(reason)) => {
                assert!(!out, "{destination}: both published and dead-lettered");
                assert!(
                    reason.contains(want),
                    "{destination}: reason {reason:?} should say {want:?}"
                );
            }
            (End::Published, _) => {
                assert!(
                    dead.is_none() && out,
                    "{destination} should be published: {dead:?}"
                )
            }
            (End::Dead(want), None) => {
                panic!("{destination} should be dead-lettered ({want}); published: {out}")
            }
            (End::Either, Some(reason)) => {
                assert!(!out, "{destination}: both published and dead-lettered");
                assert!(
                    !reason.is_empty(),
                    "{destination}: a dead letter needs a reason"
                );
            }
            (End::Either, None) => {
                assert!(out, "{destination}: neither published nor dead-lettered")
            }
        }
    }
    Ok(())
}

/// One good row for every key, remembered in `good` in insert order.
async fn insert_good_round(
    h: &dyn StoreHarness,
    topic: &str,
    keys: &[String],
    round: usize,
    good: &mut HashMap<String, Vec<Vec<u8>>>,
) -> Result<()> {
    for k in keys {
        let payload = format!("{k}/{round}").into_bytes();
        h.insert_raw(&RawInsert::event(topic, Some(k), &payload))
            .await?;
        good.entry(k.clone()).or_default().push(payload);
    }
    Ok(())
}

/// Messages a broker binding cannot carry (over its name, header or frame limits, with line
/// breaks or characters its headers refuse, against CloudEvents rules), sent in one batch with
/// good messages and then seeded arbitrary ones: each bad one is refused alone with a rejection
/// that is not an outage (so the relay parks it, never retries it forever), or published; no
/// panic; the good ones, before and after it, are delivered, in order per key; the transport
/// works on afterwards.
pub async fn messages_are_refused_alone(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("poison"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.expect("subscribe");
    let topic = sub.destination.clone();
    let good = |n: usize, key: &str| {
        Message::raw_event(&topic, "Fine", format!("good-{n}").into_bytes()).with_key(key)
    };
    let bad_cases: Vec<(Message, bool)> = {
        let m = || Message::raw_event(&topic, "Bad", b"{}".to_vec());
        let with = |f: &dyn Fn(&mut Message)| {
            let mut x = m();
            f(&mut x);
            x
        };
        // (message, must be refused: it breaks a rule every transport enforces)
        vec![
            (with(&|x| x.message_type = "T".repeat(300)), false),
            (with(&|x| x.message_type = "A\nB".into()), true),
            (with(&|x| x.ordering_key = Some("k\r\n".into())), true),
            (
                with(&|x| {
                    x.headers.insert("a b".into(), "v".into());
                }),
                true,
            ),
            (
                with(&|x| {
                    x.headers.insert("a:b".into(), "v".into());
                }),
                true,
            ),
            (
                with(&|x| {
                    x.headers.insert("X-Up".into(), "v".into());
                }),
                true,
            ),
            (
                with(&|x| {
                    x.headers.insert("tenant".into(), "a\nb".into());
                }),
                true,
            ),
            (
                with(&|x| {
                    x.headers.insert("big".into(), "v".repeat(200_000));
                }),
                false,
            ),
            (with(&|x| x.content_type = "c".repeat(300)), false),
            (
                with(&|x| {
                    x.created_at =
                        herald_core::message::from_micros(herald_core::message::MAX_TIME_MICROS + 1)
                }),
                true,
            ),
            (with(&|x| x.destination = format!("{topic} x")), false),
            (with(&|x| x.destination = "d".repeat(300)), false),
        ]
    };
    let mut batch = vec![good(0, "a")];
    for (m, _) in &bad_cases {
        batch.push(m.clone());
    }
    batch.extend([good(1, "a"), good(2, "b")]);
    let results = t.publish(&batch).await;
    assert_eq!(results.len(), batch.len(), "one result per message");
    let mut delivered_bad = 0;
    for (i, (m, r)) in batch.iter().zip(&results).enumerate() {
        let must_refuse = i >= 1 && i <= bad_cases.len() && bad_cases[i - 1].1;
        match r {
            Ok(()) if m.message_type == "Fine" => {}
            Ok(()) => {
                assert!(
                    !must_refuse,
                    "message {i} breaks a CloudEvents rule but was published"
                );
                if m.destination == topic {
                    delivered_bad += 1;
                }
            }
            Err(e) => {
                assert!(m.message_type != "Fine", "good message {i} failed: {e}");
                assert!(
                    !e.is_transient(),
                    "message {i}: a bad message is not an outage: {e}"
                );
                assert!(
                    t.validate(m).is_err()
                        || matches!(e, Error::Rejected { .. } | Error::Unpublishable { .. }),
                    "{e}"
                );
            }
        }
    }
    // The transport is still usable, and everything good came through, in order per key.
    let after = good(3, "a");
    let r = t.publish(std::slice::from_ref(&after)).await;
    assert!(
        r[0].is_ok(),
        "publishing after the poison batch: {:?}",
        r[0]
    );
    let mut got = Vec::new();
    for _ in 0..(4 + delivered_bad) {
        let d = tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("a delivery within 30 s")
            .expect("next");
        s.ack(d.tag()).await.expect("ack");
        if let herald_core::Received::Message(d) = d
            && d.message.message_type == "Fine"
        {
            got.push(String::from_utf8_lossy(&d.message.payload).into_owned());
        }
    }
    let a: Vec<&String> = got.iter().filter(|p| *p != "good-2").collect();
    assert_eq!(a, ["good-0", "good-1", "good-3"], "key a in order: {got:?}");
    assert!(got.contains(&"good-2".to_owned()), "{got:?}");

    // Arbitrary messages, each beside a good one: refused alone or published, never an outage.
    let mut generator = Gen::new("messages");
    for n in 0..30 {
        let m = generator.message(&topic);
        let check = t.validate(&m);
        let results = t.publish(&[m.clone(), good(100 + n, "g")]).await;
        assert!(
            results[1].is_ok(),
            "the good neighbour of arbitrary message {n}: {:?}",
            results[1]
        );
        match &results[0] {
            Ok(()) => assert!(
                check.is_ok(),
                "message {n} failed validate ({check:?}) yet was published"
            ),
            Err(e) => assert!(!e.is_transient(), "arbitrary message {n}: {e}"),
        }
    }
}
