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
    print_relays(&store.relays().await?);

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

/// How long ago `t` was, for a table cell.
fn ago(t: Option<SystemTime>) -> String {
    t.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or_else(
            || "-".to_owned(),
            |d| format!("{:.1}s ago", d.as_secs_f64()),
        )
}

/// `0-3,7` for partitions 0, 1, 2, 3 and 7.
fn ranges(parts: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let mut j = i;
        while j + 1 < parts.len() && parts[j + 1] == parts[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            parts[i].to_string()
        } else {
            format!("{}-{}", parts[i], parts[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "-".to_owned()
    } else {
        out.join(",")
    }
}

/// The live relays and those that ended within the last hour, with what they hold and how
/// they ended (a takeover names who took over).
fn print_relays(relays: &[herald::RelayStatus]) {
    use herald::RelayState;
    let hour = std::time::Duration::from_secs(3600);
    let recent = |t: Option<SystemTime>| {
        t.and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|d| d < hour)
    };
    let shown: Vec<_> = relays
        .iter()
        .filter(|r| match &r.state {
            RelayState::Live | RelayState::Silent => true,
            RelayState::Stopped { at } | RelayState::TakenOver { at, .. } => recent(*at),
        })
        .collect();
    println!();
    let live = shown.iter().filter(|r| r.state == RelayState::Live).count();
    println!("relays: {live} live");
    if shown.is_empty() {
        println!("(no relay has run against this outbox in the last hour)");
        return;
    }
    println!(
        "{:<28} {:<20} {:>8} {:>12} {:>12}  {:<16} state",
        "relay", "host", "pid", "started", "heartbeat", "partitions"
    );
    for r in shown {
        let state = match &r.state {
            RelayState::Live => "live".to_owned(),
            RelayState::Silent => "silent: not heart-beating, not yet taken over".to_owned(),
            RelayState::Stopped { at } => format!("stopped {}", ago(*at)),
            RelayState::TakenOver { by, at } => {
                format!("taken over by {by} {} (it stopped heart-beating)", ago(*at))
            }
        };
        println!(
            "{:<28} {:<20} {:>8} {:>12} {:>12}  {:<16} {state}",
            r.relay.relay_id,
            r.relay.host,
            r.relay.pid,
            ago(r.started_at),
            ago(r.heartbeat_at),
            ranges(&r.partitions),
        );
    }
}

async fn consumer_dead_letters(
    db: &backends::Database,
    table: &herald::Identifier,
) -> anyhow::Result<i64> {
    let admin = backends::dead_letters(db, table)?;
    Ok(admin.count(herald::dead_letters::Side::Consumer).await? as i64)
}
