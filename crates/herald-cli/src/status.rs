//! `herald status`: outbox depth per destination, and consumer lag where the broker can tell.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::bail;
use clap::Args;
use herald::Subscription;

use crate::backends;

/// Flags of `herald status`.
#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    db: crate::DbArgs,
    /// Also show consumer-group lag on this broker (every group on the embedded broker).
    #[arg(long, env = "HERALD_BROKER_URL", hide_env_values = true)]
    broker: Option<String>,
    /// An event subscription to report lag for, as SERVICE:TOPIC (repeatable).
    #[arg(long = "events", value_name = "SERVICE:TOPIC")]
    events: Vec<String>,
    /// A command queue to report lag for, as SERVICE:QUEUE (repeatable).
    #[arg(long = "commands", value_name = "SERVICE:QUEUE")]
    commands: Vec<String>,
}

fn split(spec: &str) -> anyhow::Result<(String, String)> {
    match spec.split_once(':') {
        Some((s, d)) if !s.is_empty() && !d.is_empty() => Ok((s.to_owned(), d.to_owned())),
        _ => bail!(herald::Error::config(format!(
            "{spec:?} is not SERVICE:DESTINATION"
        ))),
    }
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let url = backends::parse_url("database", &args.db.database)?;
    let table = herald::Identifier::new(&args.db.table)?;
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
    let consumer_dead = consumer_dead_letters(&db, &table).await?;
    println!("total: pending={pending} dead_letters={dead} consumer_dead_letters={consumer_dead}");

    let Some(broker) = &args.broker else {
        return Ok(ExitCode::SUCCESS);
    };
    let broker_url = backends::parse_url("broker", broker)?;
    let mut subs = Vec::new();
    for spec in &args.events {
        let (service, topic) = split(spec)?;
        subs.push(Subscription::events(topic, service));
    }
    for spec in &args.commands {
        let (service, queue) = split(spec)?;
        subs.push(Subscription::commands(queue, service));
    }
    println!();
    println!(
        "{:<24} {:<32} {:>10}",
        "consumer group", "destination", "lag"
    );
    #[cfg(feature = "embedded")]
    if broker_url.scheme() == "sqlite" && subs.is_empty() {
        let embedded = herald::embedded::EmbeddedTransport::open(broker_url.expose()).await?;
        for g in embedded.groups().await? {
            println!(
                "{:<24} {:<32} {:>10}   (parked by the broker: {})",
                g.group, g.destination, g.lag, g.dead
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let transport = backends::open_transport(&broker_url).await?;
    for s in &subs {
        let lag = transport
            .lag(s)
            .await?
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        println!("{:<24} {:<32} {:>10}", s.service, s.destination, lag);
    }
    if subs.is_empty() {
        println!("(name groups with --events SERVICE:TOPIC or --commands SERVICE:QUEUE)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn consumer_dead_letters(
    db: &backends::Database,
    table: &herald::Identifier,
) -> anyhow::Result<i64> {
    let admin = backends::dead_letters(db, table)?;
    Ok(admin.count(herald::dead_letters::Side::Consumer).await? as i64)
}
