//! The transport and consumer conformance suites on Redis Streams, with the consumers' inbox on
//! MySQL/MariaDB (so the MySQL inbox also runs behind a real broker).
//!
//! Needs Redis at `HERALD_TEST_REDIS` (default `redis://127.0.0.1:6379`) and MySQL at
//! `HERALD_TEST_MYSQL`.

#[path = "../../herald-testkit/support/mysql_effects.rs"]
#[allow(dead_code)]
mod mysql_effects;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::{Apply, Kind, SecretUrl, Subscription, Transport};
use herald_redis::RedisTransport;
use herald_testkit::consumer_suite::{Capabilities, ConsumerHarness};
use herald_testkit::inbox_suite::InboxHarness as _;
use mysql_effects::MySqlEffects;
use uuid::Uuid;

fn url() -> String {
    std::env::var("HERALD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Redis {
    db: MySqlEffects,
    names: std::sync::Mutex<Vec<String>>,
}

async fn harness() -> Redis {
    Redis {
        db: mysql_effects::open().await,
        names: Default::default(),
    }
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be running (see .ci/run)")
}

#[async_trait]
impl ConsumerHarness for Redis {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ordered_per_key: true,
            competing_consumers: true,
            broker_dedup: false,
            replay: true,
            flags_redeliveries: true,
            commands_need_owner: false,
            rebalance_redelivers: false,
            max_payload: None,
        }
    }

    async fn transport(&self) -> Arc<dyn Transport> {
        let t = RedisTransport::connect(SecretUrl::parse("broker", &url()).unwrap())
            .await
            .expect("Redis must be running (see .ci/run)");
        Arc::new(t.with_visibility_timeout(Duration::from_secs(1)))
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
        let _: String = redis::cmd("XADD")
            .arg(herald_redis::wire::stream_key(s.kind, &s.destination))
            .arg("*")
            .arg("hello")
            .arg("not a herald message")
            .query_async(&mut raw().await)
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
        let mut conn = raw().await;
        let names = self.names.lock().unwrap().clone();
        for name in names {
            for kind in [Kind::Event, Kind::Command] {
                let _: redis::RedisResult<i64> = redis::cmd("DEL")
                    .arg(herald_redis::wire::stream_key(kind, &name))
                    .query_async(&mut conn)
                    .await;
            }
        }
    }
}

herald_testkit::consumer_suite!(harness());
herald_testkit::transport_suite!("Redis Streams", harness());

/// This server keeps nothing on disk (`appendonly no`): the transport must say that confirmed
/// messages do not survive a restart.
#[tokio::test]
async fn persistence_settings_are_reported() {
    let t = RedisTransport::connect(SecretUrl::parse("broker", &url()).unwrap())
        .await
        .unwrap();
    let warnings = t.durability_warnings().await.unwrap();
    let aof: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendonly")
        .query_async(&mut raw().await)
        .await
        .unwrap();
    assert_eq!(
        warnings.iter().any(|w| w.contains("appendonly=no")),
        aof.get(1).map(String::as_str) == Some("no"),
        "{aof:?}: {warnings:?}"
    );
    assert!(t.describe().starts_with("redis redis://"));
}
