//! The relay and consumer engines in paused time, over in-memory stores and scripted
//! transports: every branch of `Relay::tick`, graceful shutdown, consumer retries, parking and
//! lanes. No server, no real sleep: tokio's clock only moves when every task waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::{Applied, Replay};
use herald_core::memory::MemoryTransport;
use herald_core::{
    Apply, Consumer, ConsumerConfig, Error, Failpoint, Message, OutboxStore, Relay, RelayConfig,
    Result, Subscriber, Subscription, Transport,
};
use herald_testkit::MemoryStore;

/// What the scripted transport answers for one message.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Confirm,
    Reject,
    Unknown,
    Unpublishable,
}

type Script = dyn Fn(&Message, usize) -> Answer + Send + Sync;

/// A transport whose answers a test decides, per message and attempt. It can also answer with
/// a result list of the wrong length, or take a while (in tokio's clock) to answer.
struct Scripted {
    script: Box<Script>,
    attempts: Mutex<HashMap<String, usize>>,
    confirmed: Mutex<Vec<Message>>,
    short_by: AtomicUsize,
    delay: Mutex<Duration>,
}

impl Scripted {
    fn new(script: impl Fn(&Message, usize) -> Answer + Send + Sync + 'static) -> Arc<Scripted> {
        Arc::new(Scripted {
            script: Box::new(script),
            attempts: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(Vec::new()),
            short_by: AtomicUsize::new(0),
            delay: Mutex::new(Duration::ZERO),
        })
    }

    fn confirming() -> Arc<Scripted> {
        Scripted::new(|_, _| Answer::Confirm)
    }

    fn confirmed_types(&self) -> Vec<String> {
        self.confirmed
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.message_type.clone())
            .collect()
    }
}

#[async_trait]
impl Transport for Scripted {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut out: Vec<Result<()>> = batch
            .iter()
            .map(|m| {
                let attempt = {
                    let mut a = self.attempts.lock().unwrap();
                    let n = a.entry(m.message_type.clone()).or_default();
                    *n += 1;
                    *n
                };
                match (self.script)(m, attempt) {
                    Answer::Confirm => {
                        self.confirmed.lock().unwrap().push(m.clone());
                        Ok(())
                    }
                    Answer::Reject => Err(Error::rejected("no route")),
                    Answer::Unknown => Err(Error::unavailable("broker", "connection reset")),
                    Answer::Unpublishable => Err(Error::unpublishable("too odd to send")),
                }
            })
            .collect();
        let short = self.short_by.load(Ordering::SeqCst).min(out.len());
        out.truncate(out.len() - short);
        out
    }

    async fn subscribe(&self, _: &Subscription) -> Result<Box<dyn Subscriber>> {
        Err(Error::config("scripted transports only publish"))
    }

    fn describe(&self) -> String {
        "scripted".to_owned()
    }
}

fn config() -> RelayConfig {
    RelayConfig {
        batch_size: 100,
        lease: Duration::from_secs(10),
        publish_timeout: Duration::from_secs(2),
        max_attempts: 3,
        retry_window: Duration::ZERO,
        ..RelayConfig::default()
    }
}

fn msg(kind: &str, key: &str) -> Message {
    Message::raw_event("orders", kind, b"{}".to_vec()).with_key(key)
}

fn relay(store: &Arc<MemoryStore>, transport: Arc<dyn Transport>) -> Relay {
    Relay::new(store.clone(), transport, config()).expect("a valid configuration")
}

#[tokio::test(start_paused = true)]
async fn confirmed_messages_are_marked_in_order() {
    let store = Arc::new(MemoryStore::new());
    for i in 0..5 {
        store.enqueue(msg(&format!("m{i}"), "k"));
    }
    let t = Scripted::confirming();
    let report = relay(&store, t.clone()).tick().await.unwrap();
    assert_eq!((report.claimed, report.published), (5, 5));
    assert_eq!(store.pending(), 0);
    assert_eq!(t.confirmed_types(), ["m0", "m1", "m2", "m3", "m4"]);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_head_holds_its_key_until_it_is_dead_lettered() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue(msg("bad", "k"));
    store.enqueue(msg("after-bad", "k"));
    store.enqueue(msg("other", "j"));
    let t = Scripted::new(|m, _| {
        if m.message_type == "bad" {
            Answer::Reject
        } else {
            Answer::Confirm
        }
    });
    let r = relay(&store, t.clone());
    let first = r.tick().await.unwrap();
    assert_eq!(first.rejected, 1);
    assert_eq!(first.published, 1, "the other key flows");
    // An event sent beside its rejected head may reach the broker, but it is not counted: it
    // stays in the outbox behind the head and is published again after it (a duplicate,
    // never a message counted as published before its key's head).
    assert_eq!(
        store.pending(),
        2,
        "the head and the message behind it stay"
    );
    // Each retry waits out its delay (tokio's clock, advanced by hand).
    let mut rounds = 0;
    while store.dead_letters().is_empty() {
        rounds += 1;
        assert!(rounds < 10, "the head is dead-lettered after max_attempts");
        tokio::time::advance(Duration::from_secs(1)).await;
        r.tick().await.unwrap();
    }
    assert_eq!(store.dead_letters()[0].0.message_type, "bad");
    assert!(store.dead_letters()[0].1.contains("no route"));
    while store.pending() > 0 {
        tokio::time::advance(Duration::from_secs(1)).await;
        r.tick().await.unwrap();
    }
    assert_eq!(
        t.confirmed_types().last().map(String::as_str),
        Some("after-bad")
    );
    assert_eq!(r.counters().published.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_outcome_releases_the_row_for_another_attempt() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue(msg("m", "k"));
    store.enqueue(msg("n", "k"));
    let t = Scripted::new(|m, attempt| {
        if m.message_type == "m" && attempt == 1 {
            Answer::Unknown
        } else {
            Answer::Confirm
        }
    });
    let r = relay(&store, t.clone());
    let first = r.tick().await.unwrap();
    assert_eq!(first.published, 0, "n is held behind m");
    assert_eq!(first.released, 2);
    assert!(first.broker_error.is_some());
    assert!(store.dead_letters().is_empty(), "an outage is not poison");
    let second = r.tick().await.unwrap();
    assert_eq!(second.published, 2, "released rows are claimable at once");
    assert_eq!(store.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn unpublishable_and_oversized_messages_are_dead_lettered_at_once() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue(msg("odd", "k"));
    store.enqueue(Message::raw_event("orders", "huge", vec![b'x'; 2 * 1024 * 1024]).with_key("j"));
    store.enqueue(msg("fine", "k"));
    let t = Scripted::new(|m, _| {
        if m.message_type == "odd" {
            Answer::Unpublishable
        } else {
            Answer::Confirm
        }
    });
    let r = relay(&store, t.clone());
    let first = r.tick().await.unwrap();
    assert_eq!(
        first.dead_lettered, 2,
        "no retry for what no attempt can carry"
    );
    let reasons: Vec<String> = store.dead_letters().into_iter().map(|(_, r)| r).collect();
    assert!(
        reasons.iter().any(|r| r.contains("max_message_bytes")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("too odd")), "{reasons:?}");
    while store.pending() > 0 {
        r.tick().await.unwrap();
    }
    assert_eq!(
        t.confirmed_types(),
        ["fine"],
        "the oversized one never reached the broker"
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_result_list_releases_the_batch_at_once() {
    let store = Arc::new(MemoryStore::new());
    for i in 0..3 {
        store.enqueue(msg(&format!("m{i}"), &format!("k{i}")));
    }
    let t = Scripted::confirming();
    t.short_by.store(1, Ordering::SeqCst);
    let r = relay(&store, t.clone());
    let first = r.tick().await.unwrap();
    assert_eq!(first.published, 0, "a miscounted answer confirms nothing");
    assert_eq!(first.released, 3);
    t.short_by.store(0, Ordering::SeqCst);
    let second = r.tick().await.unwrap();
    assert_eq!(second.published, 3, "the rows were not left leased");
}

/// A store whose claims take `slow` (in tokio's clock) to come back.
struct SlowClaims {
    inner: Arc<MemoryStore>,
    slow: Duration,
}

#[async_trait]
impl OutboxStore for SlowClaims {
    async fn heartbeat(&self, beat: &herald_core::Heartbeat<'_>) -> Result<herald_core::Holdings> {
        self.inner.heartbeat(beat).await
    }
    async fn leave(&self, incarnation: i64) -> Result<()> {
        self.inner.leave(incarnation).await
    }
    async fn relays(&self) -> Result<Vec<herald_core::RelayStatus>> {
        self.inner.relays().await
    }
    async fn claim(
        &self,
        lease: &herald_core::Lease,
        max: usize,
        cap: Duration,
        exclude: &[i64],
    ) -> Result<herald_core::Claim> {
        let claim = self.inner.claim(lease, max, cap, exclude).await?;
        tokio::time::sleep(self.slow).await;
        Ok(claim)
    }
    async fn complete(&self, lease: &herald_core::Lease, seqs: &[i64]) -> Result<u64> {
        self.inner.complete(lease, seqs).await
    }
    async fn release(&self, lease: &herald_core::Lease, seqs: &[i64], why: &str) -> Result<u64> {
        self.inner.release(lease, seqs, why).await
    }
    async fn record_rejection(
        &self,
        lease: &herald_core::Lease,
        seq: i64,
        reason: &str,
        max: u32,
        after: Duration,
    ) -> Result<herald_core::RejectionOutcome> {
        self.inner
            .record_rejection(lease, seq, reason, max, after)
            .await
    }
    async fn stats(&self) -> Result<Vec<herald_core::DestinationStats>> {
        self.inner.stats().await
    }
    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

#[tokio::test(start_paused = true)]
async fn a_batch_read_past_the_relays_deadline_is_not_published() {
    let inner = Arc::new(MemoryStore::new());
    inner.enqueue(msg("m", "k"));
    // No heartbeat runs during a lone tick: the deadline is the publish window after the first.
    let store = Arc::new(SlowClaims {
        inner: inner.clone(),
        slow: config().publish_window() + Duration::from_millis(10),
    });
    let t = Scripted::confirming();
    let r = Relay::new(store, t.clone(), config()).unwrap();
    let report = r.tick().await.unwrap();
    assert_eq!(report.lease_lost, 1);
    assert!(
        t.confirmed_types().is_empty(),
        "a paused relay does not publish out of turn"
    );
    assert_eq!(inner.pending(), 1, "the row waits for the next batch");
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_never_answers_times_out_and_releases() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue(msg("m", "k"));
    let t = Scripted::confirming();
    *t.delay.lock().unwrap() = Duration::from_secs(3600);
    let r = relay(&store, t.clone());
    let report = r.tick().await.unwrap();
    assert_eq!(report.published, 0);
    assert_eq!(report.released, 1);
    let error = report.broker_error.expect("the timeout is reported");
    assert!(error.contains("broker confirmation"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn failpoints_fire_after_the_claim_and_after_the_confirm() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue(msg("m", "k"));
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let hook: herald_core::relay::FailpointHook =
        Arc::new(move |f: Failpoint| seen.lock().unwrap().push(format!("{f:?}")));
    let r =
        Relay::with_failpoint(store.clone(), Scripted::confirming(), config(), Some(hook)).unwrap();
    r.tick().await.unwrap();
    assert_eq!(*hits.lock().unwrap(), ["AfterClaim", "AfterConfirm"]);
}

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_finishes_the_batch_in_flight() {
    let store = Arc::new(MemoryStore::new());
    for i in 0..20 {
        store.enqueue(msg(&format!("m{i}"), &format!("k{}", i % 4)));
    }
    let t = Scripted::confirming();
    *t.delay.lock().unwrap() = Duration::from_millis(500);
    let r = relay(&store, t.clone());
    let run = {
        let r = r.clone();
        tokio::spawn(async move { r.run(tokio::time::sleep(Duration::from_millis(100))).await })
    };
    run.await.unwrap().unwrap();
    let published = r.counters().published.load(Ordering::SeqCst) as usize;
    assert_eq!(
        published,
        t.confirmed_types().len(),
        "every confirmed message was marked"
    );
    assert_eq!(
        store.pending(),
        20 - published,
        "nothing marked without a confirm"
    );
    assert!(
        published > 0,
        "the batch in flight at the signal was finished"
    );
}

#[test]
fn relay_and_consumer_configurations_refuse_values_that_cannot_work() {
    let zero_batch = RelayConfig {
        batch_size: 0,
        ..RelayConfig::default()
    };
    assert!(zero_batch.validate().is_err());
    for bad in [
        ConsumerConfig {
            housekeeping_every: Duration::ZERO,
            ..ConsumerConfig::default()
        },
        ConsumerConfig {
            retry_initial: Duration::ZERO,
            ..ConsumerConfig::default()
        },
        ConsumerConfig {
            concurrency: 0,
            ..ConsumerConfig::default()
        },
        ConsumerConfig {
            max_attempts: 0,
            ..ConsumerConfig::default()
        },
    ] {
        let e = bad.validate().expect_err("refused");
        assert!(matches!(e, Error::Config { .. }), "{e}");
    }
    ConsumerConfig::default().validate().unwrap();
}

/// An applier that keeps effects in memory and fails a message's first `fail` attempts.
#[derive(Default)]
struct MemoryApply {
    fail: HashMap<String, usize>,
    attempts: Mutex<HashMap<String, usize>>,
    applied: Mutex<Vec<Message>>,
    parked: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl Apply for MemoryApply {
    async fn apply(&self, _: &str, m: &Message, _: Option<i64>) -> Result<Applied> {
        let attempt = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(m.message_type.clone()).or_default();
            *n += 1;
            *n
        };
        if attempt <= self.fail.get(&m.message_type).copied().unwrap_or(0) {
            return Err(Error::Handler {
                source: "the handler failed".into(),
            });
        }
        // Yield so that lanes interleave.
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.applied.lock().unwrap().push(m.clone());
        Ok(Applied::Done)
    }
    async fn dead_letter(&self, _: &str, m: &Message, reason: &str, _: u32) -> Result<()> {
        self.parked
            .lock()
            .unwrap()
            .push((m.message_type.clone(), reason.to_owned()));
        Ok(())
    }
    async fn dead_letter_undecodable(&self, _: &str, _: &str, _: &[u8], _: &str) -> Result<()> {
        Ok(())
    }
    async fn replays(&self, _: &str, _: usize) -> Result<Vec<Replay>> {
        Ok(Vec::new())
    }
    async fn replay_failed(&self, _: i64, _: &str) -> Result<()> {
        Ok(())
    }
    async fn purge_inbox(&self, _: Duration, _: usize) -> Result<u64> {
        Ok(0)
    }
}

async fn consume(apply: Arc<MemoryApply>, messages: &[Message], concurrency: usize) {
    let transport = MemoryTransport::new();
    let consumer = Consumer::new(
        Arc::new(transport.clone()),
        apply.clone(),
        Subscription::events("orders", "billing"),
        ConsumerConfig {
            max_attempts: 3,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            concurrency,
            ..ConsumerConfig::default()
        },
    )
    .unwrap();
    let expected = messages.len();
    let watched = apply.clone();
    let running = tokio::spawn(async move {
        consumer
            .run(async move {
                loop {
                    let done = watched.applied.lock().unwrap().len()
                        + watched.parked.lock().unwrap().len();
                    if done >= expected {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
    });
    // Subscribe first: the memory transport delivers what is published after.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(transport.publish(messages).await.iter().all(|r| r.is_ok()));
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the consumer finishes in tokio's clock")
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_handler_is_retried_then_its_message_parked_while_others_flow() {
    let apply = Arc::new(MemoryApply {
        fail: HashMap::from([("flaky".to_owned(), 2), ("broken".to_owned(), usize::MAX)]),
        ..MemoryApply::default()
    });
    let messages = [msg("flaky", "a"), msg("broken", "b"), msg("fine", "c")];
    consume(apply.clone(), &messages, 1).await;
    let applied: Vec<String> = apply
        .applied
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.message_type.clone())
        .collect();
    assert_eq!(applied, ["flaky", "fine"]);
    let parked = apply.parked.lock().unwrap().clone();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].0, "broken");
    assert!(parked[0].1.contains("the handler failed"), "{parked:?}");
    assert_eq!(apply.attempts.lock().unwrap()["broken"], 3, "max_attempts");
}

#[tokio::test(start_paused = true)]
async fn lanes_keep_each_keys_order() {
    let apply = Arc::new(MemoryApply::default());
    let messages: Vec<Message> = (0..40)
        .map(|i| msg(&format!("{}-{i:02}", i % 5), &format!("key-{}", i % 5)))
        .collect();
    consume(apply.clone(), &messages, 4).await;
    let applied = apply.applied.lock().unwrap().clone();
    assert_eq!(applied.len(), 40);
    for k in 0..5 {
        let key = format!("key-{k}");
        let of_key: Vec<&str> = applied
            .iter()
            .filter(|m| m.ordering_key.as_deref() == Some(key.as_str()))
            .map(|m| m.message_type.as_str())
            .collect();
        let mut sorted = of_key.clone();
        sorted.sort();
        assert_eq!(of_key, sorted, "{key} applied in order");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_waits_a_bounded_time_for_a_database_that_never_answers() {
    let inner = Arc::new(MemoryStore::new());
    inner.enqueue(msg("m", "k"));
    let store = Arc::new(SlowClaims {
        inner: inner.clone(),
        slow: Duration::from_secs(24 * 3600),
    });
    let r = Relay::new(store, Scripted::confirming(), config()).unwrap();
    let started = tokio::time::Instant::now();
    r.run(tokio::time::sleep(Duration::from_millis(100)))
        .await
        .unwrap();
    let waited = started.elapsed();
    let grace = config().publish_timeout + config().lease;
    assert!(
        waited <= Duration::from_millis(100) + grace + Duration::from_secs(1),
        "the stop is bounded by the publish timeout plus the lease, waited {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(100),
        "the stop came after the signal"
    );
}

/// Runs `relay` until the returned sender fires or the task is aborted (a kill).
fn spawn_run(
    relay: &Relay,
) -> (
    tokio::task::JoinHandle<Result<()>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let r = relay.clone();
    (
        tokio::spawn(async move {
            r.run(async move {
                let _ = rx.await;
            })
            .await
        }),
        tx,
    )
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_killed_relays_partitions_are_taken_over_within_the_lease() {
    let store = Arc::new(MemoryStore::new());
    let t = Scripted::confirming();
    let a = relay(&store, t.clone());
    let b = relay(&store, t.clone());
    let (run_a, _stop_a) = spawn_run(&a);
    wait_for(
        "the first relay holding everything",
        Duration::from_secs(5),
        || a.holdings().1.len() == 8,
    )
    .await;
    let (run_b, stop_b) = spawn_run(&b);
    wait_for("the partitions shared", Duration::from_secs(10), || {
        a.holdings().1.len() == 4 && b.holdings().1.len() == 4
    })
    .await;
    // Killed: the task is dropped mid-flight, nothing says goodbye.
    run_a.abort();
    let took = wait_for("the takeover", config().lease * 2, || {
        b.holdings().1.len() == 8
    })
    .await;
    assert!(
        took <= config().lease,
        "took {took:?}, over the lease {:?}",
        config().lease
    );
    assert_eq!(b.counters().partitions_taken_over.load(Ordering::SeqCst), 4);
    for i in 0..16 {
        store.enqueue(msg(&format!("m{i}"), &format!("k{i}")));
    }
    wait_for(
        "the survivor draining every key",
        Duration::from_secs(5),
        || store.pending() == 0,
    )
    .await;
    stop_b.send(()).unwrap();
    run_b.await.unwrap().unwrap();
    assert!(
        store.owners().iter().all(Option::is_none),
        "a graceful stop releases everything"
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_relay_is_taken_over_and_publishes_nothing_out_of_turn_when_it_wakes() {
    let store = Arc::new(MemoryStore::with_partitions(1));
    let frozen = herald_testkit::Freezable::new(store.clone());
    let t = Scripted::confirming();
    let a = Relay::new(frozen.clone(), t.clone(), config()).unwrap();
    let b = relay(&store, t.clone());
    let (run_a, stop_a) = spawn_run(&a);
    wait_for(
        "the first relay holding the partition",
        Duration::from_secs(5),
        || a.holdings().1 == [0],
    )
    .await;
    let (run_b, stop_b) = spawn_run(&b);
    // The holder reads these rows, then freezes before publishing them.
    frozen.freeze_after_next_read();
    for i in 0..6 {
        store.enqueue(msg(&format!("m{i}"), "k"));
    }
    wait_for("the holder freezing", Duration::from_secs(5), || {
        frozen.is_frozen()
    })
    .await;
    let took = wait_for("the takeover", config().lease * 2, || b.holdings().1 == [0]).await;
    assert!(took <= config().lease, "took {took:?}");
    wait_for("the survivor publishing", Duration::from_secs(5), || {
        store.pending() == 0
    })
    .await;
    frozen.thaw();
    wait_for("the frozen relay rejoining", Duration::from_secs(5), || {
        a.counters().taken_over.load(Ordering::SeqCst) == 1
    })
    .await;
    for i in 6..9 {
        store.enqueue(msg(&format!("m{i}"), "k"));
    }
    wait_for("the rest", Duration::from_secs(5), || store.pending() == 0).await;
    stop_a.send(()).unwrap();
    stop_b.send(()).unwrap();
    run_a.await.unwrap().unwrap();
    run_b.await.unwrap().unwrap();
    let types = t.confirmed_types();
    let expected: Vec<String> = (0..9).map(|i| format!("m{i}")).collect();
    assert_eq!(
        types, expected,
        "each message once, in order: nothing from the woken relay"
    );
}
