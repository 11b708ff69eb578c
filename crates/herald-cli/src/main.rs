//! The `herald` command: migrate, relay, status, replay, dlq, demo, bench, verify.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod backends;
mod bench;
mod demo;
mod dlq;
mod relay;
mod replay;
mod status;
mod verify;

/// herald: never fail to publish an event. A transactional outbox relay for PostgreSQL and SQLite,
/// publishing to RabbitMQ, NATS JetStream or an embedded broker.
#[derive(Parser)]
#[command(name = "herald", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the outbox, dead-letter and inbox tables (idempotent).
    Migrate(DbArgs),
    /// Publish outbox rows to the broker until stopped (SIGTERM or Ctrl-C stop it gracefully).
    Relay(relay::RelayArgs),
    /// Show outbox depth, age of the oldest pending message, dead letters, and consumer lag.
    Status(status::StatusArgs),
    /// Rewind a consumer group on a log broker (embedded, NATS) to deliver events again.
    Replay(replay::ReplayArgs),
    /// Run the order story end to end and check that nothing was lost, phantom or out of order.
    Demo(demo::DemoArgs),
    /// List, show, replay or purge dead letters (relay side and consumer side).
    Dlq(dlq::DlqArgs),
    /// Measure drain rate, latency, producer tax and database cost against same-run baselines.
    Bench(bench::BenchArgs),
    /// Prove the guarantees on your own database and broker: a workload under injected faults,
    /// checked for loss, phantoms, reordering and double effects, beside the naive ways.
    Verify(verify::VerifyArgs),
}

/// Where the outbox lives.
#[derive(Args, Clone)]
pub struct DbArgs {
    /// Database URL: postgres://user@host/db or sqlite://path.
    #[arg(long, env = "HERALD_DATABASE_URL", hide_env_values = true)]
    database: String,
    /// Outbox table name; dead letters go to <table>_dead_letter, the inbox is <table>_inbox.
    #[arg(long, env = "HERALD_TABLE", default_value = "herald_outbox")]
    table: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; its expected warnings (the injected outage) would drown it.
    // lapin logs every connection the verify faults break at ERROR level; verify reports them.
    let default_filter = if matches!(cli.command, Command::Verify(_)) {
        "error,lapin=off,async_nats=off"
    } else if matches!(cli.command, Command::Demo(_) | Command::Bench(_)) {
        "error"
    } else {
        "warn,herald=info,herald_core=info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Migrate(args) => migrate(args).await,
            Command::Relay(args) => relay::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Replay(args) => replay::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Verify(args) => verify::run(args).await,
        }
    });
    // Do not wait for stray background tasks (a consumer blocked on a socket) on the way out.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let config = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<herald::Error>(),
                    Some(herald::Error::Config(_) | herald::Error::Schema { .. })
                )
            });
            ExitCode::from(if config { 2 } else { 1 })
        }
    }
}

async fn migrate(args: DbArgs) -> anyhow::Result<ExitCode> {
    let url = backends::parse_url("database", &args.database)?;
    let table = herald::Identifier::new(&args.table)?;
    let db = backends::open_database(&url, None).await?;
    backends::migrate(&db, &table).await?;
    println!("migrated {url}: tables {table}, {table}_dead_letter, {table}_inbox are ready");
    Ok(ExitCode::SUCCESS)
}
