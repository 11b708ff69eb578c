//! The order story as a herald library user writes it: three services in one process.
//!
//! * The **order service** saves an order and announces `OrderPlaced` in one transaction; some
//!   transactions roll back (their event must never be seen).
//! * The **email service** consumes `OrderPlaced` through its inbox, records the email and sends
//!   the `ChargeCard` command, all in one transaction.
//! * The **billing service** owns the `billing` queue and applies each `ChargeCard` once.
//!
//! One [`Host`] runs the relay and both consumers, declares their queues before anything is
//! published, and stops them together. It ends with
//! `shop: orders=N committed=C emails=E charges=K lost=0 duplicates=0` and exits non-zero unless
//! every committed order got exactly one email and one charge, and rolled-back orders none.
//!
//! ```sh
//! cargo run --release -p herald --example shop                  # SQLite + the embedded broker
//! cargo run --release -p herald --example shop --features postgres,rabbitmq -- \
//!     --database postgres://postgres@127.0.0.1/test --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! `--orders N` (default 200). The business SQL is written once with `?` placeholders
//! ([`herald::Statement`]), so the same services run on SQLite, PostgreSQL and MySQL; a service
//! on one database uses sqlx directly (`ctx.tx()` is the transaction's connection).

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald::{Backend, BoxError, Context, Handle, Host, Message, Router, async_trait};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order: i64,
    customer: String,
    total_cents: i64,
}

#[derive(Serialize, Deserialize)]
struct ChargeCard {
    order: i64,
    total_cents: i64,
}

/// The email service: on `OrderPlaced`, record the email and ask billing to charge the card.
struct Emails;

#[async_trait]
impl<D: Backend> Handle<D, OrderPlaced> for Emails {
    async fn handle(&self, ctx: &mut Context<'_, D>, order: OrderPlaced) -> Result<(), BoxError> {
        ctx.sql("INSERT INTO shop_emails (order_id, customer) VALUES (?, ?)")
            .int(order.order)
            .text(&order.customer)
            .execute()
            .await?;
        // The next step commits with this one: the charge is never lost, never sent twice.
        let charge = ChargeCard {
            order: order.order,
            total_cents: order.total_cents,
        };
        ctx.send(Message::command("billing", &charge)?.with_key(format!("order-{}", order.order)))
            .await?;
        Ok(())
    }
}

/// The billing service: each charge applied once.
struct Billing;

#[async_trait]
impl<D: Backend> Handle<D, ChargeCard> for Billing {
    async fn handle(&self, ctx: &mut Context<'_, D>, charge: ChargeCard) -> Result<(), BoxError> {
        ctx.sql("INSERT INTO shop_charges (order_id, total_cents) VALUES (?, ?)")
            .int(charge.order)
            .int(charge.total_cents)
            .execute()
            .await?;
        Ok(())
    }
}

/// The order service: the order row and its event commit together, or not at all.
async fn place_order<D: Backend>(
    host: &Host<D>,
    order: i64,
    roll_back: bool,
) -> Result<(), BoxError> {
    let placed = OrderPlaced {
        order,
        customer: format!("customer-{}", order % 17),
        total_cents: 1000 + order % 5000,
    };
    let mut tx = host.begin().await?;
    host.statement("INSERT INTO shop_orders (id, customer, total_cents) VALUES (?, ?, ?)")
        .int(placed.order)
        .text(&placed.customer)
        .int(placed.total_cents)
        .execute(&mut tx)
        .await?;
    let event = Message::event("orders", &placed)?.with_key(format!("order-{order}"));
    host.writer().publish(&mut tx, &event).await?;
    if roll_back {
        tx.rollback().await?; // the order and its event are gone together
    } else {
        tx.commit().await?;
    }
    Ok(())
}

struct Args {
    database: Option<String>,
    broker: Option<String>,
    orders: i64,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        database: None,
        broker: None,
        orders: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--database" => out.database = Some(value()?),
            "--broker" => out.broker = Some(value()?),
            "--orders" => {
                out.orders = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
                    .ok_or("--orders takes a number from 1 to 1000000")?
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: shop [--database URL] [--broker URL] [--orders N]"
                ));
            }
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shop: {e}");
            return ExitCode::from(2);
        }
    };
    let scratch = std::env::temp_dir().join(format!("herald-shop-{}", std::process::id()));
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/shop.db", scratch.display()));
    // Beside the default database, the embedded broker in the same scratch directory; beside
    // a database you name, the broker you name (the host's default otherwise).
    let broker = match (&args.database, &args.broker) {
        (_, Some(b)) => Some(b.clone()),
        (None, None) => Some(format!("sqlite://{}/broker.db", scratch.display())),
        (Some(_), None) => None,
    };
    let broker = broker.as_deref();
    if args.database.is_none()
        && let Err(e) = std::fs::create_dir_all(&scratch)
    {
        eprintln!("shop: cannot create {}: {e}", scratch.display());
        return ExitCode::FAILURE;
    }
    let scheme = database.split(':').next().unwrap_or_default();
    let outcome = match scheme {
        "" => Err("--database is empty: give a URL such as sqlite://shop.db or postgres://...".into()),
        "sqlite" => shop::<herald::sqlite::SqliteDialect>(&database, broker, args.orders).await,
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            shop::<herald::postgres::PgDialect>(&database, broker, args.orders).await
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => shop::<herald::mysql::MySqlDialect>(&database, broker, args.orders).await,
        other => Err(format!(
            "this build has no {other}:// support: add `--features postgres` (or mysql) and the broker's \
             feature (rabbitmq, nats, kafka, redis) to `cargo run -p herald --example shop`"
        )
        .into()),
    };
    if args.database.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            // The error and its causes (herald never puts a password in either).
            let mut text = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("shop: {text}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the shop; `Ok(true)` when every count is what it must be.
async fn shop<D: Backend>(
    database: &str,
    broker: Option<&str>,
    orders: i64,
) -> Result<bool, BoxError> {
    let mut builder = Host::<D>::builder().database(database);
    if let Some(broker) = broker {
        builder = builder.broker(broker);
    }
    let host = builder
        .events(
            "orders",
            "email-service",
            Router::<D>::new().on::<OrderPlaced, _>(Emails),
        )
        .commands(
            "billing",
            "billing",
            Router::<D>::new().on::<ChargeCard, _>(Billing),
        )
        .build()
        .await?;
    let mut conn = host.pool().acquire().await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS shop_orders (id BIGINT PRIMARY KEY, customer VARCHAR(64) NOT NULL, total_cents BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS shop_emails (order_id BIGINT NOT NULL, customer VARCHAR(64) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS shop_charges (order_id BIGINT NOT NULL, total_cents BIGINT NOT NULL)",
    ] {
        host.statement(ddl).execute(&mut conn).await?;
    }
    drop(conn);

    let running = host.start().await?;
    // Order ids of this run: tables and queues left by earlier runs do not count.
    let first = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 * 1000;
    let mut committed = 0;
    for n in 0..orders {
        let roll_back = n % 9 == 4;
        place_order(&host, first + n, roll_back).await?;
        committed += i64::from(!roll_back);
    }

    // Wait for every committed order's email and charge (a minute at most), then stop.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = count(&host, first, first + orders).await?;
        if (t.emailed >= committed && t.charged >= committed) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await?;

    let t = count(&host, first, first + orders).await?;
    let lost = (committed - t.emailed_committed) + (committed - t.charged_committed);
    let duplicates = (t.emails - t.emailed) + (t.charges - t.charged);
    let phantoms = (t.emailed - t.emailed_committed) + (t.charged - t.charged_committed);
    println!(
        "shop: orders={orders} committed={committed} emails={} charges={} lost={lost} duplicates={duplicates}",
        t.emails, t.charges
    );
    if phantoms > 0 {
        println!("shop: {phantoms} emails or charges for orders that were rolled back");
    }
    Ok(lost == 0 && duplicates == 0 && phantoms == 0)
}

struct Tally {
    /// Rows, duplicates included.
    emails: i64,
    charges: i64,
    /// Distinct orders with a row.
    emailed: i64,
    charged: i64,
    /// Distinct committed orders with a row.
    emailed_committed: i64,
    charged_committed: i64,
}

async fn count<D: Backend>(host: &Host<D>, from: i64, to: i64) -> herald::Result<Tally> {
    let mut conn = host
        .pool()
        .acquire()
        .await
        .map_err(|e| herald::Error::unavailable("the database", e))?;
    let mut one = async |sql: &str| -> herald::Result<i64> {
        let n = host
            .statement(sql)
            .int(from)
            .int(to)
            .fetch_int(&mut conn)
            .await?;
        Ok(n.unwrap_or(0))
    };
    let range = "order_id >= ? AND order_id < ?";
    Ok(Tally {
        emails: one(&format!("SELECT COUNT(*) FROM shop_emails WHERE {range}")).await?,
        charges: one(&format!("SELECT COUNT(*) FROM shop_charges WHERE {range}")).await?,
        emailed: one(&format!("SELECT COUNT(DISTINCT order_id) FROM shop_emails WHERE {range}")).await?,
        charged: one(&format!("SELECT COUNT(DISTINCT order_id) FROM shop_charges WHERE {range}")).await?,
        emailed_committed: one(&format!(
            "SELECT COUNT(DISTINCT order_id) FROM shop_emails WHERE {range} AND order_id IN (SELECT id FROM shop_orders)"
        ))
        .await?,
        charged_committed: one(&format!(
            "SELECT COUNT(DISTINCT order_id) FROM shop_charges WHERE {range} AND order_id IN (SELECT id FROM shop_orders)"
        ))
        .await?,
    })
}
