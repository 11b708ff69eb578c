//! The outbox-store conformance suite. Every store (SQLite, PostgreSQL, ...) runs these checks
//! against its real database; each backend's test file only implements [`StoreHarness`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::membership::{Heartbeat, Holdings, RelayInfo, Standing, new_incarnation};
use herald_core::memory::MemoryTransport;
use herald_core::{
    Lease, Message, OutboxStore, RejectionOutcome, Relay, RelayConfig, Result, Transport,
};

/// What the suite needs from a backend. Each harness works in its own isolated schema or file.
#[async_trait]
pub trait StoreHarness: Send + Sync {
    /// A new store over the shared database, as a separate relay process would open it.
    async fn store(&self) -> Arc<dyn OutboxStore>;
    /// Enqueues `messages` in one transaction, then commits or rolls back.
    async fn enqueue(&self, messages: &[Message], commit: bool) -> Result<()>;
    /// Whether two transactions can write the outbox at once (false for SQLite, which has one
    /// writer: there, commit order is always id order).
    fn concurrent_writers(&self) -> bool {
        true
    }
    /// Starts a transaction, enqueues `message`, and returns a handle that commits it later.
    async fn enqueue_open(&self, message: &Message) -> Result<Box<dyn OpenTransaction>>;
    /// Inserts a row with plain SQL, as a non-Rust producer following docs/OUTBOX.md would:
    /// only the required columns (`message_type`, `destination`, `payload`) plus `ordering_key`.
    async fn insert_plain(
        &self,
        destination: &str,
        message_type: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<()>;
    /// Inserts `row` with plain SQL and bind parameters, every column as given.
    async fn insert_raw(&self, row: &crate::poison::RawInsert) -> Result<()>;
    /// Inserts a row only this database accepts, for `destination`; false if the case does not
    /// apply here.
    async fn insert_native(
        &self,
        case: crate::poison::NativePoison,
        destination: &str,
    ) -> Result<bool> {
        let _ = (case, destination);
        Ok(false)
    }
    /// Inserts a row whose `headers` column is not a JSON object of strings.
    async fn insert_undecodable(&self, destination: &str) -> Result<()>;
    /// Reasons recorded in the dead-letter table, by destination.
    async fn dead_letter_reasons(&self) -> Result<Vec<(String, String)>>;
    /// The database server's address, for a relay that reaches it through a proxy; `None` for
    /// a database in a file.
    fn server(&self) -> Option<std::net::SocketAddr> {
        None
    }
    /// A store that reaches the database server at `addr` (a proxy in front of
    /// [`server`](Self::server)).
    async fn store_at(&self, addr: std::net::SocketAddr) -> Option<Arc<dyn OutboxStore>> {
        let _ = addr;
        None
    }
    /// Removes what the harness created (schema, files). Called after a passing test; a failing
    /// one leaves its data for inspection.
    async fn cleanup(&self) {}
}

/// A transaction left open by [`StoreHarness::enqueue_open`].
#[async_trait]
pub trait OpenTransaction: Send {
    /// Commits it.
    async fn commit(self: Box<Self>) -> Result<()>;
}

fn cfg(id: &str) -> RelayConfig {
    RelayConfig {
        relay_id: id.to_owned(),
        batch_size: 64,
        workers: 1,
        ..RelayConfig::default()
    }
}

async fn drain(relay: &Relay) -> Result<usize> {
    let mut total = 0;
    for _ in 0..10_000 {
        let r = relay.tick().await?;
        total += r.published;
        if r.claimed == 0 {
            return Ok(total);
        }
    }
    panic!("relay did not drain the outbox in 10000 ticks");
}

/// A rolled-back transaction's message is never claimed, so never published; the committed one is.
pub async fn rolled_back_is_never_published(h: &dyn StoreHarness) -> Result<()> {
    let kept = Message::raw_event("t", "Kept", b"1".to_vec()).with_key("k");
    let dropped = Message::raw_event("t", "Dropped", b"2".to_vec()).with_key("k");
    h.enqueue(std::slice::from_ref(&dropped), false).await?;
    h.enqueue(std::slice::from_ref(&kept), true).await?;
    let broker = MemoryTransport::new();
    let relay = Relay::new(h.store().await, Arc::new(broker.clone()), cfg("a"))?;
    assert_eq!(drain(&relay).await?, 1);
    let ids: Vec<_> = broker.published().iter().map(|m| m.id).collect();
    assert_eq!(
        ids,
        vec![kept.id],
        "only the committed message may be published"
    );
    Ok(())
}

/// A transaction that took a lower id but commits after a higher one has been published is
/// still published (no high-water mark skips it).
pub async fn late_commit_with_lower_id_is_published(h: &dyn StoreHarness) -> Result<()> {
    if !h.concurrent_writers() {
        eprintln!(
            "not applicable: this database has one writer at a time, so commit order is id order"
        );
        return Ok(());
    }
    let early = Message::raw_event("t", "Early", b"1".to_vec()).with_key("a");
    let late = Message::raw_event("t", "Late", b"2".to_vec()).with_key("b");
    let open = h.enqueue_open(&early).await?; // takes the lower id, commits last
    h.enqueue(std::slice::from_ref(&late), true).await?;
    let broker = MemoryTransport::new();
    let relay = Relay::new(h.store().await, Arc::new(broker.clone()), cfg("a"))?;
    assert_eq!(drain(&relay).await?, 1, "only the committed row is visible");
    open.commit().await?;
    assert_eq!(drain(&relay).await?, 1, "the late commit must be published");
    let ids: Vec<_> = broker.published().iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![late.id, early.id]);
    Ok(())
}

/// Joins `store` as a new relay incarnation alive for `ttl`; returns it and what it holds.
pub async fn join(store: &dyn OutboxStore, ttl: Duration) -> Result<(i64, Holdings)> {
    let incarnation = new_incarnation();
    let info = RelayInfo::this_process("suite");
    let held = store
        .heartbeat(&Heartbeat {
            incarnation,
            joining: true,
            relay: &info,
            ttl,
            release: &[],
        })
        .await?;
    Ok((incarnation, held))
}

/// Renews `incarnation` for `ttl`, giving up `release`.
pub async fn beat(
    store: &dyn OutboxStore,
    incarnation: i64,
    ttl: Duration,
    release: &[u32],
) -> Result<Holdings> {
    let info = RelayInfo::this_process("suite");
    store
        .heartbeat(&Heartbeat {
            incarnation,
            joining: false,
            relay: &info,
            ttl,
            release,
        })
        .await
}

/// A batch over what `held` holds, publishable for a minute.
pub fn lease_for(incarnation: i64, held: &Holdings) -> Lease {
    let all = held.held.len() == held.partitions as usize;
    Lease::new(
        incarnation,
        (!all).then(|| held.held.clone()),
        held.partitions,
        Standing::new(
            incarnation,
            tokio::time::Instant::now() + Duration::from_secs(60),
        ),
    )
}

const CAP: Duration = Duration::from_secs(600);

/// A partition has one owner: a second relay gets none while the first holds all, half once the
/// first gives its surplus up, and each key's rows are read by exactly one of them, oldest
/// first. A row waiting out a retry delay holds its key's later rows back, not other keys.
pub async fn one_owner_per_partition(h: &dyn StoreHarness) -> Result<()> {
    let keys: Vec<String> = (0..12).map(|k| format!("key-{k}")).collect();
    for round in 0..2u8 {
        let batch: Vec<_> = keys
            .iter()
            .map(|k| Message::raw_event("t", "E", vec![round]).with_key(k.clone()))
            .collect();
        h.enqueue(&batch, true).await?;
    }
    let (s1, s2) = (h.store().await, h.store().await);
    let ttl = Duration::from_secs(30);
    let (a, held_a) = join(&*s1, ttl).await?;
    assert!(held_a.alive);
    assert_eq!(
        held_a.held.len() as u32,
        held_a.partitions,
        "a lone relay takes every partition"
    );
    let (b, held_b) = join(&*s2, ttl).await?;
    assert!(
        held_b.held.is_empty(),
        "nothing is free while the first relay is alive"
    );
    let held_a = beat(&*s1, a, ttl, &[]).await?;
    let expected_surplus = held_a.partitions - held_a.partitions.div_ceil(2);
    assert_eq!(held_a.surplus.len() as u32, expected_surplus, "{held_a:?}");
    let held_a = beat(&*s1, a, ttl, &held_a.surplus).await?;
    let held_b = beat(&*s2, b, ttl, &[]).await?;
    assert_eq!(
        (held_a.held.len() + held_b.held.len()) as u32,
        held_a.partitions,
        "{held_a:?} {held_b:?}"
    );
    assert!(held_a.held.iter().all(|p| !held_b.held.contains(p)));
    let read_a = s1.claim(&lease_for(a, &held_a), 100, CAP, &[]).await?;
    let read_b = s2.claim(&lease_for(b, &held_b), 100, CAP, &[]).await?;
    assert_eq!(
        read_a.rows.len() + read_b.rows.len(),
        24,
        "every row read once"
    );
    for k in &keys {
        let in_a = read_a
            .rows
            .iter()
            .filter(|r| r.message.ordering_key.as_ref() == Some(k));
        let in_b = read_b
            .rows
            .iter()
            .filter(|r| r.message.ordering_key.as_ref() == Some(k));
        let (na, nb) = (in_a.clone().count(), in_b.count());
        assert!(na == 0 || nb == 0, "key {k} read by both relays");
        let rounds: Vec<u8> = in_a.map(|r| r.message.payload[0]).collect();
        assert!(rounds.is_empty() || rounds == vec![0, 1], "{k}: {rounds:?}");
    }
    // A rejected head holds its key back; the other keys still flow.
    let (owner, lease, read) = if read_a.rows.is_empty() {
        (&s2, lease_for(b, &held_b), read_b)
    } else {
        (&s1, lease_for(a, &held_a), read_a)
    };
    let head = &read.rows[0];
    let outcome = owner
        .record_rejection(&lease, head.seq, "no queue yet", 5, Duration::from_secs(30))
        .await?;
    assert_eq!(outcome, RejectionOutcome::WillRetry);
    let again = owner.claim(&lease, 100, CAP, &[]).await?;
    assert!(
        again
            .rows
            .iter()
            .all(|r| r.message.ordering_key != head.message.ordering_key),
        "a key waiting for a retry must hold its later rows back"
    );
    assert_eq!(again.rows.len(), read.rows.len() - 2);
    Ok(())
}

/// A relay that stops heart-beating is taken over by the next heartbeat of another, which
/// records whom it took over; the silent relay's marks, releases and rejections are refused
/// from then on, its renewal says it is no longer alive, and it may not publish.
pub async fn silent_relay_is_taken_over_and_fenced(h: &dyn StoreHarness) -> Result<()> {
    let m = Message::raw_event("t", "M", b"x".to_vec()).with_key("k");
    h.enqueue(std::slice::from_ref(&m), true).await?;
    let (zombie, successor) = (h.store().await, h.store().await);
    let (z, held_z) = join(&*zombie, Duration::from_millis(1)).await?;
    let stale_lease = lease_for(z, &held_z);
    let stale = zombie.claim(&stale_lease, 10, CAP, &[]).await?;
    assert_eq!(stale.rows.len(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, held_s) = join(&*successor, Duration::from_secs(30)).await?;
    assert_eq!(held_s.held.len() as u32, held_s.partitions, "{held_s:?}");
    assert_eq!(held_s.took_over.len(), 1, "{held_s:?}");
    assert_eq!(held_s.took_over[0].incarnation, z);
    let fresh = successor
        .claim(&lease_for(s, &held_s), 10, CAP, &[])
        .await?;
    assert_eq!(
        fresh.rows.len(),
        1,
        "the successor reads the silent relay's rows"
    );
    assert_eq!(
        zombie.complete(&stale_lease, &[stale.rows[0].seq]).await?,
        0,
        "the silent relay's mark must be refused"
    );
    assert_eq!(
        zombie
            .release(&stale_lease, &[stale.rows[0].seq], "zombie")
            .await?,
        0,
        "the silent relay's release must be refused"
    );
    assert_eq!(
        zombie
            .record_rejection(&stale_lease, stale.rows[0].seq, "x", 1, Duration::ZERO)
            .await?,
        RejectionOutcome::LeaseLost
    );
    assert!(
        !beat(&*zombie, z, Duration::from_secs(30), &[]).await?.alive,
        "a relay taken over must not renew"
    );
    let expired = Lease::until(z, tokio::time::Instant::now());
    assert!(
        !expired.usable(),
        "a lease past its deadline is not usable for publishing"
    );
    assert_eq!(
        successor
            .complete(&lease_for(s, &held_s), &[fresh.rows[0].seq])
            .await?,
        1
    );
    let relays = successor.relays().await?;
    let zs = relays
        .iter()
        .find(|r| r.incarnation == z)
        .expect("the silent relay is listed");
    assert!(
        matches!(zs.state, herald_core::RelayState::TakenOver { .. }),
        "{zs:?}"
    );
    Ok(())
}

/// A relay that renews in time keeps its partitions, whoever else heart-beats; one that leaves
/// gives them up at once.
pub async fn renewal_keeps_and_leaving_frees(h: &dyn StoreHarness) -> Result<()> {
    let (s1, s2) = (h.store().await, h.store().await);
    let short = Duration::from_millis(400);
    let (a, held_a) = join(&*s1, short).await?;
    let (b, _) = join(&*s2, Duration::from_secs(30)).await?;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(beat(&*s1, a, short, &[]).await?.alive);
        let held_b = beat(&*s2, b, Duration::from_secs(30), &[]).await?;
        assert!(
            held_b.took_over.is_empty(),
            "a live relay was taken over: {held_b:?}"
        );
    }
    let kept = beat(&*s1, a, short, &[]).await?;
    assert_eq!(
        kept.held, held_a.held,
        "a relay that renews keeps its partitions"
    );
    s1.leave(a).await?;
    let held_b = beat(&*s2, b, Duration::from_secs(30), &[]).await?;
    assert_eq!(held_b.held.len() as u32, held_b.partitions, "{held_b:?}");
    assert!(
        held_b.took_over.is_empty(),
        "a graceful leave is not a takeover"
    );
    Ok(())
}

/// A released row (after a broker outage) is read again at once, without an attempt counted.
pub async fn released_rows_are_claimable_again(h: &dyn StoreHarness) -> Result<()> {
    h.enqueue(&[Message::raw_event("t", "M", b"x".to_vec())], true)
        .await?;
    let s = h.store().await;
    let (r, held) = join(&*s, Duration::from_secs(30)).await?;
    let lease = lease_for(r, &held);
    let c = s.claim(&lease, 10, CAP, &[]).await?;
    assert_eq!(
        s.release(&lease, &[c.rows[0].seq], "broker unavailable")
            .await?,
        1
    );
    let again = s.claim(&lease, 10, CAP, &[]).await?;
    assert_eq!(again.rows.len(), 1);
    assert_eq!(
        again.rows[0].attempts, 0,
        "an outage must not count as an attempt"
    );
    Ok(())
}

/// A message the broker keeps rejecting is dead-lettered after `max_attempts`, with the reason;
/// an oversized message is dead-lettered at once; other messages keep flowing.
pub async fn poison_is_dead_lettered_with_reason(h: &dyn StoreHarness) -> Result<()> {
    h.enqueue(
        &[Message::raw_event("t", "Big", vec![b'x'; 4096]).with_key("big")],
        true,
    )
    .await?;
    h.enqueue(
        &[Message::raw_command("nobody", "Cmd", b"c".to_vec()).with_key("cmd")],
        true,
    )
    .await?;
    h.enqueue(
        &[Message::raw_event("t", "Fine", b"f".to_vec()).with_key("fine")],
        true,
    )
    .await?;
    let broker = RejectCommands(MemoryTransport::new());
    let config = RelayConfig {
        max_message_bytes: 1024,
        max_attempts: 3,
        retry_window: Duration::ZERO,
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(4),
        ..cfg("r")
    };
    let relay = Relay::new(h.store().await, Arc::new(broker.clone()), config)?;
    let (mut dead, mut rejected) = (0, 0);
    // Rejected commands wait a few milliseconds between attempts; tick until they are parked.
    for _ in 0..100_000 {
        let r = relay.tick().await?;
        dead += r.dead_lettered;
        rejected += r.rejected;
        if dead == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(dead, 2);
    assert_eq!(
        rejected, 2,
        "the command is retried before it is dead-lettered"
    );
    let fine: Vec<_> = broker
        .0
        .published()
        .into_iter()
        .map(|m| m.message_type)
        .collect();
    assert_eq!(fine, vec!["Fine"]);
    let reasons: HashMap<_, _> = h.dead_letter_reasons().await?.into_iter().collect();
    assert!(
        reasons["t"].contains("over the relay's limit of 1024 bytes"),
        "{reasons:?}"
    );
    assert!(reasons["nobody"].contains("no owner"), "{reasons:?}");
    let stats = h.store().await.stats().await?;
    assert_eq!(stats.iter().map(|s| s.pending).sum::<u64>(), 0);
    assert_eq!(stats.iter().map(|s| s.dead_letters).sum::<u64>(), 2);
    Ok(())
}

/// A row that cannot be decoded is parked in the dead-letter table with the reason, not dropped
/// and not retried forever.
pub async fn undecodable_row_is_dead_lettered(h: &dyn StoreHarness) -> Result<()> {
    h.insert_undecodable("bad").await?;
    let broker = MemoryTransport::new();
    let relay = Relay::new(h.store().await, Arc::new(broker.clone()), cfg("r"))?;
    drain(&relay).await?;
    assert!(broker.published().is_empty());
    let reasons = h.dead_letter_reasons().await?;
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].1.contains("headers are not a JSON object"),
        "{reasons:?}"
    );
    Ok(())
}

/// A row inserted with plain SQL, with only the documented required columns, is published with
/// the documented defaults.
pub async fn plain_sql_row_is_published(h: &dyn StoreHarness) -> Result<()> {
    h.insert_plain("orders", "OrderPlaced", "order-1", br#"{"id":1}"#)
        .await?;
    let broker = MemoryTransport::new();
    let relay = Relay::new(h.store().await, Arc::new(broker.clone()), cfg("r"))?;
    assert_eq!(drain(&relay).await?, 1);
    let m = &broker.published()[0];
    assert_eq!(m.kind, herald_core::Kind::Event);
    assert_eq!(m.message_type, "OrderPlaced");
    assert_eq!(m.ordering_key.as_deref(), Some("order-1"));
    assert_eq!(m.content_type, "application/json");
    assert_eq!(m.payload, br#"{"id":1}"#);
    let age = std::time::SystemTime::now()
        .duration_since(m.created_at)
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(300),
        "created_at defaults to now, got {age:?} ago"
    );
    Ok(())
}

/// Two relays running side by side on one outbox, one of them killed mid-way (its task
/// dropped: no goodbye, no release): the other holds every partition within the lease and
/// publishes the rest; every message arrives, and each key's first deliveries are in order.
pub async fn two_relays_keep_order_per_key(h: &dyn StoreHarness) -> Result<()> {
    // Few keys and small batches, so that each key's rows spread over many batches.
    let keys = 5;
    let per_key = 40u8;
    let mut expected = 0;
    for round in 0..per_key {
        let batch: Vec<_> = (0..keys)
            .map(|k| Message::raw_event("t", "E", vec![round]).with_key(format!("k{k}")))
            .collect();
        expected += batch.len();
        h.enqueue(&batch, true).await?;
    }
    let broker = MemoryTransport::new();
    // Publishing takes a random few milliseconds, so the two relays interleave as real ones do.
    let transport: Arc<dyn Transport> = Arc::new(Jittery(broker.clone()));
    let lease = Duration::from_millis(800);
    let small = |id| RelayConfig {
        batch_size: 3,
        lease,
        poll_interval: Duration::from_millis(10),
        ..cfg(id)
    };
    let r1 = Relay::new(h.store().await, transport.clone(), small("r1"))?;
    let r2 = Relay::new(h.store().await, transport, small("r2"))?;
    let (t1, _keep) = spawn_run(&r1);
    let (t2, stop2) = spawn_run(&r2);
    let distinct = |b: &MemoryTransport| {
        b.published()
            .iter()
            .map(|m| m.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let limit = std::time::Instant::now() + Duration::from_secs(60);
    while distinct(&broker) < expected / 3 {
        assert!(
            std::time::Instant::now() < limit,
            "nothing published in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t1.abort();
    let killed = std::time::Instant::now();
    let (_, _, of) = r2.holdings();
    while r2.holdings().1.len() < of as usize {
        assert!(
            killed.elapsed() < 10 * lease,
            "the survivor did not take over: {:?}",
            r2.holdings()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = killed.elapsed();
    // The bound is the lease; a loaded test machine gets one more.
    assert!(took <= 2 * lease, "takeover took {took:?}, lease {lease:?}");
    while distinct(&broker) < expected {
        assert!(
            std::time::Instant::now() < limit,
            "not everything was published"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop2.send(());
    t2.await.expect("relay task")?;
    let published = broker.published();
    // Duplicates: the killed relay's batch in flight.
    let dups = first_deliveries_in_order(&published, expected);
    assert!(
        dups <= 3,
        "at most the killed relay's batch in flight is published twice, got {dups} duplicates"
    );
    Ok(())
}

/// Runs `relay` until the returned sender fires or the task is aborted.
fn spawn_run(
    relay: &Relay,
) -> (
    tokio::task::JoinHandle<Result<()>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let r = relay.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        r.run(async move {
            let _ = rx.await;
        })
        .await
    });
    (task, tx)
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Checks that `published` holds each of `expected` messages of key `k` once at least and that
/// their first deliveries are in payload order; returns the duplicates.
fn first_deliveries_in_order(published: &[Message], expected: usize) -> usize {
    let mut first = std::collections::HashSet::new();
    let mut last: HashMap<String, u8> = HashMap::new();
    for m in published {
        if !first.insert(m.id) {
            continue;
        }
        let key = m.ordering_key.clone().unwrap_or_default();
        let seq = m.payload[0];
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(
                seq > prev,
                "key {key} first delivered out of order: {seq} after {prev}"
            );
        }
    }
    assert_eq!(first.len(), expected, "every message delivered");
    published.len() - expected
}

type Running = (
    tokio::task::JoinHandle<Result<()>>,
    tokio::sync::oneshot::Sender<()>,
);

/// Two relays with a short lease over one broker: `a` (on `first`) runs and holds every
/// partition, then `b` (on `second`) runs beside it.
struct Pair {
    lease: Duration,
    broker: MemoryTransport,
    a: Relay,
    b: Relay,
    run_a: tokio::task::JoinHandle<Result<()>>,
    stop_a: tokio::sync::oneshot::Sender<()>,
    run_b: tokio::task::JoinHandle<Result<()>>,
    stop_b: tokio::sync::oneshot::Sender<()>,
}

impl Pair {
    async fn start(first: Arc<dyn OutboxStore>, second: Arc<dyn OutboxStore>) -> Result<Pair> {
        let lease = Duration::from_millis(800);
        let conf = |id| RelayConfig {
            lease,
            poll_interval: Duration::from_millis(10),
            ..cfg(id)
        };
        let broker = MemoryTransport::new();
        let a = Relay::new(first, Arc::new(broker.clone()), conf("first"))?;
        let b = Relay::new(second, Arc::new(broker.clone()), conf("survivor"))?;
        let (run_a, stop_a): Running = spawn_run(&a);
        wait_until(
            "the first relay holding everything",
            Duration::from_secs(10),
            || {
                let (_, held, of) = a.holdings();
                of > 0 && held.len() == of as usize
            },
        )
        .await;
        let (run_b, stop_b) = spawn_run(&b);
        Ok(Pair {
            lease,
            broker,
            a,
            b,
            run_a,
            stop_a,
            run_b,
            stop_b,
        })
    }
}

/// A relay frozen between reading a batch and publishing it (SIGSTOP, a long GC pause) for
/// longer than the lease: another relay takes its partitions within the lease and publishes the
/// batch; when the frozen one wakes it publishes nothing of its stale batch, its marks are
/// refused, and it rejoins.
pub async fn a_paused_relay_is_fenced_when_it_wakes(h: &dyn StoreHarness) -> Result<()> {
    let frozen = crate::Freezable::new(h.store().await);
    let Pair {
        lease,
        broker,
        a,
        b,
        run_a,
        stop_a,
        run_b,
        stop_b,
    } = Pair::start(frozen.clone(), h.store().await).await?;
    frozen.freeze_after_next_read();
    let batch: Vec<_> = (0..6u8)
        .map(|i| Message::raw_event("t", "E", vec![i]).with_key("k"))
        .collect();
    h.enqueue(&batch, true).await?;
    wait_until(
        "the holder freezing after its read",
        Duration::from_secs(10),
        || frozen.is_frozen(),
    )
    .await;
    let frozen_at = std::time::Instant::now();
    let (_, _, of) = a.holdings();
    let took = wait_until("the takeover", 10 * lease, || {
        b.holdings().1.len() == of as usize
    })
    .await;
    assert!(took <= 2 * lease, "takeover took {took:?}, lease {lease:?}");
    wait_until(
        "the survivor publishing the batch",
        Duration::from_secs(10),
        || broker.published().len() >= 6,
    )
    .await;
    // Frozen for longer than the lease in all.
    tokio::time::sleep((lease + Duration::from_millis(200)).saturating_sub(frozen_at.elapsed()))
        .await;
    frozen.thaw();
    wait_until("the woken relay rejoining", Duration::from_secs(10), || {
        a.counters()
            .taken_over
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    })
    .await;
    let more: Vec<_> = (6..9u8)
        .map(|i| Message::raw_event("t", "E", vec![i]).with_key("k"))
        .collect();
    h.enqueue(&more, true).await?;
    wait_until("the rest", Duration::from_secs(10), || {
        broker.published().len() >= 9
    })
    .await;
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    run_a.await.expect("relay task")?;
    run_b.await.expect("relay task")?;
    let published = broker.published();
    assert_eq!(
        first_deliveries_in_order(&published, 9),
        0,
        "the woken relay published nothing of its stale batch"
    );
    assert!(
        a.counters()
            .lease_lost
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 6
    );
    Ok(())
}

/// A relay whose database link goes silent (packets dropped: no error, no answer) stops
/// publishing at its deadline and is taken over within the lease; nothing is lost or reordered.
pub async fn a_relay_cut_off_from_the_database_is_taken_over(h: &dyn StoreHarness) -> Result<()> {
    let Some(server) = h.server() else {
        eprintln!("not applicable: the database is a file, there is no link to cut");
        return Ok(());
    };
    let proxy = crate::ChaosProxy::start(server)
        .await
        .map_err(|e| herald_core::Error::unavailable("chaos proxy", e))?;
    let Some(cut) = h.store_at(proxy.addr()).await else {
        return Ok(());
    };
    let Pair {
        lease,
        broker,
        a,
        b,
        run_a,
        stop_a,
        run_b,
        stop_b,
    } = Pair::start(cut, h.store().await).await?;
    let first: Vec<_> = (0..5u8)
        .map(|i| Message::raw_event("t", "E", vec![i]).with_key(format!("k{}", i % 2)))
        .collect();
    h.enqueue(&first, true).await?;
    wait_until(
        "the first relay publishing",
        Duration::from_secs(10),
        || broker.published().len() >= 5,
    )
    .await;
    proxy.set(crate::Link::Blackhole);
    let (_, _, of) = a.holdings();
    let took = wait_until("the takeover", 10 * lease, || {
        b.holdings().1.len() == of as usize
    })
    .await;
    assert!(took <= 2 * lease, "takeover took {took:?}, lease {lease:?}");
    let rest: Vec<_> = (5..10u8)
        .map(|i| Message::raw_event("t", "E", vec![i]).with_key(format!("k{}", i % 2)))
        .collect();
    h.enqueue(&rest, true).await?;
    wait_until("the survivor publishing", Duration::from_secs(10), || {
        broker
            .published()
            .iter()
            .map(|m| m.id)
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= 10
    })
    .await;
    proxy.heal();
    let _ = stop_b.send(());
    run_b.await.expect("relay task")?;
    let _ = stop_a.send(());
    // The cut relay's calls on its dead connections may still hang; its stop is bounded.
    let _ = tokio::time::timeout(Duration::from_secs(30), run_a).await;
    let published = broker.published();
    let dups = first_deliveries_in_order(&published, 10);
    assert!(
        dups <= 5,
        "only a batch in flight may be published twice, got {dups}"
    );
    Ok(())
}

/// Takes 0 to 3 ms before publishing.
struct Jittery(MemoryTransport);

#[async_trait]
impl Transport for Jittery {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3000))).await;
        self.0.publish(batch).await
    }

    async fn subscribe(
        &self,
        s: &herald_core::Subscription,
    ) -> Result<Box<dyn herald_core::Subscriber>> {
        self.0.subscribe(s).await
    }

    fn describe(&self) -> String {
        "jittery-memory".to_owned()
    }
}

/// Rejects every command as unowned, like a broker with no queue bound for it.
#[derive(Clone)]
struct RejectCommands(MemoryTransport);

#[async_trait]
impl Transport for RejectCommands {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let events: Vec<_> = batch
            .iter()
            .filter(|m| m.kind == herald_core::Kind::Event)
            .cloned()
            .collect();
        self.0.publish(&events).await;
        batch
            .iter()
            .map(|m| match m.kind {
                herald_core::Kind::Event => Ok(()),
                herald_core::Kind::Command => Err(herald_core::Error::rejected(
                    "no owner for this command queue",
                )),
            })
            .collect()
    }

    async fn subscribe(
        &self,
        s: &herald_core::Subscription,
    ) -> Result<Box<dyn herald_core::Subscriber>> {
        self.0.subscribe(s).await
    }

    fn describe(&self) -> String {
        "reject-commands".to_owned()
    }
}

/// Runs every check of the suite, each against a fresh harness from `make`.
#[macro_export]
macro_rules! store_suite {
    ($make:expr) => {
        $crate::store_suite!(@one $make, rolled_back_is_never_published);
        $crate::store_suite!(@one $make, late_commit_with_lower_id_is_published);
        $crate::store_suite!(@one $make, one_owner_per_partition);
        $crate::store_suite!(@one $make, silent_relay_is_taken_over_and_fenced);
        $crate::store_suite!(@one $make, renewal_keeps_and_leaving_frees);
        $crate::store_suite!(@one $make, released_rows_are_claimable_again);
        $crate::store_suite!(@one $make, poison_is_dead_lettered_with_reason);
        $crate::store_suite!(@one $make, undecodable_row_is_dead_lettered);
        $crate::store_suite!(@one $make, plain_sql_row_is_published);
        $crate::store_suite!(@one $make, two_relays_keep_order_per_key);
        $crate::store_suite!(@one $make, a_paused_relay_is_fenced_when_it_wakes);
        $crate::store_suite!(@one $make, a_relay_cut_off_from_the_database_is_taken_over);
        $crate::store_suite!(@poison $make, rows_end_published_or_dead_lettered);
    };
    (@poison $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let harness = $make.await;
            $crate::poison::$name(&harness).await.expect(stringify!($name));
            $crate::suite::StoreHarness::cleanup(&harness).await;
        }
    };
    (@one $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let harness = $make.await;
            $crate::suite::$name(&harness).await.expect(stringify!($name));
            $crate::suite::StoreHarness::cleanup(&harness).await;
        }
    };
}
