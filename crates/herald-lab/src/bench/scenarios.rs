//! The benchmark scenarios and their same-run baselines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_trait::async_trait;
use herald::{
    BoxError, Consumer, ConsumerConfig, Message, Relay, RelayConfig, Subscription, Transport,
};
use serde::Serialize;

use super::db::BenchDb;
use super::timing::{Percentiles, TimingApply, TimingTransport, Timings};
use herald::connect::Database;

/// What a scenario needs: the database, the broker, names, knobs.
pub struct Env {
    pub db: Arc<BenchDb>,
    pub broker: Arc<dyn Transport>,
    pub topic: String,
    pub relay: RelayConfig,
    pub payload_bytes: usize,
}

impl Env {
    pub fn message(&self, i: u64) -> Message {
        let mut payload = format!("{{\"order\":{i},\"note\":\"");
        while payload.len() + 2 < self.payload_bytes {
            payload.push('x');
        }
        payload.push_str("\"}");
        Message::raw_event(&self.topic, "OrderPlaced", payload.into_bytes())
            .with_key(format!("order-{}", i % 1000))
    }

    async fn relay(&self, transport: Arc<dyn Transport>, id: &str) -> Result<Relay> {
        let store: Arc<dyn herald::OutboxStore> = match &self.db.db {
            Database::Postgres(p) => {
                Arc::new(herald::postgres::PgOutbox::new(p.clone(), self.db.table.clone()).await?)
            }
            Database::Sqlite(p) => {
                Arc::new(herald::sqlite::SqliteOutbox::new(p.clone(), self.db.table.clone()).await?)
            }
            Database::MySql(_) => unreachable!("the bench refuses MySQL at start-up"),
        };
        Ok(Relay::new(
            store,
            transport,
            RelayConfig {
                relay_id: id.to_owned(),
                ..self.relay.clone()
            },
        )?)
    }
}

/// Prints progress on one line every second until dropped.
struct Progress {
    stop: Arc<AtomicBool>,
}

impl Progress {
    fn start(label: String, done: Arc<AtomicU64>, total: Option<u64>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let n = done.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64();
                match total {
                    Some(t) => eprintln!("bench: {label}: {n}/{t} ({rate:.0}/s)"),
                    None => eprintln!("bench: {label}: {n} ({rate:.0}/s)"),
                }
            }
        });
        Progress { stop }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A throughput figure.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub name: String,
    pub count: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// The bench process's peak resident memory during the scenario (Linux), where measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// CPU time the bench process used per message during the scenario, microseconds (Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_message: Option<f64>,
    /// What the relay alone cost PostgreSQL per message during the scenario.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_db_cost: Option<RelayCost>,
}

/// The relay's own database writes per message (the producer's insert is not counted).
#[derive(Debug, Clone, Serialize)]
pub struct RelayCost {
    pub wal_bytes_per_event: f64,
    pub transactions_per_event: f64,
    pub rows_written_per_event: f64,
}

impl Rate {
    fn new(name: &str, count: u64, elapsed: Duration) -> Rate {
        let seconds = elapsed.as_secs_f64();
        Rate {
            name: name.to_owned(),
            count,
            seconds,
            per_second: count as f64 / seconds.max(1e-9),
            peak_rss_bytes: None,
            cpu_us_per_message: None,
            relay_db_cost: None,
        }
    }
}

/// Resets the process's peak resident set size, so the next [`peak_rss`] covers what follows.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set size since start or the last [`reset_peak_rss`] (VmHWM).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Raw publishing with confirmations through the same client and in-flight window as the relay
/// (`workers` loops of `batch_size`): the relay's ceiling.
pub async fn raw_publish(env: &Env, n: u64) -> Result<Rate> {
    let done = Arc::new(AtomicU64::new(0));
    let _p = Progress::start("raw publish".into(), done.clone(), Some(n));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..env.relay.workers {
        let (next, done, broker) = (next.clone(), done.clone(), env.broker.clone());
        let batch = env.relay.batch_size as u64;
        let msgs: Vec<Message> = (0..batch).map(|i| env.message(i)).collect();
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= n {
                    return anyhow::Ok(());
                }
                let k = batch.min(n - from) as usize;
                // Fresh ids, as distinct messages would have (NATS deduplicates repeated ids).
                let fresh: Vec<Message> = msgs[..k]
                    .iter()
                    .map(|m| Message {
                        id: uuid::Uuid::now_v7(),
                        ..m.clone()
                    })
                    .collect();
                for r in broker.publish(&fresh).await {
                    r?;
                }
                done.fetch_add(k as u64, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(Rate::new(
        "raw publish with confirms (relay ceiling)",
        n,
        started.elapsed(),
    ))
}

/// A broker that confirms everything at once and keeps nothing: the relay against it measures
/// what the database side alone allows (claim, mark, and the relay's own work).
struct InstantBroker;

#[async_trait::async_trait]
impl Transport for InstantBroker {
    async fn publish(&self, batch: &[Message]) -> Vec<herald::Result<()>> {
        batch.iter().map(|_| Ok(())).collect()
    }
    async fn subscribe(
        &self,
        _: &herald::Subscription,
    ) -> herald::Result<Box<dyn herald::Subscriber>> {
        Err(herald::Error::config(
            "the instant broker has no subscribers",
        ))
    }
    fn describe(&self) -> String {
        "instant broker (confirms at once, keeps nothing)".to_owned()
    }
}

/// The database ceiling: the drain with a broker that confirms at once.
pub async fn db_ceiling(env: &Env, n: u64) -> Result<Rate> {
    let mut rate = drain_to(env, n, Arc::new(InstantBroker), "drain, instant broker").await?;
    rate.name = "relay, instant broker (database ceiling)".to_owned();
    Ok(rate)
}

/// Drain: an outbox pre-filled with `n` messages, published by the relay until empty.
pub async fn drain(env: &Env, n: u64) -> Result<Rate> {
    drain_to(env, n, env.broker.clone(), "drain").await
}

/// The drain with telemetry off and on, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryCost {
    /// No metrics recorder, no spans.
    pub off: Rate,
    /// Prometheus recorder installed and every metric recorded; a `herald.publish` span per
    /// message, exported over OTLP/gRPC to a local sink.
    pub on: Rate,
    /// `on` / `off` throughput.
    pub ratio: f64,
    /// `on` / `off` CPU time per message of the bench process (the relay, the in-process
    /// databases and broker where they are, and the OTLP sink while on): steadier than the
    /// throughput on a busy machine.
    pub cpu_ratio: Option<f64>,
    /// Spans the sink received during the `on` drain (the batch exporter drops spans its
    /// queue cannot hold, as OpenTelemetry SDKs do, rather than slow the relay down).
    pub spans_received: u64,
    /// Size of one `/metrics` scrape after the `on` drain, bytes.
    pub scrape_bytes: usize,
}

/// Drains `n` messages with telemetry off, then installs the Prometheus recorder, turns spans
/// on and drains `n` more, exporting to `o.sink`.
pub async fn telemetry_cost(env: &Env, n: u64, o: super::Observed<'_>) -> Result<TelemetryCost> {
    let off = drain_to(env, n, env.broker.clone(), "drain, telemetry off").await?;
    let metrics = herald_telemetry::Metrics::install()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    o.telemetry.set_spans(true);
    let before = o.sink.spans().len();
    let on = drain_to(env, n, env.broker.clone(), "drain, telemetry on").await;
    o.telemetry.set_spans(false);
    let on = on?;
    // What the batch exporter still holds goes out now; it is not timed.
    let telemetry = o.telemetry;
    tokio::task::block_in_place(|| telemetry.flush());
    let spans_received = o
        .sink
        .wait_for(Duration::from_secs(5), |s| s.len() - before >= n as usize)
        .await
        .len()
        - before;
    let scrape_bytes = metrics.render().len();
    Ok(TelemetryCost {
        ratio: on.per_second / off.per_second.max(f64::MIN_POSITIVE),
        cpu_ratio: on
            .cpu_us_per_message
            .zip(off.cpu_us_per_message)
            .map(|(a, b)| a / b.max(f64::MIN_POSITIVE)),
        off: Rate {
            name: "drain, telemetry off".to_owned(),
            ..off
        },
        on: Rate {
            name: "drain, metrics + OTLP spans".to_owned(),
            ..on
        },
        spans_received: spans_received as u64,
        scrape_bytes,
    })
}

async fn drain_to(env: &Env, n: u64, broker: Arc<dyn Transport>, label: &str) -> Result<Rate> {
    eprintln!("bench: {label}: filling the outbox with {n} messages");
    let messages: Vec<Message> = (0..n).map(|i| env.message(i)).collect();
    env.db.prefill(&messages).await?;
    drop(messages);
    let relay = env.relay(broker, "bench-drain").await?;
    let before = env.db.pg_counters().await?;
    reset_peak_rss();
    let done = Arc::new(AtomicU64::new(0));
    let _p = Progress::start(label.into(), done.clone(), Some(n));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = {
        let relay = relay.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stop_rx.changed().await;
                })
                .await
        })
    };
    let started = Instant::now();
    let cpu_before = herald_telemetry::process::cpu_seconds();
    let deadline = started + Duration::from_secs(600);
    loop {
        let published = relay.counters().published.load(Ordering::Relaxed);
        done.store(published, Ordering::Relaxed);
        if published >= n {
            break;
        }
        if Instant::now() > deadline || runner.is_finished() {
            bail!("drain stopped at {published}/{n}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(herald_telemetry::process::cpu_seconds())
        .map(|(b, a)| (a - b) * 1e6 / n.max(1) as f64);
    let _ = stop_tx.send(true);
    runner.await??;
    let peak = peak_rss();
    // Backends flush their statistics at most once a second once idle: wait for the relay's.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = env.db.pg_counters().await?;
    // Later scenarios should not inherit the drain's dead rows.
    if let Database::Postgres(p) = &env.db.db {
        sqlx::query("VACUUM herald_outbox").execute(p).await?;
    }
    let mut rate = Rate::new("drain (outbox to broker)", n, elapsed);
    rate.peak_rss_bytes = peak;
    rate.cpu_us_per_message = cpu;
    if let (Some(b), Some(a)) = (before, after) {
        let per = |x: i64| x as f64 / n.max(1) as f64;
        rate.relay_db_cost = Some(RelayCost {
            wal_bytes_per_event: per(a.wal_bytes - b.wal_bytes),
            transactions_per_event: per(a.xact_commit - b.xact_commit),
            rows_written_per_event: per((a.tup_inserted - b.tup_inserted)
                + (a.tup_updated - b.tup_updated)
                + (a.tup_deleted - b.tup_deleted)),
        });
    }
    Ok(rate)
}

/// Latencies of one steady run.
#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    pub name: String,
    pub target_per_second: Option<u32>,
    pub achieved_per_second: f64,
    pub commit_to_confirm: Percentiles,
    pub commit_to_consumer: Percentiles,
    /// The producers' share: intended send time to their commit returning.
    pub intended_to_commit: Percentiles,
    pub db_cost: Option<DbCost>,
}

/// What one event costs PostgreSQL, measured over a steady run.
#[derive(Debug, Clone, Serialize)]
pub struct DbCost {
    pub wal_bytes_per_event: f64,
    pub transactions_per_event: f64,
    pub rows_written_per_event: f64,
    pub peak_dead_tuples: i64,
    pub outbox_table_bytes: i64,
    pub outbox_index_bytes: i64,
}

struct Noop;

#[async_trait]
impl<DB: herald::sql::SqlDb> herald::sql::Handler<DB> for Noop {
    async fn handle(&self, _tx: &mut DB::Connection, _m: &Message) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Producers committing business row + outbox message, open loop at `rate` per second (latency
/// counted from each message's intended send time, so a stall is not hidden) or, with `rate`
/// `None`, closed loop with `writers` writers as fast as they go (latency from transaction start).
/// The relay runs in-process and is woken after each commit when `wake` is set.
pub async fn steady(
    env: &Env,
    rate: Option<u32>,
    duration: Duration,
    writers: usize,
    wake: bool,
    consumer_concurrency: usize,
) -> Result<Steady> {
    let with_consumer = consumer_concurrency > 0;
    let timings = Timings::new();
    let transport: Arc<dyn Transport> = Arc::new(TimingTransport {
        inner: env.broker.clone(),
        timings: timings.clone(),
    });
    let relay = env.relay(transport.clone(), "bench-steady").await?;
    let service = format!("bench-consumer-{}", fastrand::u32(..));
    // A topic of its own, so the consumer does not first wade through earlier scenarios' events.
    let topic = format!(
        "{}_{}",
        env.topic,
        rate.map_or_else(|| "max".to_owned(), |r| r.to_string())
    );
    let apply: Arc<dyn herald::Apply> = match &env.db.db {
        Database::Postgres(p) => Arc::new(herald::postgres::PgApplier::new(
            p.clone(),
            &env.db.table,
            Noop,
        )?),
        Database::Sqlite(p) => Arc::new(herald::sqlite::SqliteApplier::new(
            p.clone(),
            &env.db.table,
            Noop,
        )?),
        Database::MySql(_) => unreachable!("the bench refuses MySQL at start-up"),
    };
    let apply: Arc<dyn herald::Apply> = Arc::new(TimingApply {
        inner: apply,
        timings: timings.clone(),
    });
    let consumer = Consumer::new(
        env.broker.clone(),
        apply,
        Subscription::events(&topic, &service),
        ConsumerConfig {
            concurrency: consumer_concurrency.max(1),
            ..ConsumerConfig::default()
        },
    )?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopper = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let relay_task = {
        let (relay, rx) = (relay.clone(), stop_rx.clone());
        tokio::spawn(async move { relay.run(stopper(rx)).await })
    };
    let consumer_task = {
        let (consumer, rx) = (consumer.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if with_consumer {
                consumer.run(stopper(rx)).await
            } else {
                Ok(())
            }
        })
    };

    let before = env.db.pg_counters().await?;
    let peak_dead = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (db, peak, on) = (env.db.clone(), peak_dead.clone(), sampling.clone());
        tokio::spawn(async move {
            while on.load(Ordering::Relaxed) {
                if let Ok(Some(n)) = db.dead_tuples().await {
                    peak.fetch_max(n.max(0) as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let label = match rate {
        Some(r) => format!("steady {r}/s"),
        None => format!("steady max ({writers} writers)"),
    };
    let produced = Arc::new(AtomicU64::new(0));
    let _p = Progress::start(label.clone(), produced.clone(), None);
    let started = Instant::now();
    let waker = relay.waker();
    let mut tasks = tokio::task::JoinSet::new();
    let total_slots = rate.map(|r| (f64::from(r) * duration.as_secs_f64()) as u64);
    for w in 0..writers as u64 {
        let (db, timings, produced, waker) = (
            env.db.clone(),
            timings.clone(),
            produced.clone(),
            waker.clone(),
        );
        let msgs: Vec<Message> = (0..64)
            .map(|i| Message {
                destination: topic.clone(),
                ..env.message(i)
            })
            .collect();
        tasks.spawn(async move {
            let mut slot = w;
            loop {
                let intended = match (rate, total_slots) {
                    (Some(r), Some(total)) => {
                        if slot >= total {
                            return anyhow::Ok(());
                        }
                        let at = started + Duration::from_secs_f64(slot as f64 / f64::from(r));
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    _ => {
                        if started.elapsed() >= duration {
                            return anyhow::Ok(());
                        }
                        Instant::now()
                    }
                };
                let m = Message {
                    id: uuid::Uuid::now_v7(),
                    ..msgs[(slot % 64) as usize].clone()
                };
                timings.started(m.id, intended);
                db.business(Some(&m)).await?;
                timings.committed(&m.id);
                if wake {
                    waker.wake();
                }
                produced.fetch_add(1, Ordering::Relaxed);
                slot += writers as u64;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let production = started.elapsed();
    let n = produced.load(Ordering::Relaxed);
    // Let the relay and the consumer finish what was produced (bounded: a backlog that does not
    // clear within a minute is reported as such below).
    let deadline = Instant::now() + Duration::from_secs(60);
    // (Without a consumer nothing is consumed: waiting for it cost every such run a full minute,
    // the "unexplained" slow runs of the first session, and inflated the per-event counters.)
    while (timings.confirmed.load(Ordering::Relaxed) < n
        || (with_consumer && timings.consumed.load(Ordering::Relaxed) < n))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let after = env.db.pg_counters().await?;
    let _ = stop_tx.send(true);
    relay_task.await??;
    consumer_task.await??;
    let db_cost = match (before, after) {
        (Some(b), Some(a)) if n > 0 => {
            let sizes = env.db.outbox_size().await?.unwrap_or_default();
            let per = |x: i64| x as f64 / n as f64;
            Some(DbCost {
                wal_bytes_per_event: per(a.wal_bytes - b.wal_bytes),
                transactions_per_event: per(a.xact_commit - b.xact_commit),
                rows_written_per_event: per((a.tup_inserted - b.tup_inserted)
                    + (a.tup_updated - b.tup_updated)
                    + (a.tup_deleted - b.tup_deleted)),
                peak_dead_tuples: peak_dead.load(Ordering::Relaxed) as i64,
                outbox_table_bytes: sizes.0,
                outbox_index_bytes: sizes.1,
            })
        }
        _ => None,
    };
    let confirm = Percentiles::of(&timings.confirm.lock().expect("histogram"));
    let consume = Percentiles::of(&timings.consume.lock().expect("histogram"));
    let commit = Percentiles::of(&timings.commit.lock().expect("histogram"));
    if confirm.count < n {
        eprintln!(
            "bench: {label}: only {} of {n} confirmed within the wait",
            confirm.count
        );
    }
    Ok(Steady {
        name: label,
        target_per_second: rate,
        achieved_per_second: n as f64 / production.as_secs_f64(),
        commit_to_confirm: confirm,
        intended_to_commit: commit,
        commit_to_consumer: consume,
        db_cost,
    })
}

/// Producer tax: business-only transactions per second versus business + outbox (with the relay
/// running), `writers` concurrent writers for `duration` each.
pub async fn producer_tax(env: &Env, duration: Duration, writers: usize) -> Result<(Rate, Rate)> {
    let business = closed_loop(
        env,
        duration,
        writers,
        false,
        "raw business inserts (producer ceiling)",
    )
    .await?;
    let relay = env.relay(env.broker.clone(), "bench-tax").await?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = {
        let relay = relay.clone();
        tokio::spawn(async move {
            relay
                .run(async move {
                    let _ = stop_rx.changed().await;
                })
                .await
        })
    };
    let with_outbox = closed_loop(
        env,
        duration,
        writers,
        true,
        "business + outbox, relay running",
    )
    .await?;
    let _ = stop_tx.send(true);
    task.await??;
    Ok((business, with_outbox))
}

async fn closed_loop(
    env: &Env,
    duration: Duration,
    writers: usize,
    outbox: bool,
    name: &str,
) -> Result<Rate> {
    let done = Arc::new(AtomicU64::new(0));
    let _p = Progress::start(name.to_owned(), done.clone(), None);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers as u64 {
        let (db, done) = (env.db.clone(), done.clone());
        let m = env.message(w);
        tasks.spawn(async move {
            while started.elapsed() < duration {
                let msg = Message {
                    id: uuid::Uuid::now_v7(),
                    ..m.clone()
                };
                db.business(outbox.then_some(&msg)).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(Rate::new(
        name,
        done.load(Ordering::Relaxed),
        started.elapsed(),
    ))
}

/// Naive "save, then publish": commit the business row, then publish and wait for the broker,
/// `writers` concurrent writers. What people do without an outbox (and lose events with).
pub async fn naive(env: &Env, duration: Duration, writers: usize) -> Result<(Rate, Percentiles)> {
    let timings = Timings::new();
    let done = Arc::new(AtomicU64::new(0));
    let _p = Progress::start("naive save-then-publish".into(), done.clone(), None);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers as u64 {
        let (db, done, broker, timings) = (
            env.db.clone(),
            done.clone(),
            env.broker.clone(),
            timings.clone(),
        );
        let m = env.message(w);
        tasks.spawn(async move {
            while started.elapsed() < duration {
                let msg = Message {
                    id: uuid::Uuid::now_v7(),
                    ..m.clone()
                };
                let t0 = Instant::now();
                db.business(None).await?;
                broker.publish(std::slice::from_ref(&msg)).await.remove(0)?;
                let micros = (t0.elapsed().as_micros() as u64).max(1);
                timings
                    .confirm
                    .lock()
                    .expect("histogram")
                    .saturating_record(micros);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let rate = Rate::new(
        "naive save-then-publish",
        done.load(Ordering::Relaxed),
        started.elapsed(),
    );
    let lat = Percentiles::of(&timings.confirm.lock().expect("histogram"));
    Ok((rate, lat))
}
