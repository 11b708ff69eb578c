//! The relay: claim a batch from the outbox, publish it, wait for the broker's confirmations, mark.
//!
//! A message is deleted from the outbox only after the broker positively confirmed it, so a crash
//! anywhere in between leaves the row in place and it is published again once the lease expires:
//! a duplicate, never a loss. Leases are committed before publishing and carry a fencing token, so
//! a relay that was paused past its lease finds its marks refused and stops publishing that batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::RelayConfig;
use crate::error::{Error, Result};
use crate::store::{OutboxStore, RejectionOutcome};
use crate::transport::Transport;

/// Points in a tick where a test or `herald relay --failpoint` can crash the relay on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The lease is committed, nothing published.
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
    /// Messages released after a broker outage.
    pub released: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Messages whose lease was lost.
    pub lease_lost: AtomicU64,
    /// Ticks that hit a broker outage.
    pub broker_errors: AtomicU64,
}

/// Wakes an idle relay at once, e.g. right after the application committed an outbox row in the
/// same process. Cheap; polling remains the safety net when no one calls it.
#[derive(Debug, Clone, Default)]
pub struct Waker(Arc<Notify>);

impl Waker {
    /// Wakes one idle relay worker.
    pub fn wake(&self) {
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
        Ok(Relay {
            inner: Arc::new(Inner {
                store,
                transport,
                config,
                waker: Waker::default(),
                counters: RelayCounters::default(),
                failpoint,
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

    fn hit(&self, point: Failpoint) {
        if let Some(hook) = &self.inner.failpoint {
            hook(point);
        }
    }

    /// One claim-publish-mark round. Returns what it did; an `Err` is a database error (the
    /// broker's errors are reported in [`TickReport::broker_error`]).
    pub async fn tick(&self) -> Result<TickReport> {
        let cfg = &self.inner.config;
        let store = &self.inner.store;
        let claim = store
            .claim(&cfg.relay_id, cfg.batch_size, cfg.lease)
            .await?;
        let mut report = TickReport {
            claimed: claim.rows.len(),
            ..TickReport::default()
        };
        if claim.rows.is_empty() {
            return Ok(report);
        }
        let lease = claim.lease;
        self.hit(Failpoint::AfterClaim);

        // Oversized messages would be refused by the broker on every attempt: park them now,
        // with the reason, instead of letting them block their key.
        let mut rows = Vec::with_capacity(claim.rows.len());
        for row in claim.rows {
            let size = row.message.wire_size();
            if size > cfg.max_message_bytes {
                let reason = format!(
                    "message is {size} bytes, over the relay's limit of {} bytes (max_message_bytes)",
                    cfg.max_message_bytes
                );
                self.reject(&lease, &row, &reason, 1, &mut report).await?;
            } else {
                rows.push(row);
            }
        }
        if rows.is_empty() {
            return Ok(report);
        }

        // A relay that was paused (GC, SIGSTOP, a slow disk) may wake up after its lease passed
        // to someone else. Publishing now could reorder a key, so it drops the batch instead.
        if !lease.usable(cfg.lease) {
            warn!(
                token = lease.token,
                rows = rows.len(),
                "lease expired before publishing; dropping batch"
            );
            report.lease_lost += rows.len();
            self.inner
                .counters
                .lease_lost
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            return Ok(report);
        }

        let messages: Vec<_> = rows.iter().map(|r| r.message.clone()).collect();
        let results = match tokio::time::timeout(
            cfg.publish_timeout,
            self.inner.transport.publish(&messages),
        )
        .await
        {
            Ok(results) => results,
            Err(_) => crate::transport::fail_all(messages.len(), || Error::Timeout {
                what: "broker confirmation".to_owned(),
                after: cfg.publish_timeout,
            }),
        };
        debug_assert_eq!(
            results.len(),
            rows.len(),
            "transport must return one result per message"
        );
        self.hit(Failpoint::AfterConfirm);

        let mut confirmed = Vec::with_capacity(rows.len());
        let mut unknown = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(()) => confirmed.push(row.seq),
                Err(e) if e.is_transient() => {
                    if report.broker_error.is_none() {
                        report.broker_error = Some(e.chain());
                    }
                    unknown.push(row.seq);
                }
                Err(e) => {
                    let reason = e.chain();
                    self.reject(&lease, row, &reason, cfg.max_attempts, &mut report)
                        .await?;
                }
            }
        }

        if !confirmed.is_empty() {
            let marked = store.complete(&lease, &confirmed).await? as usize;
            report.published += marked;
            if marked < confirmed.len() {
                // Another relay took these rows over: it will publish them again (a duplicate).
                let lost = confirmed.len() - marked;
                warn!(
                    token = lease.token,
                    lost, "lease lost before marking; these messages will be published again"
                );
                report.lease_lost += lost;
                self.inner
                    .counters
                    .lease_lost
                    .fetch_add(lost as u64, Ordering::Relaxed);
            }
        }
        if !unknown.is_empty() {
            report.released += store.release(&lease, &unknown).await? as usize;
            self.inner
                .counters
                .released
                .fetch_add(unknown.len() as u64, Ordering::Relaxed);
            self.inner
                .counters
                .broker_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        self.inner
            .counters
            .published
            .fetch_add(report.published as u64, Ordering::Relaxed);
        Ok(report)
    }

    async fn reject(
        &self,
        lease: &crate::store::Lease,
        row: &crate::store::OutboxRow,
        reason: &str,
        max_attempts: u32,
        report: &mut TickReport,
    ) -> Result<()> {
        // Retry a rejected message after a growing delay: an unroutable command often means its
        // owner has not declared its queue yet.
        let cfg = &self.inner.config;
        let retry_after = cfg
            .backoff_initial
            .saturating_mul(1 << row.attempts.min(16))
            .min(cfg.backoff_max);
        let seq = row.seq;
        match self
            .inner
            .store
            .record_rejection(lease, seq, reason, max_attempts, retry_after)
            .await?
        {
            RejectionOutcome::WillRetry => {
                warn!(seq, reason, "broker rejected message; will retry");
                report.rejected += 1;
            }
            RejectionOutcome::DeadLettered => {
                warn!(seq, reason, "message dead-lettered");
                report.dead_lettered += 1;
                self.inner
                    .counters
                    .dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
            }
            RejectionOutcome::LeaseLost => report.lease_lost += 1,
        }
        Ok(())
    }

    /// Runs `workers` claim-publish-mark loops until `shutdown` completes, then lets every
    /// in-flight batch finish (publish and mark) before returning, so a graceful stop causes no
    /// duplicates. Broker and database outages are retried forever with capped, jittered backoff;
    /// only a non-transient database error (such as a missing table) ends the run early.
    pub async fn run<F>(&self, shutdown: F) -> Result<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let signal = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..self.inner.config.workers {
            let relay = self.clone();
            let stop = stop_rx.clone();
            workers.spawn(async move { relay.worker_loop(worker, stop).await });
        }
        let mut outcome = Ok(());
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // One worker hit a permanent error: stop the others gracefully too.
                    outcome = Err(e);
                    signal.abort();
                    workers.abort_all();
                }
                Err(e) if e.is_cancelled() => {}
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        signal.abort();
        outcome
    }

    async fn worker_loop(&self, worker: usize, mut stop: watch::Receiver<bool>) -> Result<()> {
        let cfg = &self.inner.config;
        let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
        let mut idle = Duration::from_millis(1);
        info!(worker, relay = %cfg.relay_id, "relay worker started");
        loop {
            if *stop.borrow() {
                info!(worker, "relay worker stopped");
                return Ok(());
            }
            // After an outage the wait is a backoff that a wake-up must not cut short; when idle
            // a wake-up (a commit in this process) ends the wait at once.
            let (wait, wakeable) = match self.tick().await {
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
