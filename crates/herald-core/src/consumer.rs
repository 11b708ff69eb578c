//! The consumer runtime: each delivery is applied in one database transaction together with its
//! inbox record, and acknowledged to the broker only after that transaction committed.
//!
//! * A duplicate (the inbox already holds its id) is acknowledged without running the handler.
//! * A handler that fails is retried with growing delays, up to `max_attempts`; then the message is
//!   parked in the consumer dead-letter table with the reason and the attempt count, and
//!   acknowledged. Messages behind it wait meanwhile, so order within the subscription holds.
//! * A database outage is retried forever (nothing is dead-lettered for it).
//! * A delivery that cannot be decoded is parked with its raw body and the decode error.
//! * Dead letters marked for replay (`herald dlq replay`) are applied again by the consumer of the
//!   service that parked them, through the same inbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{Instrument, info, warn};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::relay::AbortOnDrop;
use crate::telemetry::names;
use crate::trace;
use crate::transport::{Delivery, Received, Subscriber, Subscription, Transport};

/// What applying one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The handler ran and its effects committed with the inbox record.
    Done,
    /// The inbox already held this message id: nothing ran.
    Duplicate,
    /// The message carried a version not newer than the last applied one for its key: skipped
    /// (and recorded in the inbox).
    Stale,
}

/// A consumer dead letter that an operator asked to replay.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The dead letter's id.
    pub id: i64,
    /// The message to apply again.
    pub message: Message,
}

/// The database side of a consumer: inbox, handler transaction, dead letters. Implemented per
/// database (`PgApplier`, `SqliteApplier`), each wrapping the user's handler.
#[async_trait]
pub trait Apply: Send + Sync + 'static {
    /// In one transaction: record `message.id` for `consumer` in the inbox (a duplicate ends here),
    /// check the version if configured, run the handler, delete dead letter `replay_of` if given,
    /// commit. A handler failure rolls everything back and returns [`Error::Handler`].
    async fn apply(
        &self,
        consumer: &str,
        message: &Message,
        replay_of: Option<i64>,
    ) -> Result<Applied>;

    /// Parks `message` for `consumer` with `reason` after `attempts` failed attempts.
    async fn dead_letter(
        &self,
        consumer: &str,
        message: &Message,
        reason: &str,
        attempts: u32,
    ) -> Result<()>;

    /// Parks a delivery that could not be decoded.
    async fn dead_letter_undecodable(
        &self,
        consumer: &str,
        destination: &str,
        body: &[u8],
        reason: &str,
    ) -> Result<()>;

    /// Up to `max` dead letters of `consumer` marked for replay.
    async fn replays(&self, consumer: &str, max: usize) -> Result<Vec<Replay>>;

    /// Records that replaying dead letter `id` failed again (it stays parked, unmarked).
    async fn replay_failed(&self, id: i64, reason: &str) -> Result<()>;

    /// Deletes inbox rows older than `retention`, at most `batch` of them. Returns how many.
    async fn purge_inbox(&self, retention: Duration, batch: usize) -> Result<u64>;
}

/// Consumer settings; defaults on each field.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Handler attempts before a message is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// First delay between handler attempts. Default 100 ms.
    pub retry_initial: Duration,
    /// Longest delay between handler attempts. Default 5 s.
    pub retry_max: Duration,
    /// How long inbox rows are kept: the deduplication window. It must exceed the longest time a
    /// broker may redeliver a message (and any replay you may run). Default 7 days.
    pub inbox_retention: Duration,
    /// How often dead letters marked for replay and expired inbox rows are looked for. Default 1 s.
    pub housekeeping_every: Duration,
    /// Deliveries applied at once. Above 1, deliveries are spread over workers by ordering key,
    /// so each key's messages are still applied one at a time, in order; unkeyed messages go
    /// round-robin. Default 1.
    pub concurrency: usize,
    /// How often the group's lag is read from the broker for `herald_consumer_lag_messages`
    /// (on RabbitMQ and Kafka each read opens a connection or a client). Default 30 s.
    pub lag_interval: Duration,
}

fn lane_of(key: &str, n: usize) -> usize {
    // FNV-1a: stable across runs and platforms, unlike the std hasher's random seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_attempts: 5,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            housekeeping_every: Duration::from_secs(1),
            concurrency: 1,
            lag_interval: Duration::from_secs(30),
        }
    }
}

impl ConsumerConfig {
    /// Checks that the values can work together; the error says which value to change.
    pub fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 || self.max_attempts > 1000 {
            return Err(Error::config(format!(
                "consumer max attempts {} must be between 1 and 1000",
                self.max_attempts
            )));
        }
        if self.retry_initial < Duration::from_millis(1) {
            return Err(Error::config(format!(
                "consumer retry_initial {:?} must be at least 1ms (0 retries in a hot loop)",
                self.retry_initial
            )));
        }
        if self.retry_max < self.retry_initial {
            return Err(Error::config(format!(
                "consumer retry_max {:?} must be at least retry_initial {:?}",
                self.retry_max, self.retry_initial
            )));
        }
        if self.housekeeping_every < Duration::from_millis(10) {
            return Err(Error::config(format!(
                "consumer housekeeping_every {:?} must be at least 10ms",
                self.housekeeping_every
            )));
        }
        if self.inbox_retention < Duration::from_secs(1) {
            return Err(Error::config(format!(
                "consumer inbox_retention {:?} must be at least 1s: it is the deduplication window",
                self.inbox_retention
            )));
        }
        if self.lag_interval < Duration::from_millis(100) {
            return Err(Error::config(format!(
                "consumer lag_interval {:?} must be at least 100ms",
                self.lag_interval
            )));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(Error::config(format!(
                "consumer concurrency {} must be between 1 and 1024",
                self.concurrency
            )));
        }
        Ok(())
    }
}

/// Totals since the consumer started.
#[derive(Debug, Default)]
pub struct ConsumerCounters {
    /// Messages whose handler ran and committed.
    pub applied: AtomicU64,
    /// Duplicates skipped by the inbox.
    pub duplicates: AtomicU64,
    /// Stale versions skipped.
    pub stale: AtomicU64,
    /// Failed handler attempts.
    pub failures: AtomicU64,
    /// Messages parked in the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Dead letters replayed successfully.
    pub replayed: AtomicU64,
    /// Acknowledgements that failed after the effect committed (the broker redelivers those
    /// messages; the inbox skips them).
    pub ack_failures: AtomicU64,
}

/// Runs one service's subscription through an [`Apply`].
#[derive(Clone)]
pub struct Consumer {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    apply: Arc<dyn Apply>,
    subscription: Subscription,
    config: ConsumerConfig,
    counters: ConsumerCounters,
}

impl Consumer {
    /// A consumer of `subscription` (its `service` names the inbox's consumer).
    pub fn new(
        transport: Arc<dyn Transport>,
        apply: Arc<dyn Apply>,
        subscription: Subscription,
        config: ConsumerConfig,
    ) -> Result<Consumer> {
        config.validate()?;
        if subscription.service.is_empty() {
            return Err(Error::config(
                "a subscription needs a service name (its consumer group)",
            ));
        }
        Ok(Consumer {
            inner: Arc::new(Inner {
                transport,
                apply,
                subscription,
                config,
                counters: ConsumerCounters::default(),
            }),
        })
    }

    /// What this consumer subscribes to.
    pub fn subscription(&self) -> &Subscription {
        &self.inner.subscription
    }

    /// Totals since start.
    pub fn counters(&self) -> &ConsumerCounters {
        &self.inner.counters
    }

    /// Declares what this consumer needs on the broker, consuming nothing
    /// ([`Transport::declare`]): before anything is published that it must not miss.
    pub async fn declare(&self) -> Result<()> {
        self.inner.transport.declare(&self.inner.subscription).await
    }

    /// Opens the subscription.
    pub async fn subscribe(&self) -> Result<Box<dyn Subscriber>> {
        self.inner
            .transport
            .subscribe(&self.inner.subscription)
            .await
    }

    /// Handles one received item completely: applies (with retries) or parks it, then acks.
    pub async fn handle(
        &self,
        sub: &mut dyn Subscriber,
        received: Received,
    ) -> Result<Option<Applied>> {
        let tag = received.tag();
        let outcome = self.process(received).await?;
        sub.ack(tag).await?;
        Ok(outcome)
    }

    /// Applies (with retries) or parks one received item, without acknowledging it.
    async fn process(&self, received: Received) -> Result<Option<Applied>> {
        let service = &self.inner.subscription.service;
        match received {
            Received::Undecodable(u) => {
                warn!(service, reason = %u.reason, "undecodable delivery; parking it");
                self.retry_transient(|| {
                    self.inner.apply.dead_letter_undecodable(
                        service,
                        &self.inner.subscription.destination,
                        &u.body,
                        &u.reason,
                    )
                })
                .await?;
                self.inner
                    .counters
                    .dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
                self.handled("parked");
                Ok(None)
            }
            Received::Message(d) => {
                // The handler runs inside the message's trace, and what it sends is caused by
                // this message (trace, correlation and causation ids).
                let span = trace::handle_span(&d.message, service);
                trace::Cause::of(&d.message)
                    .scope(self.apply_with_retries(&d, &span))
                    .instrument(span.clone())
                    .await
            }
        }
    }

    fn handled(&self, outcome: &'static str) {
        metrics::counter!(
            names::HANDLED,
            "service" => self.inner.subscription.service.clone(),
            "outcome" => outcome
        )
        .increment(1);
    }

    async fn apply_with_retries(
        &self,
        d: &Delivery,
        span: &tracing::Span,
    ) -> Result<Option<Applied>> {
        let cfg = &self.inner.config;
        let service = &self.inner.subscription.service;
        let mut retry = Backoff::new(cfg.retry_initial, cfg.retry_max);
        let mut outage = Backoff::new(cfg.retry_initial, cfg.retry_max);
        let mut attempts = 0;
        loop {
            let started = tokio::time::Instant::now();
            let applied = self.inner.apply.apply(service, &d.message, None).await;
            metrics::histogram!(names::HANDLE_DURATION, "service" => service.clone())
                .record(started.elapsed().as_secs_f64());
            match applied {
                Ok(outcome) => {
                    let (counter, label) = match outcome {
                        Applied::Done => (&self.inner.counters.applied, "applied"),
                        Applied::Duplicate => (&self.inner.counters.duplicates, "duplicate"),
                        Applied::Stale => (&self.inner.counters.stale, "stale"),
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    self.handled(label);
                    return Ok(Some(outcome));
                }
                Err(e) if e.is_transient() => {
                    let delay = outage.next_delay();
                    warn!(service, error = %e.chain(), ?delay, "database unavailable; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    attempts += 1;
                    self.inner.counters.failures.fetch_add(1, Ordering::Relaxed);
                    let reason = e.chain();
                    // A payload that does not decode into the handler's type decodes no better
                    // next time: parked at once, with serde's reason.
                    let hopeless = matches!(e, Error::Decode { .. } | Error::Unhandled { .. });
                    if attempts >= cfg.max_attempts || hopeless {
                        trace::failed(span, &e);
                        if hopeless {
                            warn!(service, id = %d.message.id, %reason, "cannot be handled as it is; parking it at once");
                        } else {
                            warn!(service, id = %d.message.id, attempts, %reason, "handler keeps failing; dead-lettering");
                        }
                        self.retry_transient(|| {
                            self.inner
                                .apply
                                .dead_letter(service, &d.message, &reason, attempts)
                        })
                        .await?;
                        self.inner
                            .counters
                            .dead_lettered
                            .fetch_add(1, Ordering::Relaxed);
                        self.handled("parked");
                        return Ok(None);
                    }
                    self.handled("retried");
                    let delay = retry.next_delay();
                    warn!(service, id = %d.message.id, attempts, %reason, ?delay, "handler failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn retry_transient<'a, F, Fut>(&'a self, f: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<()>> + 'a,
    {
        let cfg = &self.inner.config;
        let mut outage = Backoff::new(cfg.retry_initial, cfg.retry_max);
        loop {
            match f().await {
                Err(e) if e.is_transient() => tokio::time::sleep(outage.next_delay()).await,
                other => return other,
            }
        }
    }

    /// Applies the dead letters marked for replay, once each. Returns how many succeeded.
    pub async fn replay_marked(&self) -> Result<usize> {
        let service = &self.inner.subscription.service;
        let mut done = 0;
        for r in self.inner.apply.replays(service, 100).await? {
            match self
                .inner
                .apply
                .apply(service, &r.message, Some(r.id))
                .await
            {
                Ok(_) => {
                    done += 1;
                    self.inner.counters.replayed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    warn!(service, id = r.id, error = %e.chain(), "replayed dead letter failed again; it stays parked");
                    self.inner.apply.replay_failed(r.id, &e.chain()).await?;
                }
            }
        }
        Ok(done)
    }

    /// One delivery at a time, in broker order.
    async fn sequential(
        &self,
        sub: &mut Box<dyn Subscriber>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        loop {
            let received = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                received = sub.next() => received,
            };
            match received {
                Ok(r) => {
                    let tag = r.tag();
                    self.process(r).await?;
                    if let Err(e) = sub.ack(tag).await {
                        self.ack_failed(sub, e).await?;
                    }
                }
                Err(e) => self.resubscribe(sub, e).await?,
            }
        }
    }

    /// `concurrency` workers; deliveries go to a worker chosen by their ordering key, so one key's
    /// messages are still applied one at a time in broker order. Workers hand tags back to this
    /// loop, which owns the subscriber and acknowledges them.
    async fn keyed(
        &self,
        sub: &mut Box<dyn Subscriber>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let n = self.inner.config.concurrency;
        // Tags are only meaningful to the subscriber that handed them out: each delivery carries
        // the generation of its subscriber, and a tag from before a resubscription is not acked
        // (the broker redelivers that message and the inbox recognises it).
        type Done = (u64, Result<u64>);
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
        let mut lanes = Vec::with_capacity(n);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Received)>();
            lanes.push(tx);
            let (me, done) = (self.clone(), done_tx.clone());
            workers.spawn(async move {
                while let Some((generation, r)) = rx.recv().await {
                    let tag = r.tag();
                    if done
                        .send((generation, me.process(r).await.map(|_| tag)))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        let limit = usize::from(self.inner.subscription.prefetch.max(1));
        let mut in_flight = 0usize;
        let mut next_lane = 0usize;
        let mut generation = 0u64;
        let outcome = loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break Ok(()),
                Some((of, done)) = done_rx.recv() => {
                    in_flight -= 1;
                    match done {
                        Ok(tag) if of == generation => if let Err(e) = sub.ack(tag).await {
                            if let Err(e) = self.ack_failed(sub, e).await { break Err(e) }
                            generation += 1;
                        },
                        Ok(_) => {}
                        Err(e) => break Err(e),
                    }
                }
                received = sub.next(), if in_flight < limit => match received {
                    Ok(r) => {
                        let lane = match &r {
                            Received::Message(d) => match &d.message.ordering_key {
                                Some(key) => lane_of(key, n),
                                None => { next_lane = (next_lane + 1) % n; next_lane }
                            },
                            Received::Undecodable(_) => 0,
                        };
                        in_flight += 1;
                        let _ = lanes[lane].send((generation, r));
                    }
                    Err(e) => {
                        if let Err(e) = self.resubscribe(sub, e).await { break Err(e) }
                        generation += 1;
                    }
                },
            }
        };
        // Let the deliveries being applied finish and acknowledge them before returning.
        drop(lanes);
        drop(done_tx);
        while let Some((of, done)) = done_rx.recv().await {
            if let (Ok(tag), true) = (done, of == generation) {
                let _ = sub.ack(tag).await;
            }
        }
        while workers.join_next().await.is_some() {}
        outcome
    }

    /// An acknowledgement failed after the effect committed. If the broker is only unreachable,
    /// the message will be redelivered and the inbox recognises it: resubscribe and go on.
    async fn ack_failed(&self, sub: &mut Box<dyn Subscriber>, e: Error) -> Result<()> {
        if !e.is_transient() {
            return Err(e);
        }
        warn!(error = %e.chain(), "acknowledgement failed; the message will be redelivered and recognised by the inbox");
        self.inner
            .counters
            .ack_failures
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::ACK_FAILURES, "service" => self.inner.subscription.service.clone())
            .increment(1);
        self.resubscribe(sub, e).await
    }

    async fn resubscribe(&self, sub: &mut Box<dyn Subscriber>, e: Error) -> Result<()> {
        if !e.is_transient() {
            return Err(e);
        }
        warn!(error = %e.chain(), "subscription lost; resubscribing");
        tokio::time::sleep(self.inner.config.retry_initial).await;
        match self.subscribe().await {
            Ok(s) => {
                // What the lost subscription held comes back only after the broker's redelivery
                // delay, counted from when the broker is reachable again (a restarted broker
                // restarts its timers): consuming sooner would let later messages of those keys
                // overtake it. Subscribers take nothing until their first `next`, and the old one
                // is dropped first so it cannot take anything either.
                *sub = s;
                let delay = self.inner.transport.redelivery_delay();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            Err(e) => warn!(error = %e.chain(), "resubscribing failed; will retry"),
        }
        Ok(())
    }

    /// Consumes until `shutdown` completes. The item being handled is finished (committed and
    /// acknowledged) before returning. Also replays marked dead letters and purges the inbox.
    pub async fn run<F>(&self, shutdown: F) -> Result<()>
    where
        F: std::future::Future<Output = ()> + Send,
    {
        let (stop_tx, mut stop) = watch::channel(false);
        let mut sub = self.subscribe().await?;
        let cfg = &self.inner.config;
        // Housekeeping runs beside the delivery loop rather than in a select with it, so a
        // delivery being fetched is never dropped half-way.
        // Both are aborted when this future ends or is dropped (a consumer task aborted by its
        // owner leaves nothing running).
        let _housekeeping = {
            let me = self.clone();
            AbortOnDrop::spawn(async move {
                let cfg = &me.inner.config;
                let mut tick = tokio::time::interval(cfg.housekeeping_every);
                loop {
                    tick.tick().await;
                    if let Err(e) = me.replay_marked().await {
                        warn!(error = %e.chain(), "replaying dead letters failed; will retry");
                    }
                    if let Err(e) = me.inner.apply.purge_inbox(cfg.inbox_retention, 1000).await {
                        warn!(error = %e.chain(), "purging the inbox failed; will retry");
                    }
                }
            })
        };
        let _lag = {
            let me = self.clone();
            AbortOnDrop::spawn(async move { me.lag_loop().await })
        };
        info!(service = %self.inner.subscription.service, destination = %self.inner.subscription.destination, "consumer started");
        let mut work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + '_>> =
            if cfg.concurrency <= 1 {
                Box::pin(self.sequential(&mut sub, &mut stop))
            } else {
                Box::pin(self.keyed(&mut sub, &mut stop))
            };
        // The shutdown future is polled here rather than spawned, so it may borrow.
        let result = tokio::select! {
            result = &mut work => result,
            () = shutdown => {
                let _ = stop_tx.send(true);
                work.await
            }
        };
        result
    }

    /// Reads the group's lag into `herald_consumer_lag_messages` every `lag_interval`, where
    /// the broker can tell.
    async fn lag_loop(&self) {
        let s = &self.inner.subscription;
        let gauge = metrics::gauge!(
            names::CONSUMER_LAG,
            "service" => s.service.clone(),
            "topic" => s.destination.clone()
        );
        let mut tick = tokio::time::interval(self.inner.config.lag_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let every = self.inner.config.lag_interval;
            match tokio::time::timeout(every, self.inner.transport.lag(s)).await {
                Ok(Ok(Some(n))) => gauge.set(n as f64),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e.chain(), "reading the consumer lag failed")
                }
                Err(_) => tracing::debug!("reading the consumer lag timed out"),
            }
        }
    }
}
