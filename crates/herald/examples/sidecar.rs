//! The sidecar setup: a service in any language writes the outbox with plain SQL in its own
//! transactions, and the relay beside the database publishes the rows. This is what
//! `herald migrate` and `herald relay --until-empty` do, as a library.
//!
//! Runs without servers: `cargo run -p herald --example sidecar`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald::sqlite::{SqliteOutbox, connect, migrate};
use herald::{Identifier, OutboxStore, Relay, RelayConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("herald-sidecar-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pool = connect(&format!("sqlite://{}/shop.db", dir.display())).await?;
    let table = Identifier::new("herald_outbox")?;
    migrate(&pool, &table).await?;

    // What a Python, Go or Java service runs in its transaction (only four columns required).
    for order in 1..=3 {
        sqlx::query(
            "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) \
             VALUES ('OrderPlaced', 'orders', ?1, CAST(?2 AS BLOB))",
        )
        .bind(format!("order-{order}"))
        .bind(format!(r#"{{"order":{order}}}"#))
        .execute(&pool)
        .await?;
    }

    // The relay: publish until the outbox is empty, then stop gracefully.
    let broker =
        herald::embedded::EmbeddedTransport::open(&format!("sqlite://{}/broker.db", dir.display()))
            .await?;
    let store = Arc::new(SqliteOutbox::new(pool, table).await?);
    let relay = Relay::new(
        store.clone(),
        Arc::new(broker.clone()),
        RelayConfig::default(),
    )?;
    let watched = store.clone();
    relay
        .run(async move {
            loop {
                let pending: u64 = match watched.stats().await {
                    Ok(stats) => stats.iter().map(|s| s.pending).sum(),
                    Err(_) => 1,
                };
                if pending == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await?;
    println!(
        "published {}; the broker's orders log holds {}",
        relay.counters().published.load(Ordering::Relaxed),
        broker.log_len("orders").await?
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
