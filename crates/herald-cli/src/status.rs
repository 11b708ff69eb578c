//! `herald status`: outbox depth per destination.

use std::process::ExitCode;
use std::time::SystemTime;

use crate::DbArgs;
use crate::backends;

pub async fn run(args: DbArgs) -> anyhow::Result<ExitCode> {
    let url = backends::parse_url("database", &args.database)?;
    let table = herald::Identifier::new(&args.table)?;
    let db = backends::open_database(&url, None).await?;
    let store = backends::open_store(&db, &table).await?;
    let stats = store.stats().await?;
    println!(
        "{:<32} {:>10} {:>14} {:>12}",
        "destination", "pending", "oldest age", "dead letters"
    );
    let (mut pending, mut dead) = (0, 0);
    for s in &stats {
        let age = s
            .oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
        println!(
            "{:<32} {:>10} {:>14} {:>12}",
            s.destination, s.pending, age, s.dead_letters
        );
        pending += s.pending;
        dead += s.dead_letters;
    }
    println!("total: pending={pending} dead_letters={dead}");
    Ok(ExitCode::SUCCESS)
}
