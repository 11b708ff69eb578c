//! `herald relay` against rows no producer should write, inserted with plain SQL on SQLite,
//! PostgreSQL and MariaDB, published to the embedded broker, RabbitMQ and NATS: the relay stays
//! up and exits 0 from `--until-empty`, the good rows are all published, each bad row is
//! published or dead-lettered with a reason, and `herald dlq` and `herald status` read every
//! dead letter (bytes that are not UTF-8 included). Also: what the relay's logs never show, and
//! `--until-empty` failing while rows wait for a retry.

use std::process::{Command, Output, Stdio};

mod common;

use common::{amqp_url, mysql_server, nats_url, pg_url};
use sqlx::AssertSqlSafe;

fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", uuid::Uuid::new_v4().as_u64_pair().0)
}

fn herald(args: &[&str], log: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("HERALD_LOG", log)
        .env_remove("RUST_LOG")
        .env_remove("HERALD_DATABASE_URL")
        .env_remove("HERALD_BROKER_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `secret` as client crates print it: as text, as a Debug list of bytes, and as hex.
fn leaked(haystack: &str, secret: &str) -> bool {
    let bytes: Vec<String> = secret.bytes().map(|b| b.to_string()).collect();
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    haystack.contains(secret) || haystack.contains(&bytes.join(", ")) || haystack.contains(&hex)
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    stdout
}

/// Relays everything once (bad rows dead-lettered at their first refusal), then checks that the
/// outbox is empty, that `dlq list` shows `dead` dead letters, that `dlq show` prints each, and
/// that replay and purge work on them.
async fn relay_and_read_dead_letters(db: &str, broker: &str, dead: usize, ids: &[i64]) {
    let out = herald(
        &[
            "relay",
            "--database",
            db,
            "--broker",
            broker,
            "--until-empty",
            "--max-attempts",
            "1",
            "--retry-window",
            "0s",
        ],
        "warn",
    );
    let summary = ok(&out);
    assert!(
        summary.contains(&format!("dead_lettered={dead}")),
        "{summary}"
    );
    // Each dead letter is logged, with its reason, at WARN.
    let (_, logs) = text(&out);
    let logged = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("dead-letter"))
        .count();
    assert_eq!(logged, dead, "{logs}");
    let status = ok(&herald(&["status", "--database", db], "error"));
    assert!(status.contains("total: pending=0"), "{status}");
    assert!(status.contains(&format!("dead_letters={dead}")), "{status}");
    let list = ok(&herald(
        &["dlq", "list", "--database", db, "--side", "relay"],
        "error",
    ));
    assert!(list.contains(&format!("{dead} dead letter(s)")), "{list}");
    for id in ids {
        let shown = ok(&herald(
            &[
                "dlq",
                "show",
                "--database",
                db,
                "--side",
                "relay",
                &id.to_string(),
            ],
            "error",
        ));
        assert!(shown.contains("reason:"), "{shown}");
    }
    let purged = ok(&herald(
        &[
            "dlq",
            "purge",
            "--database",
            db,
            "--side",
            "relay",
            "--older-than",
            "0s",
            "--type",
            "nothing-has-this-type",
            "--yes",
        ],
        "error",
    ));
    assert!(purged.contains("no dead letters match"), "{purged}");
    let replayed = ok(&herald(
        &[
            "dlq",
            "replay",
            "--database",
            db,
            "--side",
            "relay",
            "--yes",
        ],
        "error",
    ));
    assert!(replayed.contains(&format!("replayed {dead}")), "{replayed}");
    let status = ok(&herald(&["status", "--database", db], "error"));
    assert!(
        status.contains(&format!("total: pending={dead} dead_letters=0")),
        "the replayed rows are back in the outbox: {status}"
    );
}

#[tokio::test]
async fn sqlite_poison_rows_and_non_utf8_dead_letters() {
    let dir = std::env::temp_dir().join(unique("herald-poison"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}/app.db", dir.display());
    let broker = format!("sqlite://{}/broker.db", dir.display());
    ok(&herald(&["migrate", "--database", &db], "error"));
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    for sql in [
        // Bytes that are not UTF-8 in a text column, a BLOB key, text in the integer time.
        "INSERT INTO herald_outbox (message_type, destination, payload) VALUES (CAST(x'c3fffe' AS TEXT), 'orders', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('T', 'orders', x'00ff', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', 'orders', x'00', 'yesterday')",
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Order\nPlaced', 'orders', 'k1', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, headers, payload) VALUES ('T', 'orders', '{\"X-Tenant\":\"a\"}', x'00')",
        "INSERT INTO herald_outbox (kind, message_type, destination, ordering_key, payload) VALUES ('command', 'Charge', 'nobody', 'k1', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Fine', 'orders', 'k1', x'01')",
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Fine', 'orders', 'k2', x'02')",
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let ids = (1..=6).collect::<Vec<i64>>();
    relay_and_read_dead_letters(&db, &broker, 6, &ids).await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn postgres_poison_rows_on_rabbitmq() {
    let schema = unique("herald_poison");
    let admin = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&admin)
        .await
        .unwrap();
    let db = format!("{}?options[search_path]={schema}", pg_url());
    ok(&herald(&["migrate", "--database", &db], "error"));
    let pool = sqlx::PgPool::connect(&db).await.unwrap();
    let topic = unique("poison-orders");
    let big = "v".repeat(200_000);
    let long = "T".repeat(300);
    for (sql, arg) in [
        (
            "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', $1, '\\x00', 'infinity')",
            "",
        ),
        (
            "INSERT INTO herald_outbox (message_type, destination, payload, created_at) VALUES ('T', $1, '\\x00', '294276-01-01')",
            "",
        ),
        (
            "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('T', $1, E'k\\n1', '\\x00')",
            "",
        ),
        (
            "INSERT INTO herald_outbox (message_type, destination, payload) VALUES ($2, $1, '\\x00')",
            long.as_str(),
        ),
        (
            "INSERT INTO herald_outbox (message_type, destination, headers, payload) VALUES ('T', $1, jsonb_build_object('big', $2::text), '\\x00')",
            big.as_str(),
        ),
        (
            "INSERT INTO herald_outbox (kind, message_type, destination, ordering_key, payload) VALUES ('command', 'Charge', $1 || '-nobody', 'k1', '\\x00')",
            "",
        ),
        (
            "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Fine', $1, 'k1', '\\x01')",
            "",
        ),
        (
            "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Fine', $1, 'k2', '\\x02')",
            "",
        ),
    ] {
        let q = sqlx::query(AssertSqlSafe(sql)).bind(&topic);
        let q = if sql.contains("$2") { q.bind(arg) } else { q };
        q.execute(&pool).await.unwrap();
    }
    let ids: Vec<i64> = (1..=6).collect();
    relay_and_read_dead_letters(&db, &amqp_url(), 6, &ids).await;
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn mysql_poison_rows_on_nats() {
    let name = unique("herald_poison");
    let admin = sqlx::MySqlPool::connect(&format!("{}/test", mysql_server()))
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&admin)
        .await
        .unwrap();
    let db = format!("{}/{name}", mysql_server());
    ok(&herald(&["migrate", "--database", &db], "error"));
    let pool = sqlx::MySqlPool::connect(&db).await.unwrap();
    let topic = unique("poison-orders");
    for sql in [
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('T', ?, 'k\\n1', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, headers, payload) VALUES ('T', ?, '{\"a b\":\"x\"}', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, payload) VALUES ('T', CONCAT(?, '.*'), x'00')",
        "INSERT INTO herald_outbox (message_id, message_type, destination, payload) VALUES ('not-a-uuid', 'T', ?, x'00')",
        "INSERT INTO herald_outbox (message_type, destination, headers, payload) VALUES ('T', CONCAT(?, ' x'), '{}', x'00')",
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Fine', ?, 'k1', x'01')",
        "INSERT INTO herald_outbox (message_type, destination, ordering_key, payload) VALUES ('Fine', ?, 'k2', x'02')",
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .bind(&topic)
            .execute(&pool)
            .await
            .unwrap();
    }
    let ids: Vec<i64> = (1..=5).collect();
    relay_and_read_dead_letters(&db, &nats_url(), 5, &ids).await;
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE `{name}`")))
        .execute(&admin)
        .await
        .unwrap();
}

/// At the most verbose level, with a client crate asked for by name, the relay's logs hold no
/// password (lapin logs the AMQP login frame at TRACE), no payload and no header value (lapin
/// logs a returned message whole at WARN), and no colour codes when stderr is not a terminal.
#[tokio::test]
async fn logs_never_show_passwords_payloads_or_colours() {
    let dir = std::env::temp_dir().join(unique("herald-logs"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}/app.db", dir.display());
    let broker = format!("sqlite://{}/broker.db", dir.display());
    ok(&herald(&["migrate", "--database", &db], "error"));
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query(
        "INSERT INTO herald_outbox (kind, message_type, destination, headers, payload) \
         VALUES ('command', 'Charge', ?1, '{\"tenant\":\"header-sentinel-7\"}', CAST('payload-sentinel-7' AS BLOB))",
    )
    .bind(unique("nobody"))
    .execute(&pool)
    .await
    .unwrap();
    let trace = "trace,lapin=trace,lapin::channel=trace,amq_protocol=trace";

    let wrong = amqp_url().replacen("guest:guest@", "guest:login-sentinel-7@", 1);
    let out = herald(
        &[
            "relay",
            "--database",
            &db,
            "--broker",
            &wrong,
            "--until-empty",
        ],
        trace,
    );
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a refused login is fatal: {stderr}"
    );
    assert!(stderr.contains("refused the login"), "{stderr}");
    assert!(
        !leaked(&stderr, "login-sentinel-7"),
        "password in the logs: {stderr}"
    );

    let out = herald(
        &[
            "relay",
            "--database",
            &db,
            "--broker",
            &amqp_url(),
            "--until-empty",
            "--max-attempts",
            "1",
            "--retry-window",
            "0s",
        ],
        trace,
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("dead_lettered=1"), "{stdout}");
    assert!(stderr.contains("DEBUG"), "the level was honoured: {stderr}");
    for secret in [
        "payload-sentinel-7",
        "header-sentinel-7",
        "guest:guest",
        "\0guest\0guest",
    ] {
        assert!(!leaked(&stderr, secret), "{secret} in the logs");
    }
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a log that is not a terminal"
    );

    sqlx::query("INSERT INTO herald_outbox (message_type, destination, payload) VALUES ('T', 'orders', x'00')")
        .execute(&pool)
        .await
        .unwrap();
    let out = herald(
        &[
            "relay",
            "--database",
            &db,
            "--broker",
            &broker,
            "--until-empty",
            "--log-format",
            "json",
        ],
        "info",
    );
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for l in lines {
        assert!(
            l.starts_with('{') && l.ends_with('}'),
            "not a JSON line: {l}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--until-empty` does not report success while a row waits for its retry: a command whose
/// owner has not subscribed yet stays in the outbox (the retry window is minutes), and the relay
/// exits 1 saying so.
#[tokio::test]
async fn until_empty_fails_while_rows_wait_for_a_retry() {
    let dir = std::env::temp_dir().join(unique("herald-until-empty"));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite://{}/app.db", dir.display());
    ok(&herald(&["migrate", "--database", &db], "error"));
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query("INSERT INTO herald_outbox (kind, message_type, destination, payload) VALUES ('command', 'Charge', 'billing', x'00')")
        .execute(&pool)
        .await
        .unwrap();
    let broker = format!("sqlite://{}/broker.db", dir.display());
    let out = herald(
        &[
            "relay",
            "--database",
            &db,
            "--broker",
            &broker,
            "--until-empty",
        ],
        "error",
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("1 rows remain") && stderr.contains("billing=1"),
        "{stderr}"
    );
    assert!(
        stdout.contains("rejected=1") && stdout.contains("dead_lettered=0"),
        "{stdout}"
    );
    let last_error: String = sqlx::query_scalar("SELECT last_error FROM herald_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        last_error.contains("no service owns command queue"),
        "{last_error}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
