//! The consumer conformance suite on NATS JetStream, with the inbox on PostgreSQL.

#[path = "../../herald-testkit/support/pg_effects.rs"]
mod pg_effects;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::{Apply, Kind, SecretUrl, Subscription, Transport};
use herald_nats::NatsTransport;
use herald_testkit::consumer_suite::{Capabilities, ConsumerHarness};
use herald_testkit::inbox_suite::InboxHarness as _;
use pg_effects::PgEffects;
use uuid::Uuid;

fn url() -> String {
    std::env::var("HERALD_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

struct Nats {
    db: PgEffects,
    names: std::sync::Mutex<Vec<(Kind, String)>>,
}

async fn harness() -> Nats {
    Nats {
        db: pg_effects::open().await,
        names: Default::default(),
    }
}

#[async_trait]
impl ConsumerHarness for Nats {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            competing_consumers: true,
            broker_dedup: true,
            replay: true,
            flags_redeliveries: true,
            commands_need_owner: true,
            rebalance_redelivers: false,
            max_payload: Some(1024 * 1024),
        }
    }

    async fn transport(&self) -> Arc<dyn Transport> {
        let t = NatsTransport::connect(SecretUrl::parse("broker", &url()).unwrap())
            .await
            .expect("NATS must be running (see .ci/run)");
        Arc::new(t.with_ack_wait(Duration::from_secs(1)))
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
        let client = async_nats::connect(url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.publish(
            herald_nats::wire::subject(s.kind, &s.destination),
            "not a herald message".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    fn unique(&self, what: &str) -> String {
        let name = herald_testkit::unique(what);
        self.names.lock().unwrap().push((Kind::Event, name.clone()));
        self.names
            .lock()
            .unwrap()
            .push((Kind::Command, name.clone()));
        name
    }

    async fn cleanup(&self) {
        self.db.cleanup().await;
        let js = async_nats::jetstream::new(async_nats::connect(url()).await.unwrap());
        let names = self.names.lock().unwrap().clone();
        for (kind, name) in names {
            let _ = js
                .delete_stream(herald_nats::wire::stream_name(kind, &name))
                .await;
        }
    }
}

herald_testkit::consumer_suite!(harness());
herald_testkit::transport_suite!("NATS JetStream", harness());
