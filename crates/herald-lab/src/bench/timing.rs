//! Latency bookkeeping: when each message was meant to be sent, when the broker confirmed it, and
//! when a consumer committed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hdrhistogram::Histogram;
use herald::consumer::{Applied, Apply, Replay};
use herald::{Message, Result, Subscriber, Subscription, Transport};
use uuid::Uuid;

/// Shared by the producers, the timing transport and the timing applier.
pub struct Timings {
    start: Mutex<HashMap<Uuid, Instant>>,
    pub confirm: Mutex<Histogram<u64>>,
    pub consume: Mutex<Histogram<u64>>,
    /// From the intended send time to the producer's commit returning: the producer's own share
    /// of the latency.
    pub commit: Mutex<Histogram<u64>>,
    pub confirmed: std::sync::atomic::AtomicU64,
    pub consumed: std::sync::atomic::AtomicU64,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Timings {
    pub fn new() -> Arc<Timings> {
        Arc::new(Timings {
            start: Mutex::new(HashMap::new()),
            confirm: Mutex::new(histogram()),
            consume: Mutex::new(histogram()),
            commit: Mutex::new(histogram()),
            confirmed: Default::default(),
            consumed: Default::default(),
        })
    }

    /// Message `id` was (meant to be) sent at `at`.
    pub fn started(&self, id: Uuid, at: Instant) {
        self.start.lock().expect("timings").insert(id, at);
    }

    /// Message `id`'s transaction committed now.
    pub fn committed(&self, id: &Uuid) {
        if let Some(d) = self.elapsed(id) {
            record(&self.commit, d);
        }
    }

    fn elapsed(&self, id: &Uuid) -> Option<Duration> {
        self.start
            .lock()
            .expect("timings")
            .get(id)
            .map(Instant::elapsed)
    }
}

fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    let micros = (d.as_micros() as u64).clamp(1, 600_000_000);
    h.lock().expect("histogram").saturating_record(micros);
}

/// Records, for every confirmed message, the time from its start to the confirmation.
pub struct TimingTransport {
    pub inner: Arc<dyn Transport>,
    pub timings: Arc<Timings>,
}

#[async_trait]
impl Transport for TimingTransport {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let results = self.inner.publish(batch).await;
        for (m, r) in batch.iter().zip(&results) {
            if r.is_ok()
                && let Some(d) = self.timings.elapsed(&m.id)
            {
                record(&self.timings.confirm, d);
                self.timings
                    .confirmed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        results
    }

    async fn subscribe(&self, s: &Subscription) -> Result<Box<dyn Subscriber>> {
        self.inner.subscribe(s).await
    }

    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Records, for every applied message, the time from its start to the consumer's commit.
pub struct TimingApply {
    pub inner: Arc<dyn Apply>,
    pub timings: Arc<Timings>,
}

#[async_trait]
impl Apply for TimingApply {
    async fn apply(
        &self,
        consumer: &str,
        message: &Message,
        replay_of: Option<i64>,
    ) -> Result<Applied> {
        let outcome = self.inner.apply(consumer, message, replay_of).await?;
        if outcome == Applied::Done
            && let Some(d) = self.timings.elapsed(&message.id)
        {
            record(&self.timings.consume, d);
            self.timings
                .consumed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(outcome)
    }

    async fn dead_letter(
        &self,
        consumer: &str,
        message: &Message,
        reason: &str,
        attempts: u32,
    ) -> Result<()> {
        self.inner
            .dead_letter(consumer, message, reason, attempts)
            .await
    }

    async fn dead_letter_undecodable(
        &self,
        consumer: &str,
        destination: &str,
        body: &[u8],
        reason: &str,
    ) -> Result<()> {
        self.inner
            .dead_letter_undecodable(consumer, destination, body, reason)
            .await
    }

    async fn replays(&self, consumer: &str, max: usize) -> Result<Vec<Replay>> {
        self.inner.replays(consumer, max).await
    }

    async fn replay_failed(&self, id: i64, reason: &str) -> Result<()> {
        self.inner.replay_failed(id, reason).await
    }

    async fn purge_inbox(&self, retention: Duration, batch: usize) -> Result<u64> {
        self.inner.purge_inbox(retention, batch).await
    }
}

/// p50, p90, p99 and max of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}
