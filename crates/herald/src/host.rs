//! The host: one service's herald, started and stopped as one. It opens the database and the
//! broker, creates herald's tables, declares the broker topology every consumer needs, runs the
//! relay (after its durability checks) and the consumers, and stops them all, gracefully, on one
//! signal.
//!
//! ```no_run
//! # async fn example() -> herald::Result<()> {
//! use herald::sqlite::{Host, Router};
//! # use herald::{BoxError, sqlite::{Context, SqliteDialect}, Handle};
//! # #[derive(serde::Deserialize)] struct OrderPlaced { order: i64 }
//! # struct Emails;
//! # #[herald::async_trait]
//! # impl Handle<SqliteDialect, OrderPlaced> for Emails {
//! #     async fn handle(&self, _: &mut Context<'_>, _: OrderPlaced) -> Result<(), BoxError> { Ok(()) }
//! # }
//!
//! let host = Host::builder()
//!     .database("sqlite://shop.db")
//!     .broker("sqlite://shop-broker.db")
//!     .events("orders", "email-service", Router::new().on::<OrderPlaced, _>(Emails))
//!     .build()
//!     .await?;
//! host.run_until_signal().await // SIGTERM or Ctrl-C: in-flight work finishes, then it returns
//! # }
//! ```
//!
//! The pieces stay usable on their own: [`Host::relay`], [`Host::consumers`], [`Host::writer`]
//! and [`Host::pool`] are the same objects the host runs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herald_core::{
    Consumer, ConsumerConfig, Error, Identifier, Relay, RelayConfig, Result, SecretUrl,
    Subscription, Transport,
};
use herald_sql::{Applier, Dialect, Handler, OutboxWriter, SqlOutbox, Statement};
use sqlx::Pool;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::connect::{self, Database};

/// A database herald can host a service on: implemented for `SqliteDialect`, `PgDialect` and
/// `MySqlDialect` (with their features). Nothing to implement.
pub trait Backend: Dialect {
    /// The URL scheme, for messages.
    const SCHEME: &'static str;
    /// This backend's pool, if `db` is one.
    fn pool_of(db: Database) -> Option<Pool<Self::DB>>;
}

/// `impl Backend` for a dialect whose pool is the `Database` variant `$variant`.
macro_rules! backend {
    ($feature:literal, $dialect:ty, $scheme:literal, $variant:ident, $db:ty) => {
        #[cfg(feature = $feature)]
        impl Backend for $dialect {
            const SCHEME: &'static str = $scheme;
            fn pool_of(db: Database) -> Option<Pool<$db>> {
                #[allow(irrefutable_let_patterns, unreachable_patterns)]
                match db {
                    Database::$variant(pool) => Some(pool),
                    _ => None,
                }
            }
        }
    };
}

backend!(
    "sqlite",
    herald_sqlite::SqliteDialect,
    "sqlite",
    Sqlite,
    sqlx::Sqlite
);
backend!(
    "postgres",
    herald_postgres::PgDialect,
    "postgres",
    Postgres,
    sqlx::Postgres
);
backend!(
    "mysql",
    herald_mysql::MySqlDialect,
    "mysql",
    MySql,
    sqlx::MySql
);

enum Source<T> {
    Url(String),
    Given(T),
}

type MakeApply<D> = Box<
    dyn FnOnce(Pool<<D as Dialect>::DB>, &Identifier) -> Result<Arc<dyn herald_core::Apply>> + Send,
>;

/// Builds a [`Host`]: [`Host::builder`].
pub struct HostBuilder<D: Backend> {
    database: Option<Source<Pool<D::DB>>>,
    broker: Option<Source<Arc<dyn Transport>>>,
    table: String,
    relay: Option<RelayConfig>,
    consumer_config: ConsumerConfig,
    migrate: bool,
    consumers: Vec<(Subscription, ConsumerConfig, MakeApply<D>)>,
}

impl<D: Backend> HostBuilder<D> {
    /// The application database, by URL (`sqlite://path`, `postgres://...`, `mysql://...`; the
    /// password is never shown in errors or logs).
    pub fn database(mut self, url: impl Into<String>) -> Self {
        self.database = Some(Source::Url(url.into()));
        self
    }

    /// The application database, as the service's own pool.
    pub fn pool(mut self, pool: Pool<D::DB>) -> Self {
        self.database = Some(Source::Given(pool));
        self
    }

    /// The broker, by URL: `amqp://`, `nats://`, `kafka://`, `redis://`, or `sqlite://path` for
    /// the embedded broker (each with its feature). Required, except with a SQLite database,
    /// where the default is the embedded broker `herald-broker.db` in the working directory.
    pub fn broker(mut self, url: impl Into<String>) -> Self {
        self.broker = Some(Source::Url(url.into()));
        self
    }

    /// The broker, as a transport already open.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.broker = Some(Source::Given(transport));
        self
    }

    /// The outbox table (default `herald_outbox`); the inbox and dead-letter tables are named
    /// after it.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The relay's settings (default [`RelayConfig::default`]).
    pub fn relay(mut self, config: RelayConfig) -> Self {
        self.relay = Some(config);
        self
    }

    /// Runs no relay in this process (another process, `herald relay`, publishes the outbox).
    pub fn without_relay(mut self) -> Self {
        self.relay = None;
        self
    }

    /// Settings for the consumers added after this call without their own.
    pub fn consumer_config(mut self, config: ConsumerConfig) -> Self {
        self.consumer_config = config;
        self
    }

    /// Whether `build` creates or upgrades herald's tables (default: yes).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Consumes every event published to `topic` as `service` (its own copy; instances of one
    /// service share the work), through `handler` (a [`Router`](herald_sql::Router) or any
    /// [`Handler`]) in the inbox transaction.
    pub fn events<H: Handler<D::DB>>(
        self,
        topic: impl Into<String>,
        service: impl Into<String>,
        handler: H,
    ) -> Self {
        self.consumer(Subscription::events(topic, service), handler)
    }

    /// Owns the command queue `queue` as `service`: every command sent to it is handled here.
    pub fn commands<H: Handler<D::DB>>(
        self,
        queue: impl Into<String>,
        service: impl Into<String>,
        handler: H,
    ) -> Self {
        self.consumer(Subscription::commands(queue, service), handler)
    }

    /// A consumer of `subscription` (with its prefetch, say) through `handler`.
    pub fn consumer<H: Handler<D::DB>>(mut self, subscription: Subscription, handler: H) -> Self {
        let make: MakeApply<D> = Box::new(move |pool, table| {
            Ok(Arc::new(Applier::<D, H>::new(pool, table, handler)?)
                as Arc<dyn herald_core::Apply>)
        });
        let config = self.consumer_config.clone();
        self.consumers.push((subscription, config, make));
        self
    }

    /// Connects, creates herald's tables (unless [`migrate(false)`](Self::migrate)) and builds
    /// the relay and the consumers. Everything that can be wrong with the configuration fails
    /// here, before anything runs.
    pub async fn build(self) -> Result<Host<D>> {
        let table = Identifier::new(&self.table)?;
        if let Some(relay) = &self.relay {
            relay.validate()?;
        }
        let (pool, database_url) = match self.database {
            None => {
                return Err(Error::config(
                    "the host needs a database: .database(url) or .pool(pool)",
                ));
            }
            Some(Source::Given(pool)) => (pool, None),
            Some(Source::Url(raw)) => {
                let url = connect::parse_url("database", &raw)?;
                (open_pool::<D>(&url).await?, Some(url))
            }
        };
        let transport = match self.broker {
            Some(Source::Given(t)) => t,
            Some(Source::Url(raw)) => {
                connect::open_transport(&connect::parse_url("broker", &raw)?).await?
            }
            None => {
                let default = match &database_url {
                    Some(url) => connect::broker_or_default(None, url)?,
                    None if D::SCHEME == "sqlite" => connect::DEFAULT_BROKER.to_owned(),
                    None => {
                        return Err(Error::config(format!(
                            "the host needs a broker with a {} database: .broker(url) or .transport(t)",
                            D::SCHEME
                        )));
                    }
                };
                connect::open_transport(&connect::parse_url("broker", &default)?).await?
            }
        };
        if self.migrate {
            herald_sql::migrate::<D>(&pool, &table).await?;
        }
        let relay = match self.relay {
            Some(config) => {
                let store = SqlOutbox::<D>::new(pool.clone(), table.clone()).await?;
                Some(Relay::new(Arc::new(store), transport.clone(), config)?)
            }
            None => None,
        };
        let mut consumers = Vec::with_capacity(self.consumers.len());
        for (subscription, config, make) in self.consumers {
            let apply = make(pool.clone(), &table)?;
            consumers.push(Consumer::new(
                transport.clone(),
                apply,
                subscription,
                config,
            )?);
        }
        Ok(Host {
            writer: OutboxWriter::new(&table),
            pool,
            table,
            transport,
            relay,
            consumers,
            started: Arc::new(AtomicBool::new(false)),
        })
    }
}

async fn open_pool<D: Backend>(url: &SecretUrl) -> Result<Pool<D::DB>> {
    let scheme = match url.scheme() {
        "postgresql" => "postgres",
        "mariadb" => "mysql",
        other => other,
    };
    if scheme != D::SCHEME {
        let hint = match scheme {
            "postgres" | "mysql" | "sqlite" => format!("; use herald::{scheme}::Host"),
            _ => String::new(),
        };
        return Err(Error::config(format!(
            "this host is for {} but the database URL {url} is {}://{hint}",
            D::SCHEME,
            url.scheme(),
        )));
    }
    let db = connect::open_database(url, None).await?;
    D::pool_of(db).ok_or_else(|| Error::config(format!("{url} is not a {} database", D::SCHEME)))
}

/// One service's herald: its database, broker, outbox writer, relay and consumers. Build it
/// with [`Host::builder`]; run it with [`run`](Self::run), [`run_until_signal`](Self::run_until_signal)
/// or [`start`](Self::start).
pub struct Host<D: Backend> {
    pool: Pool<D::DB>,
    table: Identifier,
    writer: OutboxWriter<D>,
    transport: Arc<dyn Transport>,
    relay: Option<Relay>,
    consumers: Vec<Consumer>,
    started: Arc<AtomicBool>,
}

impl<D: Backend> Host<D> {
    /// A builder with the defaults: outbox `herald_outbox`, a relay with
    /// [`RelayConfig::default`], tables migrated at build.
    pub fn builder() -> HostBuilder<D> {
        HostBuilder {
            database: None,
            broker: None,
            table: "herald_outbox".to_owned(),
            relay: Some(RelayConfig::default()),
            consumer_config: ConsumerConfig::default(),
            migrate: true,
            consumers: Vec::new(),
        }
    }

    /// The database pool: begin the service's transactions on it.
    pub fn pool(&self) -> &Pool<D::DB> {
        &self.pool
    }

    /// Begins a transaction on the pool: the service's business rows and the messages it
    /// writes with [`writer`](Self::writer) commit together.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, D::DB>> {
        self.pool
            .begin()
            .await
            .map_err(|e| herald_sql::db::<D>("beginning a transaction", e))
    }

    /// Writes messages into the outbox in the caller's transaction.
    pub fn writer(&self) -> &OutboxWriter<D> {
        &self.writer
    }

    /// The outbox table.
    pub fn table(&self) -> &Identifier {
        &self.table
    }

    /// The broker.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The relay, unless built [`without_relay`](HostBuilder::without_relay).
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// The consumers, in the order they were added.
    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    /// A statement in SQL written once for every database (`?` placeholders), for the service's
    /// own tables: `host.statement("INSERT ...").int(7).execute(&mut *tx)`.
    pub fn statement(&self, sql: &str) -> Statement<D> {
        Statement::new(sql)
    }

    /// Declares on the broker what every consumer needs (queues, bindings, streams, consumer
    /// groups), so that nothing published from now on is missed: an event published before a
    /// service's queue exists is not delivered to it, and a command before its owner's queue
    /// exists is refused. [`start`](Self::start) does this first; call it yourself to declare
    /// without consuming (at deploy time, say).
    pub async fn declare(&self) -> Result<()> {
        for consumer in &self.consumers {
            consumer.declare().await?;
        }
        Ok(())
    }

    /// Declares the topology, then starts the relay (which logs unsafe durability settings as it
    /// starts) and the consumers in the background; [`Running::stop`] stops them.
    pub async fn start(&self) -> Result<Running> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(Error::config(
                "this host is already running: stop it (Running::stop) before starting it again",
            ));
        }
        let guard = Started(self.started.clone());
        self.declare().await?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        // A part that stops on its own says so at once, whether or not anyone waits on it.
        let reported = |name: String, r: Result<()>| {
            if let Err(e) = &r {
                tracing::error!(part = %name, error = %e.chain(), "stopped with an error it cannot retry");
            }
            (name, r)
        };
        if let Some(relay) = &self.relay {
            let (relay, rx) = (relay.clone(), stopped.clone());
            tasks.spawn(async move { reported("relay".to_owned(), relay.run(until(rx)).await) });
        }
        for consumer in &self.consumers {
            let (consumer, rx) = (consumer.clone(), stopped.clone());
            let name = format!("consumer {}", consumer.subscription().service);
            tasks.spawn(async move { reported(name, consumer.run(until(rx)).await) });
        }
        info!(broker = %self.transport.describe(), relay = self.relay.is_some(), consumers = self.consumers.len(), "herald host started");
        Ok(Running {
            stop,
            tasks,
            _started: guard,
        })
    }

    /// Runs until `shutdown` completes, then stops everything gracefully: in-flight batches are
    /// published and marked, deliveries being handled commit and are acknowledged. Returns the
    /// first error that stopped a part early (which stops the rest too).
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut running = self.start().await?;
        let early = tokio::select! {
            () = shutdown => None,
            failed = running.failure() => Some(failed),
        };
        let stopped = running.stop().await;
        match early {
            Some(e) => Err(e),
            None => stopped,
        }
    }

    /// [`run`](Self::run) until SIGTERM or Ctrl-C.
    pub async fn run_until_signal(&self) -> Result<()> {
        self.run(shutdown_signal()).await
    }
}

/// SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A started host: [`Host::start`]. Stop it with [`stop`](Self::stop); dropping it instead
/// aborts every part at once (no loss: what was in flight is published or delivered again), and
/// the host may be started again before the aborted tasks have wound down.
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: JoinSet<(String, Result<()>)>,
    _started: Started,
}

/// Marks the host as running until dropped (after every part stopped).
struct Started(Arc<AtomicBool>);

impl Drop for Started {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Running {
    /// Waits until a part stops on its own with an error it cannot retry (a missing table, a
    /// refused login) and returns it; never returns while every part runs. The others keep
    /// running: stop them with [`stop`](Self::stop).
    pub async fn failure(&mut self) -> Error {
        loop {
            match self.tasks.join_next().await {
                Some(Ok((_, Err(e)))) => return e,
                Some(Ok((name, Ok(())))) => info!(part = %name, "stopped"),
                Some(Err(e)) => return Error::unavailable("a host task (it panicked)", e),
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Stops every part gracefully and waits for them; returns the first error any of them
    /// ended with.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first = None;
        while let Some(joined) = self.tasks.join_next().await {
            let failed = match joined {
                Ok((_, Ok(()))) => None,
                Ok((_, Err(e))) => Some(e),
                Err(e) => Some(Error::unavailable("a host task (it panicked)", e)),
            };
            if first.is_none() {
                first = failed;
            }
        }
        first.map_or(Ok(()), Err)
    }
}
