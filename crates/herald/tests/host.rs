//! The host and typed handlers, on SQLite and the embedded broker (no servers): routing by type,
//! what cannot be handled parked at once with its reason, topology declared before the relay
//! publishes, configuration mistakes refused at build, durability warnings.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use herald::sql::dead_letters::{DeadLetterAdmin, DeadLetters, Filter, Side, Summary};
use herald::sqlite::{Context, Host, Router, SqliteDialect};
use herald::{BoxError, ConsumerConfig, Handle, Message, async_trait};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename = "order.cancelled")]
struct OrderCancelled {
    order: i64,
}

#[derive(Serialize, Deserialize)]
struct ChargeCard {
    order: i64,
    cents: i64,
}

/// Records `(kind, order)` in the `seen` table.
struct Record(&'static str);

#[async_trait]
impl Handle<SqliteDialect, OrderPlaced> for Record {
    async fn handle(&self, ctx: &mut Context<'_>, m: OrderPlaced) -> Result<(), BoxError> {
        seen(ctx, self.0, m.order).await
    }
}

#[async_trait]
impl Handle<SqliteDialect, OrderCancelled> for Record {
    async fn handle(&self, ctx: &mut Context<'_>, m: OrderCancelled) -> Result<(), BoxError> {
        seen(ctx, self.0, m.order).await
    }
}

#[async_trait]
impl Handle<SqliteDialect, ChargeCard> for Record {
    async fn handle(&self, ctx: &mut Context<'_>, m: ChargeCard) -> Result<(), BoxError> {
        seen(ctx, self.0, m.order * 1000 + m.cents).await
    }
}

async fn seen(ctx: &mut Context<'_>, kind: &str, n: i64) -> Result<(), BoxError> {
    ctx.sql("INSERT INTO seen (kind, n) VALUES (?, ?)")
        .text(kind)
        .int(n)
        .execute()
        .await?;
    Ok(())
}

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-host-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn db(&self) -> String {
        format!("sqlite://{}/app.db", self.0.display())
    }

    fn broker(&self) -> String {
        format!("sqlite://{}/broker.db", self.0.display())
    }

    /// A host on this directory's database and embedded broker.
    fn host(&self) -> herald::HostBuilder<SqliteDialect> {
        Host::builder().database(self.db()).broker(self.broker())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Consumers that would retry a failing handler slowly: a message parked after one attempt was
/// parked at once.
fn patient() -> ConsumerConfig {
    ConsumerConfig {
        max_attempts: 5,
        retry_initial: Duration::from_secs(2),
        ..ConsumerConfig::default()
    }
}

/// The table the `Record` handlers write.
async fn create_seen(host: &Host) {
    let mut conn = host.pool().acquire().await.unwrap();
    host.statement("CREATE TABLE seen (kind TEXT NOT NULL, n INTEGER NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
}

async fn count(host: &Host, sql: &str) -> i64 {
    let mut conn = host.pool().acquire().await.unwrap();
    host.statement(sql)
        .fetch_int(&mut conn)
        .await
        .unwrap()
        .unwrap_or(0)
}

async fn dead_letters(host: &Host, side: Side) -> Vec<Summary> {
    DeadLetters::<SqliteDialect>::new(host.pool().clone(), host.table())
        .unwrap()
        .list(side, &Filter::default())
        .await
        .unwrap()
}

/// Waits up to 20 s for `done`.
async fn eventually<F: AsyncFn() -> bool>(what: &str, done: F) {
    for _ in 0..400 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn typed_handlers_by_type_and_what_cannot_be_handled_is_parked_at_once() {
    let dir = Scratch::new();
    let host = dir
        .host()
        .consumer_config(patient())
        .events(
            "orders",
            "ledger",
            Router::new()
                .on::<OrderPlaced, _>(Record("placed"))
                .on::<OrderCancelled, _>(Record("cancelled")),
        )
        .commands(
            "billing",
            "billing",
            Router::new().on::<ChargeCard, _>(Record("charge")),
        )
        .build()
        .await
        .unwrap();
    create_seen(&host).await;

    let mut tx = host.pool().begin().await.unwrap();
    let w = host.writer();
    for order in 1..=3 {
        let m = Message::event("orders", &OrderPlaced { order }).unwrap();
        w.publish(&mut tx, &m.with_key(format!("o{order}")))
            .await
            .unwrap();
    }
    let cancelled = Message::event("orders", &OrderCancelled { order: 2 }).unwrap();
    assert_eq!(cancelled.message_type, "order.cancelled");
    w.publish(&mut tx, &cancelled).await.unwrap();
    // What a producer in another language could write: a payload that is not an OrderPlaced
    // (with a value that must not appear in the reason), a type nobody here handles.
    let bad = br#"{"order":"4111-1111-1111-1111"}"#.to_vec();
    w.publish(&mut tx, &Message::raw_event("orders", "OrderPlaced", bad))
        .await
        .unwrap();
    w.publish(
        &mut tx,
        &Message::raw_event("orders", "OrderShipped", b"{}".to_vec()),
    )
    .await
    .unwrap();
    w.send(
        &mut tx,
        &Message::raw_command("billing", "RefundCard", b"{}".to_vec()),
    )
    .await
    .unwrap();
    let charge = Message::command("billing", &ChargeCard { order: 7, cents: 5 }).unwrap();
    w.send(&mut tx, &charge).await.unwrap();
    tx.commit().await.unwrap();

    let running = host.start().await.unwrap();
    eventually("every handled message and both parked ones", async || {
        count(&host, "SELECT COUNT(*) FROM seen").await == 5
            && dead_letters(&host, Side::Consumer).await.len() == 2
    })
    .await;
    running.stop().await.unwrap();

    let seen = |kind: &str| format!("SELECT COUNT(*) FROM seen WHERE kind = '{kind}'");
    assert_eq!(count(&host, &seen("placed")).await, 3);
    assert_eq!(count(&host, &seen("cancelled")).await, 1);
    assert_eq!(
        count(&host, "SELECT n FROM seen WHERE kind = 'charge'").await,
        7005
    );

    let mut parked = dead_letters(&host, Side::Consumer).await;
    parked.sort_by(|a, b| a.message_type.cmp(&b.message_type));
    let (undecodable, unhandled) = (&parked[0], &parked[1]);
    assert_eq!(undecodable.message_type, "OrderPlaced");
    assert_eq!(undecodable.consumer, "ledger");
    assert_eq!(undecodable.attempts, 1, "parked at once, not retried");
    assert!(
        undecodable.reason.contains("not a valid OrderPlaced")
            && undecodable
                .reason
                .contains("invalid type: string, expected i64"),
        "{}",
        undecodable.reason
    );
    assert!(
        !undecodable.reason.contains("4111"),
        "the payload leaked into the reason: {}",
        undecodable.reason
    );
    assert_eq!(unhandled.message_type, "RefundCard");
    assert_eq!(unhandled.attempts, 1);
    assert!(
        unhandled.reason.contains(
            "no handler for message type \"RefundCard\"; this service handles ChargeCard"
        ),
        "{}",
        unhandled.reason
    );
    // An event type nobody subscribed for is skipped, not parked.
    assert!(parked.iter().all(|d| d.message_type != "OrderShipped"));
    assert!(dead_letters(&host, Side::Relay).await.is_empty());
}

#[tokio::test]
async fn declaring_the_topology_is_what_lets_an_early_command_through() {
    let dir = Scratch::new();
    let host = dir
        .host()
        .relay(herald::RelayConfig {
            backoff_initial: Duration::from_millis(20),
            ..herald::RelayConfig::default()
        })
        .commands(
            "billing",
            "billing",
            Router::new().on::<ChargeCard, _>(Record("charge")),
        )
        .build()
        .await
        .unwrap();
    create_seen(&host).await;
    let mut tx = host.pool().begin().await.unwrap();
    let charge = Message::command("billing", &ChargeCard { order: 1, cents: 2 }).unwrap();
    host.writer().send(&mut tx, &charge).await.unwrap();
    tx.commit().await.unwrap();

    // Before anything declared the owner's queue, the broker refuses the command (the relay
    // keeps it and retries; after its retry window it would be a dead letter).
    let relay = host.relay().unwrap();
    let before = relay.tick().await.unwrap();
    assert_eq!((before.published, before.rejected), (0, 1), "{before:?}");

    host.declare().await.unwrap();
    let mut published = 0;
    for _ in 0..100 {
        published += relay.tick().await.unwrap().published;
        if published == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        published, 1,
        "the command is accepted once its queue is declared"
    );

    // `start` declares too (again: declaring is idempotent) and the owner applies it.
    let running = host.start().await.unwrap();
    eventually("the charge", async || {
        count(&host, "SELECT COUNT(*) FROM seen").await == 1
    })
    .await;
    running.stop().await.unwrap();
    assert!(dead_letters(&host, Side::Relay).await.is_empty());
    assert_eq!(
        host.consumers()[0]
            .counters()
            .applied
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn configuration_mistakes_fail_at_build_and_say_what_to_change() {
    let dir = Scratch::new();
    let error = |r: herald::Result<Host>| r.err().expect("build must fail").to_string();

    let twice = dir
        .host()
        .events(
            "orders",
            "ledger",
            Router::new()
                .on::<OrderPlaced, _>(Record("a"))
                .on::<OrderPlaced, _>(Record("b")),
        )
        .build()
        .await;
    assert!(error(twice).contains("two handlers for the message type(s) OrderPlaced"),);

    let wrong = Host::builder()
        .database("postgres://app:s3cret@db.invalid/shop")
        .build()
        .await;
    let text = error(wrong);
    assert!(text.contains("this host is for sqlite"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");

    let text = error(Host::builder().broker(dir.broker()).build().await);
    assert!(text.contains("needs a database"), "{text}");

    let text = error(
        Host::builder()
            .database(dir.db())
            .broker("  ")
            .build()
            .await,
    );
    assert!(text.contains("broker"), "{text}");

    let text = error(dir.host().table("no spaces; please").build().await);
    assert!(
        text.contains("no spaces; please") || text.contains("identifier"),
        "{text}"
    );

    let zero = herald::RelayConfig {
        batch_size: 0,
        ..herald::RelayConfig::default()
    };
    let text = error(dir.host().relay(zero).build().await);
    assert!(text.contains("batch"), "{text}");
}

#[tokio::test]
async fn the_in_process_relay_warns_when_the_database_may_lose_commits() {
    let dir = Scratch::new();
    let opts = herald::sqlite::connect_options(&dir.db())
        .unwrap()
        .synchronous(sqlx::sqlite::SqliteSynchronous::Off);
    let pool = herald::sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let host = Host::builder()
        .pool(pool)
        .broker(dir.broker())
        .build()
        .await
        .unwrap();
    let warnings = host.relay().unwrap().warn_durability().await;
    assert!(
        warnings.iter().any(|w| w.contains("synchronous")),
        "{warnings:?}"
    );
    // A stop right after the start is clean.
    host.run(async {}).await.unwrap();
    // A host with nothing to run still runs until its shutdown.
    let idle = dir.host().without_relay().build().await.unwrap();
    let waited =
        tokio::time::timeout(Duration::from_millis(300), idle.run(std::future::pending())).await;
    assert!(waited.is_err(), "run returned before its shutdown");
}

/// Panics on order 13, records the others.
struct Fragile;

#[async_trait]
impl Handle<SqliteDialect, OrderPlaced> for Fragile {
    async fn handle(&self, ctx: &mut Context<'_>, m: OrderPlaced) -> Result<(), BoxError> {
        assert_ne!(m.order, 13, "order 13 is cursed");
        seen(ctx, "placed", m.order).await
    }
}

#[tokio::test]
async fn a_handler_that_panics_is_retried_then_parked_and_other_keys_flow() {
    let dir = Scratch::new();
    let host = dir
        .host()
        .consumer_config(ConsumerConfig {
            max_attempts: 2,
            retry_initial: Duration::from_millis(20),
            ..ConsumerConfig::default()
        })
        .events(
            "orders",
            "ledger",
            Router::new().on::<OrderPlaced, _>(Fragile),
        )
        .build()
        .await
        .unwrap();
    create_seen(&host).await;
    let mut tx = host.begin().await.unwrap();
    for order in [12, 13, 14] {
        let m = Message::event("orders", &OrderPlaced { order }).unwrap();
        host.writer()
            .publish(&mut tx, &m.with_key(format!("o{order}")))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let running = host.start().await.unwrap();
    let again = host.start().await.err().expect("a second start is refused");
    assert!(again.to_string().contains("already running"), "{again}");
    eventually("the other orders and the parked one", async || {
        count(&host, "SELECT COUNT(*) FROM seen").await == 2
            && dead_letters(&host, Side::Consumer).await.len() == 1
    })
    .await;
    running.stop().await.unwrap();
    let parked = dead_letters(&host, Side::Consumer).await;
    assert_eq!(parked[0].attempts, 2);
    assert!(
        parked[0].reason.contains("the handler panicked") && parked[0].reason.contains("cursed"),
        "{}",
        parked[0].reason
    );
    // Stopped hosts start again.
    host.start().await.unwrap().stop().await.unwrap();
}
