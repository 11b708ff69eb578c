//! `herald dlq`: list, show, replay and purge dead letters, on the relay's side (messages the
//! broker refused or that could not be read from the outbox) and on the consumers' side
//! (messages a handler kept failing on, or that could not be decoded).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use herald::dead_letters::{self as dl, DeadLetterAdmin};
use herald::message::{from_micros, rfc3339};

use crate::backends::{self, parse_duration};

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

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
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

impl Side {
    fn of(self) -> dl::Side {
        match self {
            Side::Relay => dl::Side::Relay,
            Side::Consumer => dl::Side::Consumer,
        }
    }
}

impl Filter {
    fn query(&self) -> dl::Filter {
        dl::Filter {
            id: self.id,
            destination: self.destination.clone(),
            message_type: self.message_type.clone(),
            consumer: self.consumer.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            limit: (self.limit < i64::MAX).then_some(self.limit.max(1) as u64),
        }
    }
}

fn sides(f: &Filter) -> Vec<Side> {
    match f.side {
        Some(s) => vec![s],
        None if f.consumer.is_some() => vec![Side::Consumer],
        None => vec![Side::Relay, Side::Consumer],
    }
}

async fn open(db: &crate::DbArgs) -> Result<Box<dyn DeadLetterAdmin>> {
    let url = backends::parse_url("database", &db.database)?;
    let table = herald::Identifier::new(&db.table)?;
    let database = backends::open_database(&url, None).await?;
    Ok(backends::dead_letters(&database, &table)?)
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

/// Runs `herald dlq`.
pub async fn run(args: DlqArgs) -> Result<ExitCode> {
    match args.command {
        DlqCommand::List(f) => {
            let admin = open(&f.db).await?;
            let mut all = Vec::new();
            for side in sides(&f) {
                all.extend(admin.list(side.of(), &f.query()).await?);
            }
            println!(
                "{:<8} {:>6} {:<16} {:<24} {:<18} {:<14} {:>4} {:>5}  reason",
                "side", "id", "consumer", "destination", "type", "key", "att", "age"
            );
            for l in &all {
                println!(
                    "{:<8} {:>6} {:<16} {:<24} {:<18} {:<14} {:>4} {:>5}  {}",
                    if l.side == dl::Side::Relay {
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
                    age(l.parked_at_micros),
                    short(&l.reason, 80)
                );
            }
            println!("{} dead letter(s)", all.len());
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { db, side, id } => {
            let admin = open(&db).await?;
            show(admin.as_ref(), side, id).await
        }
        DlqCommand::Replay { mut filter, yes } => {
            filter.limit = i64::MAX;
            let admin = open(&filter.db).await?;
            let side = filter.side.ok_or_else(|| {
                herald::Error::config("replay needs --side relay or --side consumer")
            })?;
            let rows = admin.list(side.of(), &filter.query()).await?;
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
                if admin.replay(side.of(), r.id).await? {
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
            let admin = open(&filter.db).await?;
            let side = filter.side.ok_or_else(|| {
                herald::Error::config("purge needs --side relay or --side consumer")
            })?;
            let n = admin.list(side.of(), &filter.query()).await?.len();
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
            let deleted = admin.purge(side.of(), &filter.query()).await?;
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

async fn show(admin: &dyn DeadLetterAdmin, side: Side, id: i64) -> Result<ExitCode> {
    let Some(d) = admin.show(side.of(), id).await? else {
        eprintln!("no {} dead letter with id {id}", side_name(side));
        return Ok(ExitCode::from(1));
    };
    let s = &d.summary;
    println!("side:          {}", side_name(side));
    println!("id:            {id}");
    if side == Side::Consumer {
        println!("consumer:      {}", s.consumer);
    }
    println!("message id:    {}", d.message_id);
    println!("kind:          {}", d.kind);
    println!("type:          {}", s.message_type);
    println!("source:        {}", d.source);
    println!("destination:   {}", s.destination);
    println!("ordering key:  {}", s.key);
    println!("headers:       {}", d.headers);
    println!("content type:  {}", d.content_type);
    println!("attempts:      {}", s.attempts);
    println!(
        "parked at:     {} ({} ago)",
        rfc3339(from_micros(s.parked_at_micros)),
        age(s.parked_at_micros)
    );
    println!("reason:        {}", s.reason);
    println!("payload ({} bytes):", d.payload.len());
    println!(
        "{}",
        String::from_utf8_lossy(&d.payload[..d.payload.len().min(4096)])
    );
    Ok(ExitCode::SUCCESS)
}
