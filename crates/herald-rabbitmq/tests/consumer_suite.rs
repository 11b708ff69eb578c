//! The consumer conformance suite on RabbitMQ, with the inbox on PostgreSQL.

#[path = "../../herald-testkit/support/pg_effects.rs"]
mod pg_effects;

use std::sync::Arc;

use async_trait::async_trait;
use herald_core::{Apply, SecretUrl, Subscription, Transport};
use herald_rabbitmq::RabbitTransport;
use herald_testkit::consumer_suite::{Capabilities, ConsumerHarness};
use herald_testkit::inbox_suite::InboxHarness as _;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use pg_effects::PgEffects;
use uuid::Uuid;

fn url() -> String {
    std::env::var("HERALD_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

struct Rabbit {
    db: PgEffects,
    names: std::sync::Mutex<Vec<String>>,
}

async fn harness() -> Rabbit {
    Rabbit {
        db: pg_effects::open().await,
        names: Default::default(),
    }
}

#[async_trait]
impl ConsumerHarness for Rabbit {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            competing_consumers: true,
            broker_dedup: false,
            replay: false,
            flags_redeliveries: true,
            commands_need_owner: true,
            rebalance_redelivers: false,
            max_payload: None,
        }
    }

    async fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(RabbitTransport::new(SecretUrl::parse("broker", &url()).unwrap()).unwrap())
    }

    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply> {
        self.db.applier(service, fail_key)
    }

    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)> {
        self.db.effects(service).await
    }

    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)> {
        self.db.dead_letters(service).await
    }

    async fn publish_garbage(&self, s: &Subscription) {
        let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        ch.basic_publish(
            s.destination.as_str().into(),
            "x".into(),
            BasicPublishOptions::default(),
            b"not a herald message",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    fn unique(&self, what: &str) -> String {
        let name = herald_testkit::unique(what);
        self.names.lock().unwrap().push(name.clone());
        name
    }

    async fn cleanup(&self) {
        self.db.cleanup().await;
        let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let names = self.names.lock().unwrap().clone();
        for name in names {
            for q in [
                name.clone(),
                format!("svc.{name}"),
                format!("email.{name}"),
                format!("billing.{name}"),
            ] {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
    }
}

herald_testkit::consumer_suite!(harness());
herald_testkit::transport_suite!("RabbitMQ", harness());
