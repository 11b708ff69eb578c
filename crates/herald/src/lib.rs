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
//!     .enqueue(&mut tx, &Message::raw_event("orders", "OrderPlaced", br#"{"id":1}"#.to_vec()).with_key("order-1"))
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
    typed,
};

/// Prometheus metrics, `/healthz` and `/readyz`, logs and OpenTelemetry export over OTLP (the
/// `observability` feature; `otlp` adds the exporter).
#[cfg(feature = "observability")]
pub use herald_telemetry as observability;

/// Helpers for writing a backend (a store or a transport), beyond the traits: not needed to use
/// herald.
#[doc(hidden)]
pub use herald_core::driver;

/// PostgreSQL storage, and the host and typed handlers on it.
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use herald_postgres::*;
    /// The host on PostgreSQL: [`crate::Host`].
    pub type Host = crate::Host<PgDialect>;
    /// Typed handlers by message type on PostgreSQL: [`crate::Router`].
    pub type Router = crate::Router<PgDialect>;
    /// What a typed handler sees on PostgreSQL: [`crate::Context`].
    pub type Context<'a> = crate::Context<'a, PgDialect>;
}

/// SQLite storage, and the host and typed handlers on it.
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use herald_sqlite::*;
    /// The host on SQLite: [`crate::Host`].
    pub type Host = crate::Host<SqliteDialect>;
    /// Typed handlers by message type on SQLite: [`crate::Router`].
    pub type Router = crate::Router<SqliteDialect>;
    /// What a typed handler sees on SQLite: [`crate::Context`].
    pub type Context<'a> = crate::Context<'a, SqliteDialect>;
}

/// RabbitMQ transport.
#[cfg(feature = "rabbitmq")]
pub use herald_rabbitmq as rabbitmq;

/// NATS JetStream transport.
#[cfg(feature = "nats")]
pub use herald_nats as nats;

/// The embedded, zero-server transport.
#[cfg(feature = "embedded")]
pub use herald_embedded as embedded;

/// MySQL and MariaDB storage, and the host and typed handlers on it.
#[cfg(feature = "mysql")]
pub mod mysql {
    pub use herald_mysql::*;
    /// The host on MySQL or MariaDB: [`crate::Host`].
    pub type Host = crate::Host<MySqlDialect>;
    /// Typed handlers by message type on MySQL or MariaDB: [`crate::Router`].
    pub type Router = crate::Router<MySqlDialect>;
    /// What a typed handler sees on MySQL or MariaDB: [`crate::Context`].
    pub type Context<'a> = crate::Context<'a, MySqlDialect>;
}

/// Redis Streams transport.
#[cfg(feature = "redis")]
pub use herald_redis as redis;

/// Kafka transport (builds librdkafka).
#[cfg(feature = "kafka")]
pub use herald_kafka as kafka;

pub mod connect;
mod host;

pub use herald_core::typed::{Codec, Json};
pub use herald_sql::{Context, Handle, Handler, Router, Statement, Unknown};
pub use host::{Backend, Host, HostBuilder, Running, shutdown_signal};

/// The sqlx this herald was built against (0.9): use it for your own queries, so that the
/// connection and pool types are the ones herald's functions take.
pub use sqlx;

/// The `#[async_trait]` attribute that implementing [`Handle`] and [`Handler`] takes.
pub use async_trait::async_trait;

/// Dead-letter administration (list, show, replay, purge) on any SQL database.
pub use herald_sql::dead_letters;

/// What the SQL databases share, written once: for backend authors and for naming the generic
/// types (`herald_sql::SqlOutbox<D>`, `Applier<D, H>`, ...) directly.
pub use herald_sql as sql;
