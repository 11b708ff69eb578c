//! One trace from a producer's span through the outbox, the relay, RabbitMQ and a consumer, on
//! to the command the consumer sends and the service that handles it, decoded from the OTLP
//! wire (gRPC) with the official protobuf definitions.
//!
//! Needs PostgreSQL (`HERALD_TEST_POSTGRES`) and RabbitMQ (`HERALD_TEST_AMQP`); `.ci/run` starts them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use herald::message::{CAUSATION_ID, CORRELATION_ID, TRACEPARENT};
use herald::postgres::{Handler, PgApplier, PgOutbox, PgOutboxWriter, migrate};
use herald::rabbitmq::RabbitTransport;
use herald::{
    BoxError, Consumer, ConsumerConfig, Identifier, Message, Relay, RelayConfig, SecretUrl,
    Subscription,
};
use herald_telemetry::sink::{ReceivedSpan, Sink};
use herald_telemetry::{OtlpConfig, Protocol, Telemetry};
use sqlx::{PgConnection, PgPool};
use tracing::Instrument;

#[path = "../../herald-testkit/support/pg_schema.rs"]
mod pg_schema;

fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The email service: on `OrderPlaced`, asks billing to charge the card (without saying what
/// caused it: herald adds that).
struct SendCharge {
    writer: PgOutboxWriter,
    queue: String,
}

#[async_trait]
impl Handler<sqlx::Postgres> for SendCharge {
    async fn handle(&self, tx: &mut PgConnection, m: &Message) -> Result<(), BoxError> {
        tracing::info!("sending the charge");
        let charge = Message::raw_command(self.queue.clone(), "ChargeCard", m.payload.clone());
        self.writer.send(tx, &charge).await?;
        Ok(())
    }
}

/// Billing: keeps what it received.
struct Keep(Arc<Mutex<Vec<Message>>>);

#[async_trait]
impl Handler<sqlx::Postgres> for Keep {
    async fn handle(&self, _tx: &mut PgConnection, m: &Message) -> Result<(), BoxError> {
        self.0.lock().unwrap().push(m.clone());
        Ok(())
    }
}

async fn until_applied(consumer: &Consumer) {
    let watched = consumer.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(async move {
            while watched.counters().applied.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }),
    )
    .await
    .expect("the consumer applied the message in time")
    .unwrap();
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str, parent: Option<&str>) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id.as_deref() == parent)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {name} span with parent {parent:?}, got {found:#?} among {spans:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_producer_to_the_follow_up_command_s_handler() {
    let sink = Sink::start().await.unwrap();
    let telemetry = Telemetry::builder()
        .service_name("herald-trace-test")
        .default_filter("warn")
        .otlp(Some(OtlpConfig {
            endpoint: sink.grpc_endpoint(),
            protocol: Protocol::Grpc,
        }))
        .init()
        .unwrap();

    let schema = pg_schema::create("herald_trace").await;
    let pool = PgPool::connect(&pg_schema::url_of(&schema)).await.unwrap();
    let table = Identifier::new("herald_outbox").unwrap();
    migrate(&pool, &table).await.unwrap();

    let topic = herald_testkit::unique("orders");
    let queue = herald_testkit::unique("billing");
    let rabbit =
        Arc::new(RabbitTransport::new(SecretUrl::parse("broker", &amqp_url()).unwrap()).unwrap());
    let writer = PgOutboxWriter::new(&table);
    let relay = Relay::new(
        Arc::new(PgOutbox::new(pool.clone(), table.clone()).await.unwrap()),
        rabbit.clone(),
        RelayConfig::default(),
    )
    .unwrap();
    let emails = Consumer::new(
        rabbit.clone(),
        Arc::new(
            PgApplier::new(
                pool.clone(),
                &table,
                SendCharge {
                    writer: writer.clone(),
                    queue: queue.clone(),
                },
            )
            .unwrap(),
        ),
        Subscription::events(topic.clone(), format!("{topic}-email")),
        ConsumerConfig::default(),
    )
    .unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let billing = Consumer::new(
        rabbit.clone(),
        Arc::new(PgApplier::new(pool.clone(), &table, Keep(received.clone())).unwrap()),
        Subscription::commands(queue.clone(), queue.clone()),
        ConsumerConfig::default(),
    )
    .unwrap();
    drop(emails.subscribe().await.unwrap());
    drop(billing.subscribe().await.unwrap());

    // The producer's own span: the event is written inside it.
    let placed = Message::raw_event(topic.clone(), "OrderPlaced", br#"{"order":7}"#.to_vec())
        .with_key("order-7");
    let producer = tracing::info_span!("place_order");
    async {
        let mut tx = pool.begin().await.unwrap();
        writer.publish(&mut tx, &placed).await.unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(producer.clone())
    .await;
    drop(producer);

    assert_eq!(relay.tick().await.unwrap().published, 1);
    until_applied(&emails).await;
    assert_eq!(relay.tick().await.unwrap().published, 1, "the follow-up");
    until_applied(&billing).await;

    let charge = received
        .lock()
        .unwrap()
        .pop()
        .expect("billing got the charge");
    assert_eq!(
        charge.header(CORRELATION_ID),
        Some(placed.id.to_string().as_str())
    );
    assert_eq!(
        charge.header(CAUSATION_ID),
        Some(placed.id.to_string().as_str())
    );

    let flushing = tokio::task::spawn_blocking(move || {
        telemetry.flush();
        telemetry
    });
    let telemetry = flushing.await.unwrap();
    let spans = sink
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().filter(|s| s.name.starts_with("herald.")).count() >= 4
        })
        .await;
    // place_order -> herald.publish -> herald.handle -> herald.publish -> herald.handle
    let root = one(&spans, "place_order", None);
    let publish = one(&spans, "herald.publish", Some(&root.span_id));
    let handle = one(&spans, "herald.handle", Some(&publish.span_id));
    let follow_up = one(&spans, "herald.publish", Some(&handle.span_id));
    let billed = one(&spans, "herald.handle", Some(&follow_up.span_id));
    for s in [publish, handle, follow_up, billed] {
        assert_eq!(
            s.trace_id, root.trace_id,
            "{s:#?} is not in the producer's trace"
        );
        assert_eq!(s.service.as_deref(), Some("herald-trace-test"));
        assert_eq!(s.protocol, "grpc");
    }
    assert_eq!(
        (publish.kind, handle.kind),
        (4, 5),
        "producer and consumer kinds"
    );
    assert_eq!(publish.attributes["messaging.destination.name"], topic);
    assert_eq!(
        publish.attributes["messaging.message.id"],
        placed.id.to_string()
    );
    assert_eq!(
        handle.attributes["messaging.consumer.group.name"],
        format!("{topic}-email")
    );
    assert_eq!(follow_up.attributes["messaging.destination.name"], queue);
    // What billing received carries the follow-up publish span as its parent.
    let tp = charge
        .header(TRACEPARENT)
        .expect("the charge has a traceparent");
    assert_eq!(tp, format!("00-{}-{}-01", root.trace_id, follow_up.span_id));

    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    pg_schema::drop_schema(&pool, &schema).await;
    pool.close().await;
}
