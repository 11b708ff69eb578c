//! The relay: heart-beat to hold partitions of the outbox, read a batch of them, publish it, wait
//! for the broker's confirmations, mark.
//!
//! A message is deleted from the outbox only after the broker positively confirmed it, so a crash
//! anywhere in between leaves the row in place and it is published again by whoever holds its
//! partition next: a duplicate, never a loss. A relay that stops heart-beating loses its
//! partitions to another relay within the lease ([`crate::membership`]); its own incarnation is
//! the fencing token, so if it was only paused it finds its marks refused, and it stops
//! publishing once its local deadline passes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::RelayConfig;
use crate::error::{Error, Result};
use crate::membership::{Heartbeat, RelayInfo, Standing, new_incarnation};
use crate::message::Message;
use crate::store::{Claim, Lease, OutboxStore, RejectionOutcome};
use crate::telemetry::{Health, Thresholds, names};
use crate::trace;
use crate::transport::Transport;

/// Points in a tick where a test or `herald relay --failpoint` can crash the relay on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The batch is read, nothing published.
    AfterClaim,
    /// The broker confirmed the batch; the rows are not yet marked.
    AfterConfirm,
}

impl Failpoint {
    /// Parses `after-claim` or `after-confirm`.
    pub fn parse(s: &str) -> Option<Failpoint> {
        match s {
            "after-claim" => Some(Failpoint::AfterClaim),
            "after-confirm" => Some(Failpoint::AfterConfirm),
            _ => None,
        }
    }
}

/// A hook called at every [`Failpoint`]; it may abort the process.
pub type FailpointHook = Arc<dyn Fn(Failpoint) + Send + Sync>;

/// What one [`Relay::tick`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows confirmed by the broker and marked.
    pub published: usize,
    /// Rows given back after a broker outage or unknown outcome, to be published again.
    pub released: usize,
    /// Rows the broker rejected that will be retried.
    pub rejected: usize,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: usize,
    /// Rows whose lease was lost before they could be marked (they will be published again).
    pub lease_lost: usize,
    /// The broker error that made rows be released, if any.
    pub broker_error: Option<String>,
}

/// Totals since the relay started.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Messages confirmed and marked.
    pub published: AtomicU64,
    /// Messages released after a broker outage or an unknown outcome.
    pub released: AtomicU64,
    /// Rejections that will be retried (one per attempt).
    pub rejected: AtomicU64,
    /// Messages dead-lettered (rejected too often, unpublishable, or undecodable rows).
    pub dead_lettered: AtomicU64,
    /// Messages whose lease was lost.
    pub lease_lost: AtomicU64,
    /// Ticks that hit a broker outage.
    pub broker_errors: AtomicU64,
    /// Partitions this relay took over from relays that stopped heart-beating.
    pub partitions_taken_over: AtomicU64,
    /// Times this relay was itself taken over (it was paused or cut off too long) and rejoined.
    pub taken_over: AtomicU64,
    /// Heartbeats that failed (database unreachable or slow).
    pub heartbeat_errors: AtomicU64,
}

/// Wakes an idle relay at once, e.g. right after the application committed an outbox row in the
/// same process. Cheap; polling remains the safety net when no one calls it.
#[derive(Debug, Clone, Default)]
pub struct Waker(Arc<Notify>);

impl Waker {
    /// Wakes the idle relay workers (a commit may be in any worker's partitions).
    pub fn wake(&self) {
        self.0.notify_waiters();
        self.0.notify_one();
    }
}

/// The outbox relay. Cheap to clone; clones share counters and the waker.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn OutboxStore>,
    transport: Arc<dyn Transport>,
    config: RelayConfig,
    waker: Waker,
    counters: RelayCounters,
    failpoint: Option<FailpointHook>,
    /// `config.attempts_before_dead_letter()`, computed once.
    dead_letter_after: u32,
    members: Members,
    health: Arc<Health>,
}

/// This relay's membership: who it is, what it holds, and which partitions have a batch in
/// flight.
struct Members {
    info: RelayInfo,
    standing: Arc<Standing>,
    state: Mutex<MemberState>,
    /// One heartbeat at a time.
    beating: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct MemberState {
    incarnation: i64,
    joined: bool,
    partitions: u32,
    held: BTreeSet<u32>,
    surplus: Vec<u32>,
    /// Partitions read by a batch still running (possibly of an earlier incarnation).
    busy: HashMap<u32, usize>,
    last_beat: Option<tokio::time::Instant>,
    /// Incremented whenever `held` or `surplus` changes.
    generation: u64,
}

/// A batch read ahead by a worker, with its lease and busy partitions.
struct Ahead<'a> {
    generation: u64,
    lease: Lease,
    busy: Busy<'a>,
    claim: Claim,
}

/// Heart-beats in the background while held ([`Relay::keep_alive`]).
pub struct KeepAlive {
    _task: AbortOnDrop,
    _stop: watch::Sender<bool>,
}

/// A task aborted when the handle drops.
pub(crate) struct AbortOnDrop(pub(crate) Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Spawns `task`, aborted when the guard is dropped.
    pub(crate) fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        AbortOnDrop(Some(tokio::spawn(task)))
    }

    async fn join(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Marks partitions busy while a batch over them runs.
struct Busy<'a> {
    members: &'a Members,
    partitions: Vec<u32>,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut st = self.members.lock();
        for p in &self.partitions {
            if let Some(n) = st.busy.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    st.busy.remove(p);
                }
            }
        }
    }
}

impl Members {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Relay {
    /// A relay over `store` and `transport`. Fails if `config` is invalid.
    pub fn new(
        store: Arc<dyn OutboxStore>,
        transport: Arc<dyn Transport>,
        config: RelayConfig,
    ) -> Result<Relay> {
        Relay::with_failpoint(store, transport, config, None)
    }

    /// Like [`Relay::new`], with a hook called at each [`Failpoint`].
    pub fn with_failpoint(
        store: Arc<dyn OutboxStore>,
        transport: Arc<dyn Transport>,
        config: RelayConfig,
        failpoint: Option<FailpointHook>,
    ) -> Result<Relay> {
        config.validate()?;
        let dead_letter_after = config.attempts_before_dead_letter();
        let incarnation = new_incarnation();
        let members = Members {
            info: RelayInfo::this_process(&config.relay_id),
            standing: Standing::new(incarnation, tokio::time::Instant::now()),
            state: Mutex::new(MemberState {
                incarnation,
                ..MemberState::default()
            }),
            beating: tokio::sync::Mutex::new(()),
        };
        Ok(Relay {
            inner: Arc::new(Inner {
                store,
                transport,
                config,
                waker: Waker::default(),
                counters: RelayCounters::default(),
                failpoint,
                dead_letter_after,
                members,
                health: Arc::new(Health::default()),
            }),
        })
    }

    /// A handle that wakes this relay when an outbox row was committed.
    pub fn waker(&self) -> Waker {
        self.inner.waker.clone()
    }

    /// Totals since start.
    pub fn counters(&self) -> &RelayCounters {
        &self.inner.counters
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// What this relay's loops record for `/healthz` and `/readyz` (updated while
    /// [`run`](Self::run) runs).
    pub fn health(&self) -> Arc<Health> {
        self.inner.health.clone()
    }

    /// `/readyz`'s thresholds for this relay: not ready once the database or the broker has
    /// failed for `unreachable_after`, or once the oldest pending row is older than
    /// `stall_after` while the relay made no progress for as long. A loop that has not turned
    /// for four times the longest call it may wait on (plus a backoff and a poll) fails
    /// `/healthz`.
    pub fn thresholds(&self, stall_after: Duration, unreachable_after: Duration) -> Thresholds {
        let cfg = &self.inner.config;
        let call = cfg.publish_timeout.max(cfg.lease);
        Thresholds {
            unreachable_after,
            stall_after,
            loop_bound: (call * 4 + cfg.backoff_max + cfg.poll_interval)
                .max(Duration::from_secs(30)),
        }
    }

    fn hit(&self, point: Failpoint) {
        if let Some(hook) = &self.inner.failpoint {
            hook(point);
        }
    }

    /// This relay's current incarnation and the partitions it holds (of how many).
    pub fn holdings(&self) -> (i64, Vec<u32>, u32) {
        let st = self.inner.members.lock();
        (
            st.incarnation,
            st.held.iter().copied().collect(),
            st.partitions,
        )
    }

    /// One heartbeat: registers or renews this relay's incarnation, gives up idle surplus
    /// partitions, and takes what the store grants. If the incarnation was taken over (the
    /// relay was paused or cut off past its liveness), every batch in flight stops being
    /// publishable and the relay rejoins as a new incarnation.
    pub async fn heartbeat(&self) -> Result<()> {
        let m = &self.inner.members;
        let _one = m.beating.lock().await;
        let cfg = &self.inner.config;
        for _ in 0..2 {
            let (incarnation, joining, release) = {
                let mut st = m.lock();
                let release: Vec<u32> = st
                    .surplus
                    .iter()
                    .copied()
                    .filter(|p| !st.busy.contains_key(p))
                    .collect();
                for p in &release {
                    st.held.remove(p);
                }
                if !release.is_empty() {
                    st.generation += 1;
                }
                (st.incarnation, !st.joined, release)
            };
            let sent = tokio::time::Instant::now();
            let beat = Heartbeat {
                incarnation,
                joining,
                relay: &m.info,
                ttl: cfg.liveness(),
                release: &release,
            };
            // A heartbeat stuck on a dead connection must not hold the next one up: past the
            // liveness it no longer matters what it would have said.
            let answer = tokio::time::timeout(cfg.liveness(), self.inner.store.heartbeat(&beat))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        what: "heartbeat".to_owned(),
                        after: cfg.liveness(),
                    })
                });
            let holdings = match answer {
                Ok(h) => {
                    self.inner.health.database(sent, Ok(()));
                    h
                }
                Err(e) => {
                    self.inner.health.database(sent, Err(e.chain()));
                    self.count(
                        &self.inner.counters.heartbeat_errors,
                        names::HEARTBEAT_ERRORS,
                        1,
                    );
                    return Err(e);
                }
            };
            if !holdings.alive {
                let fresh = new_incarnation();
                warn!(
                    relay = %cfg.relay_id,
                    incarnation,
                    "this relay's incarnation no longer stands (taken over after missing its heartbeats, or stopped); it drops its batches in flight and rejoins"
                );
                self.count(&self.inner.counters.taken_over, names::TAKEN_OVER, 1);
                m.standing.reincarnate(fresh);
                let mut st = m.lock();
                st.incarnation = fresh;
                st.joined = false;
                st.held.clear();
                st.surplus.clear();
                st.generation += 1;
                continue;
            }
            let gained = {
                let mut st = m.lock();
                let before = st.held.clone();
                st.joined = true;
                st.partitions = holdings.partitions;
                st.held = holdings.held.iter().copied().collect();
                if st.held != before || st.surplus != holdings.surplus {
                    st.generation += 1;
                }
                st.surplus = holdings.surplus.clone();
                st.last_beat = Some(sent);
                st.held.difference(&before).count()
            };
            m.standing.renew(sent + cfg.publish_window());
            for t in &holdings.took_over {
                warn!(
                    from = %t.from,
                    incarnation = t.incarnation,
                    partitions = ?t.partitions,
                    "took over the partitions of a relay that stopped heart-beating"
                );
                self.count(
                    &self.inner.counters.partitions_taken_over,
                    names::PARTITIONS_TAKEN_OVER,
                    t.partitions.len(),
                );
            }
            if joining || gained > 0 || !release.is_empty() {
                info!(
                    relay = %cfg.relay_id,
                    held = holdings.held.len(),
                    of = holdings.partitions,
                    live_relays = holdings.live_relays,
                    "partitions"
                );
            }
            if gained > 0 {
                self.inner.waker.wake();
            }
            let (held, of) = {
                let st = m.lock();
                (st.held.len(), st.partitions)
            };
            self.inner.health.held(held, of);
            metrics::gauge!(names::PARTITIONS_HELD).set(held as f64);
            return Ok(());
        }
        Err(Error::unavailable(
            "outbox",
            "the relay was taken over again right after rejoining",
        ))
    }

    /// Keeps this relay's partitions held by heart-beating in the background until the guard
    /// drops, for callers that drive [`tick`](Self::tick) themselves ([`run`](Self::run) does
    /// this on its own).
    pub fn keep_alive(&self) -> KeepAlive {
        let (stop, rx) = watch::channel(false);
        let relay = self.clone();
        KeepAlive {
            _task: AbortOnDrop(Some(tokio::spawn(
                async move { relay.heartbeat_loop(rx).await },
            ))),
            _stop: stop,
        }
    }

    /// Checks that the database and the broker keep what they acknowledge (`synchronous_commit`,
    /// SQLite's `synchronous`, durable queues, ...), logs each problem found as a warning and
    /// returns them. [`run`](Self::run) calls it as it starts; a check that fails is logged and
    /// skipped.
    pub async fn warn_durability(&self) -> Vec<String> {
        // Bounded: a database or broker that does not answer must not hold the start.
        let limit = self.inner.config.publish_timeout;
        let mut found = Vec::new();
        for (what, checked) in [
            (
                "the database's",
                tokio::time::timeout(limit, self.inner.store.durability_warnings()).await,
            ),
            (
                "the broker's",
                tokio::time::timeout(limit, self.inner.transport.durability_warnings()).await,
            ),
        ] {
            match checked {
                Ok(Ok(w)) => found.extend(w),
                Ok(Err(e)) => {
                    warn!(error = %e.chain(), "could not check {what} durability settings")
                }
                Err(_) => warn!(after = ?limit, "checking {what} durability settings timed out"),
            }
        }
        for w in &found {
            warn!("{w}");
        }
        found
    }

    /// Gives up this relay's partitions now and records the stop: another relay takes them at
    /// its next heartbeat. Call it after the last tick (`run` does).
    pub async fn leave(&self) -> Result<()> {
        let incarnation = self.inner.members.lock().incarnation;
        self.inner.store.leave(incarnation).await?;
        let mut st = self.inner.members.lock();
        st.held.clear();
        st.joined = false;
        st.generation += 1;
        self.inner.members.standing.reincarnate(new_incarnation());
        st.incarnation = self.inner.members.standing.incarnation();
        Ok(())
    }

    /// Heart-beats unless one ran recently (within two intervals: the heartbeat loop of `run`
    /// or `keep_alive` normally got there first).
    async fn heartbeat_if_due(&self) -> Result<()> {
        let due = {
            let st = self.inner.members.lock();
            !st.joined
                || st
                    .last_beat
                    .is_none_or(|t| t.elapsed() >= 2 * self.inner.config.heartbeat_interval())
        };
        if due { self.heartbeat().await } else { Ok(()) }
    }

    /// The partitions worker `worker` of `workers` reads now (`p mod workers == worker`, held,
    /// no batch of them in flight), marked busy until the guard drops.
    fn take_share(&self, worker: usize, workers: usize) -> Option<(Lease, Busy<'_>)> {
        let m = &self.inner.members;
        let mut st = m.lock();
        // Not joined, or no heartbeat in time (the database is unreachable): nothing could be
        // published, so nothing is read.
        if !st.joined || !m.standing.may_publish(st.incarnation) {
            return None;
        }
        let mine: Vec<u32> = st
            .held
            .iter()
            .copied()
            // Surplus partitions are not read any more: they go idle and are given up at the
            // next heartbeat, even under steady traffic.
            .filter(|p| {
                *p as usize % workers == worker
                    && !st.busy.contains_key(p)
                    && !st.surplus.contains(p)
            })
            .collect();
        if mine.is_empty() {
            return None;
        }
        for p in &mine {
            *st.busy.entry(*p).or_default() += 1;
        }
        let all = mine.len() == st.partitions as usize;
        let lease = Lease::new(
            st.incarnation,
            (!all).then(|| mine.clone()),
            st.partitions,
            m.standing.clone(),
        );
        Some((
            lease,
            Busy {
                members: m,
                partitions: mine,
            },
        ))
    }

    /// One read-publish-mark round over every partition this relay holds (heart-beating first
    /// if one is due). Returns what it did; an `Err` is a database error (the broker's errors
    /// are reported in [`TickReport::broker_error`]).
    ///
    /// Every row read ends the tick in exactly one state: published (deleted), left in place
    /// (its error on the row) or waiting for a retry, or dead-lettered with a reason. Per-key
    /// order holds under rejections: once a row of a key is not confirmed (rejected, outcome
    /// unknown), no later row of that key in the batch counts as published before it; those
    /// rows stay and are published again after it (a duplicate at worst, never out of turn).
    pub async fn tick(&self) -> Result<TickReport> {
        self.tick_share(0, 1).await
    }

    async fn tick_share(&self, worker: usize, workers: usize) -> Result<TickReport> {
        self.heartbeat_if_due().await?;
        let Some((lease, _busy)) = self.take_share(worker, workers) else {
            return Ok(TickReport::default());
        };
        let claim = self.read(&lease, &[]).await?;
        Ok(self.deliver(worker, &lease, claim).await?.0)
    }

    /// One batch's read: the oldest publishable rows of `lease`'s partitions, except `exclude`.
    async fn read(&self, lease: &Lease, exclude: &[i64]) -> Result<Claim> {
        let cfg = &self.inner.config;
        let hold_cap = cfg.retry_delay_max + cfg.lease;
        let started = tokio::time::Instant::now();
        let claim = self
            .bounded(
                "reading outbox rows",
                self.inner
                    .store
                    .claim(lease, cfg.batch_size, hold_cap, exclude),
            )
            .await;
        metrics::histogram!(names::CLAIM_DURATION).record(started.elapsed().as_secs_f64());
        claim
    }

    /// `call` to the store, abandoned after the publish timeout or the lease, whichever is
    /// longer: a call stuck on a dead connection must not hold its partitions forever (what it
    /// did not finish is read again).
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let cfg = &self.inner.config;
        let limit = cfg.publish_timeout.max(cfg.lease);
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(Error::Timeout {
                what: what.to_owned(),
                after: limit,
            })
        })
    }

    /// Like [`tick_share`](Self::tick_share), reading the next batch of the same partitions
    /// while this one is published (`ahead` carries it to the next call). The read-ahead skips
    /// this batch's rows, and it is used only if this batch was confirmed in full: otherwise a
    /// head waits, and the next read starts from the oldest row again, so nothing overtakes it.
    /// Every read still starts from the oldest pending row, so a transaction that committed
    /// late with a lower id is read at the next batch. The pipeline stops when the relay's
    /// partitions changed or some of these are to be given up.
    async fn tick_pipelined<'a>(
        &'a self,
        worker: usize,
        workers: usize,
        ahead: &mut Option<Ahead<'a>>,
    ) -> Result<TickReport> {
        let current = match ahead.take() {
            Some(a) if a.generation == self.generation() && a.lease.usable() => a,
            _ => {
                self.heartbeat_if_due().await?;
                let Some((lease, busy)) = self.take_share(worker, workers) else {
                    return Ok(TickReport::default());
                };
                let claim = self.read(&lease, &[]).await?;
                Ahead {
                    generation: self.generation(),
                    lease,
                    busy,
                    claim,
                }
            }
        };
        if current.claim.rows.is_empty() && current.claim.parked == 0 {
            return Ok(TickReport::default());
        }
        let Ahead {
            generation,
            lease,
            busy,
            claim,
        } = current;
        let ids: Vec<i64> = claim.rows.iter().map(|r| r.seq).collect();
        let go_on = !ids.is_empty() && !self.giving_up(&busy.partitions);
        let (delivered, next) = tokio::join!(self.deliver(worker, &lease, claim), async {
            if go_on {
                Some(self.read(&lease, &ids).await)
            } else {
                None
            }
        });
        let (report, blocked) = delivered?;
        if let Some(Ok(next)) = next
            && report.broker_error.is_none()
            && blocked.is_empty()
        {
            *ahead = Some(Ahead {
                generation,
                lease,
                busy,
                claim: next,
            });
        }
        Ok(report)
    }

    /// Counts changes of the partitions held, so a read-ahead knows its share is still current.
    fn generation(&self) -> u64 {
        self.inner.members.lock().generation
    }

    /// Whether any of `partitions` is to be given up at the next heartbeat.
    fn giving_up(&self, partitions: &[u32]) -> bool {
        let st = self.inner.members.lock();
        partitions.iter().any(|p| st.surplus.contains(p))
    }

    /// Publishes and marks a batch that was read (see [`tick`](Self::tick)); returns what it
    /// did and the keys that are blocked: a row of theirs was not confirmed, so no later row of
    /// theirs may be published before it is.
    async fn deliver(
        &self,
        worker: usize,
        lease: &Lease,
        claim: Claim,
    ) -> Result<(TickReport, HashSet<String>)> {
        let store = &self.inner.store;
        let mut report = TickReport {
            claimed: claim.rows.len() + claim.parked,
            dead_lettered: claim.parked,
            ..TickReport::default()
        };
        self.count(
            &self.inner.counters.dead_lettered,
            names::DEAD_LETTERED,
            claim.parked,
        );
        if claim.parked > 0 {
            self.inner.health.progress();
        }
        if claim.rows.is_empty() {
            return Ok((report, HashSet::new()));
        }
        debug!(
            token = lease.token,
            rows = claim.rows.len(),
            parked = claim.parked,
            "read"
        );
        self.hit(Failpoint::AfterClaim);

        // Messages no broker attempt can carry (over the size limit, against CloudEvents rules
        // or the transport's wire limits) are parked now, with the reason, before anything is
        // sent: a client crate never sees a value it would panic on, and the key moves on.
        let mut rows = Vec::with_capacity(claim.rows.len());
        for row in claim.rows {
            match self.unpublishable(&row.message) {
                None => rows.push(row),
                Some(reason) => {
                    // A lost lease here means this row vanished (deleted by hand) or the
                    // relay was taken over, which is checked before anything is published.
                    // On a database error the batch stays in the outbox (nothing is leased).
                    self.reject(lease, &row, &reason, 1, &mut report).await?;
                }
            }
        }
        if rows.is_empty() {
            return Ok((report, HashSet::new()));
        }

        // A relay that was paused (GC, SIGSTOP, a slow disk) or cut off from the database may
        // wake up after its partitions passed to someone else. Publishing now could reorder a
        // key, so it drops the batch instead.
        if !lease.usable() {
            warn!(
                token = lease.token,
                rows = rows.len(),
                "no heartbeat in time to publish this batch; dropping it (its rows stay in the outbox)"
            );
            let keys = rows
                .iter()
                .filter_map(|r| r.message.ordering_key.clone())
                .collect();
            return Ok((self.lease_lost(report, lease.token, rows.len()), keys));
        }

        let results = self.publish_in_waves(worker, &rows, lease).await;
        self.hit(Failpoint::AfterConfirm);

        // Walk the batch in order. A key is blocked from its first row that is not confirmed
        // on: later rows of it are released even if the broker confirmed them, so they are
        // published again after their head (a duplicate), never counted as published before it.
        let dead_letter_after = self.inner.dead_letter_after;
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut confirmed = Vec::with_capacity(rows.len());
        let mut confirmed_to: Vec<&str> = Vec::with_capacity(rows.len());
        let mut unknown = Vec::new();
        // Rows not sent, or sent but not counted, because an earlier row of their key was not
        // confirmed.
        let mut held = Vec::new();
        // A database error while recording a rejection is kept until the confirmed rows are
        // marked and the rest released: failing at once would leave them all leased.
        let mut failure: Option<Error> = None;
        for (row, result) in rows.iter().zip(results) {
            let key = row.message.ordering_key.as_deref();
            if key.is_some_and(|k| blocked.contains(k)) {
                held.push(row.seq);
                continue;
            }
            let keeps_key = match result {
                Some(Ok(())) => {
                    confirmed.push(row.seq);
                    confirmed_to.push(&row.message.destination);
                    true
                }
                // Held back behind an earlier message of its key that was not confirmed.
                None => {
                    held.push(row.seq);
                    false
                }
                Some(Err(e)) if e.is_transient() || failure.is_some() => {
                    if e.is_transient() && report.broker_error.is_none() {
                        report.broker_error = Some(e.chain());
                    }
                    unknown.push(row.seq);
                    false
                }
                Some(Err(e)) => {
                    let attempts = match e {
                        Error::Unpublishable { .. } => 1,
                        _ => dead_letter_after,
                    };
                    let reason = e.chain();
                    match self
                        .reject(lease, row, &reason, attempts, &mut report)
                        .await
                    {
                        // A dead letter leaves the key's order; a row waiting for its retry
                        // is still the key's head.
                        Ok(outcome) => outcome == RejectionOutcome::DeadLettered,
                        Err(db) => {
                            failure = Some(db);
                            unknown.push(row.seq);
                            false
                        }
                    }
                }
            };
            if !keeps_key && let Some(k) = key {
                blocked.insert(k);
            }
        }

        if !confirmed.is_empty() {
            let marked = self
                .bounded("marking outbox rows", store.complete(lease, &confirmed))
                .await? as usize;
            report.published += marked;
            if marked > 0 {
                self.inner.health.progress();
            }
            // Rows marked by someone else are few and rare: the first `marked` count here.
            let mut per_destination: HashMap<&str, u64> = HashMap::new();
            for d in confirmed_to.iter().take(marked) {
                *per_destination.entry(d).or_default() += 1;
            }
            for (d, n) in per_destination {
                metrics::counter!(names::PUBLISHED, "destination" => d.to_owned()).increment(n);
            }
            if marked < confirmed.len() {
                // Another relay took these rows over: it will publish them again (a duplicate).
                let lost = confirmed.len() - marked;
                warn!(
                    token = lease.token,
                    lost, "taken over before marking; these messages will be published again"
                );
                report = self.lease_lost(report, lease.token, lost);
            }
        }
        let unknown_reason = match (&report.broker_error, &failure) {
            (Some(e), _) => format!("outcome unknown, will publish again: {e}"),
            (None, Some(e)) => format!("not recorded, the relay's database failed: {}", e.chain()),
            (None, None) => "outcome unknown, will publish again".to_owned(),
        };
        for (seqs, reason) in [
            (&unknown, unknown_reason.as_str()),
            (
                &held,
                "waiting: an earlier message of its key was not confirmed",
            ),
        ] {
            if seqs.is_empty() {
                continue;
            }
            let released = self
                .bounded("releasing outbox rows", store.release(lease, seqs, reason))
                .await? as usize;
            report.released += released;
            self.count(&self.inner.counters.released, names::RELEASED, released);
            if released < seqs.len() {
                report = self.lease_lost(report, lease.token, seqs.len() - released);
            }
        }
        if report.broker_error.is_some() {
            self.count(&self.inner.counters.broker_errors, names::BROKER_ERRORS, 1);
        }
        self.inner
            .counters
            .published
            .fetch_add(report.published as u64, Ordering::Relaxed);
        match failure {
            Some(e) => Err(e),
            None => Ok((report, blocked.into_iter().map(str::to_owned).collect())),
        }
    }

    /// Publishes `rows` and returns one outcome per row, `None` for a row held back unsent.
    ///
    /// A command can be refused on its own (its owner has not declared its queue yet), and the
    /// broker says so only with its confirmation. Were the later messages of its key already
    /// sent, they would reach consumers before it: the order broken on the wire, however the
    /// rows are counted afterwards. So the batch goes out in waves: a key's messages after a
    /// command wait for the next wave, and are held back (released, published next tick) if
    /// that command was not confirmed. A batch of events with distinct ids is one wave. Each
    /// wave may take the publish timeout; none starts once the lease is no longer safe to
    /// publish under.
    async fn publish_in_waves(
        &self,
        worker: usize,
        rows: &[crate::store::OutboxRow],
        lease: &Lease,
    ) -> Vec<Option<Result<()>>> {
        let cfg = &self.inner.config;
        // A message's wave: no earlier than its key's (a key's messages keep their order),
        // after any command of its key before it, and after any message of the batch with the
        // same id (a producer may reuse one; a broker's confirmation or return names the id, so
        // two in flight at once could not be told apart).
        let mut key_wave: HashMap<&str, usize> = HashMap::new();
        let mut id_wave: HashMap<uuid::Uuid, usize> = HashMap::new();
        let waves: Vec<usize> = rows
            .iter()
            .map(|r| {
                let key = r.message.ordering_key.as_deref();
                let w = key
                    .and_then(|k| key_wave.get(k).copied())
                    .unwrap_or(0)
                    .max(id_wave.get(&r.message.id).copied().unwrap_or(0));
                id_wave.insert(r.message.id, w + 1);
                if let Some(k) = key {
                    let next = if r.message.kind == crate::message::Kind::Command {
                        w + 1
                    } else {
                        w
                    };
                    key_wave.insert(k, next);
                }
                w
            })
            .collect();
        let last_wave = waves.iter().copied().max().unwrap_or(0);
        let mut results: Vec<Option<Result<()>>> = (0..rows.len()).map(|_| None).collect();
        let mut failed: HashSet<&str> = HashSet::new();
        for wave in 0..=last_wave {
            if wave > 0 && !lease.usable() {
                break;
            }
            let send: Vec<usize> = (0..rows.len())
                .filter(|i| waves[*i] == wave)
                .filter(|i| {
                    rows[*i]
                        .message
                        .ordering_key
                        .as_deref()
                        .is_none_or(|k| !failed.contains(k))
                })
                .collect();
            if send.is_empty() {
                continue;
            }
            self.inner.health.worker_turned(worker);
            let mut messages: Vec<Message> =
                send.iter().map(|i| rows[*i].message.clone()).collect();
            // One span per message while tracing is on, continuing the row's trace; the message
            // leaves with the span's traceparent.
            let spans: Vec<Option<tracing::Span>> =
                messages.iter_mut().map(trace::publish_span).collect();
            let started = tokio::time::Instant::now();
            // Each wave has the whole publish timeout; the heartbeat keeps the partitions held
            // meanwhile, and no wave starts once the relay's deadline has passed.
            let sent = match tokio::time::timeout(
                cfg.publish_timeout,
                self.inner.transport.publish(&messages),
            )
            .await
            {
                Ok(r) if r.len() == messages.len() => r,
                Ok(r) => {
                    // A transport broke its contract (one result per message). Counting
                    // anything as confirmed could lose a message: every outcome is unknown.
                    error!(
                        transport = %self.inner.transport.describe(),
                        sent = messages.len(),
                        results = r.len(),
                        "transport returned the wrong number of results; releasing the batch"
                    );
                    crate::transport::fail_all(messages.len(), || {
                        Error::unavailable(
                            "transport",
                            "returned the wrong number of results (a bug in the transport)",
                        )
                    })
                }
                Err(_) => crate::transport::fail_all(messages.len(), || Error::Timeout {
                    what: "broker confirmation".to_owned(),
                    after: cfg.publish_timeout,
                }),
            };
            metrics::histogram!(names::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
            // The broker answered unless every outcome is unknown (a refusal is an answer).
            let answered = sent
                .iter()
                .any(|r| r.as_ref().is_ok() || r.as_ref().is_err_and(|e| !e.is_transient()));
            let unanswered = sent.iter().find_map(|r| r.as_ref().err()).map(Error::chain);
            self.inner.health.broker(
                started,
                match (answered, unanswered) {
                    (false, Some(e)) => Err(e),
                    _ => Ok(()),
                },
            );
            for (span, r) in spans.iter().zip(&sent) {
                let Some(span) = span else { continue };
                span.in_scope(|| match r {
                    Ok(()) => debug!("confirmed"),
                    Err(e) => {
                        trace::failed(span, e);
                        debug!(error = %e.chain(), "not confirmed");
                    }
                });
            }
            drop(spans);
            for (i, r) in send.into_iter().zip(sent) {
                if r.is_err()
                    && let Some(k) = rows[i].message.ordering_key.as_deref()
                {
                    failed.insert(k);
                }
                results[i] = Some(r);
            }
        }
        results
    }

    fn count(&self, counter: &AtomicU64, metric: &'static str, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
            metrics::counter!(metric).increment(n as u64);
        }
    }

    fn lease_lost(&self, mut report: TickReport, token: i64, rows: usize) -> TickReport {
        debug!(token, rows, "lease lost");
        report.lease_lost += rows;
        self.count(&self.inner.counters.lease_lost, names::LEASE_LOST, rows);
        report
    }

    /// Why `m` can never be published through this relay's transport, if it cannot.
    fn unpublishable(&self, m: &Message) -> Option<String> {
        let cfg = &self.inner.config;
        let size = m.wire_size();
        if size > cfg.max_message_bytes {
            return Some(format!(
                "message is {size} bytes, over the relay's limit of {} bytes (max_message_bytes)",
                cfg.max_message_bytes
            ));
        }
        self.inner.transport.validate(m).err().map(|e| e.chain())
    }

    async fn reject(
        &self,
        lease: &Lease,
        row: &crate::store::OutboxRow,
        reason: &str,
        max_attempts: u32,
        report: &mut TickReport,
    ) -> Result<RejectionOutcome> {
        // Retry a rejected message after a growing delay: an unroutable command often means its
        // owner has not declared its queue yet.
        let retry_after = self.inner.config.retry_delay(row.attempts);
        let seq = row.seq;
        let outcome = self
            .bounded(
                "recording a rejection",
                self.inner
                    .store
                    .record_rejection(lease, seq, reason, max_attempts, retry_after),
            )
            .await?;
        match outcome {
            RejectionOutcome::WillRetry => {
                warn!(
                    seq,
                    reason,
                    ?retry_after,
                    "broker rejected message; will retry"
                );
                report.rejected += 1;
                self.count(&self.inner.counters.rejected, names::REJECTED, 1);
            }
            RejectionOutcome::DeadLettered => {
                warn!(seq, reason, "message dead-lettered");
                report.dead_lettered += 1;
                self.count(&self.inner.counters.dead_lettered, names::DEAD_LETTERED, 1);
            }
            RejectionOutcome::LeaseLost => {
                report.lease_lost += 1;
                self.count(&self.inner.counters.lease_lost, names::LEASE_LOST, 1);
            }
        }
        Ok(outcome)
    }

    /// Heart-beats, then runs `workers` read-publish-mark loops until `shutdown` completes;
    /// then lets every in-flight batch finish (publish and mark) before giving its partitions
    /// up, so a graceful stop causes no duplicates and another relay continues at its next
    /// heartbeat. The wait is bounded by the publish timeout plus the lease: a batch still
    /// running then (a database or broker that stopped answering) is abandoned, and its rows are
    /// read again by the partitions' next holder (a duplicate at worst, never a loss). Broker and
    /// database outages are retried forever with capped, jittered backoff; only a non-transient
    /// database error (such as a missing table) ends the run early.
    pub async fn run<F>(&self, shutdown: F) -> Result<()>
    where
        F: std::future::Future<Output = ()> + Send,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut shutdown_fired = false;
        if let Err(e) = self.heartbeat().await {
            if !e.is_transient() {
                return Err(e);
            }
            warn!(error = %e.chain(), "first heartbeat failed; retrying");
        }
        self.warn_durability().await;
        let (stop_tx, stop_rx) = watch::channel(false);
        // The heartbeat outlives the workers: batches finishing after the stop still need the
        // partitions held.
        let (beat_stop, beat_rx) = watch::channel(false);
        // Aborted if this future is dropped (a killed task): no heartbeat outlives the relay.
        let beater = AbortOnDrop(Some({
            let relay = self.clone();
            tokio::spawn(async move { relay.heartbeat_loop(beat_rx).await })
        }));
        let workers_n = self.inner.config.workers;
        self.inner.health.started(workers_n);
        let sampler = AbortOnDrop(Some({
            let relay = self.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move { relay.sample_loop(stop).await })
        }));
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..workers_n {
            let relay = self.clone();
            let stop = stop_rx.clone();
            workers.spawn(async move { relay.worker_loop(worker, workers_n, stop).await });
        }
        let mut outcome = Ok(());
        let grace = self.inner.config.publish_timeout + self.inner.config.lease;
        let mut stopped = stop_rx.clone();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let joined = match deadline {
                None => tokio::select! {
                    joined = workers.join_next() => joined,
                    () = &mut shutdown, if !shutdown_fired => {
                        shutdown_fired = true;
                        let _ = stop_tx.send(true);
                        continue;
                    }
                    _ = stopped.changed() => {
                        deadline = Some(tokio::time::Instant::now() + grace);
                        continue;
                    }
                },
                Some(at) => match tokio::time::timeout_at(at, workers.join_next()).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        warn!(
                            waited = ?grace,
                            "in-flight batches did not finish after the stop; abandoning them"
                        );
                        workers.abort_all();
                        while let Some(joined) = workers.join_next().await {
                            if let Ok(Err(e)) = joined
                                && outcome.is_ok()
                            {
                                outcome = Err(e);
                            }
                        }
                        break;
                    }
                },
            };
            let Some(joined) = joined else { break };
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // One worker hit a permanent error: stop the others gracefully too (each
                    // finishes its in-flight batch).
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                    let _ = stop_tx.send(true);
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        drop(sampler);
        let _ = beat_stop.send(true);
        beater.join().await;
        self.inner.health.stopped();
        match self.leave().await {
            Ok(()) => info!(relay = %self.inner.config.relay_id, "partitions released"),
            Err(e) => warn!(
                error = %e.chain(),
                "could not release the partitions; another relay takes them once this one's liveness ends"
            ),
        }
        outcome
    }

    /// Every [`RelayConfig::sample_interval`]: the outbox's pending rows, their oldest age and
    /// its dead letters into the gauges and the health, and a check of the broker if nothing
    /// was heard from it for as long.
    async fn sample_loop(&self, mut stop: watch::Receiver<bool>) {
        let every = self.inner.config.sample_interval;
        let mut seen = HashSet::new();
        loop {
            tokio::join!(self.sample_outbox(&mut seen), self.check_broker(every));
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn sample_outbox(&self, seen: &mut HashSet<String>) {
        let health = &self.inner.health;
        let started = tokio::time::Instant::now();
        let stats = match self
            .bounded("sampling the outbox", self.inner.store.stats())
            .await
        {
            Ok(stats) => stats,
            Err(e) => {
                debug!(error = %e.chain(), "sampling the outbox failed");
                if e.is_transient() {
                    health.database(started, Err(e.chain()));
                }
                return;
            }
        };
        let now = std::time::SystemTime::now();
        let (mut pending, mut oldest, mut dead) = (0u64, None::<Duration>, 0u64);
        let mut oldest_created = None::<std::time::SystemTime>;
        let mut current = HashSet::with_capacity(stats.len());
        for d in stats {
            // A clock behind the database's reads as age zero, not as a negative age.
            let age = d.oldest.map(|t| now.duration_since(t).unwrap_or_default());
            metrics::gauge!(names::OUTBOX_PENDING, "destination" => d.destination.clone())
                .set(d.pending as f64);
            metrics::gauge!(names::OUTBOX_OLDEST_AGE, "destination" => d.destination.clone())
                .set(age.unwrap_or_default().as_secs_f64());
            pending += d.pending;
            dead += d.dead_letters;
            if d.pending > 0 {
                oldest = oldest.max(age);
                oldest_created = match (oldest_created, d.oldest) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            current.insert(d.destination);
        }
        // A destination that emptied and left the stats reads as zero, not as its last value.
        for gone in seen.difference(&current) {
            metrics::gauge!(names::OUTBOX_PENDING, "destination" => gone.clone()).set(0.0);
            metrics::gauge!(names::OUTBOX_OLDEST_AGE, "destination" => gone.clone()).set(0.0);
        }
        *seen = current;
        metrics::gauge!(names::DEAD_LETTERS, "side" => "outbox").set(dead as f64);
        health.sampled(pending, oldest, oldest_created);
    }

    /// Asks the broker whether it answers, unless a publish heard from it within `quiet`.
    async fn check_broker(&self, quiet: Duration) {
        let health = &self.inner.health;
        if health.broker_seen().is_some_and(|t| t.elapsed() < quiet) {
            return;
        }
        let limit = self.inner.config.publish_timeout;
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(limit, self.inner.transport.check()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.chain()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        };
        health.broker(started, result);
    }

    async fn heartbeat_loop(&self, mut stop: watch::Receiver<bool>) {
        let every = self.inner.config.heartbeat_interval();
        let mut failing = false;
        loop {
            self.inner.health.heartbeat_turned();
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            match self.heartbeat().await {
                Ok(()) if failing => {
                    info!("heartbeat recovered");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        warn!(
                            error = %e.chain(),
                            "heartbeat failed; this relay stops publishing once its deadline passes, and another takes over unless the database answers"
                        );
                    }
                    failing = true;
                }
            }
        }
    }

    async fn worker_loop(
        &self,
        worker: usize,
        workers: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let cfg = &self.inner.config;
        let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
        let mut idle = Duration::from_millis(1);
        let mut ahead = None;
        info!(worker, relay = %cfg.relay_id, "relay worker started");
        loop {
            self.inner.health.worker_turned(worker);
            if *stop.borrow() {
                info!(worker, "relay worker stopped");
                return Ok(());
            }
            // After an outage the wait is a backoff that a wake-up must not cut short; when idle
            // a wake-up (a commit in this process) ends the wait at once.
            let (wait, wakeable) = match self.tick_pipelined(worker, workers, &mut ahead).await {
                Ok(report) if report.broker_error.is_some() => {
                    let delay = backoff.next_delay();
                    warn!(
                        worker,
                        error = report.broker_error.as_deref().unwrap_or(""),
                        ?delay,
                        "broker unavailable; backing off"
                    );
                    (delay, false)
                }
                Ok(report) if report.claimed > 0 => {
                    backoff.reset();
                    idle = Duration::from_millis(1);
                    debug!(worker, ?report, "tick");
                    continue;
                }
                Ok(_) => {
                    // Idle: poll again soon after activity, then less and less often.
                    backoff.reset();
                    let delay = idle;
                    idle = (idle * 2).min(cfg.poll_interval);
                    (delay, true)
                }
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    warn!(worker, error = %e.chain(), ?delay, "database unavailable; backing off");
                    (delay, false)
                }
                Err(e) => return Err(e),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.waker.0.notified(), if wakeable => { idle = Duration::from_millis(1); }
                _ = stop.changed() => {}
            }
        }
    }
}
