//! The `herald` binary against the real PostgreSQL and RabbitMQ: rows written with plain SQL,
//! relays aborted at a failpoint, killed with SIGKILL over and over, stopped with SIGTERM, two
//! relays at once, and bad configuration. Messages are read back with a plain AMQP client.
//!
//! Needs PostgreSQL (`HERALD_TEST_POSTGRES`) and RabbitMQ (`HERALD_TEST_AMQP`); `.ci/run` starts them.

mod common;

use common::{Db, amqp_url, herald, pg_url, relay, unique};

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

/// A plain AMQP consumer bound to `topic`'s exchange before anything is published.
struct Listener {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
    queue: String,
    channel: lapin::Channel,
}

impl Listener {
    async fn bind(topic: &str) -> Listener {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                topic.into(),
                lapin::ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = format!("{topic}.listener");
        let opts = QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.as_str().into(), opts, FieldTable::default())
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                topic.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Listener {
            _conn: conn,
            consumer,
            queue,
            channel,
        }
    }

    /// Receives until `distinct` different message ids arrived and then `quiet` passed with
    /// nothing more; returns every delivery as (id, key, seq), duplicates included.
    async fn receive(&mut self, distinct: usize, quiet: Duration) -> Vec<(String, String, u64)> {
        let mut got = Vec::new();
        let mut ids = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let wait = if ids.len() >= distinct {
                quiet
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            let Ok(Some(Ok(d))) = tokio::time::timeout(wait, self.consumer.next()).await else {
                break;
            };
            let headers = d.properties.headers().clone().unwrap_or_default();
            let text = |k: &str| match headers.inner().get(k) {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                _ => String::new(),
            };
            let seq = serde_json::from_slice::<serde_json::Value>(&d.data).unwrap()["seq"]
                .as_u64()
                .unwrap();
            let id = text("ce-id");
            ids.insert(id.clone());
            got.push((id, text("ce-partitionkey"), seq));
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = &self.queue;
        let _ = &self.channel;
        got
    }
}

/// No loss, and per key the first deliveries come in commit order. Returns the duplicate count.
fn check(deliveries: &[(String, String, u64)], expected: usize) -> usize {
    let mut first = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut duplicates = 0;
    for (id, key, seq) in deliveries {
        if !first.insert(id.clone()) {
            duplicates += 1;
            continue;
        }
        if let Some(prev) = last.insert(key, *seq) {
            assert!(*seq > prev, "key {key}: seq {seq} delivered after {prev}");
        }
    }
    assert_eq!(
        first.len(),
        expected,
        "every committed message must be delivered"
    );
    duplicates
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGTERM to each relay, which must exit 0. The outbox may have been empty before a relay even
/// started, so each first gets time to install its SIGTERM handler (before that, the signal's
/// default action kills the process).
async fn stop_gracefully(relays: &mut [&mut Child]) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in relays.iter() {
        signal(r, "-TERM");
    }
    for r in relays.iter_mut() {
        assert!(r.wait().unwrap().success(), "a relay did not exit cleanly");
    }
}

async fn wait_until_empty(db: &Db, limit: Duration) {
    let deadline = Instant::now() + limit;
    while db.pending().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows inserted with plain SQL (and a rolled-back one) are published by `herald relay` exactly
/// as the README documents; `herald status` shows the outbox empty afterwards.
#[tokio::test]
async fn plain_sql_rows_are_published_and_rollbacks_are_not() {
    let db = Db::new().await;
    let topic = unique("plain");
    let mut listener = Listener::bind(&topic).await;
    db.insert_plain(&topic, 3, 2).await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Phantom', $1, 'key-0', '\\x00')")
        .bind(&topic)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let out = relay(&db, &["--until-empty"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let got = listener.receive(6, Duration::from_millis(300)).await;
    assert_eq!(check(&got, 6), 0);
    let status = herald(&["status", "--database", &db.url]).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("total: pending=0 dead_letters=0"));
    db.drop().await;
}

/// A relay aborted after the broker confirmed but before it marked: on restart the messages are
/// published again (duplicates), never lost.
#[tokio::test]
async fn abort_between_confirm_and_mark_duplicates_never_loses() {
    let db = Db::new().await;
    let topic = unique("abort");
    let mut listener = Listener::bind(&topic).await;
    db.insert_plain(&topic, 5, 1).await;

    let out = relay(
        &db,
        &[
            "--lease",
            "1s",
            "--publish-timeout",
            "500ms",
            "--workers",
            "1",
            "--failpoint",
            "after-confirm",
        ],
    )
    .output()
    .unwrap();
    assert!(
        !out.status.success(),
        "the failpoint must abort the process"
    );
    assert!(stderr(&out).contains("failpoint"), "{}", stderr(&out));
    assert_eq!(db.pending().await, 5, "nothing was marked");

    // A new relay takes over once the dead relay stopped heart-beating.
    let mut next = relay(&db, &["--lease", "1s", "--publish-timeout", "500ms"])
        .spawn()
        .unwrap();
    wait_until_empty(&db, Duration::from_secs(20)).await;
    stop_gracefully(&mut [&mut next]).await;
    let got = listener.receive(5, Duration::from_millis(300)).await;
    assert_eq!(check(&got, 5), 5, "each message was delivered twice");
    db.drop().await;
}

/// Aborts a relay at `point` while it publishes 5 keys x 2 messages, then lets a fresh relay take
/// over. Returns (rows left unmarked by the aborted relay, duplicates delivered). `check` asserts
/// that every message arrived and each key's first deliveries are in order.
async fn abort_at_then_recover(point: &str) -> (i64, usize) {
    let db = Db::new().await;
    let topic = unique("failpoint");
    let mut listener = Listener::bind(&topic).await;
    db.insert_plain(&topic, 5, 2).await;
    // One worker: the whole outbox is one batch, so the failpoint sees all of it.
    let quick = [
        "--lease",
        "1s",
        "--publish-timeout",
        "500ms",
        "--workers",
        "1",
    ];
    let mut args = quick.to_vec();
    args.extend(["--failpoint", point]);
    let out = relay(&db, &args).output().unwrap();
    assert!(!out.status.success(), "{point}: the failpoint must abort");
    assert!(stderr(&out).contains("failpoint"), "{}", stderr(&out));
    let left = db.pending().await;

    let mut next = relay(&db, &quick).spawn().unwrap();
    wait_until_empty(&db, Duration::from_secs(20)).await;
    stop_gracefully(&mut [&mut next]).await;
    let got = listener.receive(10, Duration::from_millis(300)).await;
    let duplicates = check(&got, 10);
    db.drop().await;
    (left, duplicates)
}

/// Aborted with its lease committed and nothing published: nothing is duplicated or lost.
#[tokio::test]
async fn abort_after_claim_loses_nothing() {
    assert_eq!(abort_at_then_recover("after-claim").await, (10, 0));
}

/// Aborted with half of its batch confirmed: those are published again, nothing is lost, and the
/// keys stay in order.
#[tokio::test]
async fn abort_mid_batch_duplicates_the_confirmed_half_only() {
    let (left, dups) = abort_at_then_recover("mid-batch").await;
    assert_eq!(left, 10, "nothing was marked");
    assert_eq!(dups, 5, "the confirmed half is delivered twice");
}

/// Aborted while the mark's commit is in flight: either it landed (no duplicates) or it did not
/// (the batch is published again); never a loss.
#[tokio::test]
async fn abort_during_mark_is_a_duplicate_or_nothing_never_a_loss() {
    let (left, dups) = abort_at_then_recover("during-mark").await;
    assert!(
        (left == 10 && dups == 10) || (left == 0 && dups == 0),
        "left={left} dups={dups}"
    );
}

/// Two relay processes on one database: nothing lost, every key in order.
#[tokio::test]
async fn two_relays_lose_nothing_and_keep_key_order() {
    let db = Db::new().await;
    let topic = unique("two");
    let mut listener = Listener::bind(&topic).await;
    db.insert_plain(&topic, 8, 60).await;
    let args = ["--batch-size", "16", "--workers", "2"];
    let mut a = relay(&db, &args).spawn().unwrap();
    let mut b = relay(&db, &args).spawn().unwrap();
    wait_until_empty(&db, Duration::from_secs(60)).await;
    stop_gracefully(&mut [&mut a, &mut b]).await;
    let got = listener.receive(480, Duration::from_millis(300)).await;
    assert_eq!(check(&got, 480), 0, "no duplicates without crashes");
    db.drop().await;
}

/// SIGKILL the relay over and over while it drains: nothing is lost, keys stay in order.
#[tokio::test]
async fn sigkill_over_and_over_loses_nothing() {
    let db = Db::new().await;
    let topic = unique("kill");
    let mut listener = Listener::bind(&topic).await;
    db.insert_plain(&topic, 10, 150).await;
    let args = [
        "--lease",
        "1s",
        "--publish-timeout",
        "500ms",
        "--batch-size",
        "32",
    ];
    let mut rng = fastrand::Rng::with_seed(
        std::env::var("HERALD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7),
    );
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = relay(&db, &args).stdout(Stdio::null()).spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(rng.u64(100..500))).await;
        signal(&child, "-KILL");
        child.wait().unwrap();
        kills += 1;
        if db.pending().await == 0 {
            break;
        }
    }
    let mut last = relay(&db, &args).spawn().unwrap();
    wait_until_empty(&db, Duration::from_secs(60)).await;
    stop_gracefully(&mut [&mut last]).await;
    let got = listener.receive(1500, Duration::from_millis(500)).await;
    let duplicates = check(&got, 1500);
    eprintln!("killed {kills} times: 1500 delivered, {duplicates} duplicates");
    db.drop().await;
}

/// SIGTERM lets the in-flight batch finish: the relay exits 0 and leaves no lease behind, so
/// the next relay publishes the rest without duplicates.
#[tokio::test]
async fn sigterm_finishes_in_flight_work_without_duplicates() {
    let db = Db::new().await;
    let topic = unique("term");
    let mut listener = Listener::bind(&topic).await;
    db.insert_plain(&topic, 10, 300).await;
    let child = relay(&db, &["--batch-size", "64"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.pending().await > 2500 {
        assert!(Instant::now() < deadline, "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("relay stopped"));
    let leased: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM herald_outbox WHERE lease_token IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(leased, 0, "a graceful stop leaves no lease behind");
    let out = relay(&db, &["--until-empty"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let got = listener.receive(3000, Duration::from_millis(500)).await;
    assert_eq!(check(&got, 3000), 0, "no duplicates after a graceful stop");
    db.drop().await;
}

/// Bad configuration fails at start-up, with exit code 2 and a message that says what to fix,
/// and a password never appears in the output.
#[tokio::test]
async fn invalid_configuration_fails_clearly() {
    let db = Db::new().await;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--database".into(), "not a url".into()],
            "not a valid URL",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--table".into(),
                "x\"; DROP TABLE y;--".into(),
            ],
            "is not allowed",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                amqp_url(),
                "--table".into(),
                "no_such_table".into(),
            ],
            "herald migrate",
        ),
        (
            vec!["--database".into(), db.url.clone()],
            "--broker is required with a postgres database",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                amqp_url(),
                "--publish-timeout".into(),
                "0s".into(),
            ],
            "publish timeout",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                amqp_url(),
                "--max-message-bytes".into(),
                "0".into(),
            ],
            "max message bytes",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                "nats://127.0.0.1:4222?tls=true".into(),
            ],
            "use tls://",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                "rediss://u:sentinel-pw@127.0.0.1:6379".into(),
            ],
            "not supported",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                amqp_url().replacen("guest:guest@", "guest:sentinel-pw@", 1),
            ],
            "refused the login",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--broker".into(),
                "http://u:sentinel-pw@h/".into(),
            ],
            "not supported",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--lease".into(),
                "100ms".into(),
            ],
            "heart-beats",
        ),
        (
            vec![
                "--database".into(),
                db.url.clone(),
                "--lease".into(),
                "soon".into(),
            ],
            "not a duration",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["relay".to_owned()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = herald(&refs).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{refs:?}: {err}");
        assert!(
            err.contains(expected),
            "{refs:?}: expected {expected:?} in {err}"
        );
        assert!(!err.contains("sentinel-pw"), "{err}");
    }
    // A wrong password reaches the server and fails; the password is not echoed.
    let url = pg_url()
        .replace("postgres@", "postgres:sentinel-pw@")
        .replace("127.0.0.1:5432", "127.0.0.1:1");
    let out = herald(&["status", "--database", &url]).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot connect") && err.contains("***") && !err.contains("sentinel-pw"),
        "{err}"
    );
    db.drop().await;
}
