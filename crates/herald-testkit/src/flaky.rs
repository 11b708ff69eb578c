//! A transport wrapper that injects broker faults: an outage (every publish fails, nothing
//! reaches the broker) and lost confirmations (the message reaches the broker but the relay is
//! told the outcome is unknown, so it publishes again: a duplicate).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::{Error, Message, Result, Subscriber, Subscription, Transport};

/// Wraps a transport with switchable faults. Clones share the switches.
#[derive(Clone)]
pub struct FlakyTransport {
    inner: Arc<dyn Transport>,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    down: AtomicBool,
    lose_confirms: AtomicU64,
    refused: AtomicU64,
    confirms_lost: AtomicU64,
}

impl FlakyTransport {
    /// Wraps `inner`, with no faults switched on.
    pub fn new(inner: Arc<dyn Transport>) -> FlakyTransport {
        FlakyTransport {
            inner,
            state: Arc::new(State::default()),
        }
    }

    /// Starts or ends an outage.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// The next `n` messages reach the broker, but their confirmation is reported as a timeout.
    pub fn lose_confirms(&self, n: u64) {
        self.state.lose_confirms.store(n, Ordering::SeqCst);
    }

    /// Messages refused during outages so far.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Confirmations lost on purpose so far.
    pub fn confirms_lost(&self) -> u64 {
        self.state.confirms_lost.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Transport for FlakyTransport {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        if self.state.down.load(Ordering::SeqCst) {
            self.state
                .refused
                .fetch_add(batch.len() as u64, Ordering::SeqCst);
            return herald_core::transport::fail_all(batch.len(), || {
                Error::unavailable("broker (fault injected)", "connection refused")
            });
        }
        let mut results = self.inner.publish(batch).await;
        for r in results.iter_mut().filter(|r| r.is_ok()) {
            let took =
                self.state
                    .lose_confirms
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if took.is_ok() {
                self.state.confirms_lost.fetch_add(1, Ordering::SeqCst);
                *r = Err(Error::Timeout {
                    what: "broker confirmation (fault injected)".to_owned(),
                    after: Duration::ZERO,
                });
            }
        }
        results
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Subscriber>> {
        self.inner.subscribe(subscription).await
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        self.inner.durability_warnings().await
    }

    fn redelivery_delay(&self) -> std::time::Duration {
        self.inner.redelivery_delay()
    }

    async fn check(&self) -> Result<()> {
        if self.state.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable(
                "broker (fault injected)",
                "connection refused",
            ));
        }
        self.inner.check().await
    }

    fn describe(&self) -> String {
        format!("flaky({})", self.inner.describe())
    }
}
