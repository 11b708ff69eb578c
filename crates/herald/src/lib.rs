//! herald: never fail to publish an event.
//!
//! A service writes its events and commands into an outbox table in the same database
//! transaction as the state change they announce; herald's relay publishes them to the broker
//! after the commit (at least once, in commit order per key) and never publishes the messages of
//! a transaction that rolled back; herald's consumers apply each message once, in one
//! transaction with its inbox record.
//!
//! ```
//! use herald::sqlite::{Context, Host, Router, SqliteDialect};
//! use herald::{BoxError, Handle, Message, async_trait};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order: i64 }
//!
//! /// The email service: runs in the inbox transaction, so each order is emailed once.
//! struct Emails;
//!
//! #[async_trait]
//! impl Handle<SqliteDialect, OrderPlaced> for Emails {
//!     async fn handle(&self, ctx: &mut Context<'_>, placed: OrderPlaced) -> Result<(), BoxError> {
//!         herald::sqlx::query("INSERT INTO emails (order_id) VALUES (?1)")
//!             .bind(placed.order)
//!             .execute(ctx.tx())
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! # let dir = std::env::temp_dir().join(format!("herald-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let (database, broker) = (format!("sqlite://{}/shop.db", dir.display()), format!("sqlite://{}/broker.db", dir.display()));
//! // One host: the database, the broker, the relay and the consumers.
//! let host = Host::builder()
//!     .database(database) // "sqlite://shop.db"
//!     .broker(broker)     // "sqlite://broker.db": the embedded broker; or amqp://, nats://, ...
//!     .events("orders", "email-service", Router::new().on::<OrderPlaced, _>(Emails))
//!     .build()
//!     .await?;
//! herald::sqlx::query("CREATE TABLE emails (order_id INTEGER NOT NULL)").execute(host.pool()).await?;
//! let running = host.start().await?; // declares the queues, then relays and consumes
//!
//! // The business change and its event commit together, or not at all.
//! let mut tx = host.begin().await?;
//! let placed = Message::event("orders", &OrderPlaced { order: 7 })?.with_key("order-7");
//! host.writer().publish(&mut tx, &placed).await?;
//! tx.commit().await?;
//!
//! # let mut emailed = 0i64;
//! # for _ in 0..500 {
//! #     emailed = herald::sqlx::query_scalar("SELECT COUNT(*) FROM emails").fetch_one(host.pool()).await?;
//! #     if emailed == 1 { break }
//! #     tokio::time::sleep(std::time::Duration::from_millis(20)).await;
//! # }
//! # assert_eq!(emailed, 1);
//! running.stop().await?; // or host.run_until_signal().await? in a service
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```
//!
//! **The pieces**, each with one constructor, for when the host is not what you want:
//!
//! | what | constructor |
//! | --- | --- |
//! | a typed message | [`Message::event`]`(topic, &value)?`, [`Message::command`]`(queue, &value)?` (bytes: [`Message::raw_event`]) |
//! | the writer | [`Host::writer`], or `sqlite::SqliteOutboxWriter::new(&table)` (`PgOutboxWriter`, `MySqlOutboxWriter`) |
//! | the relay's outbox | `sqlite::SqliteOutbox::new(pool, table).await?` (`PgOutbox`, `MySqlOutbox`) |
//! | a broker from a URL | [`connect::transport`]`("amqp://...").await?` |
//! | the relay | [`Relay::new`]`(Arc::new(outbox), transport, RelayConfig::default())?` |
//! | a consumer | [`Consumer::new`]`(transport, Arc::new(sqlite::SqliteApplier::new(pool, &table, router)?), Subscription::events(topic, service), ConsumerConfig::default())?` |
//! | typed handlers | [`Router::new`]`().on::<OrderPlaced, _>(handler)`, handlers implement [`Handle`] |
//! | everything together | [`Host::builder`] |
//!
//! Backends are Cargo features: `sqlite` and `embedded` (default), `postgres`, `mysql`,
//! `rabbitmq`, `nats`, `kafka`, `redis`; `observability` and `otlp` for metrics and traces.
//! herald re-exports the [`sqlx`] it was built against (0.9): use `herald::sqlx` for your own
//! queries and a version mismatch cannot happen. `examples/shop.rs` is the whole order story
//! (an order service, an email service, a billing service) on any database and broker.
//!
//! **Typed messages** ([`typed`]): the message type is the name serde gives the payload's type
//! (its `#[serde(rename)]` if it has one), read the same way by sender and router; a payload that
//! does not decode into the handler's type is parked at once with serde's reason (the values it
//! quotes removed); a type no handler is registered for is parked if it is a command and skipped
//! if it is an event ([`Unknown`]); the router reads JSON, and another [`Codec`] is used with
//! [`Message::encoded`] and [`Message::decode_with`] in a plain [`Handler`].

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
