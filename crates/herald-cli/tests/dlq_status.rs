//! `herald dlq` and `herald status` on a SQLite database with dead letters on both sides and a
//! lagging consumer group on the embedded broker (no servers needed).

use std::process::{Command, Output, Stdio};

fn herald(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("HERALD_LOG", "error")
        .env_remove("HERALD_DATABASE_URL")
        .env_remove("HERALD_BROKER_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn count(pool: &sqlx::SqlitePool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn dead_letters_can_be_listed_shown_replayed_and_purged() {
    let dir = std::env::temp_dir().join(format!("herald-dlq-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}/app.db", dir.display());
    let broker = format!("sqlite://{}/broker.db", dir.display());
    ok(&herald(&["migrate", "--database", &db]));
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    // An undecodable row, a command nobody owns, and a good event.
    sqlx::query("INSERT INTO herald_outbox (message_type, destination, headers, payload) VALUES ('Bad', 'orders', 'not json', x'00')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO herald_outbox (kind, message_type, destination, payload) VALUES ('command', 'Charge', 'billing', x'01')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO herald_outbox (message_type, destination, payload) VALUES ('OrderPlaced', 'orders', x'02')")
        .execute(&pool)
        .await
        .unwrap();
    ok(&herald(&[
        "relay",
        "--database",
        &db,
        "--broker",
        &broker,
        "--until-empty",
        "--max-attempts",
        "1",
        "--retry-window",
        "0s",
    ]));
    // A consumer-side dead letter, as the consumer runtime writes it.
    sqlx::query(
        "INSERT INTO herald_outbox_consumer_dead_letter (consumer, message_id, message_type, destination, payload, attempts, reason) \
         VALUES ('email', '0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b', 'OrderPlaced', 'orders', x'02', 5, 'handler failed: smtp down')",
    )
    .execute(&pool)
    .await
    .unwrap();

    let list = ok(&herald(&["dlq", "list", "--database", &db]));
    assert!(list.contains("3 dead letter(s)"), "{list}");
    assert!(
        list.contains("cannot decode outbox row: headers are not a JSON object"),
        "{list}"
    );
    assert!(list.contains("no service owns command queue"), "{list}");
    assert!(list.contains("smtp down"), "{list}");
    let only = ok(&herald(&[
        "dlq",
        "list",
        "--database",
        &db,
        "--side",
        "relay",
        "--type",
        "Charge",
    ]));
    assert!(
        only.contains("1 dead letter(s)") && only.contains("billing"),
        "{only}"
    );

    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM herald_outbox_dead_letter WHERE message_type = 'Charge'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let shown = ok(&herald(&[
        "dlq",
        "show",
        "--database",
        &db,
        "--side",
        "relay",
        &id.to_string(),
    ]));
    assert!(
        shown.contains("destination:   billing") && shown.contains("kind:          command"),
        "{shown}"
    );

    // Replay puts the command back into the outbox, in its own transaction.
    let replayed = ok(&herald(&[
        "dlq",
        "replay",
        "--database",
        &db,
        "--side",
        "relay",
        "--id",
        &id.to_string(),
        "--yes",
    ]));
    assert!(replayed.contains("replayed 1"), "{replayed}");
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM herald_outbox WHERE message_type = 'Charge'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM herald_outbox_dead_letter").await,
        1
    );

    // Consumer-side replay marks the row for the consumer of its service.
    ok(&herald(&[
        "dlq",
        "replay",
        "--database",
        &db,
        "--side",
        "consumer",
        "--consumer",
        "email",
        "--yes",
    ]));
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM herald_outbox_consumer_dead_letter WHERE replay_requested = 1"
        )
        .await,
        1
    );

    // Purge refuses without a terminal or --yes, then deletes with --yes.
    let refused = herald(&["dlq", "purge", "--database", &db, "--side", "relay"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("add --yes"));
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM herald_outbox_dead_letter").await,
        1
    );
    ok(&herald(&[
        "dlq",
        "purge",
        "--database",
        &db,
        "--side",
        "relay",
        "--yes",
    ]));
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM herald_outbox_dead_letter").await,
        0
    );

    // Status: one pending (the replayed command), a consumer dead letter, and a lagging group.
    let bpool = sqlx::SqlitePool::connect(&broker).await.unwrap();
    sqlx::query("INSERT INTO herald_group_offset (grp, destination, acked, handed) VALUES ('analytics', 'orders', 0, 0)")
        .execute(&bpool)
        .await
        .unwrap();
    let status = ok(&herald(&["status", "--database", &db, "--broker", &broker]));
    assert!(
        status.contains("total: pending=1 dead_letters=0 consumer_dead_letters=1"),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("analytics") && l.contains("orders") && l.contains(" 1 ")),
        "{status}"
    );
    // The same facts for scripts.
    let json: serde_json::Value = serde_json::from_str(&ok(&herald(&[
        "status",
        "--database",
        &db,
        "--broker",
        &broker,
        "--json",
    ])))
    .expect("status --json prints one JSON object");
    assert_eq!(json["total"]["pending"], 1);
    assert_eq!(json["total"]["dead_letters"], 0);
    assert_eq!(json["total"]["consumer_dead_letters"], 1);
    let orders = json["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["pending"] == 1)
        .expect("the pending destination");
    assert!(orders["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    let group = json["consumer_groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "analytics")
        .expect("the analytics group");
    assert_eq!(group["destination"], "orders");
    assert_eq!(group["lag"], 1);
    assert!(json["relays"].is_array());
    std::fs::remove_dir_all(&dir).ok();
}
