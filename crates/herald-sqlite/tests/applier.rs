//! The SQLite consumer side: stale versions, inbox retention, replay of parked messages.

use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::{Applied, Apply};
use herald_core::{BoxError, Identifier, Message};
use herald_sqlite::{SqliteApplier, SqliteHandler, connect, migrate};
use sqlx::SqliteConnection;

struct Count;

#[async_trait]
impl SqliteHandler for Count {
    async fn handle(&self, tx: &mut SqliteConnection, m: &Message) -> Result<(), BoxError> {
        sqlx::query("INSERT INTO applied (message_id) VALUES (?1)")
            .bind(m.id.to_string())
            .execute(tx)
            .await?;
        Ok(())
    }
}

async fn setup() -> (sqlx::SqlitePool, Identifier, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(herald_testkit::unique("herald-applier"));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = connect(&format!("sqlite://{}/app.db", dir.display()))
        .await
        .unwrap();
    let table = Identifier::new("herald_outbox").unwrap();
    migrate(&pool, &table).await.unwrap();
    sqlx::query("CREATE TABLE applied (message_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    (pool, table, dir)
}

fn versioned(key: &str, v: &str) -> Message {
    Message::event("products", "ProductChanged", b"{}".to_vec())
        .with_key(key)
        .with_header("version", v)
}

#[tokio::test]
async fn stale_versions_are_skipped_per_key() {
    let (pool, table, dir) = setup().await;
    let a = SqliteApplier::new(pool.clone(), &table, Count)
        .unwrap()
        .skip_stale_versions("version");
    assert_eq!(
        a.apply("svc", &versioned("p1", "2"), None).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        a.apply("svc", &versioned("p1", "1"), None).await.unwrap(),
        Applied::Stale
    );
    assert_eq!(
        a.apply("svc", &versioned("p1", "2"), None).await.unwrap(),
        Applied::Stale,
        "same version, new id"
    );
    assert_eq!(
        a.apply("svc", &versioned("p2", "1"), None).await.unwrap(),
        Applied::Done,
        "keys are independent"
    );
    assert_eq!(
        a.apply("svc", &versioned("p1", "3"), None).await.unwrap(),
        Applied::Done
    );
    let err = a
        .apply("svc", &versioned("p1", "x"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an integer version"), "{err}");
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM applied")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 3);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn inbox_retention_purges_in_batches() {
    let (pool, table, dir) = setup().await;
    let a = SqliteApplier::new(pool.clone(), &table, Count).unwrap();
    for _ in 0..5 {
        a.apply("svc", &Message::event("t", "E", vec![]), None)
            .await
            .unwrap();
    }
    assert_eq!(
        a.purge_inbox(Duration::from_secs(3600), 10).await.unwrap(),
        0,
        "nothing is an hour old"
    );
    assert_eq!(
        a.purge_inbox(Duration::ZERO, 2).await.unwrap(),
        2,
        "at most one batch"
    );
    assert_eq!(a.purge_inbox(Duration::ZERO, 10).await.unwrap(), 3);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn a_marked_dead_letter_is_applied_once_and_removed() {
    let (pool, table, dir) = setup().await;
    let a = SqliteApplier::new(pool.clone(), &table, Count).unwrap();
    let m = Message::event("t", "E", b"x".to_vec()).with_key("k");
    a.dead_letter("svc", &m, "handler failed: boom", 5)
        .await
        .unwrap();
    assert!(
        a.replays("svc", 10).await.unwrap().is_empty(),
        "not marked yet"
    );
    sqlx::query("UPDATE herald_outbox_consumer_dead_letter SET replay_requested = 1")
        .execute(&pool)
        .await
        .unwrap();
    let replays = a.replays("svc", 10).await.unwrap();
    assert_eq!(replays.len(), 1);
    assert_eq!(replays[0].message, m);
    assert_eq!(
        a.apply("svc", &replays[0].message, Some(replays[0].id))
            .await
            .unwrap(),
        Applied::Done
    );
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM herald_outbox_consumer_dead_letter")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        left, 0,
        "the dead letter is removed in the same transaction as the effect"
    );
    std::fs::remove_dir_all(dir).ok();
}
