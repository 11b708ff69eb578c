//! `herald bench`: drain, steady-state latency, producer tax and database cost, each next to a
//! baseline measured in the same run (raw confirmed publish, raw business inserts, naive
//! save-then-publish), so that ratios survive the machine's drift.

mod db;
mod report;
mod scenarios;
mod timing;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use herald::RelayConfig;

use db::BenchDb;
use herald::connect::{self as backends, Database, parse_duration};
use scenarios::Env;

/// Flags of `herald bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Database URL (postgres://...); default: SQLite in a temporary directory. PostgreSQL runs
    /// in a fresh schema that is dropped afterwards.
    #[arg(long)]
    database: Option<String>,
    /// Broker URL (amqp://... or nats://...); default: the embedded broker in a temporary directory.
    #[arg(long)]
    broker: Option<String>,
    /// Messages in the drain scenario (and in the raw-publish baseline).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Open-loop rates for the steady scenario, events per second (comma-separated); a closed-loop
    /// "max" run is added.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    rates: Vec<u32>,
    /// Length of each steady, producer-tax and naive run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent writers in the closed-loop runs.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Payload size of each message, bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Relay batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Relay workers (concurrent claim-publish-mark loops).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Relay's longest idle poll interval.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Deliveries the steady scenario's consumer applies at once (spread by ordering key);
    /// 0 picks 1 on SQLite (one writer: more lanes only contend) and 4 on PostgreSQL.
    #[arg(long, default_value_t = 0)]
    consumer_concurrency: usize,
    /// Do not wake the relay after each commit: measure a sidecar relay that only polls.
    #[arg(long)]
    no_wake: bool,
    /// Skip scenarios: any of drain, steady, tax, naive; `consumer` runs the steady scenario
    /// without its consumer (commit to confirm only).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Folder for results.json and latency.svg.
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
}

/// What the telemetry scenario switches on and where its spans go: the process's telemetry
/// (installed with spans off) and a local OTLP sink it exports to.
pub struct Observed<'a> {
    /// Installed by `main` with spans off and OTLP/gRPC to `sink`.
    pub telemetry: &'a herald_telemetry::Telemetry,
    /// The local OTLP receiver.
    pub sink: &'a herald_telemetry::sink::Sink,
}

impl BenchArgs {
    /// Whether `--skip` names `scenario`.
    pub fn skips(&self, scenario: &str) -> bool {
        self.skip.iter().any(|k| k == scenario)
    }
}

/// Runs `herald bench`. `observed` is needed for the telemetry scenario (skipped without it).
pub async fn run(args: BenchArgs, observed: Option<Observed<'_>>) -> Result<ExitCode> {
    let tmp = std::env::temp_dir().join(format!("herald-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let suffix = format!("{:08x}", fastrand::u32(..));
    let (db, schema, db_name) = match &args.database {
        Some(raw) => {
            let url = backends::parse_url("database", raw)?;
            let schema = format!("herald_bench_{suffix}");
            if let Database::Postgres(p) = backends::open_database(&url, None).await? {
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
                    .execute(&p)
                    .await?;
            } else {
                anyhow::bail!(herald::Error::config(
                    "--database must be postgres:// (without it the bench uses SQLite)"
                ));
            }
            (
                backends::open_database(&url, Some(&schema)).await?,
                Some(schema),
                "postgres",
            )
        }
        None => {
            let url =
                backends::parse_url("database", &format!("sqlite://{}/bench.db", tmp.display()))?;
            (backends::open_database(&url, None).await?, None, "sqlite")
        }
    };
    let (broker, broker_name) = match &args.broker {
        Some(raw) => {
            let url = backends::parse_url("broker", raw)?;
            let name = url.scheme().to_owned();
            (backends::open_transport(&url).await?, name)
        }
        None => (
            backends::open_transport(&backends::parse_url(
                "broker",
                &format!("sqlite://{}/broker.db", tmp.display()),
            )?)
            .await?,
            "embedded".to_owned(),
        ),
    };
    let bench_db = Arc::new(BenchDb::new(db, schema).await?);
    let relay = RelayConfig {
        batch_size: args.batch_size,
        workers: args.workers,
        poll_interval: args.poll_interval,
        ..RelayConfig::default()
    };
    relay.validate()?;
    let env = Env {
        db: bench_db.clone(),
        broker,
        topic: format!("herald_bench_{suffix}"),
        relay,
        payload_bytes: args.payload_bytes,
    };
    let settings = bench_db.settings().await?;
    eprintln!("bench: {db_name} + {broker_name}; {settings}");

    let mut args = args;
    if args.consumer_concurrency == 0 {
        args.consumer_concurrency = if db_name == "sqlite" { 1 } else { 4 };
    }
    let outcome = run_all(&args, &env, observed).await;
    bench_db.teardown().await;
    let _ = std::fs::remove_dir_all(&tmp);
    let results = outcome?;
    let report = report::Report::new(&args, db_name, &broker_name, settings, results);
    report.print();
    let dir = report.write(&args.out)?;
    println!("results: {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Everything measured in one run.
pub struct Results {
    /// The broker's own publish rate (no database), the drain's baseline.
    pub raw_publish: Option<scenarios::Rate>,
    /// The database's rate for the relay's statements alone (no broker).
    pub db_ceiling: Option<scenarios::Rate>,
    /// The relay draining a backlog.
    pub drain: Option<scenarios::Rate>,
    /// Commit-to-delivery latency at steady rates.
    pub steady: Vec<scenarios::Steady>,
    /// Producers' business transactions without an outbox.
    pub business: Option<scenarios::Rate>,
    /// The same transactions writing the outbox.
    pub with_outbox: Option<scenarios::Rate>,
    /// Publishing straight to the broker after the commit (the naive way), and its latency.
    pub naive: Option<(scenarios::Rate, timing::Percentiles)>,
    /// The drain with telemetry off, then on (metrics recorded, spans exported over OTLP).
    pub telemetry: Option<scenarios::TelemetryCost>,
}

async fn run_all(args: &BenchArgs, env: &Env, observed: Option<Observed<'_>>) -> Result<Results> {
    let skip = |s: &str| args.skips(s);
    let mut r = Results {
        raw_publish: None,
        db_ceiling: None,
        drain: None,
        steady: Vec::new(),
        business: None,
        with_outbox: None,
        naive: None,
        telemetry: None,
    };
    if !skip("drain") {
        r.raw_publish = Some(scenarios::raw_publish(env, args.messages).await?);
        r.db_ceiling = Some(scenarios::db_ceiling(env, args.messages).await?);
        r.drain = Some(scenarios::drain(env, args.messages).await?);
    }
    if !skip("steady") {
        let lanes = if skip("consumer") {
            0
        } else {
            args.consumer_concurrency
        };
        // Each given rate, open loop, then the closed-loop maximum.
        for rate in args.rates.iter().copied().map(Some).chain([None]) {
            r.steady.push(
                scenarios::steady(env, rate, args.duration, args.writers, !args.no_wake, lanes)
                    .await?,
            );
        }
    }
    if !skip("tax") {
        let (b, o) = scenarios::producer_tax(env, args.duration, args.writers).await?;
        r.business = Some(b);
        r.with_outbox = Some(o);
    }
    if !skip("naive") {
        r.naive = Some(scenarios::naive(env, args.duration, args.writers).await?);
    }
    // Last: once on, the metrics recorder stays installed.
    if let Some(o) = observed
        && !skip("telemetry")
    {
        r.telemetry = Some(scenarios::telemetry_cost(env, args.messages.min(50_000), o).await?);
    }
    Ok(r)
}
