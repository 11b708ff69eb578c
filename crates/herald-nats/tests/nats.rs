//! The NATS JetStream transport against the real server (`HERALD_TEST_NATS`, default
//! `nats://127.0.0.1:4222`). Every test uses its own streams.

use std::time::Duration;

use herald_core::{Kind, Message, SecretUrl, Subscription, Transport};
use herald_nats::{NatsTransport, wire};
use herald_testkit::unique;

fn url() -> String {
    std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

async fn transport() -> NatsTransport {
    NatsTransport::connect(SecretUrl::parse("broker", &url()).unwrap())
        .await
        .expect("NATS must be running (see .ci/run)")
}

async fn cleanup(kind: Kind, name: &str) {
    let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
    let _ = js.delete_stream(wire::stream_name(kind, name)).await;
}

/// A relay that publishes the same message twice (crash between ack and mark) leaves one copy:
/// JetStream deduplicates on Nats-Msg-Id.
#[tokio::test]
async fn republishing_the_same_id_stores_one_copy() {
    let topic = unique("dedup");
    let nats = transport().await;
    let m = Message::event(&topic, "E", b"1".to_vec()).with_key("k");
    assert!(nats.publish(std::slice::from_ref(&m)).await[0].is_ok());
    assert!(
        nats.publish(std::slice::from_ref(&m)).await[0].is_ok(),
        "a duplicate is still a success"
    );
    let mut sub = nats
        .subscribe(&Subscription::events(&topic, "svc"))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .expect_message();
    assert_eq!(d.message.id, m.id);
    assert_eq!(d.message.payload, m.payload);
    sub.ack(d.tag).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err(),
        "only one copy is stored"
    );
    assert_eq!(
        nats.lag(&Subscription::events(&topic, "svc"))
            .await
            .unwrap(),
        Some(0)
    );
    cleanup(Kind::Event, &topic).await;
}

/// A command sent before its owner subscribed is rejected (no stream takes it), not dropped;
/// after the owner subscribed it is delivered.
#[tokio::test]
async fn a_command_needs_its_owner() {
    let queue = unique("cmds");
    let nats = transport().await;
    let cmd = Message::command(&queue, "Charge", b"{}".to_vec());
    let err = nats
        .publish(std::slice::from_ref(&cmd))
        .await
        .remove(0)
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("owner has not subscribed"),
        "{err}"
    );
    let mut owner = nats
        .subscribe(&Subscription::commands(&queue, "billing"))
        .await
        .unwrap();
    assert!(nats.publish(std::slice::from_ref(&cmd)).await[0].is_ok());
    let d = tokio::time::timeout(Duration::from_secs(10), owner.next())
        .await
        .unwrap()
        .unwrap()
        .expect_message();
    assert_eq!(d.message.id, cmd.id);
    assert_eq!(d.message.kind, Kind::Command);
    owner.ack(d.tag).await.unwrap();
    cleanup(Kind::Command, &queue).await;
}

/// Destinations that would reach other subjects are refused before anything is sent.
#[tokio::test]
async fn wildcard_destinations_are_refused() {
    let nats = transport().await;
    let bad = Message::event("orders.>", "E", b"1".to_vec());
    let err = nats
        .publish(std::slice::from_ref(&bad))
        .await
        .remove(0)
        .unwrap_err();
    assert!(err.to_string().contains("not usable on NATS"), "{err}");
}
