//! The consumer conformance suite on the embedded broker, with the inbox on SQLite.

#[path = "../../herald-testkit/support/sqlite_effects.rs"]
mod sqlite_effects;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::{Apply, Subscription, Transport};
use herald_embedded::EmbeddedTransport;
use herald_testkit::consumer_suite::{Capabilities, ConsumerHarness};
use herald_testkit::inbox_suite::InboxHarness as _;
use sqlite_effects::SqliteEffects;
use uuid::Uuid;

struct Embedded {
    db: SqliteEffects,
    broker_url: String,
}

async fn harness() -> Embedded {
    let db = sqlite_effects::open().await;
    let broker_url = format!(
        "sqlite://{}/broker.db",
        db.dir()
            .expect("a SQLite harness has a directory")
            .display()
    );
    Embedded { db, broker_url }
}

#[async_trait]
impl ConsumerHarness for Embedded {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            competing_consumers: true,
            broker_dedup: false,
            replay: true,
            flags_redeliveries: true,
            commands_need_owner: true,
            rebalance_redelivers: false,
            max_payload: None,
        }
    }

    async fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(
            EmbeddedTransport::open(&self.broker_url)
                .await
                .unwrap()
                .with_visibility_timeout(Duration::from_millis(500)),
        )
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
        let pool = sqlx::SqlitePool::connect(&self.broker_url).await.unwrap();
        sqlx::query(
            "INSERT INTO herald_log (destination, kind, message_id, message_type, source, headers, content_type, payload, \
             created_at, published_at) VALUES (?1, 'event', 'not-a-uuid', 'T', '', '{}', 'x', x'00', 0, 0)",
        )
        .bind(&s.destination)
        .execute(&pool)
        .await
        .unwrap();
    }

    fn unique(&self, what: &str) -> String {
        herald_testkit::unique(what)
    }

    async fn cleanup(&self) {
        self.db.cleanup().await;
    }
}

herald_testkit::consumer_suite!(harness());
herald_testkit::transport_suite!("Embedded (SQLite)", harness());
