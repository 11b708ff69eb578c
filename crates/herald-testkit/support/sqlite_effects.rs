// The consumer side of the inbox and consumer suites on SQLite, in a file of its own (included
// with `#[path]`, so the testkit itself links no database driver).

use herald_sqlite::{SqliteDialect, connect};
use herald_testkit::sql_effects::SqlEffects;

pub type SqliteEffects = SqlEffects<SqliteDialect>;

pub async fn open() -> SqliteEffects {
    let dir = std::env::temp_dir().join(herald_testkit::unique("herald-consumer-test"));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = connect(&format!("sqlite://{}/app.db", dir.display()))
        .await
        .unwrap();
    SqlEffects::new(
        pool,
        "CREATE TABLE effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, message_id TEXT NOT NULL, ordering_key TEXT)",
        None,
        Some(dir),
    )
    .await
}
