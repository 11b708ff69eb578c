//! A consumer whose handler records its effect and sends the next step's command in one
//! transaction with its inbox record: a duplicate delivery has no effect, and a step is never
//! lost between the two.
//!
//! Runs without servers (SQLite and the embedded broker): `cargo run -p herald --example
//! consumer`. On PostgreSQL: `impl Handler<sqlx::Postgres>`, `herald::postgres::PgApplier`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald::sqlite::{Handler, SqliteApplier, SqliteOutbox, SqliteOutboxWriter, connect, migrate};
use herald::{
    BoxError, Consumer, ConsumerConfig, Identifier, Message, Relay, RelayConfig, Subscription,
};
use sqlx::SqliteConnection;

/// On `OrderPlaced`: record the confirmation and ask billing to charge the card.
struct ConfirmAndCharge {
    writer: SqliteOutboxWriter,
}

#[async_trait]
impl Handler<sqlx::Sqlite> for ConfirmAndCharge {
    async fn handle(&self, tx: &mut SqliteConnection, m: &Message) -> Result<(), BoxError> {
        sqlx::query("INSERT INTO confirmations (order_key) VALUES (?1)")
            .bind(m.ordering_key.as_deref())
            .execute(&mut *tx)
            .await?;
        // The next step's command commits with this step: the workflow never loses a step.
        let charge = Message::raw_command("billing", "ChargeCard", m.payload.clone()).caused_by(m);
        self.writer.send(tx, &charge).await?;
        Ok(())
    }
}

/// Billing's side: the charge, applied once.
struct Charge;

#[async_trait]
impl Handler<sqlx::Sqlite> for Charge {
    async fn handle(&self, tx: &mut SqliteConnection, m: &Message) -> Result<(), BoxError> {
        sqlx::query("INSERT INTO charges (order_json) VALUES (?1)")
            .bind(m.payload.as_slice())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// Runs `consumer` until it applied or parked one message (a service runs it until SIGTERM).
async fn until_handled(consumer: &Consumer) -> herald::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let watched = consumer.clone();
    consumer
        .run(async move {
            let c = watched.counters();
            while c.applied.load(Relaxed) + c.dead_lettered.load(Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("herald-consumer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pool = connect(&format!("sqlite://{}/shop.db", dir.display())).await?;
    let table = Identifier::new("herald_outbox")?;
    migrate(&pool, &table).await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS confirmations (order_key TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS charges (order_json BLOB NOT NULL)",
    ] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    let broker = Arc::new(
        herald::embedded::EmbeddedTransport::open(&format!("sqlite://{}/broker.db", dir.display()))
            .await?,
    );
    let writer = SqliteOutboxWriter::new(&table);
    let relay = Relay::new(
        Arc::new(SqliteOutbox::new(pool.clone(), table.clone()).await?),
        broker.clone(),
        RelayConfig::default(),
    )?;

    let apply = Arc::new(SqliteApplier::new(
        pool.clone(),
        &table,
        ConfirmAndCharge {
            writer: writer.clone(),
        },
    )?);
    let emails = Consumer::new(
        broker.clone(),
        apply,
        Subscription::events("orders", "email-service"),
        ConsumerConfig::default(),
    )?;
    let billing = Consumer::new(
        broker.clone(),
        Arc::new(SqliteApplier::new(pool.clone(), &table, Charge)?),
        Subscription::commands("billing", "billing"),
        ConsumerConfig::default(),
    )?;
    // Subscribing declares each service's place on the broker before anything is published.
    drop(emails.subscribe().await?);
    drop(billing.subscribe().await?);

    let mut tx = pool.begin().await?;
    let placed =
        Message::raw_event("orders", "OrderPlaced", br#"{"order":7}"#.to_vec()).with_key("order-7");
    writer.publish(&mut tx, &placed).await?;
    tx.commit().await?;
    relay.tick().await?;

    until_handled(&emails).await?;
    // The ChargeCard command committed with the confirmation; the relay publishes it next.
    relay.tick().await?;
    until_handled(&billing).await?;
    let count = |table: &str| format!("SELECT COUNT(*) FROM {table}");
    let confirmed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count("confirmations")))
        .fetch_one(&pool)
        .await?;
    let charged: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count("charges")))
        .fetch_one(&pool)
        .await?;
    println!("confirmations={confirmed} charges={charged}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
