//! What the outbox-store suite's harness does the same way on every SQL database, written once
//! over herald-sql's dialects. Each backend's harness keeps only what is its own: opening an
//! isolated database and the poison rows only its column types can hold.

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Error, Identifier, Message, OutboxStore, Result};
use herald_sql::{Dialect, OutboxWriter, SqlDb, SqlOutbox, Stmt};
use sqlx::Pool;

use crate::suite::OpenTransaction;

fn e(err: sqlx::Error) -> Error {
    Error::unavailable("the test database", err)
}

/// The relay's store on `table`.
pub async fn store<D: Dialect>(pool: &Pool<D::DB>, table: &Identifier) -> Arc<dyn OutboxStore> {
    Arc::new(
        SqlOutbox::<D>::new(pool.clone(), table.clone())
            .await
            .expect("the outbox store"),
    )
}

/// Writes `messages` in one transaction, committed or rolled back.
pub async fn enqueue<D: Dialect>(
    pool: &Pool<D::DB>,
    table: &Identifier,
    messages: &[Message],
    commit: bool,
) -> Result<()> {
    let writer = OutboxWriter::<D>::new(table);
    let mut tx = pool.begin().await.map_err(e)?;
    for m in messages {
        writer.enqueue(&mut tx, m).await?;
    }
    if commit {
        tx.commit().await.map_err(e)
    } else {
        tx.rollback().await.map_err(e)
    }
}

struct Open<DB: sqlx::Database>(sqlx::Transaction<'static, DB>);

#[async_trait]
impl<DB: sqlx::Database> OpenTransaction for Open<DB> {
    async fn commit(self: Box<Self>) -> Result<()> {
        self.0.commit().await.map_err(e)
    }
}

/// Writes `message` in a transaction left open for the caller to commit.
pub async fn enqueue_open<D: Dialect>(
    pool: &Pool<D::DB>,
    table: &Identifier,
    message: &Message,
) -> Result<Box<dyn OpenTransaction>> {
    let mut tx = pool.begin().await.map_err(e)?;
    OutboxWriter::<D>::new(table)
        .enqueue(&mut tx, message)
        .await?;
    Ok(Box::new(Open(tx)))
}

/// A row as a producer in another language writes it: the four required columns only.
pub async fn insert_plain<D: Dialect>(
    pool: &Pool<D::DB>,
    destination: &str,
    message_type: &str,
    key: &str,
    payload: &[u8],
) -> Result<()> {
    let sql = D::render(
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES (?, ?, ?, ?)",
    );
    let mut conn = pool.acquire().await.map_err(e)?;
    Stmt::<D::DB>::new(&sql)
        .text(message_type)
        .text(destination)
        .text(key)
        .bytes(payload)
        .execute(&mut conn)
        .await
        .map_err(e)?;
    Ok(())
}

/// A row whose headers are a JSON array, not an object.
pub async fn insert_undecodable<D: Dialect>(pool: &Pool<D::DB>, destination: &str) -> Result<()> {
    let sql = D::render(&format!(
        "INSERT INTO herald_outbox (message_type, destination, headers, payload) VALUES ('T', ?, {}, ?)",
        D::json_param("?")
    ));
    let mut conn = pool.acquire().await.map_err(e)?;
    Stmt::<D::DB>::new(&sql)
        .text(destination)
        .text("[1,2]")
        .bytes(&[0])
        .execute(&mut conn)
        .await
        .map_err(e)?;
    Ok(())
}

/// The relay's dead letters: (destination, reason), in id order.
pub async fn dead_letter_reasons<D: Dialect>(pool: &Pool<D::DB>) -> Result<Vec<(String, String)>> {
    let mut conn = pool.acquire().await.map_err(e)?;
    let rows =
        Stmt::<D::DB>::new("SELECT destination, reason FROM herald_outbox_dead_letter ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .map_err(e)?;
    rows.iter()
        .map(|r| {
            Ok((
                <D::DB as SqlDb>::get_text(r, "destination").map_err(e)?,
                <D::DB as SqlDb>::get_text(r, "reason").map_err(e)?,
            ))
        })
        .collect()
}
