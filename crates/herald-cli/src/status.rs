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
    /// Print one JSON object (the same facts as the tables) instead of the tables.
    #[arg(long)]
    json: bool,
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
    let mut subs = Vec::new();
    for spec in &args.events {
        let (service, topic) = split(spec)?;
        subs.push(Subscription::events(topic, service));
    }
    for spec in &args.commands {
        let (service, queue) = split(spec)?;
        subs.push(Subscription::commands(queue, service));
    }
    let db = backends::open_database(&url, None).await?;
    let store = backends::open_store(&db, &table).await?;
    let stats = store.stats().await?;
    let consumer_dead = consumer_dead_letters(&db, &table).await?;
    let relays = store.relays().await?;
    // The broker is asked before anything is printed (the JSON is one object), but a broker
    // that fails does not hide the outbox's tables.
    let groups = match &args.broker {
        Some(broker) => Some(lags(&backends::parse_url("broker", broker)?, &subs).await),
        None => None,
    };
    if args.json {
        let groups = groups.transpose()?;
        let doc = json_status(&stats, consumer_dead, &relays, groups.as_deref());
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:>10} {:>14} {:>12}",
        "destination", "pending", "oldest age", "dead letters"
    );
    let (mut pending, mut dead) = (0, 0);
    for s in &stats {
        let age = age(s.oldest).map_or_else(|| "-".to_owned(), |d| format!("{d:.1}s"));
        println!(
            "{:<32} {:>10} {:>14} {:>12}",
            s.destination, s.pending, age, s.dead_letters
        );
        pending += s.pending;
        dead += s.dead_letters;
    }
    println!("total: pending={pending} dead_letters={dead} consumer_dead_letters={consumer_dead}");
    print_relays(&relays);

    let Some(groups) = groups.transpose()? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!();
    println!(
        "{:<24} {:<32} {:>10}",
        "consumer group", "destination", "lag"
    );
    for g in &groups {
        let lag = g
            .lag
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        match g.parked {
            Some(parked) => println!(
                "{:<24} {:<32} {:>10}   (parked by the broker: {parked})",
                g.group, g.destination, lag
            ),
            None => println!("{:<24} {:<32} {:>10}", g.group, g.destination, lag),
        }
    }
    if groups.is_empty() {
        println!("(name groups with --events SERVICE:TOPIC or --commands SERVICE:QUEUE)");
    }
    Ok(ExitCode::SUCCESS)
}

/// One consumer group's lag.
struct Lag {
    group: String,
    destination: String,
    lag: Option<u64>,
    /// What the embedded broker parked for the group.
    parked: Option<u64>,
}

/// The lag of `subs` on the broker at `url` (every group on the embedded broker when none is
/// named).
async fn lags(url: &herald::SecretUrl, subs: &[Subscription]) -> anyhow::Result<Vec<Lag>> {
    #[cfg(feature = "embedded")]
    if url.scheme() == "sqlite" && subs.is_empty() {
        let embedded = herald::embedded::EmbeddedTransport::open(url.expose()).await?;
        return Ok(embedded
            .groups()
            .await?
            .into_iter()
            .map(|g| Lag {
                group: g.group,
                destination: g.destination,
                lag: Some(g.lag),
                parked: Some(g.dead),
            })
            .collect());
    }
    let transport = backends::open_transport(url).await?;
    let mut out = Vec::with_capacity(subs.len());
    for s in subs {
        out.push(Lag {
            group: s.service.clone(),
            destination: s.destination.clone(),
            lag: transport.lag(s).await?,
            parked: None,
        });
    }
    Ok(out)
}

/// Seconds since `t`, if it is in the past.
fn age(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs_f64())
}

fn unix(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// `herald status --json`: the tables' facts, ages in seconds, times in Unix seconds.
fn json_status(
    stats: &[herald::DestinationStats],
    consumer_dead: i64,
    relays: &[herald::RelayStatus],
    groups: Option<&[Lag]>,
) -> serde_json::Value {
    use herald::RelayState;
    use serde_json::json;
    let destinations: Vec<_> = stats
        .iter()
        .map(|s| {
            json!({
                "destination": s.destination,
                "pending": s.pending,
                "oldest_pending_age_seconds": age(s.oldest),
                "dead_letters": s.dead_letters,
            })
        })
        .collect();
    let relays: Vec<_> = relays
        .iter()
        .map(|r| {
            let (state, by, ended) = match &r.state {
                RelayState::Live => ("live", None, None),
                RelayState::Silent => ("silent", None, None),
                RelayState::Stopped { at } => ("stopped", None, unix(*at)),
                RelayState::TakenOver { by, at } => ("taken_over", Some(by.clone()), unix(*at)),
            };
            json!({
                "relay_id": r.relay.relay_id,
                "host": r.relay.host,
                "pid": r.relay.pid,
                "state": state,
                "taken_over_by": by,
                "ended_at": ended,
                "started_at": unix(r.started_at),
                "heartbeat_at": unix(r.heartbeat_at),
                "partitions": r.partitions,
            })
        })
        .collect();
    json!({
        "destinations": destinations,
        "total": {
            "pending": stats.iter().map(|s| s.pending).sum::<u64>(),
            "dead_letters": stats.iter().map(|s| s.dead_letters).sum::<u64>(),
            "consumer_dead_letters": consumer_dead,
        },
        "relays": relays,
        "consumer_groups": groups.map(|g| g.iter().map(|g| json!({
            "group": g.group,
            "destination": g.destination,
            "lag": g.lag,
            "parked_by_broker": g.parked,
        })).collect::<Vec<_>>()),
    })
}

/// How long ago `t` was, for a table cell.
fn ago(t: Option<SystemTime>) -> String {
    age(t).map_or_else(|| "-".to_owned(), |d| format!("{d:.1}s ago"))
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
