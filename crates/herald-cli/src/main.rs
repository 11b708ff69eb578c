//! The `herald` command: migrate, relay, status, replay, dlq; with the `lab` feature (the
//! default) also demo, bench and verify.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[cfg(not(any(feature = "postgres", feature = "sqlite", feature = "mysql")))]
compile_error!("herald needs at least one database feature: postgres, sqlite or mysql");

use herald::connect as backends;
#[cfg(feature = "lab")]
use herald_lab::{bench, demo, verify};

mod dlq;
mod relay;
mod replay;
mod status;

/// herald: never fail to publish an event. A transactional outbox relay for PostgreSQL, MySQL,
/// MariaDB and SQLite, publishing to RabbitMQ, NATS JetStream, Kafka, Redis Streams or an
/// embedded broker (the backends this build was compiled with).
#[derive(Parser)]
#[command(name = "herald", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` (colours only on a terminal) or `json` (one object a line).
    /// Levels: HERALD_LOG, else RUST_LOG (e.g. `info,herald_core=debug`).
    #[arg(long, global = true, env = "HERALD_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the outbox, dead-letter and inbox tables (versioned migrations; idempotent).
    Migrate(DbArgs),
    /// Publish outbox rows to the broker until stopped (SIGTERM or Ctrl-C stop it gracefully).
    Relay(relay::RelayArgs),
    /// Show outbox depth, age of the oldest pending message, dead letters, and consumer lag.
    Status(status::StatusArgs),
    /// Rewind a consumer group on a log broker (embedded, NATS) to deliver events again.
    Replay(replay::ReplayArgs),
    /// Run the order story end to end and check that nothing was lost, phantom or out of order.
    #[cfg(feature = "lab")]
    Demo(demo::DemoArgs),
    /// List, show, replay or purge dead letters (relay side and consumer side).
    Dlq(dlq::DlqArgs),
    /// Measure drain rate, latency, producer tax and database cost against same-run baselines.
    #[cfg(feature = "lab")]
    Bench(bench::BenchArgs),
    /// Prove the guarantees on your own database and broker: a workload under injected faults,
    /// checked for loss, phantoms, reordering and double effects, beside the naive ways.
    #[cfg(feature = "lab")]
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
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Telemetry is set up inside the runtime: the gRPC exporter needs it.
    #[cfg(feature = "lab")]
    let sink = match &cli.command {
        Command::Bench(args) if !args.skips("telemetry") => {
            match runtime.block_on(herald_telemetry::sink::Sink::start()) {
                Ok(sink) => Some(sink),
                Err(e) => {
                    eprintln!(
                        "error: cannot start the local OTLP sink for the telemetry scenario: {e}"
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let telemetry = {
        let _in_runtime = runtime.enter();
        let builder = herald_telemetry::Telemetry::builder()
            .format(match cli.log_format {
                LogFormat::Text => herald_telemetry::LogFormat::Text,
                LogFormat::Json => herald_telemetry::LogFormat::Json,
            })
            .default_filter(default_filter(&cli.command));
        // The bench measures spans off, then on (exported to its own sink).
        #[cfg(feature = "lab")]
        let builder = match &sink {
            Some(sink) => builder.spans_off().otlp(Some(herald_telemetry::OtlpConfig {
                endpoint: sink.grpc_endpoint(),
                protocol: herald_telemetry::Protocol::Grpc,
            })),
            None => builder,
        };
        match builder.init() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Migrate(args) => migrate(args).await,
            Command::Relay(args) => relay::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Replay(args) => replay::run(args).await,
            #[cfg(feature = "lab")]
            Command::Demo(args) => demo::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            #[cfg(feature = "lab")]
            Command::Bench(args) => {
                let observed = sink.as_ref().map(|sink| bench::Observed {
                    telemetry: &telemetry,
                    sink,
                });
                bench::run(args, observed).await
            }
            #[cfg(feature = "lab")]
            Command::Verify(args) => verify::run(args).await,
        }
    });
    // The last spans go out before the runtime (which the gRPC exporter runs on) stops.
    telemetry.shutdown();
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

/// The log filter when HERALD_LOG and RUST_LOG are unset. The demo prints its own progress; its
/// expected warnings (the injected outage) would drown it. Verify reports the faults it injects
/// itself, and async-nats logs every connection the verify faults break at ERROR.
fn default_filter(command: &Command) -> &'static str {
    match command {
        #[cfg(feature = "lab")]
        Command::Verify(_) => "error,async_nats=off",
        #[cfg(feature = "lab")]
        Command::Demo(_) | Command::Bench(_) => "error",
        _ => "warn,herald=info,herald_core=info,herald_telemetry=info",
    }
}

async fn migrate(args: DbArgs) -> anyhow::Result<ExitCode> {
    let url = backends::parse_url("database", &args.database)?;
    let table = herald::Identifier::new(&args.table)?;
    let db = backends::open_database(&url, None).await?;
    let applied = backends::migrate(&db, &table).await?;
    let versions = if applied.is_empty() {
        "already up to date".to_owned()
    } else {
        let v: Vec<String> = applied.iter().map(i64::to_string).collect();
        format!("applied migration {}", v.join(", "))
    };
    println!(
        "migrated {url} ({versions}): tables {table}, {table}_dead_letter, {table}_inbox are ready"
    );
    Ok(ExitCode::SUCCESS)
}
