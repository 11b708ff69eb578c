//! `herald demo`: the order story, end to end, checked.
//!
//! Orders are placed (order row and `OrderPlaced` in one transaction) and later paid (status update
//! and `OrderPaid`), some transactions roll back on purpose, the broker goes down for a while and
//! loses some confirmations (so the relay publishes duplicates), two relays share the outbox, and an
//! email service consumes the events through its inbox, sending one email per order. At the end a
//! checker compares what committed with what was delivered.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use herald::{
    Consumer, ConsumerConfig, Identifier, Message, Relay, RelayConfig, Subscription, Transport,
};
use herald_testkit::verify::RecordingTransport;
use herald_testkit::{FlakyTransport, History};

use herald::connect::{self as backends, Database};
use herald::mysql::MySqlDialect;
use herald::postgres::PgDialect;
use herald::sql::{Applier, Dialect, Handler, OutboxWriter, Stmt};
use herald::sqlite::SqliteDialect;

/// Flags of `herald demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Database URL (postgres://..., mysql://...); default: a SQLite file in a temporary directory.
    #[arg(long)]
    database: Option<String>,
    /// Broker URL (amqp://, nats://, kafka://, redis://); default: the embedded broker in a temporary directory.
    #[arg(long)]
    broker: Option<String>,
    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: u32,
    /// Seed for which transactions roll back; printed so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
}

const CONSUMER: &str = "email-service";

struct Demo {
    db: Database,
    table: Identifier,
    schema: Option<String>,
}

impl Demo {
    async fn setup(&self) -> Result<()> {
        // Text keys and a message id column each database can index.
        let (id, message_id, engine) = match &self.db {
            Database::Postgres(_) => ("TEXT", "UUID", ""),
            Database::Sqlite(_) => ("TEXT", "TEXT", ""),
            Database::MySql(_) => ("VARCHAR(64)", "CHAR(36)", " ENGINE = InnoDB"),
        };
        for ddl in [
            format!(
                "CREATE TABLE orders (id {id} PRIMARY KEY, status VARCHAR(16) NOT NULL, version INT NOT NULL){engine}"
            ),
            format!(
                "CREATE TABLE emails (order_id {id} NOT NULL, message_id {message_id} NOT NULL){engine}"
            ),
        ] {
            match &self.db {
                Database::Postgres(pool) => {
                    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(pool).await?;
                }
                Database::Sqlite(pool) => {
                    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(pool).await?;
                }
                Database::MySql(pool) => {
                    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(pool).await?;
                }
            }
        }
        backends::migrate(&self.db, &self.table).await?;
        Ok(())
    }

    /// One business transaction: `order_sql` and the event, committed or rolled back together.
    async fn transact(
        &self,
        order_id: &str,
        placing: bool,
        event: &Message,
        commit: bool,
    ) -> Result<()> {
        let (t, o) = (&self.table, order_id);
        match &self.db {
            Database::Postgres(p) => transact::<PgDialect>(p, t, o, placing, event, commit).await,
            Database::Sqlite(p) => transact::<SqliteDialect>(p, t, o, placing, event, commit).await,
            Database::MySql(p) => transact::<MySqlDialect>(p, t, o, placing, event, commit).await,
        }
    }

    /// The email service: a consumer whose handler records a (simulated) email per placed order,
    /// in the inbox transaction.
    fn email_service(&self, transport: Arc<dyn Transport>, topic: &str) -> Result<Consumer> {
        let t = &self.table;
        let apply: Arc<dyn herald::Apply> = match &self.db {
            Database::Postgres(p) => Arc::new(Applier::<PgDialect, _>::new(
                p.clone(),
                t,
                Emails::<PgDialect>::new(),
            )?),
            Database::Sqlite(p) => Arc::new(Applier::<SqliteDialect, _>::new(
                p.clone(),
                t,
                Emails::<SqliteDialect>::new(),
            )?),
            Database::MySql(p) => Arc::new(Applier::<MySqlDialect, _>::new(
                p.clone(),
                t,
                Emails::<MySqlDialect>::new(),
            )?),
        };
        Ok(Consumer::new(
            transport,
            apply,
            Subscription::events(topic, CONSUMER),
            ConsumerConfig::default(),
        )?)
    }

    /// (emails sent, orders that got more than one email).
    async fn emails(&self) -> Result<(i64, i64)> {
        let q1 = "SELECT COUNT(*) FROM emails";
        let q2 = "SELECT COUNT(*) FROM (SELECT order_id FROM emails GROUP BY order_id HAVING COUNT(*) > 1) d";
        Ok(match &self.db {
            Database::Postgres(p) => (
                sqlx::query_scalar(q1).fetch_one(p).await?,
                sqlx::query_scalar(q2).fetch_one(p).await?,
            ),
            Database::Sqlite(p) => (
                sqlx::query_scalar(q1).fetch_one(p).await?,
                sqlx::query_scalar(q2).fetch_one(p).await?,
            ),
            Database::MySql(p) => (
                sqlx::query_scalar(q1).fetch_one(p).await?,
                sqlx::query_scalar(q2).fetch_one(p).await?,
            ),
        })
    }

    async fn teardown(&self) {
        match (&self.db, &self.schema) {
            (Database::Postgres(pool), Some(schema)) => {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA \"{schema}\" CASCADE"
                )))
                .execute(pool)
                .await;
            }
            (Database::MySql(pool), Some(schema)) => {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE `{schema}`")))
                    .execute(pool)
                    .await;
            }
            _ => {}
        }
    }
}

/// One business transaction on any database: the order row and its event, committed or rolled
/// back together.
async fn transact<D: Dialect>(
    pool: &sqlx::Pool<D::DB>,
    table: &Identifier,
    order_id: &str,
    placing: bool,
    event: &Message,
    commit: bool,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    let sql = if placing {
        "INSERT INTO orders (id, status, version) VALUES (?, 'placed', 1)"
    } else {
        "UPDATE orders SET status = 'paid', version = version + 1 WHERE id = ?"
    };
    Stmt::<D::DB>::new(&D::render(sql))
        .text(order_id)
        .execute(&mut tx)
        .await?;
    OutboxWriter::<D>::new(table)
        .enqueue(&mut tx, event)
        .await?;
    if commit {
        tx.commit().await?
    } else {
        tx.rollback().await?
    }
    Ok(())
}

/// The email service's handler: a (simulated) email per placed order, in the inbox transaction.
struct Emails<D> {
    insert: String,
    dialect: std::marker::PhantomData<fn() -> D>,
}

impl<D: Dialect> Emails<D> {
    fn new() -> Emails<D> {
        Emails {
            insert: D::render(&format!(
                "INSERT INTO emails (order_id, message_id) VALUES (?, {})",
                D::uuid_param("?")
            )),
            dialect: std::marker::PhantomData,
        }
    }
}

#[async_trait::async_trait]
impl<D: Dialect> Handler<D::DB> for Emails<D> {
    async fn handle(
        &self,
        tx: &mut <D::DB as sqlx::Database>::Connection,
        m: &Message,
    ) -> Result<(), herald::BoxError> {
        if m.message_type == "OrderPlaced" {
            Stmt::<D::DB>::new(&self.insert)
                .opt_text(m.ordering_key.as_deref())
                .text(&m.id.to_string())
                .execute(tx)
                .await?;
        }
        Ok(())
    }
}

fn payload(order_id: &str, seq: u64) -> Vec<u8> {
    serde_json::json!({ "order": order_id, "seq": seq })
        .to_string()
        .into_bytes()
}

/// The order id and step a delivery carries, for the history.
fn key_seq(m: &Message) -> (String, u64) {
    (m.ordering_key.clone().unwrap_or_default(), seq_of(m))
}

fn seq_of(m: &Message) -> u64 {
    serde_json::from_slice::<serde_json::Value>(&m.payload)
        .ok()
        .and_then(|v| v["seq"].as_u64())
        .unwrap_or(0)
}

/// Runs `herald demo`.
pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = std::env::temp_dir().join(format!("herald-demo-{}-{seed:x}", std::process::id()));
    std::fs::create_dir_all(&tmp).context("creating the demo's temporary directory")?;
    let suffix = format!("{:08x}", rng.u32(..));

    // Where things live: the app database and the broker.
    let (db, schema) = match &args.database {
        Some(raw) => {
            let url = backends::parse_url("database", raw)?;
            let schema = format!("herald_demo_{suffix}");
            // The demo works in a schema (PostgreSQL) or database (MySQL) of its own.
            match backends::open_database(&url, None).await? {
                Database::Postgres(p) => {
                    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
                        .execute(&p)
                        .await?;
                }
                Database::MySql(p) => {
                    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{schema}`")))
                        .execute(&p)
                        .await?;
                }
                Database::Sqlite(_) => bail!(
                    "--database must be a postgres:// or mysql:// URL (without it the demo uses SQLite)"
                ),
            }
            (
                backends::open_database(&url, Some(&schema)).await?,
                Some(schema),
            )
        }
        None => {
            let url =
                backends::parse_url("database", &format!("sqlite://{}/shop.db", tmp.display()))?;
            (backends::open_database(&url, None).await?, None)
        }
    };
    let (broker, topic): (Arc<dyn Transport>, String) = match &args.broker {
        Some(raw) => (
            backends::open_transport(&backends::parse_url("broker", raw)?).await?,
            format!("herald_demo_orders_{suffix}"),
        ),
        None => (
            backends::open_transport(&backends::parse_url(
                "broker",
                &format!("sqlite://{}/broker.db", tmp.display()),
            )?)
            .await?,
            "orders".to_owned(),
        ),
    };
    let demo = Arc::new(Demo {
        db,
        table: Identifier::new("herald_outbox")?,
        schema,
    });
    demo.setup().await?;
    eprintln!(
        "demo: seed={seed} orders={} database={} broker={}",
        args.orders,
        match demo.db {
            Database::Postgres(_) => "postgres",
            Database::MySql(_) => "mysql",
            Database::Sqlite(_) => "sqlite",
        },
        broker.describe()
    );

    let outcome = story(&demo, broker, &topic, args.orders, &mut rng).await;
    demo.teardown().await;
    let _ = std::fs::remove_dir_all(&tmp);
    outcome
}

async fn story(
    demo: &Arc<Demo>,
    broker: Arc<dyn Transport>,
    topic: &str,
    orders: u32,
    rng: &mut fastrand::Rng,
) -> Result<ExitCode> {
    let flaky = FlakyTransport::new(broker);
    let history = Arc::new(Mutex::new(History::new()));

    // The email service subscribes first, so its queue exists before anything is published.
    let recorder: Arc<dyn Transport> = Arc::new(RecordingTransport::new(
        Arc::new(flaky.clone()),
        history.clone(),
        key_seq,
    ));
    let emails = demo.email_service(recorder, topic)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let consumer = {
        let (emails, mut stopped) = (emails.clone(), stopped.clone());
        let mut sub = emails.subscribe().await?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => return anyhow::Ok(()),
                    r = sub.next() => { emails.handle(sub.as_mut(), r?).await?; }
                }
            }
        })
    };

    // Two relays share the outbox, as two sidecar processes would.
    let store = backends::open_store(&demo.db, &demo.table).await?;
    let transport: Arc<dyn Transport> = Arc::new(flaky.clone());
    let config = RelayConfig {
        workers: 1,
        batch_size: 128,
        backoff_max: Duration::from_millis(500),
        ..RelayConfig::default()
    };
    let relays = [
        Relay::new(
            store.clone(),
            transport.clone(),
            RelayConfig {
                relay_id: "demo-relay-a".into(),
                ..config.clone()
            },
        )?,
        Relay::new(
            store.clone(),
            transport,
            RelayConfig {
                relay_id: "demo-relay-b".into(),
                ..config
            },
        )?,
    ];
    let running: Vec<_> = relays
        .iter()
        .map(|r| {
            let (r, mut stopped) = (r.clone(), stopped.clone());
            tokio::spawn(async move {
                r.run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
            })
        })
        .collect();

    // Progress, twice a second.
    let producing = Arc::new(AtomicU64::new(0));
    let broker_down = Arc::new(AtomicBool::new(false));
    let progress = {
        let (producing, emails, relays, down) = (
            producing.clone(),
            emails.clone(),
            relays.clone(),
            broker_down.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let published: u64 = relays
                    .iter()
                    .map(|r| r.counters().published.load(Ordering::Relaxed))
                    .sum();
                eprintln!(
                    "demo: placed {:>6}/{orders}  published {published:>6}  delivered {:>6}  broker {}",
                    producing.load(Ordering::Relaxed),
                    emails.counters().applied.load(Ordering::Relaxed),
                    if down.load(Ordering::Relaxed) {
                        "DOWN"
                    } else {
                        "up"
                    }
                );
            }
        })
    };

    // The shop: place orders, pay them a little later, roll some back on purpose. The broker goes
    // down for a while a quarter of the way in, and loses 25 confirmations at half-way.
    let started = Instant::now();
    let mut committed_orders = Vec::new();
    let mut rolled_back = 0u32;
    let mut outage: Option<Instant> = None;
    let wakers: Vec<_> = relays.iter().map(Relay::waker).collect();
    for i in 0..orders {
        let order_id = format!("order-{i:06}");
        let commit = rng.u8(..100) >= 10;
        let placed = Message::raw_event(topic, "OrderPlaced", payload(&order_id, 1))
            .with_key(&order_id)
            .with_source("/shop/orders");
        demo.transact(&order_id, true, &placed, commit).await?;
        {
            let mut h = history.lock().expect("history");
            if commit {
                h.committed(placed.id, &order_id, 1);
            } else {
                h.rolled_back(placed.id, &order_id, 1);
            }
        }
        if commit {
            committed_orders.push(order_id);
        } else {
            rolled_back += 1;
        }
        // Pay the order placed three steps ago, if it exists.
        if i >= 3 && committed_orders.len() >= 4 && i % 2 == 0 {
            let k = committed_orders.len() - 4;
            let id = committed_orders[k].clone();
            let paid = Message::raw_event(topic, "OrderPaid", payload(&id, 2))
                .with_key(&id)
                .with_source("/shop/orders");
            demo.transact(&id, false, &paid, true).await?;
            history.lock().expect("history").committed(paid.id, &id, 2);
        }
        wakers[i as usize % 2].wake();
        producing.store(u64::from(i) + 1, Ordering::Relaxed);
        if i == orders / 4 {
            flaky.set_down(true);
            broker_down.store(true, Ordering::Relaxed);
            outage = Some(Instant::now());
        }
        if i == orders / 2 {
            flaky.lose_confirms(25);
        }
        if outage.is_some_and(|t| t.elapsed() > Duration::from_millis(1500))
            && broker_down.load(Ordering::Relaxed)
        {
            flaky.set_down(false);
            broker_down.store(false, Ordering::Relaxed);
        }
    }
    if broker_down.load(Ordering::Relaxed) {
        // Keep the outage visible for at least 1.5 s even on a fast machine.
        let left = Duration::from_millis(1500)
            .saturating_sub(outage.map_or(Duration::ZERO, |t| t.elapsed()));
        tokio::time::sleep(left).await;
        flaky.set_down(false);
        broker_down.store(false, Ordering::Relaxed);
    }

    // Wait until every committed message has been delivered (or a minute has passed).
    let expected = history.lock().expect("history").check().committed as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while emails.counters().applied.load(Ordering::Relaxed) < expected && Instant::now() < deadline
    {
        if consumer.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give stray duplicates (and phantoms, if there were any) a moment to arrive too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    for r in running {
        r.await??;
    }
    progress.abort();
    if consumer.is_finished() {
        if let Ok(Err(e)) = consumer.await {
            bail!("the email service failed: {e:#}");
        }
    } else {
        consumer.abort();
    }

    let verdict = history.lock().expect("history").check();
    let published: u64 = relays
        .iter()
        .map(|r| r.counters().published.load(Ordering::Relaxed))
        .sum();
    let dead_lettered: u64 = relays
        .iter()
        .map(|r| r.counters().dead_lettered.load(Ordering::Relaxed))
        .sum();
    let (emails_sent, twice) = demo.emails().await?;
    let committed = committed_orders.len();
    println!(
        "demo: {:.1}s, relays=2, broker refused {} publishes while down, {} confirmations lost, duplicates delivered={} suppressed by inbox={}, dead_lettered={dead_lettered}",
        started.elapsed().as_secs_f64(),
        flaky.refused(),
        flaky.confirms_lost(),
        verdict.duplicates,
        emails.counters().duplicates.load(Ordering::Relaxed),
    );
    println!(
        "demo: emails sent={emails_sent} (one per committed order: {committed}), orders emailed twice={twice}"
    );
    println!(
        "demo: orders={orders} committed={committed} rolled_back={rolled_back} published={published} delivered={} lost={} phantom={} out_of_order={}",
        verdict.delivered,
        verdict.lost.len(),
        verdict.phantom.len(),
        verdict.out_of_order.len()
    );
    let ok = verdict.ok() && twice == 0 && emails_sent == committed as i64;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
