//! The RabbitMQ transport against the real broker (`HERALD_TEST_AMQP`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Every test uses its own exchange and queues.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::{
    Error, Identifier, Kind, Message, OutboxStore, Relay, RelayConfig, SecretUrl, Subscription,
    Transport,
};
use herald_rabbitmq::RabbitTransport;
use herald_testkit::{ChaosProxy, unique};
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

fn url() -> String {
    std::env::var("HERALD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn transport() -> RabbitTransport {
    RabbitTransport::new(SecretUrl::parse("broker", &url()).unwrap()).unwrap()
}

async fn next(sub: &mut Box<dyn herald_core::Subscriber>) -> herald_core::Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a delivery within 10 s")
        .unwrap()
        .expect_message()
}

async fn delete_queues(names: &[String]) {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in names {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Every subscribing service gets every event, with the message intact.
#[tokio::test]
async fn every_service_gets_every_event() {
    let topic = unique("orders");
    let rabbit = transport();
    let mut billing = rabbit
        .subscribe(&Subscription::events(&topic, "billing"))
        .await
        .unwrap();
    let mut email = rabbit
        .subscribe(&Subscription::events(&topic, "email"))
        .await
        .unwrap();
    let m = Message::raw_event(&topic, "OrderPlaced", br#"{"id":1}"#.to_vec())
        .with_key("order-1")
        .with_source("/shop")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
    let results = rabbit.publish(std::slice::from_ref(&m)).await;
    assert!(results[0].is_ok(), "{results:?}");
    for sub in [&mut billing, &mut email] {
        let d = next(sub).await;
        assert_eq!(d.message, m);
        sub.ack(d.tag).await.unwrap();
    }
    delete_queues(&[format!("billing.{topic}"), format!("email.{topic}")]).await;
}

/// A command to a queue nobody owns comes back as a rejection (not a silent drop); once the owner
/// has subscribed, the same command is delivered to it.
#[tokio::test]
async fn a_command_needs_an_owner() {
    let queue = unique("billing-commands");
    let rabbit = transport();
    let cmd = Message::raw_command(&queue, "ChargeCard", b"{}".to_vec()).with_key("order-1");
    let results = rabbit.publish(std::slice::from_ref(&cmd)).await;
    let err = results[0].as_ref().unwrap_err();
    assert!(
        !err.is_transient(),
        "an unroutable command is poison, not an outage: {err}"
    );
    assert!(err.to_string().contains("NO_ROUTE"), "{err}");

    let mut owner = rabbit
        .subscribe(&Subscription::commands(&queue, "billing"))
        .await
        .unwrap();
    assert!(rabbit.publish(std::slice::from_ref(&cmd)).await[0].is_ok());
    let d = next(&mut owner).await;
    assert_eq!(d.message.kind, Kind::Command);
    assert_eq!(d.message.id, cmd.id);
    owner.ack(d.tag).await.unwrap();
    delete_queues(&[queue]).await;
}

/// What a client that is not herald's sees: CloudEvents binary-mode headers and persistent delivery.
#[tokio::test]
async fn wire_format_seen_by_a_plain_amqp_client() {
    let queue = unique("plain");
    let rabbit = transport();
    // Declare the queue as a plain client would, then send a command to it.
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let cmd =
        Message::raw_command(&queue, "ChargeCard", br#"{"amount":5}"#.to_vec()).with_key("order-9");
    assert!(rabbit.publish(std::slice::from_ref(&cmd)).await[0].is_ok());
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let headers = d.properties.headers().clone().unwrap();
    let h = |k: &str| match headers.inner().get(k) {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    };
    assert!(h("ce-specversion").contains("1.0"));
    assert!(h("ce-id").contains(&cmd.id.to_string()));
    assert!(h("ce-type").contains("ChargeCard"));
    assert!(h("ce-partitionkey").contains("order-9"));
    assert_eq!(
        d.properties.delivery_mode(),
        &Some(2),
        "messages are persistent"
    );
    assert_eq!(
        d.properties
            .content_type()
            .as_ref()
            .map(|s| s.to_string())
            .as_deref(),
        Some("application/json")
    );
    assert_eq!(d.data, cmd.payload);
    delete_queues(&[queue]).await;
}

/// The broker unreachable for a while (the network cut by a proxy): publishes fail as transient,
/// rows are released, nothing is dead-lettered, and everything is delivered after the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_delays_but_loses_nothing() {
    let topic = unique("outage");
    let proxy = ChaosProxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let via_proxy = url().replace("127.0.0.1:5672", &proxy.addr().to_string());
    let rabbit: Arc<dyn Transport> = Arc::new(
        RabbitTransport::new(SecretUrl::parse("broker", &via_proxy).unwrap())
            .unwrap()
            .with_confirm_timeout(Duration::from_secs(2)),
    );
    // The consumer connects directly, not through the proxy.
    let direct = transport();
    let mut sub = direct
        .subscribe(&Subscription::events(&topic, "svc"))
        .await
        .unwrap();

    let dir = std::env::temp_dir().join(unique("herald-rabbit-outage"));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = herald_sqlite::connect(&format!("sqlite://{}/app.db", dir.display()))
        .await
        .unwrap();
    let table = Identifier::new("herald_outbox").unwrap();
    herald_sqlite::migrate(&pool, &table).await.unwrap();
    let writer = herald_sqlite::SqliteOutboxWriter::new(&table);
    let messages: Vec<_> = (0..50u8)
        .map(|i| Message::raw_event(&topic, "E", vec![i]).with_key(format!("k{}", i % 5)))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    for m in &messages {
        writer.enqueue(&mut tx, m).await.unwrap();
    }
    tx.commit().await.unwrap();
    let store = Arc::new(
        herald_sqlite::SqliteOutbox::new(pool.clone(), table)
            .await
            .unwrap(),
    );
    let relay = Relay::new(
        store.clone(),
        rabbit,
        RelayConfig {
            batch_size: 10,
            ..RelayConfig::default()
        },
    )
    .unwrap();

    // One batch goes through, then the network is cut.
    assert_eq!(relay.tick().await.unwrap().published, 10);
    proxy.cut();
    for _ in 0..3 {
        let r = relay.tick().await.unwrap();
        assert_eq!(r.published, 0);
        assert!(r.broker_error.is_some(), "{r:?}");
        assert_eq!(r.dead_lettered, 0);
        assert_eq!(r.released, 10, "rows are given back, not dead-lettered");
    }
    proxy.heal();
    let mut published = 10;
    while published < 50 {
        let r = relay.tick().await.unwrap();
        assert_eq!(r.dead_lettered, 0);
        published += r.published;
    }
    let stats = store.stats().await.unwrap();
    assert_eq!(
        stats
            .iter()
            .map(|s| s.pending + s.dead_letters)
            .sum::<u64>(),
        0
    );
    let mut got = Vec::new();
    while got.len() < 50 {
        let d = next(&mut sub).await;
        got.push(d.message.id);
        sub.ack(d.tag).await.unwrap();
    }
    let want: Vec<_> = messages.iter().map(|m| m.id).collect();
    assert_eq!(got, want, "all delivered, in order");
    delete_queues(&[format!("svc.{topic}")]).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// Bad broker URLs fail at construction with a message that does not echo the password.
#[test]
fn bad_urls_fail_without_leaking_secrets() {
    let err = SecretUrl::parse("broker", "amqp//guest:sentinel-pw@host")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("sentinel-pw"), "{err}");
    let err = match RabbitTransport::new(
        SecretUrl::parse("broker", "http://u:sentinel-pw@h/").unwrap(),
    ) {
        Err(Error::Config(msg)) => msg,
        other => panic!("expected a config error, got {:?}", other.err()),
    };
    assert!(
        err.contains("amqp://") && !err.contains("sentinel-pw"),
        "{err}"
    );
}

/// Commands nobody owns, published in large batches among events bound to a durable queue and
/// commands that have an owner, are never confirmed: RabbitMQ acknowledges many deliveries at
/// once, lapin then hands each `basic.return` to an arbitrary pending confirm, and a transport
/// that trusted the confirm's own return lost a few dozen commands per 2,000 rows. Every
/// unowned command must come back as a rejection (or an unknown outcome, published again), and
/// every confirmed message must be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_commands_among_routed_messages_are_never_confirmed() {
    let topic = unique("mixed-events");
    let owned = unique("owned-commands");
    let nobody = unique("unowned-commands");
    let rabbit = transport();
    let mut events = rabbit
        .subscribe(&Subscription::events(&topic, "svc"))
        .await
        .unwrap();
    let mut commands = rabbit
        .subscribe(&Subscription::commands(&owned, "owner"))
        .await
        .unwrap();
    let (mut confirmed_events, mut confirmed_commands, mut rejected) = (0, 0, 0);
    for round in 0..8 {
        let batch: Vec<Message> = (0..300)
            .map(|i| match i % 3 {
                0 => Message::raw_event(&topic, "Happened", format!("{round}-{i}").into_bytes()),
                1 => Message::raw_command(&nobody, "Orphan", format!("{round}-{i}").into_bytes()),
                _ => Message::raw_command(&owned, "Owned", format!("{round}-{i}").into_bytes()),
            })
            .collect();
        let results = rabbit.publish(&batch).await;
        assert_eq!(results.len(), batch.len());
        for (m, r) in batch.iter().zip(&results) {
            match (m.destination == nobody, r) {
                (true, Ok(())) => panic!(
                    "round {round}: a command to a queue nobody owns was confirmed: it would be deleted from \
                     the outbox and never delivered"
                ),
                (true, Err(e)) if !e.is_transient() => {
                    assert!(e.to_string().contains("unroutable"), "{e}");
                    rejected += 1;
                }
                (false, Ok(())) if m.kind == Kind::Event => confirmed_events += 1,
                (false, Ok(())) => confirmed_commands += 1,
                (false, Err(e)) if !e.is_transient() => {
                    panic!(
                        "round {round}: a routable {} was rejected: {e}",
                        m.kind.as_str()
                    )
                }
                _ => {}
            }
        }
    }
    assert!(
        rejected > 700,
        "only {rejected} of 800 unowned commands were rejected"
    );
    for (sub, n) in [
        (&mut events, confirmed_events),
        (&mut commands, confirmed_commands),
    ] {
        for _ in 0..n {
            let d = next(sub).await;
            sub.ack(d.tag).await.unwrap();
        }
    }
    delete_queues(&[format!("svc.{topic}"), owned]).await;
}

/// A wrong password is a configuration error at start-up (fatal, exit 2), not an outage to retry
/// forever; the password is not in the message.
#[tokio::test]
async fn wrong_credentials_are_a_configuration_error() {
    let bad = url().replacen("guest:guest@", "guest:not-the-s3cret@", 1);
    let rabbit = RabbitTransport::new(SecretUrl::parse("broker", &bad).unwrap()).unwrap();
    let err = rabbit.check().await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{}", err.chain());
    let text = err.chain();
    assert!(text.contains("refused the login"), "{text}");
    assert!(!text.contains("not-the-s3cret"), "{text}");
}

/// Headers up to the connection's frame size go out; one byte more is refused for that message
/// alone with the limit named, before lapin sends a frame RabbitMQ would answer with FRAME_ERROR
/// (closing the connection and failing the whole batch); its neighbours are confirmed and the
/// connection stays usable.
#[tokio::test]
async fn headers_up_to_the_frame_size_go_out_and_larger_are_refused_alone() {
    let queue = unique("frame-limit");
    let rabbit = transport();
    let mut owner = rabbit
        .subscribe(&Subscription::commands(&queue, "svc"))
        .await
        .unwrap();
    let frame_max = 131_072;
    let sized = |extra: usize| {
        let base = Message::raw_command(&queue, "Big", b"x".to_vec()).with_header("pad", "");
        let len = frame_max - herald_rabbitmq::wire::header_frame_size(&base) + extra;
        Message::raw_command(&queue, "Big", b"x".to_vec()).with_header("pad", "p".repeat(len))
    };
    let fits = sized(0);
    let over = sized(1);
    assert_eq!(herald_rabbitmq::wire::header_frame_size(&fits), frame_max);
    let small = Message::raw_command(&queue, "Small", b"s".to_vec());
    let results = rabbit.publish(&[fits.clone(), over, small.clone()]).await;
    assert!(results[0].is_ok(), "exactly frame_max: {:?}", results[0]);
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, Error::Unpublishable { .. }), "{err}");
    assert!(err.to_string().contains("frame_max) of 131072"), "{err}");
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let got: Vec<_> = [next(&mut owner).await, next(&mut owner).await]
        .into_iter()
        .map(|d| d.message.id)
        .collect();
    assert_eq!(got, [fits.id, small.id]);
    delete_queues(&[queue]).await;
}

/// An event for a destination that already exists as an exchange of another type (another
/// application's direct exchange) is refused for itself, as a rejection with RabbitMQ's reason;
/// the messages before and after it, of its key and of others, are confirmed and delivered, and
/// the connection is not dropped (which made the batch fail and its confirmed head go out again
/// and again).
#[tokio::test]
async fn an_exchange_of_another_type_refuses_its_event_alone() {
    let topic = unique("good-topic");
    let clash = unique("direct-x");
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        clash.as_str().into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let rabbit = transport();
    let mut sub = rabbit
        .subscribe(&Subscription::events(&topic, "svc"))
        .await
        .unwrap();
    let batch = [
        Message::raw_event(&topic, "E", b"1".to_vec()).with_key("A"),
        Message::raw_event(&clash, "E", b"2".to_vec()).with_key("A"),
        Message::raw_event(&topic, "E", b"3".to_vec()).with_key("B"),
    ];
    for round in 0..2 {
        let results = rabbit.publish(&batch).await;
        assert!(results[0].is_ok(), "round {round}: {:?}", results[0]);
        let err = results[1].as_ref().unwrap_err();
        assert!(
            matches!(err, Error::Rejected { .. }),
            "round {round}: {err}"
        );
        assert!(err.to_string().contains("inequivalent arg"), "{err}");
        assert!(results[2].is_ok(), "round {round}: {:?}", results[2]);
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = next(&mut sub).await;
        got.push(d.message.payload.clone());
        sub.ack(d.tag).await.unwrap();
    }
    assert_eq!(
        got,
        [b"1".to_vec(), b"3".to_vec(), b"1".to_vec(), b"3".to_vec()]
    );
    let _ = ch
        .exchange_delete(
            clash.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    delete_queues(&[format!("svc.{topic}")]).await;
}
