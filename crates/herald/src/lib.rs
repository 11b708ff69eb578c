//! herald: never fail to publish an event.
//!
//! Write events into an outbox table in the same database transaction as the state change they
//! announce; herald's relay publishes them to the broker after the commit (at least once, in
//! commit order per key), and never publishes the events of a transaction that rolled back.
//!
//! Backends are Cargo features: `sqlite` and `embedded` (default), `postgres`, `mysql`,
//! `rabbitmq`, `nats`, `kafka`, `redis`. [`connect`] opens each from a URL; `examples/` shows
//! writing events, a consumer that sends the next command, and the sidecar setup.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> herald::Result<()> {
//! use std::sync::Arc;
//! use herald::{Identifier, Message, Relay, RelayConfig};
//! use herald::sqlite::{SqliteOutbox, SqliteOutboxWriter, connect, migrate};
//!
//! let dir = std::env::temp_dir().join(format!("herald-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let pool = connect(&format!("sqlite://{}/app.db", dir.display())).await?;
//! let table = Identifier::new("herald_outbox")?;
//! migrate(&pool, &table).await?;
//!
//! // The business change and its event commit together.
//! let mut tx = pool.begin().await.unwrap();
//! SqliteOutboxWriter::new(&table)
//!     .enqueue(&mut tx, &Message::event("orders", "OrderPlaced", br#"{"id":1}"#.to_vec()).with_key("order-1"))
//!     .await?;
//! tx.commit().await.unwrap();
//!
//! // The relay publishes it to the broker, here the embedded one.
//! let broker = herald::embedded::EmbeddedTransport::open(&format!("sqlite://{}/broker.db", dir.display())).await?;
//! let store = SqliteOutbox::new(pool, table).await?;
//! let relay = Relay::new(Arc::new(store), Arc::new(broker.clone()), RelayConfig::default())?;
//! assert_eq!(relay.tick().await?.published, 1);
//! assert_eq!(broker.log_len("orders").await?, 1);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

pub use herald_core::{
    Applied, Apply, BoxError, Claim, Consumer, ConsumerConfig, Delivery, DestinationStats, Error,
    Failpoint, FallbackPublisher, FallbackReport, Heartbeat, Holdings, Identifier, Kind, Lease,
    Message, OutboxRow, OutboxStore, Park, Received, RejectionOutcome, Relay, RelayConfig,
    RelayInfo, RelayState, RelayStatus, ReplayFrom, Result, SecretUrl, Subscriber, Subscription,
    TickReport, Transport, Undecodable, Waker,
};
pub use herald_core::{
    backoff, cloudevents, consumer, fallback, membership, memory, message, relay, telemetry, trace,
};

/// Prometheus metrics, `/healthz` and `/readyz`, logs and OpenTelemetry export over OTLP (the
/// `observability` feature; `otlp` adds the exporter).
#[cfg(feature = "observability")]
pub use herald_telemetry as observability;

/// Helpers for writing a backend (a store or a transport), beyond the traits: not needed to use
/// herald.
#[doc(hidden)]
pub use herald_core::driver;

/// PostgreSQL storage.
#[cfg(feature = "postgres")]
pub use herald_postgres as postgres;

/// SQLite storage.
#[cfg(feature = "sqlite")]
pub use herald_sqlite as sqlite;

/// RabbitMQ transport.
#[cfg(feature = "rabbitmq")]
pub use herald_rabbitmq as rabbitmq;

/// NATS JetStream transport.
#[cfg(feature = "nats")]
pub use herald_nats as nats;

/// The embedded, zero-server transport.
#[cfg(feature = "embedded")]
pub use herald_embedded as embedded;

/// MySQL and MariaDB storage.
#[cfg(feature = "mysql")]
pub use herald_mysql as mysql;

/// Redis Streams transport.
#[cfg(feature = "redis")]
pub use herald_redis as redis;

/// Kafka transport (builds librdkafka).
#[cfg(feature = "kafka")]
pub use herald_kafka as kafka;

pub mod connect;

/// Dead-letter administration (list, show, replay, purge) on any SQL database.
pub use herald_sql::dead_letters;

/// What the SQL databases share, written once: for backend authors and for naming the generic
/// types (`herald_sql::SqlOutbox<D>`, `Applier<D, H>`, ...) directly.
pub use herald_sql as sql;
