//! `herald dlq`: list, show, replay and purge dead letters, on the relay's side (messages the
//! broker refused or that could not be read from the outbox) and on the consumers' side
//! (messages a handler kept failing on, or that could not be decoded).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use herald::message::{from_micros, rfc3339, to_micros};
use sqlx::Row;

use crate::backends::{self, Database, parse_duration};

/// `herald dlq` and its subcommands.
#[derive(Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, newest last.
    List(Filter),
    /// Show one dead letter in full.
    Show {
        #[command(flatten)]
        db: crate::DbArgs,
        /// Which table the id is in.
        #[arg(long, value_enum)]
        side: Side,
        /// The dead letter's id.
        id: i64,
    },
    /// Replay dead letters: relay-side ones go back into the outbox (one transaction each), consumer-side ones are
    /// marked so that the consumer of their service applies them again.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Side {
    /// The relay's dead letters (`<table>_dead_letter`).
    Relay,
    /// The consumers' dead letters (`<table>_consumer_dead_letter`).
    Consumer,
}

/// Which dead letters a command applies to. Filters combine with AND.
#[derive(Args)]
struct Filter {
    #[command(flatten)]
    db: crate::DbArgs,
    /// Only this side; both when omitted (list only; replay and purge need it).
    #[arg(long, value_enum)]
    side: Option<Side>,
    /// Only this id.
    #[arg(long)]
    id: Option<i64>,
    /// Only this destination (topic or queue).
    #[arg(long)]
    destination: Option<String>,
    /// Only this message type.
    #[arg(long = "type")]
    message_type: Option<String>,
    /// Only this consumer (service); consumer side only.
    #[arg(long)]
    consumer: Option<String>,
    /// Only dead letters parked more than this long ago (e.g. 1h, 30m, 90s).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Only dead letters parked less than this long ago.
    #[arg(long, value_parser = parse_duration)]
    newer_than: Option<Duration>,
    /// At most this many rows (list).
    #[arg(long, default_value_t = 100)]
    limit: i64,
}

enum Val {
    Text(String),
    Int(i64),
}

struct Tables {
    relay: String,
    consumer: String,
}

fn tables(table: &str) -> Result<Tables> {
    let t = herald::Identifier::new(table)?;
    Ok(Tables {
        relay: t.with_suffix("_dead_letter")?.to_string(),
        consumer: t.with_suffix("_consumer_dead_letter")?.to_string(),
    })
}

fn placeholder(db: &Database, n: usize) -> String {
    match db {
        #[cfg(feature = "postgres")]
        Database::Postgres(_) => format!("${n}"),
        #[cfg(feature = "sqlite")]
        Database::Sqlite(_) => format!("?{n}"),
        // Positional only: the callers bind in the order the placeholders appear.
        #[cfg(feature = "mysql")]
        Database::MySql(_) => "?".to_owned(),
    }
}

fn micros_of(db: &Database, col: &str) -> String {
    match db {
        #[cfg(feature = "postgres")]
        Database::Postgres(_) => format!("(extract(epoch FROM {col}) * 1000000)::bigint"),
        #[cfg(feature = "sqlite")]
        Database::Sqlite(_) => col.to_owned(),
        #[cfg(feature = "mysql")]
        Database::MySql(_) => format!("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {col})"),
    }
}

fn int_of(db: &Database, col: &str) -> String {
    match db {
        #[cfg(feature = "mysql")]
        Database::MySql(_) => format!("CAST({col} AS SIGNED)"),
        #[cfg(feature = "postgres")]
        Database::Postgres(_) => format!("CAST({col} AS BIGINT)"),
        #[cfg(feature = "sqlite")]
        Database::Sqlite(_) => format!("CAST({col} AS BIGINT)"),
    }
}

/// A text column as text, whatever a producer managed to put there: SQLite keeps any value in
/// any column (invalid UTF-8, a BLOB, a number), and a dead letter is exactly where such rows
/// end up. Bytes that are not UTF-8 are shown lossily and flagged; nothing panics.
fn text<R: Row>(r: &R, col: &str) -> String
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    if let Ok(Some(s)) = r.try_get::<Option<String>, _>(col) {
        return s;
    }
    if let Ok(Some(b)) = r.try_get_unchecked::<Option<Vec<u8>>, _>(col) {
        return match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => format!(
                "{} [not UTF-8: {} bytes, shown lossily]",
                String::from_utf8_lossy(e.as_bytes()),
                e.as_bytes().len()
            ),
        };
    }
    if let Ok(Some(s)) = r.try_get_unchecked::<Option<String>, _>(col) {
        return s;
    }
    String::new()
}

fn text_of(db: &Database, col: &str) -> String {
    match db {
        #[cfg(feature = "postgres")]
        Database::Postgres(_) => format!("{col}::text"),
        #[cfg(feature = "sqlite")]
        Database::Sqlite(_) => col.to_owned(),
        #[cfg(feature = "mysql")]
        Database::MySql(_) => col.to_owned(),
    }
}

/// `WHERE ...` for `filter` on `side`, with its bind values in order.
fn where_clause(db: &Database, side: Side, f: &Filter) -> Result<(String, Vec<Val>)> {
    let mut conds = Vec::new();
    let mut vals = Vec::new();
    let mut add = |cond: String, val: Val, vals: &mut Vec<Val>| {
        vals.push(val);
        conds.push(cond.replace('#', &placeholder(db, vals.len())));
    };
    if let Some(id) = f.id {
        add("id = #".into(), Val::Int(id), &mut vals);
    }
    if let Some(d) = &f.destination {
        add("destination = #".into(), Val::Text(d.clone()), &mut vals);
    }
    if let Some(t) = &f.message_type {
        add("message_type = #".into(), Val::Text(t.clone()), &mut vals);
    }
    if let Some(c) = &f.consumer {
        if side == Side::Relay {
            bail!("--consumer only applies to --side consumer");
        }
        add("consumer = #".into(), Val::Text(c.clone()), &mut vals);
    }
    let now = to_micros(SystemTime::now());
    let at = micros_of(db, "dead_lettered_at");
    if let Some(d) = f.older_than {
        add(
            format!("{at} < #"),
            Val::Int(now - d.as_micros() as i64),
            &mut vals,
        );
    }
    if let Some(d) = f.newer_than {
        add(
            format!("{at} >= #"),
            Val::Int(now - d.as_micros() as i64),
            &mut vals,
        );
    }
    let clause = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    Ok((clause, vals))
}

/// Runs `$body` with `$pool` bound to the PostgreSQL or the SQLite pool: the same code, compiled
/// once per database type.
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            #[cfg(feature = "postgres")]
            Database::Postgres($pool) => $body,
            #[cfg(feature = "sqlite")]
            Database::Sqlite($pool) => $body,
            #[cfg(feature = "mysql")]
            Database::MySql($pool) => $body,
        }
    };
}

macro_rules! bind_all {
    ($q:expr, $vals:expr) => {{
        let mut q = $q;
        for v in $vals {
            q = match v {
                Val::Text(s) => q.bind(s.clone()),
                Val::Int(i) => q.bind(*i),
            };
        }
        q
    }};
}

struct Listed {
    side: Side,
    id: i64,
    consumer: String,
    destination: String,
    message_type: String,
    key: String,
    attempts: i64,
    at: i64,
    reason: String,
}

async fn list_side(db: &Database, t: &Tables, side: Side, f: &Filter) -> Result<Vec<Listed>> {
    let (clause, vals) = where_clause(db, side, f)?;
    let (table, consumer) = match side {
        Side::Relay => (&t.relay, "''".to_owned()),
        Side::Consumer => (&t.consumer, "consumer".to_owned()),
    };
    let sql = format!(
        "SELECT id, {consumer} AS consumer, destination, message_type, COALESCE(ordering_key, '') AS k, \
         {} AS attempts, {} AS at, reason FROM \"{table}\"{clause} ORDER BY id LIMIT {}",
        int_of(db, "attempts"),
        micros_of(db, "dead_lettered_at"),
        f.limit.max(1)
    );
    let rows = on_db!(db, |pool| {
        let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.clone())), &vals);
        q.fetch_all(pool)
            .await?
            .iter()
            .map(|r| Listed {
                side,
                id: r.get("id"),
                consumer: text(r, "consumer"),
                destination: text(r, "destination"),
                message_type: text(r, "message_type"),
                key: text(r, "k"),
                attempts: r.try_get("attempts").unwrap_or_default(),
                at: r.try_get("at").unwrap_or_default(),
                reason: text(r, "reason"),
            })
            .collect::<Vec<_>>()
    });
    Ok(rows)
}

fn sides(f: &Filter) -> Vec<Side> {
    match f.side {
        Some(s) => vec![s],
        None if f.consumer.is_some() => vec![Side::Consumer],
        None => vec![Side::Relay, Side::Consumer],
    }
}

async fn open(db: &crate::DbArgs) -> Result<(Database, Tables)> {
    let url = backends::parse_url("database", &db.database)?;
    Ok((
        backends::open_database(&url, None).await?,
        tables(&db.table)?,
    ))
}

fn age(micros: i64) -> String {
    let d = SystemTime::now()
        .duration_since(from_micros(micros))
        .unwrap_or_default()
        .as_secs();
    match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86400 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86400),
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

pub async fn run(args: DlqArgs) -> Result<ExitCode> {
    match args.command {
        DlqCommand::List(f) => {
            let (db, t) = open(&f.db).await?;
            let mut all = Vec::new();
            for side in sides(&f) {
                all.extend(list_side(&db, &t, side, &f).await?);
            }
            println!(
                "{:<8} {:>6} {:<16} {:<24} {:<18} {:<14} {:>4} {:>5}  reason",
                "side", "id", "consumer", "destination", "type", "key", "att", "age"
            );
            for l in &all {
                println!(
                    "{:<8} {:>6} {:<16} {:<24} {:<18} {:<14} {:>4} {:>5}  {}",
                    if l.side == Side::Relay {
                        "relay"
                    } else {
                        "consumer"
                    },
                    l.id,
                    short(&l.consumer, 16),
                    short(&l.destination, 24),
                    short(&l.message_type, 18),
                    short(&l.key, 14),
                    l.attempts,
                    age(l.at),
                    short(&l.reason, 80)
                );
            }
            println!("{} dead letter(s)", all.len());
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { db, side, id } => {
            let (db, t) = open(&db).await?;
            show(&db, &t, side, id).await
        }
        DlqCommand::Replay { mut filter, yes } => {
            filter.limit = i64::MAX;
            let (db, t) = open(&filter.db).await?;
            let side = filter.side.ok_or_else(|| {
                herald::Error::config("replay needs --side relay or --side consumer")
            })?;
            let rows = list_side(&db, &t, side, &filter).await?;
            if rows.is_empty() {
                println!("no dead letters match");
                return Ok(ExitCode::SUCCESS);
            }
            if !confirm(
                &format!("replay {} {} dead letter(s)?", rows.len(), side_name(side)),
                yes,
            )? {
                return Ok(ExitCode::from(1));
            }
            let (mut done, mut skipped) = (0, 0);
            for r in &rows {
                // One transaction per dead letter: a replay interrupted half-way leaves each row
                // either still parked or back in the outbox, never lost.
                if replay_one(&db, &t, side, r.id).await? {
                    done += 1;
                } else {
                    skipped += 1;
                }
            }
            match side {
                Side::Relay => {
                    println!("replayed {done}: back in the outbox, the relay publishes them next")
                }
                Side::Consumer => println!(
                    "marked {done} for replay: the consumer of each service applies them within a second; \
                     {skipped} undecodable left parked (nothing to apply; fix the producer, then purge)"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Purge { mut filter, yes } => {
            filter.limit = i64::MAX;
            let (db, t) = open(&filter.db).await?;
            let side = filter.side.ok_or_else(|| {
                herald::Error::config("purge needs --side relay or --side consumer")
            })?;
            let n = list_side(&db, &t, side, &filter).await?.len();
            if n == 0 {
                println!("no dead letters match");
                return Ok(ExitCode::SUCCESS);
            }
            if !confirm(
                &format!("delete {n} {} dead letter(s) for good?", side_name(side)),
                yes,
            )? {
                return Ok(ExitCode::from(1));
            }
            let f = &filter;
            let (clause, vals) = where_clause(&db, side, f)?;
            let table = if side == Side::Relay {
                &t.relay
            } else {
                &t.consumer
            };
            let sql = format!("DELETE FROM \"{table}\"{clause}");
            let deleted = on_db!(&db, |pool| {
                bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql.clone())), &vals)
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
            println!("purged {deleted}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Relay => "relay-side",
        Side::Consumer => "consumer-side",
    }
}

fn confirm(question: &str, yes: bool) -> Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question} Refusing without a terminal to confirm on: add --yes");
    }
    print!("{question} Type yes to go on: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

/// Replays one dead letter. Returns false if it cannot be (an undecodable consumer-side one).
async fn replay_one(db: &Database, t: &Tables, side: Side, id: i64) -> Result<bool> {
    let p1 = placeholder(db, 1);
    match side {
        Side::Relay => {
            let outbox = t.relay.strip_suffix("_dead_letter").expect("derived name");
            let insert = format!(
                "INSERT INTO \"{outbox}\" (message_id, kind, message_type, source, destination, ordering_key, headers, \
                 content_type, payload, created_at) SELECT message_id, kind, message_type, source, destination, \
                 ordering_key, headers, content_type, payload, created_at FROM \"{}\" WHERE id = {p1}",
                t.relay
            );
            let delete = format!("DELETE FROM \"{}\" WHERE id = {p1}", t.relay);
            on_db!(db, |pool| {
                let mut tx = pool.begin().await?;
                sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sqlx::AssertSqlSafe(delete.clone()))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            });
            Ok(true)
        }
        Side::Consumer => {
            let mark = match db {
                #[cfg(feature = "postgres")]
                Database::Postgres(_) => format!(
                    "UPDATE \"{}\" SET replay_requested = true WHERE id = $1 AND message_id IS NOT NULL",
                    t.consumer
                ),
                #[cfg(feature = "sqlite")]
                Database::Sqlite(_) => format!(
                    "UPDATE \"{}\" SET replay_requested = 1 WHERE id = ?1 AND message_id IS NOT NULL",
                    t.consumer
                ),
                #[cfg(feature = "mysql")]
                Database::MySql(_) => format!(
                    "UPDATE \"{}\" SET replay_requested = TRUE WHERE id = ? AND message_id IS NOT NULL",
                    t.consumer
                ),
            };
            let n = on_db!(db, |pool| {
                sqlx::query(sqlx::AssertSqlSafe(mark.clone()))
                    .bind(id)
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
            Ok(n == 1)
        }
    }
}

async fn show(db: &Database, t: &Tables, side: Side, id: i64) -> Result<ExitCode> {
    let table = if side == Side::Relay {
        &t.relay
    } else {
        &t.consumer
    };
    let consumer = if side == Side::Relay {
        "''"
    } else {
        "consumer"
    };
    let sql = format!(
        "SELECT {consumer} AS consumer, COALESCE({}, '') AS message_id, kind, message_type, source, destination, \
         COALESCE(ordering_key, '') AS k, {} AS headers, content_type, payload, {} AS attempts, \
         reason, {} AS at FROM \"{table}\" WHERE id = {}",
        text_of(db, "message_id"),
        text_of(db, "headers"),
        int_of(db, "attempts"),
        micros_of(db, "dead_lettered_at"),
        placeholder(db, 1)
    );
    let printed = on_db!(db, |pool| {
        match sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(id)
            .fetch_optional(pool)
            .await?
        {
            None => false,
            Some(r) => {
                let payload: Vec<u8> = r
                    .try_get_unchecked::<Option<Vec<u8>>, _>("payload")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let at: i64 = r.try_get("at").unwrap_or_default();
                println!("side:          {}", side_name(side));
                println!("id:            {id}");
                if side == Side::Consumer {
                    println!("consumer:      {}", text(&r, "consumer"));
                }
                println!("message id:    {}", text(&r, "message_id"));
                println!("kind:          {}", text(&r, "kind"));
                println!("type:          {}", text(&r, "message_type"));
                println!("source:        {}", text(&r, "source"));
                println!("destination:   {}", text(&r, "destination"));
                println!("ordering key:  {}", text(&r, "k"));
                println!("headers:       {}", text(&r, "headers"));
                println!("content type:  {}", text(&r, "content_type"));
                println!(
                    "attempts:      {}",
                    r.try_get::<i64, _>("attempts").unwrap_or_default()
                );
                println!(
                    "parked at:     {} ({} ago)",
                    rfc3339(from_micros(at)),
                    age(at)
                );
                println!("reason:        {}", text(&r, "reason"));
                println!("payload ({} bytes):", payload.len());
                println!(
                    "{}",
                    String::from_utf8_lossy(&payload[..payload.len().min(4096)])
                );
                true
            }
        }
    });
    if printed {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("no {} dead letter with id {id}", side_name(side));
        Ok(ExitCode::from(1))
    }
}
