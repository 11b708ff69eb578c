//! The consumer conformance suite: the inbox, retries, dead letters and group semantics, run by
//! every transport against a real database. Each transport's test file implements
//! [`ConsumerHarness`] and calls [`crate::consumer_suite!`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use herald_core::consumer::Applied;
use herald_core::{
    Apply, Consumer, ConsumerConfig, Message, ReplayFrom, Subscriber, Subscription, Transport,
};
use uuid::Uuid;

/// What a transport can do. The transport suite checks each flag both ways (a broker that
/// claims no deduplication must deliver a re-published message twice), and `docs/BACKENDS.md`
/// must show the same values ([`crate::transport_suite::assert_documented`]), so the capability
/// matrix cannot drift from the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages of one ordering key reach a consumer group in publish order.
    pub ordered_per_key: bool,
    /// Instances of one service share a subscription's messages.
    pub competing_consumers: bool,
    /// The broker drops a re-published message id (within a window): a relay crash between
    /// confirmation and mark usually causes no duplicate.
    pub broker_dedup: bool,
    /// The broker keeps consumed messages and can rewind a group.
    pub replay: bool,
    /// Deliveries of a message given back or left unacknowledged are flagged redelivered.
    pub flags_redeliveries: bool,
    /// A command sent before its owning service subscribed is rejected (not kept for later).
    pub commands_need_owner: bool,
    /// When a second instance joins, messages the first one had not acknowledged may reach both
    /// (a rebalance): competing instances share work, not exclusively.
    pub rebalance_redelivers: bool,
    /// The largest payload the broker takes as configured in the tests, where the suite checks
    /// that a larger one is refused with a reason (`None`: the limit is too large to exercise).
    pub max_payload: Option<usize>,
}

/// What the suite needs from a transport and the database under its consumers.
#[async_trait]
pub trait ConsumerHarness: Send + Sync {
    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;
    /// A transport (a new connection) configured so that an unacknowledged delivery comes back
    /// within a few seconds (short visibility timeout or ack wait).
    async fn transport(&self) -> Arc<dyn Transport>;
    /// The database side of `service`'s consumer; its handler records an effect row per message,
    /// and fails every message whose ordering key is `fail_key`.
    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply>;
    /// The effects `service` applied, in commit order: (message id, ordering key).
    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)>;
    /// `service`'s dead letters: (message id if decodable, reason, attempts).
    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)>;
    /// Publishes something that is not a herald message to `subscription`'s destination.
    async fn publish_garbage(&self, subscription: &Subscription);
    /// A name unique to this test, for topics and queues.
    fn unique(&self, what: &str) -> String;
    /// Whether the test broker can look messages up by time, for `replay` from a time (true
    /// unless a test double lacks it: librdkafka's mock cluster answers every timestamp lookup
    /// with the end of the partition).
    fn replays_by_time(&self) -> bool {
        true
    }
    /// Removes what the test created.
    async fn cleanup(&self) {}
}

fn config() -> ConsumerConfig {
    ConsumerConfig {
        max_attempts: 3,
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(5),
        ..ConsumerConfig::default()
    }
}

async fn consumer(h: &dyn ConsumerHarness, sub: &Subscription, fail_key: Option<&str>) -> Consumer {
    Consumer::new(
        h.transport().await,
        h.applier(&sub.service, fail_key),
        sub.clone(),
        config(),
    )
    .unwrap()
}

/// Handles `n` deliveries from `sub`, each within 20 s.
async fn handle(c: &Consumer, sub: &mut Box<dyn Subscriber>, n: usize) -> Vec<Option<Applied>> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {} of {n} did not arrive within 20 s", i + 1))
            .expect("next delivery");
        out.push(
            c.handle(sub.as_mut(), r)
                .await
                .expect("handling a delivery"),
        );
    }
    out
}

async fn publish(t: &Arc<dyn Transport>, messages: &[Message]) {
    for r in t.publish(messages).await {
        r.expect("publish");
    }
}

/// The same message delivered twice: its effect is applied once.
pub async fn duplicate_delivery_is_applied_once(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("dup"), "svc");
    let c = consumer(h, &sub, None).await;
    let mut s = c.subscribe().await.unwrap();
    let m = Message::raw_event(&sub.destination, "E", b"1".to_vec()).with_key("k");
    let t = h.transport().await;
    publish(&t, std::slice::from_ref(&m)).await;
    // The relay publishing it again after a crash: same id, a second copy on the broker (or, on
    // brokers that deduplicate by id, no second copy at all).
    publish(&t, std::slice::from_ref(&m)).await;
    let first = handle(&c, &mut s, 1).await;
    assert_eq!(first, vec![Some(Applied::Done)]);
    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), s.next()).await {
        assert_eq!(
            c.handle(s.as_mut(), r).await.unwrap(),
            Some(Applied::Duplicate)
        );
    }
    // And a redelivery of the same message by any other path is still a duplicate.
    assert_eq!(
        h.applier("svc", None).apply("svc", &m, None).await.unwrap(),
        Applied::Duplicate
    );
    assert_eq!(h.effects("svc").await.len(), 1);
}

/// The consumer crashed after its transaction committed but before it acknowledged: the broker
/// delivers the message again and the inbox keeps the effect from being applied twice.
pub async fn crash_between_commit_and_ack_applies_once(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("crash"), "svc");
    let c = consumer(h, &sub, None).await;
    let mut s = c.subscribe().await.unwrap();
    let m = Message::raw_event(&sub.destination, "E", b"1".to_vec()).with_key("k");
    publish(&h.transport().await, std::slice::from_ref(&m)).await;
    let r = tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .unwrap()
        .unwrap()
        .expect_message();
    assert_eq!(
        h.applier("svc", None)
            .apply("svc", &r.message, None)
            .await
            .unwrap(),
        Applied::Done
    );
    drop(s); // the process dies here: committed, never acknowledged
    let c2 = consumer(h, &sub, None).await;
    let mut s2 = c2.subscribe().await.unwrap();
    let again = handle(&c2, &mut s2, 1).await;
    assert_eq!(
        again,
        vec![Some(Applied::Duplicate)],
        "redelivered, and recognised as a duplicate"
    );
    assert_eq!(h.effects("svc").await.len(), 1);
}

/// A handler that always fails for one key: that message is dead-lettered after the attempt limit
/// with the handler's reason, and the other keys' messages are applied.
pub async fn failing_key_is_dead_lettered_and_others_flow(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("poison"), "svc");
    let c = consumer(h, &sub, Some("bad")).await;
    let mut s = c.subscribe().await.unwrap();
    let msgs = [
        Message::raw_event(&sub.destination, "E", b"1".to_vec()).with_key("a"),
        Message::raw_event(&sub.destination, "E", b"2".to_vec()).with_key("bad"),
        Message::raw_event(&sub.destination, "E", b"3".to_vec()).with_key("c"),
    ];
    publish(&h.transport().await, &msgs).await;
    let outcomes = handle(&c, &mut s, 3).await;
    assert_eq!(
        outcomes,
        vec![Some(Applied::Done), None, Some(Applied::Done)]
    );
    let applied: Vec<_> = h
        .effects("svc")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(applied, vec![msgs[0].id, msgs[2].id]);
    let dead = h.dead_letters("svc").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, Some(msgs[1].id));
    assert!(
        dead[0].1.contains("handler failed") && dead[0].1.contains("refuses key bad"),
        "{dead:?}"
    );
    assert_eq!(dead[0].2, 3, "attempts recorded");
}

/// Two instances of one service on a command queue: every command handled, none twice.
pub async fn competing_instances_handle_each_command_once(h: &dyn ConsumerHarness) {
    let sub = Subscription::commands(h.unique("cmds"), "billing");
    let (c1, c2) = (consumer(h, &sub, None).await, consumer(h, &sub, None).await);
    let (s1, s2) = (c1.subscribe().await.unwrap(), c2.subscribe().await.unwrap());
    let cmds: Vec<_> = (0..40u8)
        .map(|i| {
            Message::raw_command(&sub.destination, "Charge", vec![i]).with_key(format!("o{i}"))
        })
        .collect();
    publish(&h.transport().await, &cmds).await;
    let run = |c: Consumer, mut s: Box<dyn Subscriber>| async move {
        let mut handled = 0;
        // Generous until the first delivery: joining a Kafka group takes a rebalance.
        let quiet = |handled| Duration::from_secs(if handled == 0 { 15 } else { 3 });
        while let Ok(Ok(r)) = tokio::time::timeout(quiet(handled), s.next()).await {
            c.handle(s.as_mut(), r).await.unwrap();
            handled += 1;
        }
        handled
    };
    let (n1, n2) = tokio::join!(run(c1, s1), run(c2, s2));
    let effects = h.effects("billing").await;
    let distinct: std::collections::HashSet<_> = effects.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        distinct.len(),
        40,
        "every command handled ({n1} + {n2} deliveries)"
    );
    assert_eq!(effects.len(), 40, "no command's effect applied twice");
}

/// Two services subscribed to one event: both apply it.
pub async fn every_subscribing_service_applies_each_event(h: &dyn ConsumerHarness) {
    let topic = h.unique("fanout");
    let (a, b) = (
        Subscription::events(&topic, "email"),
        Subscription::events(&topic, "billing"),
    );
    let (ca, cb) = (consumer(h, &a, None).await, consumer(h, &b, None).await);
    let (mut sa, mut sb) = (ca.subscribe().await.unwrap(), cb.subscribe().await.unwrap());
    let msgs: Vec<_> = (0..5u8)
        .map(|i| Message::raw_event(&topic, "E", vec![i]).with_key("k"))
        .collect();
    publish(&h.transport().await, &msgs).await;
    handle(&ca, &mut sa, 5).await;
    handle(&cb, &mut sb, 5).await;
    assert_eq!(h.effects("email").await.len(), 5);
    assert_eq!(h.effects("billing").await.len(), 5);
}

/// Replaying a log from its start delivers everything again; the inbox applies nothing twice.
pub async fn replay_from_start_applies_nothing_twice(h: &dyn ConsumerHarness) {
    if !h.capabilities().replay {
        eprintln!("not applicable: this broker does not keep consumed messages");
        return;
    }
    let sub = Subscription::events(h.unique("replay"), "svc");
    let c = consumer(h, &sub, None).await;
    let mut s = c.subscribe().await.unwrap();
    let msgs: Vec<_> = (0..5u8)
        .map(|i| Message::raw_event(&sub.destination, "E", vec![i]).with_key("k"))
        .collect();
    let t = h.transport().await;
    publish(&t, &msgs).await;
    assert!(
        handle(&c, &mut s, 5)
            .await
            .iter()
            .all(|o| *o == Some(Applied::Done))
    );
    drop(s);
    t.replay(&sub, ReplayFrom::Seq(1)).await.unwrap();
    let mut s = c.subscribe().await.unwrap();
    let again = handle(&c, &mut s, 5).await;
    assert!(
        again.iter().all(|o| *o == Some(Applied::Duplicate)),
        "{again:?}"
    );
    assert_eq!(h.effects("svc").await.len(), 5);
    assert_eq!(
        t.lag(&sub).await.unwrap(),
        Some(0),
        "the group caught up again"
    );
}

/// Within a group, messages of one key are applied in publish order.
pub async fn per_key_order_within_a_group(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("order"), "svc");
    let c = consumer(h, &sub, None).await;
    let mut s = c.subscribe().await.unwrap();
    let msgs: Vec<_> = (0..30u8)
        .map(|i| Message::raw_event(&sub.destination, "E", vec![i]).with_key(format!("k{}", i % 3)))
        .collect();
    publish(&h.transport().await, &msgs).await;
    handle(&c, &mut s, 30).await;
    let position: HashMap<Uuid, usize> = msgs.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    let mut last: HashMap<Option<String>, usize> = HashMap::new();
    for (id, key) in h.effects("svc").await {
        let p = position[&id];
        if let Some(prev) = last.insert(key.clone(), p) {
            assert!(p > prev, "key {key:?} applied out of order");
        }
    }
    assert_eq!(last.len(), 3);
}

/// A consumer applying four deliveries at once still applies each key's messages in order, and
/// applies everything exactly once.
pub async fn concurrent_consumer_keeps_key_order(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("lanes"), "svc");
    let cfg = ConsumerConfig {
        concurrency: 4,
        ..config()
    };
    let c = Consumer::new(
        h.transport().await,
        h.applier("svc", None),
        sub.clone(),
        cfg,
    )
    .unwrap();
    let msgs: Vec<_> = (0..60u8)
        .map(|i| Message::raw_event(&sub.destination, "E", vec![i]).with_key(format!("k{}", i % 5)))
        .collect();
    // Subscribing declares the service's queue; on RabbitMQ, events published before it exists
    // are (rightly) dropped.
    drop(c.subscribe().await.unwrap());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let running = {
        let c = c.clone();
        tokio::spawn(async move {
            c.run(async move {
                let _ = stopped.changed().await;
            })
            .await
        })
    };
    publish(&h.transport().await, &msgs).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.effects("svc").await.len() < msgs.len() {
        if running.is_finished() {
            panic!("the consumer stopped early: {:?}", running.await);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all applied within 30 s: {} of {}",
            h.effects("svc").await.len(),
            msgs.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    running.await.unwrap().unwrap();
    let effects = h.effects("svc").await;
    assert_eq!(effects.len(), msgs.len(), "each applied once");
    let position: HashMap<Uuid, usize> = msgs.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    let mut last: HashMap<Option<String>, usize> = HashMap::new();
    for (id, key) in effects {
        let p = position[&id];
        if let Some(prev) = last.insert(key.clone(), p) {
            assert!(p > prev, "key {key:?} applied out of order");
        }
    }
}

/// A delivery that is not a herald message is parked with the decode error, and the consumer
/// goes on with the next message.
pub async fn undecodable_delivery_is_dead_lettered_and_consumer_continues(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("garbage"), "svc");
    let c = consumer(h, &sub, None).await;
    let mut s = c.subscribe().await.unwrap();
    h.publish_garbage(&sub).await;
    let good = Message::raw_event(&sub.destination, "E", b"ok".to_vec()).with_key("k");
    publish(&h.transport().await, std::slice::from_ref(&good)).await;
    let outcomes = handle(&c, &mut s, 2).await;
    assert_eq!(outcomes, vec![None, Some(Applied::Done)]);
    let dead = h.dead_letters("svc").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, None);
    assert!(dead[0].1.contains("cannot decode"), "{dead:?}");
}

/// A transport whose subscribers fail their first acknowledgement as if the broker had gone away
/// (the broker never sees that ack).
struct AckFailsOnce {
    inner: Arc<dyn Transport>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// When the ack failed, and when a subscriber created after it was first asked for a delivery.
    times: Arc<std::sync::Mutex<(Option<Instant>, Option<Instant>)>>,
}

#[async_trait]
impl Transport for AckFailsOnce {
    async fn publish(&self, batch: &[Message]) -> Vec<herald_core::Result<()>> {
        self.inner.publish(batch).await
    }
    async fn subscribe(&self, s: &Subscription) -> herald_core::Result<Box<dyn Subscriber>> {
        let after_failure = self.failed.load(std::sync::atomic::Ordering::SeqCst);
        Ok(Box::new(AckFailsOnceSub {
            inner: self.inner.subscribe(s).await?,
            failed: self.failed.clone(),
            times: self.times.clone(),
            after_failure,
        }))
    }
    fn redelivery_delay(&self) -> std::time::Duration {
        self.inner.redelivery_delay()
    }

    async fn check(&self) -> herald_core::Result<()> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct AckFailsOnceSub {
    inner: Box<dyn Subscriber>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    times: Arc<std::sync::Mutex<(Option<Instant>, Option<Instant>)>>,
    after_failure: bool,
}

#[async_trait]
impl Subscriber for AckFailsOnceSub {
    async fn next(&mut self) -> herald_core::Result<herald_core::Received> {
        if self.after_failure {
            self.times
                .lock()
                .unwrap()
                .1
                .get_or_insert_with(Instant::now);
        }
        self.inner.next().await
    }
    async fn ack(&mut self, tag: u64) -> herald_core::Result<()> {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.times.lock().unwrap().0 = Some(Instant::now());
            return Err(herald_core::Error::unavailable(
                "broker (acknowledging)",
                "connection lost (injected by the test)",
            ));
        }
        self.inner.ack(tag).await
    }
    async fn nack(&mut self, tag: u64) -> herald_core::Result<()> {
        self.inner.nack(tag).await
    }
}

/// Waits until `service` "svc" has `n` effects, failing if the consumer stopped or `deadline`
/// passed.
async fn wait_for_effects(
    h: &dyn ConsumerHarness,
    n: usize,
    running: &mut tokio::task::JoinHandle<herald_core::Result<()>>,
    deadline: tokio::time::Instant,
) {
    while h.effects("svc").await.len() < n {
        if running.is_finished() {
            panic!("the consumer stopped: {:?}", running.await);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} messages applied",
            h.effects("svc").await.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn survives_a_failed_ack(h: &dyn ConsumerHarness, concurrency: usize) {
    let sub = Subscription::events(h.unique("ackfail"), "svc");
    let inner = h.transport().await;
    let redelivery = inner.redelivery_delay();
    let times = Arc::new(std::sync::Mutex::new((None, None)));
    let transport: Arc<dyn Transport> = Arc::new(AckFailsOnce {
        inner,
        failed: Arc::default(),
        times: times.clone(),
    });
    let c = Consumer::new(
        transport,
        h.applier(&sub.service, None),
        sub.clone(),
        ConsumerConfig {
            concurrency,
            ..config()
        },
    )
    .unwrap();
    drop(c.subscribe().await.unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut running = {
        let (c, mut stopped) = (c.clone(), stopped.clone());
        tokio::spawn(async move {
            c.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let t = h.transport().await;
    let msgs: Vec<Message> = (0..6)
        .map(|i| Message::raw_event(&sub.destination, "E", vec![i]).with_key(format!("k{}", i % 3)))
        .collect();
    publish(&t, &msgs[..3]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    wait_for_effects(h, 3, &mut running, deadline).await;
    // After the failed acknowledgement the consumer goes on with new messages.
    publish(&t, &msgs[3..]).await;
    wait_for_effects(h, 6, &mut running, deadline).await;
    let _ = stop.send(true);
    running.await.unwrap().expect("the consumer ends cleanly");
    assert_eq!(
        c.counters()
            .ack_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let effects = h.effects("svc").await;
    let unique: std::collections::HashSet<_> = effects.iter().map(|e| e.0).collect();
    assert_eq!((effects.len(), unique.len()), (6, 6), "each effect once");
    // What the lost subscription held comes back after the broker's redelivery delay: the new
    // subscription must not take anything before, or later messages of a key would overtake it.
    let (failed_at, resumed_at) = *times.lock().unwrap();
    let waited = resumed_at
        .expect("resubscribed")
        .duration_since(failed_at.expect("ack failed"));
    assert!(
        waited >= redelivery,
        "consumed again {waited:?} after losing the subscription; the broker redelivers after {redelivery:?}"
    );
}

/// An acknowledgement fails after the effect committed (the broker went away): the consumer
/// resubscribes and goes on, and nothing is applied twice.
pub async fn failed_ack_does_not_stop_the_consumer(h: &dyn ConsumerHarness) {
    survives_a_failed_ack(h, 1).await;
}

/// The same with keyed lanes: acks of deliveries from the lost subscription are not sent to the
/// new one.
pub async fn failed_ack_does_not_stop_a_laned_consumer(h: &dyn ConsumerHarness) {
    survives_a_failed_ack(h, 4).await;
}

/// Runs every check of the consumer suite, each against a fresh harness from `make`.
#[macro_export]
macro_rules! consumer_suite {
    ($make:expr) => {
        $crate::consumer_suite!(@one $make, duplicate_delivery_is_applied_once);
        $crate::consumer_suite!(@one $make, crash_between_commit_and_ack_applies_once);
        $crate::consumer_suite!(@one $make, failing_key_is_dead_lettered_and_others_flow);
        $crate::consumer_suite!(@one $make, competing_instances_handle_each_command_once);
        $crate::consumer_suite!(@one $make, every_subscribing_service_applies_each_event);
        $crate::consumer_suite!(@one $make, replay_from_start_applies_nothing_twice);
        $crate::consumer_suite!(@one $make, per_key_order_within_a_group);
        $crate::consumer_suite!(@one $make, concurrent_consumer_keeps_key_order);
        $crate::consumer_suite!(@one $make, undecodable_delivery_is_dead_lettered_and_consumer_continues);
        $crate::consumer_suite!(@one $make, failed_ack_does_not_stop_the_consumer);
        $crate::consumer_suite!(@one $make, failed_ack_does_not_stop_a_laned_consumer);
    };
    (@one $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let harness = $make.await;
            $crate::consumer_suite::$name(&harness).await;
            $crate::consumer_suite::ConsumerHarness::cleanup(&harness).await;
        }
    };
}
