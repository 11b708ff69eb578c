//! Writing an event in the same transaction as the business change, then relaying it.
//!
//! Runs without servers (SQLite and the embedded broker): `cargo run -p herald --example
//! write_events`. On PostgreSQL the same code uses `herald::postgres::{PgOutboxWriter, PgOutbox,
//! migrate}` and a `sqlx::PgPool` (features `postgres` and, for RabbitMQ, `rabbitmq`).

use std::sync::Arc;

use herald::sqlite::{SqliteOutbox, SqliteOutboxWriter, connect, migrate};
use herald::{Identifier, Message, Relay, RelayConfig};

/// The event: a serde type, sent as JSON with the type name `OrderPlaced`.
#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("herald-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pool = connect(&format!("sqlite://{}/shop.db", dir.display())).await?;
    let table = Identifier::new("herald_outbox")?;
    migrate(&pool, &table).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL)")
        .execute(&pool)
        .await?;

    // The business change and its event commit together, or not at all.
    let writer = SqliteOutboxWriter::new(&table);
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id, status) VALUES (?1, 'placed')")
        .bind(42)
        .execute(&mut *tx)
        .await?;
    let placed = Message::event("orders", &OrderPlaced { order: 42 })?.with_key("order-42");
    writer.publish(&mut tx, &placed).await?;
    tx.commit().await?;

    // The relay publishes it after the commit and deletes the row once the broker confirmed it.
    let broker =
        herald::embedded::EmbeddedTransport::open(&format!("sqlite://{}/broker.db", dir.display()))
            .await?;
    let store = SqliteOutbox::new(pool, table).await?;
    let relay = Relay::new(
        Arc::new(store),
        Arc::new(broker.clone()),
        RelayConfig::default(),
    )?;
    let report = relay.tick().await?;
    println!(
        "published {} event(s); the broker's orders log holds {}",
        report.published,
        broker.log_len("orders").await?
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
