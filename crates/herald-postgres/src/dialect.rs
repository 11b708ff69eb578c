//! PostgreSQL's SQL: `$n` placeholders, timestamptz arithmetic, arrays, the `hashtext`
//! partitions and the durability checks.

use async_trait::async_trait;
use herald_core::message::micros_from_epoch_text;
use herald_core::{Identifier, Result};
use herald_sql::{Dialect, Migration, SqlOutbox, Stmt, db, is_connection_error};
use sqlx::{AssertSqlSafe, Postgres};

/// PostgreSQL's [`Dialect`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PgDialect;

#[async_trait]
impl Dialect for PgDialect {
    type DB = Postgres;
    const NAME: &'static str = "PostgreSQL";
    const TRANSACTIONAL_DDL: bool = true;
    const RETURNING_ID: bool = true;

    fn render(sql: &str) -> String {
        let mut out = String::with_capacity(sql.len() + 16);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Lost connections, pool timeouts, serialization failures, deadlocks and server shutdowns.
    fn is_transient(e: &sqlx::Error) -> bool {
        is_connection_error(e)
            || e.as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| {
                    c.starts_with("08")
                        || matches!(c.as_ref(), "40001" | "40P01" | "57P01" | "57P02" | "57P03")
                })
    }

    fn rows_affected(r: &sqlx::postgres::PgQueryResult) -> u64 {
        r.rows_affected()
    }

    fn last_insert_id(_: &sqlx::postgres::PgQueryResult) -> Option<i64> {
        None
    }

    fn time_from_micros(param: &str) -> String {
        format!("('epoch'::timestamptz + {param}::float8 * interval '1 microsecond')")
    }

    fn now_plus_micros(param: &str) -> String {
        format!("(now() + {param}::float8 * interval '1 microsecond')")
    }

    fn now() -> String {
        "now()".to_owned()
    }

    fn bound_waits(ms: u64) -> Option<String> {
        Some(format!(
            "SELECT set_config('lock_timeout', '{ms}ms', true), \
             set_config('idle_in_transaction_session_timeout', '{ms}ms', true)"
        ))
    }

    fn partition_of(n: u32) -> Option<String> {
        Some(format!(
            "((CASE WHEN o.ordering_key IS NULL THEN o.id ELSE hashtext(o.ordering_key) END) & 2147483647) % {n}"
        ))
    }

    /// As text, so that no time fails the statement: `'infinity'` or the year 294276 becomes
    /// that row's error in Rust. (`::numeric` and `isfinite` keep it so on PostgreSQL 13, where
    /// extract returns a double that prints as `1e-05` and cannot cast infinity.)
    fn select_micros(col: &str) -> String {
        format!(
            "CASE WHEN isfinite({col}) THEN extract(epoch FROM {col})::numeric::text ELSE {col}::text END"
        )
    }

    fn read_micros(
        row: &sqlx::postgres::PgRow,
        col: &str,
    ) -> std::result::Result<Option<i64>, String> {
        use sqlx::Row;
        let text: Option<String> = row.try_get(col).map_err(|e| e.to_string())?;
        text.map(|t| micros_from_epoch_text(&t)).transpose()
    }

    fn uuid_param(param: &str) -> String {
        format!("{param}::uuid")
    }

    fn json_param(param: &str) -> String {
        format!("{param}::jsonb")
    }

    fn is_set(col: &str) -> String {
        col.to_owned()
    }

    fn select_text(col: &str) -> String {
        format!("{col}::text")
    }

    fn id_in(col: &str, _n: usize) -> String {
        format!("{col} = ANY(?)")
    }

    fn bind_ids(stmt: Stmt<Postgres>, ids: &[i64]) -> Stmt<Postgres> {
        let ids = ids.to_vec();
        stmt.with(move |q| q.bind(ids))
    }

    /// The relay's own commits need no fsync: a lost mark means the message is published again
    /// (a duplicate, never a loss). `set_config(.., true)` in a one-row join turns the wait off
    /// for this statement's implicit transaction only.
    fn complete_head(table: &str, fence: &str) -> String {
        format!(
            "DELETE FROM {table} o USING (SELECT set_config('synchronous_commit', 'off', true)) s \
             WHERE {fence}"
        )
    }

    fn release_head(table: &str, fence: &str) -> String {
        format!(
            "UPDATE {table} o SET last_error = ? \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) s WHERE {fence}"
        )
    }

    fn delete_limited(table: &str, condition: &str) -> String {
        format!(
            "DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE {condition} LIMIT ?)"
        )
    }

    async fn table_columns(
        conn: &mut sqlx::PgConnection,
        table: &Identifier,
    ) -> Result<Option<Vec<String>>> {
        let have: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(table.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db::<Self>("reading the table's columns", e))?;
        Ok((!have.is_empty()).then_some(have))
    }

    async fn durability_warnings(outbox: &SqlOutbox<Self>) -> Result<Vec<String>> {
        let setting = |name: &'static str| async move {
            sqlx::query_scalar::<_, String>(AssertSqlSafe(format!(
                "SELECT current_setting('{name}')"
            )))
            .fetch_one(outbox.pool())
            .await
            .map_err(|e| db::<Self>("checking durability settings", e))
        };
        let mut warnings = Vec::new();
        let sync = setting("synchronous_commit").await?;
        if sync == "off" {
            warnings.push(format!(
                "PostgreSQL synchronous_commit={sync}: a transaction the relay already published can vanish in a \
                 server crash (a phantom event). Set synchronous_commit=on for the application's role."
            ));
        }
        if setting("fsync").await? == "off" {
            warnings.push(
                "PostgreSQL fsync=off: committed outbox rows (and published events' transactions) can be lost in a \
                 crash. Turn fsync on."
                    .to_owned(),
            );
        }
        // Not a durability setting, but the outbox is a queue: every published row is deleted,
        // and without vacuum the dead rows pile up and every claim walks them.
        if setting("autovacuum").await? == "off" {
            warnings.push(format!(
                "PostgreSQL autovacuum=off: the outbox's published (deleted) rows are never vacuumed, so the table \
                 and its indexes grow and claims slow down. Turn autovacuum on, or run VACUUM \"{}\" regularly.",
                outbox.table()
            ));
        }
        Ok(warnings)
    }

    fn migrations() -> &'static [Migration] {
        crate::migrate::MIGRATIONS
    }

    fn migrations_table(name: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {name} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
    }

    async fn lock_migrations(conn: &mut sqlx::PgConnection) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('herald-migrate'))")
            .execute(conn)
            .await
            .map_err(|e| db::<Self>("locking for the migration", e))?;
        Ok(())
    }
}
