//! What truly differs between the databases: placeholders, time arithmetic, list binding,
//! upserts, error classification, the partition hash, locks and the durability checks.

use async_trait::async_trait;
use herald_core::{Identifier, Result};

use crate::db::{SqlDb, Stmt};
use crate::migrate::Migration;
use crate::outbox::SqlOutbox;

/// How an applier decides that a message's version is newer than the last one applied for its
/// key, and records it.
pub enum VersionCheck {
    /// One statement, bound `(consumer, key, version)`, that stores the version and returns a row
    /// only if it was newer.
    Upsert(String),
    /// Read the last version (bound `(consumer, key)`, locking the row), then, if newer, store
    /// it (bound `(consumer, key, version)`).
    ReadThenWrite {
        /// Reads `version`.
        read: String,
        /// Stores the version.
        write: String,
    },
}

/// One database's SQL. The generic code in this crate writes portable SQL with `?` placeholders
/// and identifiers quoted by [`quote`](Dialect::quote); a dialect renders it and supplies the
/// pieces that differ. Backend crates implement it on a unit struct.
#[async_trait]
pub trait Dialect: Sized + Send + Sync + 'static {
    /// The sqlx database.
    type DB: SqlDb;

    /// The database's name in messages ("PostgreSQL").
    const NAME: &'static str;

    /// Whether DDL runs inside a transaction (and rolls back with it).
    const TRANSACTIONAL_DDL: bool;

    /// Statement run on a pooled connection before the relay's write transactions (a
    /// per-transaction isolation level), if any.
    const BEFORE_WRITE_TX: Option<&'static str> = None;

    /// The statement that begins a transaction which reads, then writes what it read (SQLite
    /// takes the write lock at once; elsewhere row locks do the work).
    const LOCKING_BEGIN: Option<&'static str> = None;

    /// The suffix of a `SELECT` that locks the rows it reads for update (empty where the
    /// transaction itself is exclusive).
    const FOR_UPDATE: &'static str = " FOR UPDATE";

    /// A statement that bounds, for the rest of the transaction, how long it waits for a lock
    /// and how long it may sit idle (`ms` milliseconds), if the database can: a relay paused
    /// inside a takeover must not hold the others up for longer.
    fn bound_waits(ms: u64) -> Option<String> {
        let _ = ms;
        None
    }

    /// A quoted identifier.
    fn quote(ident: &Identifier) -> String {
        format!("\"{ident}\"")
    }

    /// `sql` with its `?` placeholders in this database's style. The generic SQL never has `?`
    /// inside a literal.
    fn render(sql: &str) -> String {
        sql.to_owned()
    }

    /// Whether `e` is worth retrying: a lost connection, a pool timeout, a deadlock, a
    /// serialization failure, a server shutting down.
    fn is_transient(e: &sqlx::Error) -> bool;

    /// Whether `e` is a unique-key violation.
    fn is_unique_violation(e: &sqlx::Error) -> bool {
        e.as_database_error()
            .is_some_and(|d| d.is_unique_violation())
    }

    /// Rows a statement touched.
    fn rows_affected(r: &<Self::DB as sqlx::Database>::QueryResult) -> u64;

    /// The id an `INSERT` assigned, for databases without `INSERT ... RETURNING` (`None` where
    /// [`RETURNING_ID`](Dialect::RETURNING_ID) is used).
    fn last_insert_id(r: &<Self::DB as sqlx::Database>::QueryResult) -> Option<i64>;

    /// Whether `INSERT ... RETURNING id` returns the new id.
    const RETURNING_ID: bool;

    /// An expression for a time column's value from `param`, an integer of microseconds since
    /// the Unix epoch.
    fn time_from_micros(param: &str) -> String;

    /// An expression for the database clock plus `param` microseconds (negative for the past),
    /// in a time column's type.
    fn now_plus_micros(param: &str) -> String;

    /// The database clock, in a time column's type.
    fn now() -> String;

    /// The partition (of `n`) of the outbox row aliased `o`: a hash of its `ordering_key`, or
    /// its `id` when it has none, as a non-negative integer below `n`. `None` where the
    /// database offers no hash: its outbox has a single partition.
    fn partition_of(n: u32) -> Option<String>;

    /// The selected expression for time column `col` as [`read_micros`](Dialect::read_micros)
    /// reads it back.
    fn select_micros(col: &str) -> String;

    /// Reads the column selected by [`select_micros`](Dialect::select_micros): microseconds since
    /// the epoch, `Ok(None)` for `NULL`, an error (naming no value) for a time that does not fit.
    fn read_micros(
        row: &<Self::DB as sqlx::Database>::Row,
        col: &str,
    ) -> std::result::Result<Option<i64>, String>;

    /// `param` as a message id (a UUID column on PostgreSQL, text elsewhere).
    fn uuid_param(param: &str) -> String {
        param.to_owned()
    }

    /// `param` as the headers column (JSON).
    fn json_param(param: &str) -> String {
        param.to_owned()
    }

    /// A text column selected as text (PostgreSQL casts UUID and JSON columns).
    fn select_text(col: &str) -> String {
        col.to_owned()
    }

    /// A bytes column selected as bytes (SQLite casts, since any value may sit in a column).
    fn select_bytes(col: &str) -> String {
        col.to_owned()
    }

    /// The smallest time of column `col` over a group, selected as
    /// [`read_micros`](Dialect::read_micros) reads it back.
    fn min_micros(col: &str) -> String {
        Self::select_micros(&format!("MIN({col})"))
    }

    /// The expression a text column is grouped by in reports.
    fn group_text(col: &str) -> String {
        col.to_owned()
    }

    /// A condition that boolean flag `col` is set.
    fn is_set(col: &str) -> String {
        format!("{col} <> 0")
    }

    /// `col` as a 64-bit integer.
    fn cast_int(col: &str) -> String {
        format!("CAST({col} AS BIGINT)")
    }

    /// The larger of two expressions.
    fn greatest(a: &str, b: &str) -> String {
        format!("GREATEST({a}, {b})")
    }

    /// Text concatenation.
    fn concat(a: &str, b: &str) -> String {
        format!("{a} || {b}")
    }

    /// The boolean literal for true.
    fn true_literal() -> &'static str {
        "TRUE"
    }

    /// A condition that `col` is one of `n` ids, bound by [`bind_ids`](Dialect::bind_ids).
    fn id_in(col: &str, n: usize) -> String {
        format!("{col} IN ({})", vec!["?"; n].join(", "))
    }

    /// Binds the ids of [`id_in`](Dialect::id_in).
    fn bind_ids(stmt: Stmt<Self::DB>, ids: &[i64]) -> Stmt<Self::DB> {
        stmt.ints(ids)
    }

    /// The inbox insert, bound `(consumer, message_id)`: touches no row for a message already
    /// recorded, or fails with a unique violation that leaves the transaction usable (MySQL).
    fn inbox_insert(inbox: &str) -> String {
        format!(
            "INSERT INTO {inbox} (consumer, message_id) VALUES (?, {}) ON CONFLICT DO NOTHING",
            Self::uuid_param("?")
        )
    }

    /// The start of the statement marking rows published, up to `WHERE {fence}` (the fence
    /// binds the incarnation; the generic code appends the id condition).
    fn complete_head(table: &str, fence: &str) -> String {
        format!("DELETE FROM {table} WHERE {fence}")
    }

    /// The start of the statement leaving rows unpublished with a reason, binding
    /// `last_error`, then the fence's incarnation.
    fn release_head(table: &str, fence: &str) -> String {
        format!("UPDATE {table} SET last_error = ? WHERE {fence}")
    }

    /// The version check of [`skip_stale_versions`](crate::Applier::skip_stale_versions).
    fn version_check(versions: &str) -> VersionCheck {
        VersionCheck::Upsert(format!(
            "INSERT INTO {versions} AS v (consumer, ordering_key, version) VALUES (?, ?, ?) \
             ON CONFLICT (consumer, ordering_key) DO UPDATE SET version = excluded.version \
             WHERE v.version < excluded.version RETURNING version"
        ))
    }

    /// Deletes at most `?` (the last bound value) rows of `table` matching `condition`.
    fn delete_limited(table: &str, condition: &str) -> String;

    /// The columns of `table`, or `None` if it does not exist; refuses a table the outbox cannot
    /// live in (MySQL: not InnoDB).
    async fn table_columns(
        conn: &mut <Self::DB as sqlx::Database>::Connection,
        table: &Identifier,
    ) -> Result<Option<Vec<String>>>;

    /// Settings under which a published event's transaction could vanish in a crash.
    async fn durability_warnings(outbox: &SqlOutbox<Self>) -> Result<Vec<String>>;

    /// The versioned migrations, in order.
    fn migrations() -> &'static [Migration];

    /// The statement that begins a migration's transaction (where DDL is transactional).
    const MIGRATION_BEGIN: &'static str = "BEGIN";

    /// `CREATE TABLE IF NOT EXISTS` for the table that records applied migrations (`version`
    /// integer primary key, `description` text, `applied_at` defaulting to now).
    fn migrations_table(name: &str) -> String;

    /// Takes the lock that keeps concurrent migrations apart, on `conn` (released by
    /// [`unlock_migrations`](Dialect::unlock_migrations) or at the end of the transaction).
    async fn lock_migrations(conn: &mut <Self::DB as sqlx::Database>::Connection) -> Result<()>;

    /// Releases the lock of [`lock_migrations`](Dialect::lock_migrations), if it outlives
    /// transactions.
    async fn unlock_migrations(conn: &mut <Self::DB as sqlx::Database>::Connection) {
        let _ = conn;
    }
}
