//! Opening databases, outbox stores and brokers from URLs: what `herald relay` does with its
//! flags, for services that configure herald the same way (one URL per thing).
//!
//! Each scheme is there when its backend's feature is on: `postgres://`, `mysql://` (and
//! `mariadb://`), `sqlite://` for databases; `amqp://` and `amqps://` (RabbitMQ), `nats://` and
//! `tls://` (NATS JetStream), `kafka://` (Kafka), `redis://` (Redis Streams) and `sqlite://`
//! (the embedded broker) for brokers.

use std::sync::Arc;
use std::time::Duration;

use herald_core::{Error, Identifier, OutboxStore, Result, SecretUrl, Transport};

/// The embedded broker file used when the database is SQLite and no `--broker` is given.
pub const DEFAULT_BROKER: &str = "sqlite://herald-broker.db";

/// The broker to use: `--broker` if given; without one, the embedded broker only beside a SQLite
/// database. A PostgreSQL or MySQL outbox relayed into a local file by accident would have its
/// rows deleted as "published" while no service ever sees them.
pub fn broker_or_default(broker: Option<&str>, database: &SecretUrl) -> Result<String> {
    match broker {
        Some(b) if b.trim().is_empty() => Err(Error::config(
            "--broker (or HERALD_BROKER_URL) is empty: give the broker URL",
        )),
        Some(b) => Ok(b.to_owned()),
        None if database.scheme() == "sqlite" => Ok(DEFAULT_BROKER.to_owned()),
        None => Err(Error::config(format!(
            "--broker is required with a {} database (amqp://, nats://, kafka://, redis:// or sqlite://path for the embedded broker)",
            database.scheme()
        ))),
    }
}

/// Refuses URL parameters the broker's client would ignore: a `?tls=true` that silently runs in
/// plaintext is worse than an error.
fn check_broker_params(url: &SecretUrl) -> Result<()> {
    let (allowed, hint): (&[&str], &str) = match url.scheme() {
        "amqp" | "amqps" => (
            &[
                "heartbeat",
                "connection_timeout",
                "channel_max",
                "frame_max",
                "auth_mechanism",
            ],
            "for TLS use amqps://",
        ),
        "nats" | "tls" => (&[], "for TLS use tls://host:4222"),
        "kafka" => (&[], "Kafka TLS and SASL are not supported by this build"),
        "redis" => (
            &["protocol"],
            "Redis TLS (rediss://) is not supported by this build",
        ),
        _ => return Ok(()),
    };
    for (name, _) in url.url().query_pairs() {
        if !allowed.contains(&name.as_ref()) {
            let name: String = name.chars().take(40).collect();
            return Err(Error::config(format!(
                "broker URL parameter {name:?} is not supported for {}:// ({hint}); supported: {}",
                url.scheme(),
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// An open application database.
#[derive(Clone)]
pub enum Database {
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// MySQL or MariaDB. Connections run with `ANSI_QUOTES`, so the CLI's own SQL can quote
    /// identifiers with `"` on every database.
    #[cfg(feature = "mysql")]
    MySql(sqlx::MySqlPool),
}

/// Each database scheme, the feature that brings it, and how to write it.
const DATABASES: &[(&str, bool, &str)] = &[
    (
        "postgres",
        cfg!(feature = "postgres"),
        "postgres://user@host/db",
    ),
    (
        "mysql",
        cfg!(feature = "mysql"),
        "mysql://user@host/db (MySQL 8, MariaDB)",
    ),
    ("sqlite", cfg!(feature = "sqlite"), "sqlite://path"),
];

/// Each broker scheme, the feature that brings it, and how to write it.
const BROKERS: &[(&str, bool, &str)] = &[
    (
        "rabbitmq",
        cfg!(feature = "rabbitmq"),
        "amqp://... (RabbitMQ)",
    ),
    (
        "nats",
        cfg!(feature = "nats"),
        "nats://... (NATS JetStream)",
    ),
    (
        "kafka",
        cfg!(feature = "kafka"),
        "kafka://host:9092[,host:9092] (Kafka; kafka://mock for an in-process mock cluster)",
    ),
    (
        "redis",
        cfg!(feature = "redis"),
        "redis://... (Redis Streams)",
    ),
    (
        "embedded",
        cfg!(feature = "embedded"),
        "sqlite://path (embedded)",
    ),
];

/// The schemes this build has, and the features it was built without.
fn supported(all: &[(&str, bool, &str)]) -> String {
    let have: Vec<&str> = all.iter().filter(|b| b.1).map(|b| b.2).collect();
    let missing: Vec<&str> = all.iter().filter(|b| !b.1).map(|b| b.0).collect();
    let mut out = if have.is_empty() {
        "none (no such backend was compiled in)".to_owned()
    } else {
        have.join(", ")
    };
    if !missing.is_empty() {
        out.push_str(&format!(
            "; built without the features {} (rebuild with them to use those)",
            missing.join(", ")
        ));
    }
    out
}

/// A failed connection to the database at `url` (shown without its password).
#[cfg(any(feature = "postgres", feature = "mysql"))]
fn cannot_connect(url: &SecretUrl, e: sqlx::Error) -> Error {
    Error::Database {
        context: format!("connecting to the database at {url} (cannot connect)"),
        transient: herald_sql::is_connection_error(&e),
        source: Box::new(e),
    }
}

/// Parses a URL that may hold a password, without ever echoing it.
pub fn parse_url(what: &str, raw: &str) -> Result<SecretUrl> {
    SecretUrl::parse(what, raw)
}

/// Connects to `url`. `schema`, for PostgreSQL, sets the search path (the demo's own schema); for
/// MySQL it is the database to use.
pub async fn open_database(url: &SecretUrl, schema: Option<&str>) -> Result<Database> {
    // Only the server databases take a schema.
    let _ = &schema;
    match url.scheme() {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let mut opts: sqlx::postgres::PgConnectOptions = url.expose().parse().map_err(|e| {
                Error::config(format!(
                    "database URL {url} is not a valid PostgreSQL URL: {e}"
                ))
            })?;
            if let Some(schema) = schema {
                opts = opts.options([("search_path", schema)]);
            }
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(|e| cannot_connect(url, e))?;
            Ok(Database::Postgres(pool))
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => {
            let raw = url.expose().replacen("mariadb://", "mysql://", 1);
            let mut opts: sqlx::mysql::MySqlConnectOptions = raw.parse().map_err(|e| {
                Error::config(format!("database URL {url} is not a valid MySQL URL: {e}"))
            })?;
            if let Some(schema) = schema {
                opts = opts.database(schema);
            }
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SET SESSION sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES')")
                            .execute(conn)
                            .await?;
                        Ok(())
                    })
                })
                .connect_with(opts)
                .await
                .map_err(|e| cannot_connect(url, e))?;
            Ok(Database::MySql(pool))
        }
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Database::Sqlite(
            herald_sqlite::connect(url.expose()).await?,
        )),
        other => Err(Error::config(format!(
            "database URL scheme {other:?} is not supported by this build: use {}",
            supported(DATABASES)
        ))),
    }
}

/// The relay's view of the outbox in `table`.
pub async fn open_store(db: &Database, table: &Identifier) -> Result<Arc<dyn OutboxStore>> {
    Ok(match db {
        #[cfg(feature = "postgres")]
        Database::Postgres(pool) => {
            Arc::new(herald_postgres::PgOutbox::new(pool.clone(), table.clone()).await?)
        }
        #[cfg(feature = "sqlite")]
        Database::Sqlite(pool) => {
            Arc::new(herald_sqlite::SqliteOutbox::new(pool.clone(), table.clone()).await?)
        }
        #[cfg(feature = "mysql")]
        Database::MySql(pool) => {
            Arc::new(herald_mysql::MySqlOutbox::new(pool.clone(), table.clone()).await?)
        }
    })
}

/// The dead letters beside outbox `table` (relay and consumer side), for `herald dlq` and
/// `herald status`.
pub fn dead_letters(
    db: &Database,
    table: &Identifier,
) -> Result<Box<dyn herald_sql::DeadLetterAdmin>> {
    Ok(match db {
        #[cfg(feature = "postgres")]
        Database::Postgres(pool) => Box::new(
            herald_sql::DeadLetters::<herald_postgres::PgDialect>::new(pool.clone(), table)?,
        ),
        #[cfg(feature = "sqlite")]
        Database::Sqlite(pool) => Box::new(
            herald_sql::DeadLetters::<herald_sqlite::SqliteDialect>::new(pool.clone(), table)?,
        ),
        #[cfg(feature = "mysql")]
        Database::MySql(pool) => Box::new(
            herald_sql::DeadLetters::<herald_mysql::MySqlDialect>::new(pool.clone(), table)?,
        ),
    })
}

/// Creates or upgrades herald's tables; returns the migration versions applied.
pub async fn migrate(db: &Database, table: &Identifier) -> Result<Vec<i64>> {
    Ok(match db {
        #[cfg(feature = "postgres")]
        Database::Postgres(pool) => herald_postgres::migrate(pool, table).await?,
        #[cfg(feature = "sqlite")]
        Database::Sqlite(pool) => herald_sqlite::migrate(pool, table).await?,
        #[cfg(feature = "mysql")]
        Database::MySql(pool) => herald_mysql::migrate(pool, table).await?,
    })
}

/// The broker at `url` (a string; the password is never shown): [`open_transport`] after
/// [`parse_url`].
pub async fn transport(url: &str) -> Result<Arc<dyn Transport>> {
    open_transport(&parse_url("broker", url)?).await
}

/// The broker at `url`: `amqp://` or `amqps://` for RabbitMQ, `nats://` for NATS JetStream,
/// `kafka://` for Kafka, `redis://` for Redis Streams, `sqlite://` for the embedded one.
pub async fn open_transport(url: &SecretUrl) -> Result<Arc<dyn Transport>> {
    check_broker_params(url)?;
    match url.scheme() {
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => {
            let t = herald_rabbitmq::RabbitTransport::new(url.clone())?;
            // A wrong user or password is fatal now; an unreachable broker is retried later.
            match t.check().await {
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e.chain(), "RabbitMQ not reachable yet; the relay retries")
                }
                Ok(()) => {}
            }
            Ok(Arc::new(t))
        }
        #[cfg(feature = "nats")]
        "nats" | "tls" => Ok(Arc::new(
            herald_nats::NatsTransport::connect(url.clone()).await?,
        )),
        // `kafka://mock`: librdkafka's in-process mock cluster, for trying herald out without a
        // Kafka (it lives as long as this process and keeps nothing).
        #[cfg(feature = "kafka")]
        "kafka" if url.expose().trim_end_matches('/') == "kafka://mock" => {
            let cluster = herald_kafka::MockKafka::start(3)?;
            let real = parse_url("broker", &cluster.url())?;
            // Kept for the life of the process: the cluster stops when dropped.
            std::mem::forget(cluster);
            Ok(Arc::new(
                herald_kafka::KafkaTransport::connect(real)
                    .await?
                    .with_topic_creation(false),
            ))
        }
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(
            herald_kafka::KafkaTransport::connect(url.clone()).await?,
        )),
        "rediss" => Err(Error::config(
            "rediss:// (Redis over TLS) is not supported by this build; use redis:// on a trusted network or a TLS tunnel",
        )),
        #[cfg(feature = "redis")]
        "redis" => Ok(Arc::new(
            herald_redis::RedisTransport::connect(url.clone()).await?,
        )),
        #[cfg(feature = "embedded")]
        "sqlite" => Ok(Arc::new(
            herald_embedded::EmbeddedTransport::open(url.expose()).await?,
        )),
        other => Err(Error::config(format!(
            "broker URL scheme {other:?} is not supported by this build: use {}",
            supported(BROKERS)
        ))),
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h`, `7d` or a plain number of seconds. Whether zero is
/// acceptable is for the value's own validation to say.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 500ms, 30s, 2m, 1h or 7d"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?} has an unknown unit; use ms, s, m, h or d")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("3h").unwrap(), Duration::from_secs(3 * 3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("fast").is_err());
        assert!(
            parse_duration("99999999999999999999999d")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn broker_parameters_that_would_be_ignored_are_refused() {
        let nats = SecretUrl::parse("broker", "nats://127.0.0.1:4222?tls=true").unwrap();
        let err = check_broker_params(&nats).unwrap_err().to_string();
        assert!(err.contains("\"tls\"") && err.contains("tls://"), "{err}");
        let amqp = SecretUrl::parse("broker", "amqp://u:p@h/%2f?heartbeat=10").unwrap();
        assert!(check_broker_params(&amqp).is_ok());
        let amqp = SecretUrl::parse("broker", "amqp://u:p@h/%2f?verify=none").unwrap();
        assert!(check_broker_params(&amqp).is_err());
        let db = SecretUrl::parse("database", "postgres://h/db").unwrap();
        assert!(
            broker_or_default(None, &db)
                .unwrap_err()
                .to_string()
                .contains("--broker is required")
        );
        let db = SecretUrl::parse("database", "sqlite://x.db").unwrap();
        assert_eq!(broker_or_default(None, &db).unwrap(), DEFAULT_BROKER);
    }
}
