//! `herald relay`: run the outbox relay beside a database.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use herald::relay::FailpointHook;
use herald::{
    Claim, DestinationStats, Failpoint, Lease, Message, OutboxStore, RejectionOutcome, Relay,
    RelayConfig, Subscriber, Subscription, Transport,
};
use tracing::{info, warn};

use crate::backends::{self, parse_duration};

/// Flags of `herald relay`.
#[derive(Args)]
pub struct RelayArgs {
    #[command(flatten)]
    db: crate::DbArgs,
    /// Broker URL: amqp://user:pass@host:5672/vhost (RabbitMQ), nats://host:4222, kafka://host:9092,
    /// redis://host:6379 or sqlite://path (embedded broker). Required unless the database is
    /// SQLite (then sqlite://herald-broker.db).
    #[arg(long, env = "HERALD_BROKER_URL", hide_env_values = true)]
    broker: Option<String>,
    /// Rows claimed per batch.
    #[arg(long, env = "HERALD_BATCH_SIZE", default_value_t = 256)]
    batch_size: usize,
    /// Concurrent claim-publish-mark loops.
    #[arg(long, env = "HERALD_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Takeover bound: if this relay dies (killed, paused, cut off from the database), another
    /// relay continues its work within this. It heart-beats every eighth of it.
    #[arg(long, env = "HERALD_LEASE", default_value = "2s", value_parser = parse_duration)]
    lease: Duration,
    /// Longest wait between polls when idle.
    #[arg(long, env = "HERALD_POLL_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// How long to wait for the broker's confirmations of a batch.
    #[arg(long, env = "HERALD_PUBLISH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    publish_timeout: Duration,
    /// Attempts for a message the broker rejects (an unroutable command) before it is
    /// dead-lettered, once --retry-window has passed too.
    #[arg(long, env = "HERALD_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// How long a rejected message (a command whose owner is not deployed yet) keeps being
    /// retried before it may be dead-lettered; 0s lets --max-attempts alone decide.
    #[arg(long, env = "HERALD_RETRY_WINDOW", default_value = "5m", value_parser = parse_duration)]
    retry_window: Duration,
    /// Longest wait between two attempts of a rejected message.
    #[arg(long, env = "HERALD_RETRY_DELAY_MAX", default_value = "30s", value_parser = parse_duration)]
    retry_delay_max: Duration,
    /// Longest wait between retries after a broker or database outage (the waits start at
    /// 100ms and double up to this).
    #[arg(long, env = "HERALD_BACKOFF_MAX", default_value = "5s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// Largest message published (1024 to 1073741824); larger ones are dead-lettered.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    max_message_bytes: usize,
    /// Serve Prometheus metrics at /metrics, and /healthz and /readyz, on this address
    /// (e.g. 127.0.0.1:9464). Off when not given.
    #[arg(long, env = "HERALD_HTTP_ADDR")]
    http_addr: Option<std::net::SocketAddr>,
    /// /readyz answers 503 once the oldest pending message is older than this while the relay
    /// made no progress for as long (a stall).
    #[arg(long, env = "HERALD_STALL_AFTER", default_value = "60s", value_parser = parse_duration)]
    stall_after: Duration,
    /// /readyz answers 503 once the database or the broker has failed for this long.
    #[arg(long, env = "HERALD_UNREACHABLE_AFTER", default_value = "10s", value_parser = parse_duration)]
    unreachable_after: Duration,
    /// How often the outbox is sampled for the metrics and /readyz (pending rows, the oldest
    /// one's age, dead letters), and an idle broker asked whether it answers.
    #[arg(long, env = "HERALD_SAMPLE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    sample_interval: Duration,
    /// Name of this relay in heartbeats, `herald status` and logs.
    #[arg(long, env = "HERALD_RELAY_ID")]
    relay_id: Option<String>,
    /// Publish what can be published, then exit: 0 once the outbox is empty, 1 (saying why) if rows
    /// remain, waiting for a retry or held by another live relay, or if the broker failed every
    /// publish for 30 s (for batch jobs and tests).
    #[arg(long)]
    until_empty: bool,
    /// Testing only: abort the process at `after-claim`, `mid-batch` (half the batch published
    /// and confirmed), `after-confirm` or `during-mark` (while the mark's commit is in flight).
    #[arg(long, env = "HERALD_FAILPOINT", hide = true)]
    failpoint: Option<String>,
}

impl RelayArgs {
    fn config(&self) -> anyhow::Result<RelayConfig> {
        let mut cfg = RelayConfig {
            batch_size: self.batch_size,
            workers: self.workers,
            lease: self.lease,
            poll_interval: self.poll_interval,
            publish_timeout: self.publish_timeout,
            max_attempts: self.max_attempts,
            retry_window: self.retry_window,
            retry_delay_max: self.retry_delay_max,
            max_message_bytes: self.max_message_bytes,
            backoff_max: self.backoff_max,
            sample_interval: self.sample_interval,
            ..RelayConfig::default()
        };
        if self.until_empty && self.http_addr.is_some() {
            return Err(herald::Error::config(
                "--http-addr serves a relay that keeps running; --until-empty drains and exits: use one or the other",
            )
            .into());
        }
        for (flag, value) in [
            ("--stall-after", self.stall_after),
            ("--unreachable-after", self.unreachable_after),
        ] {
            if !(Duration::from_millis(100)..=Duration::from_secs(30 * 24 * 3600)).contains(&value)
            {
                return Err(herald::Error::config(format!(
                    "{flag} {value:?} must be between 100ms and 30 days"
                ))
                .into());
            }
        }
        if let Some(id) = &self.relay_id {
            cfg.relay_id = id.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn abort_at(point: &str) -> ! {
    eprintln!("herald relay: failpoint {point} hit, aborting");
    std::process::abort();
}

/// Where `--failpoint` makes the relay abort.
enum Crash {
    /// At a point the relay engine reports itself.
    Engine(Failpoint),
    /// After half of the first batch was published and confirmed.
    MidBatch,
    /// While the first mark's statement and commit are in flight.
    DuringMark,
}

fn parse_failpoint(spec: Option<&str>) -> anyhow::Result<Option<Crash>> {
    let Some(spec) = spec else { return Ok(None) };
    Ok(Some(match spec {
        "mid-batch" => Crash::MidBatch,
        "during-mark" => Crash::DuringMark,
        other => Crash::Engine(Failpoint::parse(other).ok_or_else(|| {
            herald::Error::config(format!(
                "failpoint {spec:?} is not after-claim, mid-batch, after-confirm or during-mark"
            ))
        })?),
    }))
}

fn failpoint_hook(crash: Option<&Crash>) -> Option<FailpointHook> {
    let Some(Crash::Engine(point)) = crash else {
        return None;
    };
    let point = *point;
    Some(Arc::new(move |hit: Failpoint| {
        if hit == point {
            abort_at(&format!("{hit:?}"));
        }
    }))
}

/// Publishes the first half of a batch, waits for its confirmations, then aborts.
struct MidBatch(Arc<dyn Transport>);

#[async_trait::async_trait]
impl Transport for MidBatch {
    async fn publish(&self, batch: &[Message]) -> Vec<herald::Result<()>> {
        let half = batch.len().div_ceil(2);
        let _ = self.0.publish(&batch[..half]).await;
        abort_at("mid-batch")
    }
    async fn subscribe(&self, s: &Subscription) -> herald::Result<Box<dyn Subscriber>> {
        self.0.subscribe(s).await
    }
    fn redelivery_delay(&self) -> std::time::Duration {
        self.0.redelivery_delay()
    }

    async fn check(&self) -> herald::Result<()> {
        self.0.check().await
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// Aborts while the first mark is in flight: after a random delay under a millisecond, whether
/// or not the commit has completed, so both outcomes occur.
struct DuringMark(Arc<dyn OutboxStore>);

#[async_trait::async_trait]
impl OutboxStore for DuringMark {
    async fn heartbeat(&self, beat: &herald::Heartbeat<'_>) -> herald::Result<herald::Holdings> {
        self.0.heartbeat(beat).await
    }
    async fn leave(&self, incarnation: i64) -> herald::Result<()> {
        self.0.leave(incarnation).await
    }
    async fn relays(&self) -> herald::Result<Vec<herald::RelayStatus>> {
        self.0.relays().await
    }
    async fn claim(
        &self,
        lease: &Lease,
        max: usize,
        cap: Duration,
        exclude: &[i64],
    ) -> herald::Result<Claim> {
        self.0.claim(lease, max, cap, exclude).await
    }
    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> herald::Result<u64> {
        let delay = Duration::from_micros(fastrand::u64(0..1000));
        let inner = self.0.clone();
        let (lease, seqs) = (lease.clone(), seqs.to_vec());
        let mark = tokio::spawn(async move { inner.complete(&lease, &seqs).await });
        tokio::time::sleep(delay).await;
        let done = mark.is_finished();
        abort_at(if done {
            "during-mark (commit returned)"
        } else {
            "during-mark (commit in flight)"
        })
    }
    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> herald::Result<u64> {
        self.0.release(lease, seqs, reason).await
    }
    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> herald::Result<RejectionOutcome> {
        self.0
            .record_rejection(lease, seq, reason, max_attempts, retry_after)
            .await
    }
    async fn stats(&self) -> herald::Result<Vec<DestinationStats>> {
        self.0.stats().await
    }
    async fn durability_warnings(&self) -> herald::Result<Vec<String>> {
        self.0.durability_warnings().await
    }
}

pub async fn run(args: RelayArgs) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_signal();
    // Everything that can be wrong with the configuration is checked before connecting.
    let config = args.config()?;
    let db_url = backends::parse_url("database", &args.db.database)?;
    let table = herald::Identifier::new(&args.db.table)?;
    let crash = parse_failpoint(args.failpoint.as_deref())?;
    let broker = backends::broker_or_default(args.broker.as_deref(), &db_url)?;
    let broker_url = backends::parse_url("broker", &broker)?;

    let db = backends::open_database(&db_url, None).await?;
    let mut store = backends::open_store(&db, &table).await?;
    let mut transport = backends::open_transport(&broker_url).await?;
    match crash {
        Some(Crash::MidBatch) => transport = Arc::new(MidBatch(transport)),
        Some(Crash::DuringMark) => store = Arc::new(DuringMark(store)),
        _ => {}
    }
    let hook = failpoint_hook(crash.as_ref());
    info!(database = %db_url, broker = %transport.describe(), table = %table, relay = %config.relay_id, "relay starting");

    let relay = Relay::with_failpoint(store.clone(), transport, config, hook)?;
    let _endpoints = match args.http_addr {
        Some(addr) => Some(serve_endpoints(&args, addr, &relay, &db, &table).await?),
        None => None,
    };
    let started = Instant::now();
    let mut remaining = None;
    let result = if args.until_empty {
        // `Relay::run` warns as it starts; the drain does not run it.
        relay.warn_durability().await;
        // A signal stops the drain between statements; rows in flight stay leased and are
        // published again after their lease (duplicates, never losses).
        let drained = tokio::select! {
            r = drain(&relay) => r,
            () = shutdown => Ok(None),
        };
        if let Err(e) = relay.leave().await {
            warn!(error = %e.chain(), "could not release the partitions");
        }
        match drained {
            Ok(gave_up) => {
                if let Some(error) = gave_up {
                    eprintln!(
                        "herald relay --until-empty: giving up after the broker failed every publish for {}s: {error}",
                        UNTIL_EMPTY_PATIENCE.as_secs()
                    );
                }
                remaining = Some(
                    store
                        .stats()
                        .await
                        .context("reading what is left in the outbox")?,
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    } else {
        let reporter = tokio::spawn(report_progress(relay.clone()));
        let result = relay.run(shutdown).await;
        reporter.abort();
        result.map_err(Into::into)
    };
    let c = relay.counters();
    println!(
        "relay stopped after {:.1}s: published={} released={} rejected={} dead_lettered={} lease_lost={} broker_errors={}",
        started.elapsed().as_secs_f64(),
        c.published.load(Ordering::Relaxed),
        c.released.load(Ordering::Relaxed),
        c.rejected.load(Ordering::Relaxed),
        c.dead_lettered.load(Ordering::Relaxed),
        c.lease_lost.load(Ordering::Relaxed),
        c.broker_errors.load(Ordering::Relaxed),
    );
    result?;
    let left: u64 = remaining.iter().flatten().map(|s| s.pending).sum();
    if left > 0 {
        let by_destination: Vec<String> = remaining
            .iter()
            .flatten()
            .filter(|s| s.pending > 0)
            .map(|s| format!("{}={}", s.destination, s.pending))
            .collect();
        eprintln!(
            "herald relay --until-empty: {left} rows remain in the outbox ({}): waiting for a retry, held back behind their key, or in partitions another live relay holds; `herald status` counts them, each row's last_error says why",
            by_destination.join(" ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves /metrics, /healthz and /readyz on `addr` until the returned guard drops, and samples
/// the consumers' dead letters (beside the outbox) into `herald_dead_letters{side="consumer"}`.
async fn serve_endpoints(
    args: &RelayArgs,
    addr: std::net::SocketAddr,
    relay: &Relay,
    db: &backends::Database,
    table: &herald::Identifier,
) -> anyhow::Result<Tasks> {
    let metrics = herald_telemetry::Metrics::install()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {addr}"))?;
    // The port the system chose, for --http-addr 127.0.0.1:0.
    let bound = listener.local_addr().unwrap_or(addr);
    let endpoints = herald_telemetry::Endpoints::new().metrics(metrics).relay(
        relay.health(),
        relay.thresholds(args.stall_after, args.unreachable_after),
    );
    let server = tokio::spawn(async move {
        if let Err(e) = endpoints.serve(listener, std::future::pending()).await {
            warn!(error = %e, "the metrics and health endpoints stopped");
        }
    });
    let admin = backends::dead_letters(db, table)?;
    let every = args.sample_interval;
    let sampler = tokio::spawn(async move {
        let gauge = metrics::gauge!(herald::telemetry::names::DEAD_LETTERS, "side" => "consumer");
        loop {
            match admin.count(herald::dead_letters::Side::Consumer).await {
                Ok(n) => gauge.set(n as f64),
                Err(e) => {
                    tracing::debug!(error = %e.chain(), "counting the consumers' dead letters failed")
                }
            }
            tokio::time::sleep(every).await;
        }
    });
    info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(Tasks(vec![server, sampler]))
}

/// Background tasks, aborted when dropped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// How long `--until-empty` keeps retrying a broker that fails every publish before it gives up
/// (and exits 1, saying what is left).
const UNTIL_EMPTY_PATIENCE: Duration = Duration::from_secs(30);

/// Ticks until a claim comes back empty and no broker error is pending, or until the broker has
/// failed every tick for [`UNTIL_EMPTY_PATIENCE`] (then returns its error). Rows waiting for a
/// retry (or in another relay's partitions) are not read: the caller checks what is left.
async fn drain(relay: &Relay) -> anyhow::Result<Option<String>> {
    let mut backoff =
        herald::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut failing_since: Option<Instant> = None;
    let _alive = relay.keep_alive();
    // Partitions another relay holds (or a dead one, until it is taken over) come to this one
    // within a lease or two; past that, whoever holds them is alive and publishing them.
    let mut idle_since = Instant::now();
    let patience = 2 * relay.config().lease;
    loop {
        let report = relay.tick().await?;
        if let Some(error) = report.broker_error {
            if report.published > 0 {
                failing_since = None;
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= UNTIL_EMPTY_PATIENCE {
                return Ok(Some(error));
            }
            tokio::time::sleep(backoff.next_delay()).await;
        } else if report.claimed == 0 {
            let (_, held, of) = relay.holdings();
            if held.len() == of as usize || idle_since.elapsed() >= patience {
                return Ok(None);
            }
            tokio::time::sleep(relay.config().heartbeat_interval()).await;
        } else {
            failing_since = None;
            idle_since = Instant::now();
        }
    }
}

async fn report_progress(relay: Relay) {
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let c = relay.counters();
        let published = c.published.load(Ordering::Relaxed);
        info!(
            published,
            rate_per_s = (published - last) / 10,
            dead_lettered = c.dead_lettered.load(Ordering::Relaxed),
            broker_errors = c.broker_errors.load(Ordering::Relaxed),
            "relay progress"
        );
        last = published;
    }
}

/// Installs the SIGTERM and SIGINT handlers now (so a signal that arrives while the relay is still
/// connecting is not fatal) and returns a future that completes on either.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; finishing in-flight batches"),
            _ = int.recv() => info!("interrupt received; finishing in-flight batches"),
        }
    }
}
