//! `herald verify`: run a workload against the user's database and broker while breaking things
//! (relays killed, aborted at failpoints, paused past their lease; database sessions terminated;
//! network to the broker and database reset, blackholed, cut one way, slowed; the broker killed
//! and paused when verify started it), heal, drain, and check the whole history. The same run
//! compares the naive ways of publishing (publish-then-save, save-then-publish, fallback storage)
//! with herald's outbox, one table row each. Exits non-zero if the outbox mode lost, invented,
//! reordered or double-applied anything, or did not drain.

mod procs;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use herald::{
    Consumer, ConsumerConfig, FallbackPublisher, Message, SecretUrl, Subscription, Transport,
};
use herald_testkit::verify::{
    Capabilities, Fault, FaultPlan, Mode, ModeResult, RecordingTransport, table,
};
use herald_testkit::{ChaosProxy, History};

use herald::connect::{self as backends, Database, parse_duration};
use procs::{BrokerProc, RelayProc, RelaySpec};
use world::{Carry, Plan, Step, Tables};

/// Flags of `herald verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// Database URL: postgres://... or sqlite://path; default: a SQLite file in a temporary
    /// directory.
    #[arg(long, env = "HERALD_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// Broker URL: amqp://..., nats://... or sqlite://path (embedded); default: the embedded
    /// broker in a temporary directory.
    #[arg(long, env = "HERALD_BROKER_URL", hide_env_values = true)]
    broker: Option<String>,
    /// How long each mode produces under faults (then faults heal and the backlog drains).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the fault plan and the workload; printed so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Modes to run, comma-separated: publish-then-save, save-then-publish, fallback, outbox.
    #[arg(
        long,
        default_value = "publish-then-save,save-then-publish,fallback,outbox"
    )]
    modes: String,
    /// Business transactions per second, over all producers.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Aggregates (ordering keys) the producers update.
    #[arg(long, default_value_t = 16)]
    keys: usize,
    /// Relay processes sharing the outbox.
    #[arg(long, default_value_t = 2)]
    relays: usize,
    /// Relay lease; a paused relay is held past it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    lease: Duration,
    /// Longest wait for the backlog to drain after the faults healed (the liveness bound).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Start the broker with this shell command (listening on the --broker URL's port), so verify
    /// can also kill -9 and pause it, e.g. "nats-server -p 14222 -js -sd /tmp/verify-nats".
    #[arg(long)]
    broker_command: Option<String>,
    /// Kinds of fault to inject, comma-separated: kill-relay, relay-failpoint, pause-relay,
    /// terminate-sessions, broker-link, database-link, kill-broker, pause-broker, app-crash.
    /// Default: every kind the environment allows.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
    /// Run without faults: a baseline. Publish-then-save still publishes the transactions it
    /// rolls back (phantoms need no fault); the other modes should come out clean.
    #[arg(long, conflicts_with = "faults")]
    no_faults: bool,
    /// Also write the results to DIR/verify.json and each mode's full history (every produced
    /// message and outcome, delivery and applied effect) to DIR/history-<mode>.jsonl, for
    /// checking with a harness of your own.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Everything the modes share.
struct Env {
    /// The producers' pool (sessions named `<run>-app`, terminated by a fault).
    app: Database,
    /// The consumer's and checker's pool (never terminated).
    observer: Database,
    /// What relays connect to (through the database proxy, sessions named `<run>-relay`).
    relay_database: String,
    /// What relays and naive producers publish to (through the broker proxy, if any).
    relay_broker: String,
    consumer_transport: Arc<dyn Transport>,
    producer_transport: Arc<dyn Transport>,
    broker_proxy: Option<ChaosProxy>,
    db_proxy: Option<ChaosProxy>,
    broker_proc: Option<tokio::sync::Mutex<BrokerProc>>,
    run: String,
    tmp: PathBuf,
    caps: Capabilities,
}

/// Runs `herald verify`.
pub async fn run(args: VerifyArgs) -> Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let modes = args
        .modes
        .split(',')
        .map(|m| {
            Mode::parse(m.trim()).ok_or_else(|| {
                herald::Error::config(format!(
                    "unknown mode {m:?}: use publish-then-save, save-then-publish, fallback or outbox"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.producers == 0 || args.keys == 0 || args.relays == 0 || args.rate == 0 {
        bail!(herald::Error::config(
            "--producers, --keys, --relays and --rate must be at least 1"
        ));
    }
    for f in args.faults.iter().flatten() {
        if !Fault::KINDS.contains(&f.as_str()) {
            bail!(herald::Error::config(format!(
                "unknown fault kind {f:?}: use {}",
                Fault::KINDS.join(", ")
            )));
        }
    }
    if args.broker_command.is_some() && args.broker.is_none() {
        bail!(herald::Error::config(
            "--broker-command needs --broker with the URL the command's broker listens on"
        ));
    }
    let run = format!("hv_{:08x}", fastrand::Rng::with_seed(seed).u32(..));
    let tmp = std::env::temp_dir().join(format!("herald-verify-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&tmp).context("creating verify's temporary directory")?;
    let outcome = run_all(&args, seed, &modes, &run, &tmp).await;
    let _ = std::fs::remove_dir_all(&tmp);
    outcome
}

async fn run_all(
    args: &VerifyArgs,
    seed: u64,
    modes: &[Mode],
    run: &str,
    tmp: &std::path::Path,
) -> Result<ExitCode> {
    let env = Arc::new(open_env(args, run, tmp).await?);
    eprintln!(
        "verify: seed={seed} (repeat with --seed {seed}) duration={:?} rate={}/s producers={} keys={} relays={} lease={:?}",
        args.duration, args.rate, args.producers, args.keys, args.relays, args.lease
    );
    eprintln!(
        "verify: database={} broker={}",
        match env.app {
            Database::Postgres(_) => "postgres",
            Database::Sqlite(_) => "sqlite",
            Database::MySql(_) => unreachable!("verify refuses MySQL at start-up"),
        },
        env.consumer_transport.describe()
    );
    let mut durability = world::durability(&env.observer).await;
    match env.consumer_transport.durability_warnings().await {
        Ok(w) if w.is_empty() => durability.push("broker: no durability warnings".to_owned()),
        Ok(w) => durability.extend(w.into_iter().map(|w| format!("broker: {w}"))),
        Err(e) => durability.push(format!("broker: could not check ({})", e.chain())),
    }
    for d in &durability {
        eprintln!("verify: durability: {d}");
    }

    let mut results = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let r = run_mode(&env, args, seed.wrapping_add(i as u64), *mode, i).await?;
        eprintln!("{}", table(std::slice::from_ref(&r.0)).trim_end());
        results.push(r);
    }
    if let Some(b) = &env.broker_proc {
        b.lock().await.kill().await;
    }

    let rows: Vec<ModeResult> = results.iter().map(|(r, _)| r.clone()).collect();
    println!(
        "\nverify: seed {seed}, {:?} of faults per mode",
        args.duration
    );
    print!("{}", table(&rows));
    for d in &durability {
        println!("durability: {d}");
    }
    let mut ok = true;
    for (r, aborts) in &results {
        let v = &r.verdict;
        if r.mode == Mode::Outbox {
            ok = r.ok();
            if ok {
                println!(
                    "outbox: no loss, no phantom, no reorder, no effect applied twice; drained {:.1}s after healing ({} relay aborts at failpoints)",
                    r.drained_in.unwrap_or_default().as_secs_f64(),
                    aborts
                );
            } else {
                println!(
                    "outbox: GUARANTEE VIOLATED: lost={:?} phantom={:?} out_of_order={:?} duplicate_effects={:?} drained={} waited_past_bound={}",
                    first(&v.lost),
                    first(&v.phantom),
                    first(&v.out_of_order),
                    first(&v.duplicate_effects),
                    r.drained_in.is_some(),
                    !r.waits_ok()
                );
            }
        }
        if r.mode.uses_relay() {
            let verdict = match r.wait_bound {
                None => "no bound: the broker process itself was killed or paused".to_owned(),
                Some(bound) => format!(
                    "bound {:.2}s (lease {:?} + longest fault + publish timeout + backoff){}",
                    bound.as_secs_f64(),
                    args.lease,
                    if r.waits_ok() { "" } else { ": EXCEEDED" }
                ),
            };
            println!(
                "{}: commit to first delivery p50 {:.2}s p99 {:.2}s max {:.2}s over {} messages; {verdict}",
                r.mode.name(),
                v.waits.p50.as_secs_f64(),
                v.waits.p99.as_secs_f64(),
                v.waits.max.as_secs_f64(),
                v.waits.count,
            );
        }
        for (id, reason) in v.dead_lettered.iter().take(3) {
            println!("{}: dead letter {id}: {reason}", r.mode.name());
        }
    }
    if let Some(dir) = &args.out {
        write_json(dir, seed, args, &durability, &results)?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn first(ids: &[uuid::Uuid]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().take(3).map(|i| i.to_string()).collect();
    if ids.len() > 3 {
        v.push(format!("... {} in all", ids.len()));
    }
    v
}

fn write_json(
    dir: &std::path::Path,
    seed: u64,
    args: &VerifyArgs,
    durability: &[String],
    results: &[(ModeResult, u32)],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let modes: Vec<_> = results
        .iter()
        .map(|(r, aborts)| {
            let v = &r.verdict;
            serde_json::json!({
                "mode": r.mode.name(),
                "committed": v.committed,
                "rolled_back": v.rolled_back,
                "unknown": v.unknown + v.settled,
                "delivered": v.delivered,
                "lost": v.lost.len(),
                "phantom": v.phantom.len(),
                "out_of_order": v.out_of_order.len(),
                "duplicate_deliveries": v.duplicates,
                "duplicate_effects": v.duplicate_effects.len(),
                "dead_lettered": v.dead_lettered.len(),
                "faults": r.faults,
                "relay_failpoint_aborts": aborts,
                "drained_s": r.drained_in.map(|d| d.as_secs_f64()),
                "wait_p50_s": v.waits.p50.as_secs_f64(),
                "wait_p99_s": v.waits.p99.as_secs_f64(),
                "wait_max_s": v.waits.max.as_secs_f64(),
                "wait_bound_s": r.wait_bound.map(|d| d.as_secs_f64()),
                "ok": r.ok(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "seed": seed,
        "duration_s": args.duration.as_secs_f64(),
        "rate": args.rate,
        "producers": args.producers,
        "keys": args.keys,
        "relays": args.relays,
        "durability": durability,
        "modes": modes,
    });
    let path = dir.join("verify.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("verify: results written to {}", path.display());
    Ok(())
}

/// One JSON object per line: `{"produced": ...}` (outcome as resolved from the ledger),
/// `{"delivered": ...}` (every delivery, in order), `{"applied": ...}` (effects in commit order),
/// `{"dead_lettered": ...}`.
fn write_history(
    dir: &std::path::Path,
    mode: Mode,
    h: &History,
    verdict: &herald_testkit::Verdict,
) -> Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("history-{}.jsonl", mode.name()));
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    for (id, key, seq, outcome) in h.produced_records() {
        let outcome = match outcome {
            herald_testkit::Outcome::Committed => "committed",
            herald_testkit::Outcome::RolledBack => "rolled_back",
            herald_testkit::Outcome::Unknown => "unknown",
        };
        let line = serde_json::json!({"produced": {"id": id, "key": key, "version": seq, "outcome": outcome}});
        writeln!(w, "{line}")?;
    }
    for (id, key, seq) in h.delivery_records() {
        writeln!(
            w,
            "{}",
            serde_json::json!({"delivered": {"id": id, "key": key, "version": seq}})
        )?;
    }
    for (id, key, seq) in h.effect_records() {
        writeln!(
            w,
            "{}",
            serde_json::json!({"applied": {"id": id, "key": key, "version": seq}})
        )?;
    }
    for (id, reason) in &verdict.dead_lettered {
        writeln!(
            w,
            "{}",
            serde_json::json!({"dead_lettered": {"id": id, "reason": reason}})
        )?;
    }
    w.flush()?;
    Ok(())
}

/// The URL with its host and port replaced by `addr` (a proxy's).
fn via(url: &SecretUrl, addr: std::net::SocketAddr) -> Result<String> {
    let mut u = url::Url::parse(url.expose()).context("re-parsing a URL")?;
    u.set_host(Some(&addr.ip().to_string()))
        .map_err(|e| anyhow::anyhow!("cannot point {url} at the proxy: {e}"))?;
    u.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot point {url} at the proxy"))?;
    Ok(u.to_string())
}

/// The server behind a URL, for a proxy to forward to.
async fn target(url: &SecretUrl, default_port: u16) -> Result<std::net::SocketAddr> {
    let u = url::Url::parse(url.expose()).context("re-parsing a URL")?;
    let host = u.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = u.port().unwrap_or(default_port);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {url}"))?
        .next()
        .with_context(|| format!("{url} resolves to no address"))
}

fn with_app_name(url: &str, name: &str) -> Result<String> {
    let mut u = url::Url::parse(url).context("re-parsing the database URL")?;
    u.query_pairs_mut().append_pair("application_name", name);
    Ok(u.to_string())
}

async fn open_env(args: &VerifyArgs, run: &str, tmp: &std::path::Path) -> Result<Env> {
    let db_raw = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/verify.db", tmp.display()));
    let broker_raw = args
        .broker
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/broker.db", tmp.display()));
    let db_url = backends::parse_url("database", &db_raw)?;
    let broker_url = backends::parse_url("broker", &broker_raw)?;
    if matches!(db_url.scheme(), "mysql" | "mariadb") {
        anyhow::bail!(herald::Error::config(
            "verify runs on PostgreSQL and SQLite for now; MySQL/MariaDB is covered by the store, inbox and \
             consumer suites (docs/BACKENDS.md)"
        ));
    }

    let broker_default_port = match broker_url.scheme() {
        "amqp" => Some(5672),
        "amqps" => Some(5671),
        "nats" | "tls" => Some(4222),
        "sqlite" => None,
        other => bail!(herald::Error::config(format!(
            "broker URL scheme {other:?} is not supported: use amqp://, nats:// or sqlite://path"
        ))),
    };
    let broker_proc = match &args.broker_command {
        Some(cmd) => {
            let port = broker_default_port
                .map(|d| {
                    url::Url::parse(broker_url.expose())
                        .ok()
                        .and_then(|u| u.port())
                        .unwrap_or(d)
                })
                .ok_or_else(|| {
                    herald::Error::config("--broker-command needs a network broker URL")
                })?;
            Some(tokio::sync::Mutex::new(
                BrokerProc::start(cmd, port, tmp.join("broker.log")).await?,
            ))
        }
        None => None,
    };

    let mut caps = Capabilities {
        broker_process: broker_proc.is_some(),
        ..Capabilities::default()
    };
    let (app, observer, relay_database, db_proxy) = match db_url.scheme() {
        "postgres" | "postgresql" => {
            let app_url = backends::parse_url(
                "database",
                &with_app_name(db_url.expose(), &format!("{run}-app"))?,
            )?;
            let app = backends::open_database(&app_url, None).await?;
            let observer = backends::open_database(&db_url, None).await?;
            let proxy = ChaosProxy::start(target(&db_url, 5432).await?).await?;
            let relay = with_app_name(&via(&db_url, proxy.addr())?, &format!("{run}-relay"))?;
            caps.database_sessions = true;
            caps.database_proxy = true;
            (app, observer, relay, Some(proxy))
        }
        "sqlite" => {
            let db = backends::open_database(&db_url, None).await?;
            (db.clone(), db, db_url.expose().to_owned(), None)
        }
        other => bail!(herald::Error::config(format!(
            "database URL scheme {other:?} is not supported: use postgres://... or sqlite://path"
        ))),
    };

    // Redeliver unacknowledged messages after 5 s (not the default 30 s), so that the settle
    // time of the naive modes' drain (8 s without progress) outlasts a redelivery.
    let consumer_transport: Arc<dyn Transport> = match broker_url.scheme() {
        "nats" | "tls" => Arc::new(
            herald::nats::NatsTransport::connect(broker_url.clone())
                .await?
                .with_ack_wait(REDELIVERY),
        ),
        "sqlite" => Arc::new(
            herald::embedded::EmbeddedTransport::open(broker_url.expose())
                .await
                .with_context(|| format!("cannot open the embedded broker at {broker_url}"))?
                .with_visibility_timeout(REDELIVERY),
        ),
        _ => backends::open_transport(&broker_url).await?,
    };
    let (producer_transport, relay_broker, broker_proxy) = match broker_default_port {
        Some(port) => {
            let proxy = ChaosProxy::start(target(&broker_url, port).await?).await?;
            let proxied = backends::parse_url("broker", &via(&broker_url, proxy.addr())?)?;
            caps.broker_proxy = true;
            (
                backends::open_transport(&proxied).await?,
                proxied.expose().to_owned(),
                Some(proxy),
            )
        }
        None => (
            consumer_transport.clone(),
            broker_url.expose().to_owned(),
            None,
        ),
    };
    Ok(Env {
        app,
        observer,
        relay_database,
        relay_broker,
        consumer_transport,
        producer_transport,
        broker_proxy,
        db_proxy,
        broker_proc,
        run: run.to_owned(),
        tmp: tmp.to_owned(),
        caps,
    })
}

/// Counters shown in the progress line.
#[derive(Default)]
struct Progress {
    /// Whether the broker process was killed or paused in this run.
    broker_down: AtomicBool,
    committed: AtomicU64,
    faults: AtomicU64,
}

async fn run_mode(
    env: &Arc<Env>,
    args: &VerifyArgs,
    seed: u64,
    mode: Mode,
    index: usize,
) -> Result<(ModeResult, u32)> {
    let tables = Tables::new(&format!("{}_{index}", env.run))?;
    let topic = format!("{}_{index}", env.run);
    world::setup(&env.observer, &tables, args.keys).await?;
    let outcome = run_mode_in(env, args, seed, mode, &tables, &topic).await;
    world::teardown(&env.observer, &tables).await;
    outcome
}

async fn run_mode_in(
    env: &Arc<Env>,
    args: &VerifyArgs,
    seed: u64,
    mode: Mode,
    tables: &Tables,
    topic: &str,
) -> Result<(ModeResult, u32)> {
    let history = Arc::new(Mutex::new(History::new()));
    let progress = Arc::new(Progress::default());
    let started = Instant::now();

    // The consumer subscribes first, so its queue or stream exists before anything is published.
    let consumer = consumer(env, tables, topic, history.clone())?;
    drop(
        consumer
            .subscribe()
            .await
            .context("subscribing the consumer")?,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let consuming = {
        let (c, mut stop) = (consumer.clone(), stop_rx.clone());
        tokio::spawn(async move {
            c.run(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };

    let spec = Arc::new(RelaySpec {
        database: env.relay_database.clone(),
        broker: env.relay_broker.clone(),
        table: tables.outbox.to_string(),
        lease: args.lease,
        log: env.tmp.join(format!("relays-{}.log", mode.name())),
    });
    let mut relays = Vec::new();
    if mode.uses_relay() {
        for i in 0..args.relays {
            relays.push(RelayProc::start(
                format!("{}-relay-{i}", env.run),
                spec.clone(),
            )?);
        }
    }

    // Producers until the deadline, faults meanwhile.
    let crashed = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + args.duration;
    let producers: Vec<_> = (0..args.producers)
        .map(|i| {
            let ctx = ProducerCtx {
                env: env.clone(),
                tables: tables.clone(),
                topic: topic.to_owned(),
                mode,
                history: history.clone(),
                progress: progress.clone(),
                crashed: crashed.clone(),
                keys: args.keys,
                every: Duration::from_secs_f64(args.producers as f64 / f64::from(args.rate)),
                deadline,
                rng: fastrand::Rng::with_seed(
                    seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ),
            };
            tokio::spawn(produce(ctx))
        })
        .collect();
    let reporter = {
        let (progress, consumer, name) = (progress.clone(), consumer.clone(), mode.name());
        let total = args.duration;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "verify: {name:<17} {:>5.1}s/{:.0}s committed {:>6}  applied {:>6}  faults {:>3}",
                    started.elapsed().as_secs_f64(),
                    total.as_secs_f64(),
                    progress.committed.load(Ordering::Relaxed),
                    consumer.counters().applied.load(Ordering::Relaxed),
                    progress.faults.load(Ordering::Relaxed)
                );
            }
        })
    };
    let mut plan = FaultPlan::new(seed, mode, env.caps, args.lease);
    let mut longest = Duration::ZERO;
    if let Some(kinds) = &args.faults {
        plan = plan.only(kinds);
    }
    if !args.no_faults {
        longest = inject(
            env,
            &mut plan,
            &mut relays,
            &crashed,
            &progress,
            deadline,
            started,
        )
        .await?;
    }
    for p in producers {
        p.await?;
    }

    // Heal everything and let the backlog drain.
    heal(env, &mut relays, &crashed).await?;
    let healed = Instant::now();
    let mut drained_in = None;
    let mut last = (i64::MAX, Instant::now());
    loop {
        let pending = world::pending(&env.observer, tables).await?;
        if pending == 0 {
            drained_in = Some(healed.elapsed());
            break;
        }
        if healed.elapsed() > args.drain_timeout {
            break;
        }
        if pending != last.0 {
            last = (pending, Instant::now());
        } else if mode != Mode::Outbox
            && last.1.elapsed() > SETTLE
            && world::outbox_depth(&env.observer, tables).await? == 0
        {
            // Nothing is on its way any more: what is missing is lost.
            break;
        }
        if consuming.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stray duplicates (and phantoms) get a moment to arrive too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reporter.abort();
    let mut aborts = 0;
    for r in &mut relays {
        r.running();
        aborts += r.aborted;
        r.stop(Duration::from_secs(10)).await;
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(10), consuming).await {
        Ok(Ok(Err(e))) => bail!("the verify consumer failed: {}", e.chain()),
        Ok(Err(e)) => bail!("the verify consumer panicked: {e}"),
        _ => {}
    }

    // Check the history against the database's ground truth.
    let ledger = world::ledger_ids(&env.observer, tables).await?;
    let effects = world::effects(&env.observer, tables).await?;
    let dead = world::dead_letters(&env.observer, tables).await?;
    let mut h = std::mem::take(&mut *history.lock().expect("history lock"));
    h.resolve(|id| ledger.contains(id));
    for (id, agg, version) in &effects {
        h.applied(*id, agg, *version);
    }
    for (id, reason) in &dead {
        h.dead_lettered(*id, reason);
    }
    let verdict = h.check();
    if let Some(dir) = &args.out {
        write_history(dir, mode, &h, &verdict)?;
    }
    Ok((
        ModeResult {
            mode,
            verdict,
            faults: progress.faults.load(Ordering::Relaxed) as usize,
            drained_in,
            // A killed or paused broker's recovery (its restart, its clients' reconnects) is not
            // the relay's to bound: such runs report their waits without a bound.
            wait_bound: (mode.uses_relay() && !progress.broker_down.load(Ordering::Relaxed))
                .then(|| wait_bound(args.lease, longest)),
        },
        aborts,
    ))
}

fn consumer(
    env: &Env,
    tables: &Tables,
    topic: &str,
    history: Arc<Mutex<History>>,
) -> Result<Consumer> {
    let transport: Arc<dyn Transport> = Arc::new(RecordingTransport::new(
        env.consumer_transport.clone(),
        history,
        world::key_seq,
    ));
    let (apply, concurrency): (Arc<dyn herald::Apply>, usize) = match &env.observer {
        Database::Postgres(p) => (
            Arc::new(herald::postgres::PgApplier::new(
                p.clone(),
                &tables.outbox,
                world::Effects::new(tables),
            )?),
            4,
        ),
        Database::Sqlite(p) => (
            Arc::new(herald::sqlite::SqliteApplier::new(
                p.clone(),
                &tables.outbox,
                world::Effects::new(tables),
            )?),
            1,
        ),
        Database::MySql(_) => unreachable!("verify refuses MySQL at start-up"),
    };
    Ok(Consumer::new(
        transport,
        apply,
        Subscription::events(topic, format!("{topic}-consumer")),
        ConsumerConfig {
            concurrency,
            ..ConsumerConfig::default()
        },
    )?)
}

struct ProducerCtx {
    env: Arc<Env>,
    tables: Tables,
    topic: String,
    mode: Mode,
    history: Arc<Mutex<History>>,
    progress: Arc<Progress>,
    crashed: Arc<AtomicBool>,
    keys: usize,
    every: Duration,
    deadline: Instant,
    rng: fastrand::Rng,
}

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How soon the broker redelivers a message whose acknowledgement was lost.
const REDELIVERY: Duration = Duration::from_secs(5);
/// How long the naive modes' backlog may make no progress before what is missing counts as lost.
const SETTLE: Duration = Duration::from_secs(8);

async fn publish_once(transport: &Arc<dyn Transport>, m: &Message) -> bool {
    matches!(
        tokio::time::timeout(PUBLISH_TIMEOUT, transport.publish(std::slice::from_ref(m))).await,
        Ok(r) if r.iter().all(Result::is_ok)
    )
}

async fn produce(mut ctx: ProducerCtx) {
    let env = ctx.env.clone();
    let in_tx: Option<world::InTx> = (ctx.mode == Mode::PublishThenSave).then(|| {
        let t = env.producer_transport.clone();
        let hook: world::InTx = Arc::new(move |m: Message| {
            let t = t.clone();
            Box::pin(async move { publish_once(&t, &m).await })
        });
        hook
    });
    let fallback = (ctx.mode == Mode::Fallback).then(|| {
        let park: Arc<dyn herald::Park> = match &env.app {
            Database::Postgres(p) => {
                Arc::new(herald::postgres::PgPark::new(p.clone(), &ctx.tables.outbox))
            }
            Database::Sqlite(p) => Arc::new(herald::sqlite::SqlitePark::new(
                p.clone(),
                &ctx.tables.outbox,
            )),
            Database::MySql(_) => unreachable!("verify refuses MySQL at start-up"),
        };
        FallbackPublisher::new(env.producer_transport.clone(), park, PUBLISH_TIMEOUT)
    });
    let mut tick = tokio::time::interval(ctx.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < ctx.deadline {
        tick.tick().await;
        let agg = world::agg_name(ctx.rng.usize(..ctx.keys));
        let roll = ctx.rng.u8(..100);
        let plan = Plan {
            rollback: roll < 10,
            hold: (10..15)
                .contains(&roll)
                .then(|| Duration::from_millis(ctx.rng.u64(50..400))),
        };
        let step = world::transact(
            &env.app,
            &ctx.tables,
            &ctx.topic,
            &agg,
            match (&in_tx, ctx.mode) {
                (Some(publish), _) => Carry::PublishFirst(publish),
                (None, Mode::Outbox) => Carry::Outbox,
                (None, _) => Carry::Nothing,
            },
            plan,
            &ctx.crashed,
        )
        .await;
        let Step::Done(msg, version, outcome) = step else {
            continue;
        };
        ctx.history
            .lock()
            .expect("history lock")
            .produced(msg.id, &agg, version as u64, outcome);
        if outcome != herald_testkit::Outcome::Committed {
            continue;
        }
        ctx.progress.committed.fetch_add(1, Ordering::Relaxed);
        if ctx.crashed.load(Ordering::SeqCst) {
            // The process "died" after its commit: the naive modes never get to publish.
            continue;
        }
        match ctx.mode {
            Mode::SaveThenPublish => {
                publish_once(&env.producer_transport, &msg).await;
            }
            Mode::Fallback => {
                if let Some(f) = &fallback {
                    let _ = f.publish(std::slice::from_ref(&msg)).await;
                }
            }
            Mode::PublishThenSave | Mode::Outbox => {}
        }
    }
}

/// Injects faults from `plan` until `deadline`, one at a time.
/// The longest a committed message may wait for its first delivery: the takeover bound (the
/// lease), plus the longest fault, plus what a relay needs to notice that a fault healed (one
/// publish timeout still running, then one retry backoff; see `RelayProc::spawn`).
pub fn wait_bound(lease: Duration, longest_fault: Duration) -> Duration {
    lease + longest_fault + procs::publish_timeout(lease) + procs::backoff_max(lease)
}

/// Injects faults until `deadline`; returns the longest one's duration.
async fn inject(
    env: &Env,
    plan: &mut FaultPlan,
    relays: &mut [RelayProc],
    crashed: &AtomicBool,
    progress: &Progress,
    deadline: Instant,
    started: Instant,
) -> Result<Duration> {
    let mut longest = Duration::ZERO;
    loop {
        let now = Instant::now();
        let Some((gap, fault, hold)) = plan.next_fault() else {
            tokio::time::sleep(deadline.saturating_duration_since(now)).await;
            return Ok(longest);
        };
        if now + gap + hold >= deadline {
            tokio::time::sleep(deadline.saturating_duration_since(now)).await;
            return Ok(longest);
        }
        longest = longest.max(hold);
        tokio::time::sleep(gap).await;
        let which = plan.pick(relays.len());
        let target = match fault {
            Fault::KillRelay | Fault::RelayFailpoint(_) | Fault::PauseRelay => {
                relays.get(which).map_or("", |r| r.id()).to_owned()
            }
            _ => String::new(),
        };
        eprintln!(
            "verify: [{:>5.1}s] {fault} {target} for {:.1}s",
            started.elapsed().as_secs_f64(),
            hold.as_secs_f64()
        );
        progress.faults.fetch_add(1, Ordering::Relaxed);
        match fault {
            Fault::KillRelay => {
                relays[which].kill().await;
                tokio::time::sleep(hold).await;
                relays[which].spawn(None)?;
            }
            Fault::RelayFailpoint(point) => {
                relays[which].kill().await;
                relays[which].spawn(Some(point))?;
                tokio::time::sleep(hold).await;
                if relays[which].running() {
                    relays[which].kill().await;
                }
                relays[which].spawn(None)?;
            }
            Fault::PauseRelay => {
                relays[which].pause().await;
                tokio::time::sleep(hold).await;
                relays[which].resume().await;
            }
            Fault::TerminateSessions => {
                if let Database::Postgres(p) = &env.observer {
                    sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name IN ($1, $2) AND pid <> pg_backend_pid()",
                    )
                    .bind(format!("{}-app", env.run))
                    .bind(format!("{}-relay", env.run))
                    .execute(p)
                    .await?;
                }
                tokio::time::sleep(hold).await;
            }
            Fault::BrokerLink(link) => {
                if let Some(p) = &env.broker_proxy {
                    p.set(link);
                    tokio::time::sleep(hold).await;
                    p.heal();
                }
            }
            Fault::DatabaseLink(link) => {
                if let Some(p) = &env.db_proxy {
                    p.set(link);
                    tokio::time::sleep(hold).await;
                    p.heal();
                }
            }
            Fault::KillBroker => {
                progress.broker_down.store(true, Ordering::Relaxed);
                if let Some(b) = &env.broker_proc {
                    b.lock().await.kill().await;
                    tokio::time::sleep(hold).await;
                    b.lock().await.spawn().await?;
                }
            }
            Fault::PauseBroker => {
                progress.broker_down.store(true, Ordering::Relaxed);
                if let Some(b) = &env.broker_proc {
                    b.lock().await.signal("STOP").await;
                    tokio::time::sleep(hold).await;
                    b.lock().await.signal("CONT").await;
                }
            }
            Fault::AppCrash => {
                crashed.store(true, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                crashed.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Undoes every fault: links healthy, broker up and running, every relay running normally.
async fn heal(env: &Env, relays: &mut [RelayProc], crashed: &AtomicBool) -> Result<()> {
    crashed.store(false, Ordering::SeqCst);
    for p in [&env.broker_proxy, &env.db_proxy].into_iter().flatten() {
        p.heal();
    }
    if let Some(b) = &env.broker_proc {
        let mut b = b.lock().await;
        if b.running() {
            b.signal("CONT").await;
        } else {
            b.spawn().await?;
        }
    }
    for r in relays {
        r.resume().await;
        if !r.running() {
            r.spawn(None)?;
        }
    }
    Ok(())
}
