//! Fallback storage: publish straight to the broker after the business transaction commits, and
//! park the message in durable storage when the broker fails, to be retried from there.
//!
//! This is what many teams build before they adopt an outbox, and it is offered here because it
//! has a place: producers that cannot write to the business database in the same transaction
//! (a different database, a non-transactional store, a legacy write path). **It does not give
//! the outbox's guarantees**, and `herald verify` shows the difference on a live system:
//!
//! * **Loss**: a crash (or kill, or deploy) between the business commit and the publish-or-park
//!   loses the message. Nothing records that it was owed.
//! * **Order**: a parked message is published later than messages of the same key that went
//!   straight through after it, so consumers see that key out of order.
//! * **Duplicates**: a publish that timed out may have reached the broker; parking it publishes
//!   it again (consumers need an inbox, as with the outbox).
//!
//! Use the transactional outbox when the message and the state change can share a transaction.
//!
//! Parked messages go to a [`Park`] store; the PostgreSQL and SQLite crates park into an outbox
//! table (written in its own transaction, not the caller's), so a normal [`Relay`] drains them.
//!
//! [`Relay`]: crate::Relay

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::transport::{Transport, fail_all};

/// Durable storage for messages the broker did not confirm, written outside any business
/// transaction.
#[async_trait]
pub trait Park: Send + Sync + 'static {
    /// Stores `messages` durably (all or none) for a later retry.
    async fn park(&self, messages: &[Message]) -> Result<()>;
}

/// What [`FallbackPublisher::publish`] did with a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FallbackReport {
    /// Messages the broker confirmed.
    pub published: usize,
    /// Messages parked for a later retry.
    pub parked: usize,
}

/// Publishes directly, parking what the broker does not confirm. See the module documentation for
/// what this does not guarantee.
#[derive(Clone)]
pub struct FallbackPublisher {
    transport: Arc<dyn Transport>,
    park: Arc<dyn Park>,
    timeout: Duration,
}

impl FallbackPublisher {
    /// Publishes through `transport`, waiting at most `timeout` for confirmations, and parks
    /// failures in `park`.
    pub fn new(
        transport: Arc<dyn Transport>,
        park: Arc<dyn Park>,
        timeout: Duration,
    ) -> FallbackPublisher {
        FallbackPublisher {
            transport,
            park,
            timeout,
        }
    }

    /// Publishes `messages` (call it after the business transaction committed). Messages the
    /// broker does not confirm in time are parked. Errs only when parking failed too: those
    /// messages are then lost unless the caller keeps them.
    pub async fn publish(&self, messages: &[Message]) -> Result<FallbackReport> {
        let results =
            match tokio::time::timeout(self.timeout, self.transport.publish(messages)).await {
                Ok(r) => r,
                Err(_) => fail_all(messages.len(), || Error::Timeout {
                    what: "broker confirmation".to_owned(),
                    after: self.timeout,
                }),
            };
        let failed: Vec<Message> = messages
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_err())
            .map(|(m, _)| m.clone())
            .collect();
        let report = FallbackReport {
            published: messages.len() - failed.len(),
            parked: failed.len(),
        };
        if !failed.is_empty() {
            tracing::warn!(
                parked = failed.len(),
                "broker did not confirm; parking messages in fallback storage"
            );
            self.park.park(&failed).await?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::memory::MemoryTransport;

    #[derive(Default)]
    struct Parked(Mutex<Vec<Message>>);

    #[async_trait]
    impl Park for Parked {
        async fn park(&self, messages: &[Message]) -> Result<()> {
            self.0.lock().unwrap().extend_from_slice(messages);
            Ok(())
        }
    }

    struct Down;

    #[async_trait]
    impl Transport for Down {
        async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
            fail_all(batch.len(), || {
                Error::unavailable("broker", "connection refused")
            })
        }
        async fn subscribe(
            &self,
            _: &crate::Subscription,
        ) -> Result<Box<dyn crate::transport::Subscriber>> {
            unreachable!()
        }
        fn describe(&self) -> String {
            "down".into()
        }
    }

    fn msgs() -> Vec<Message> {
        (0..3)
            .map(|i| Message::raw_event("t", "E", vec![i]).with_key("k"))
            .collect()
    }

    #[tokio::test]
    async fn publishes_when_the_broker_confirms_and_parks_when_it_does_not() {
        let parked = Arc::new(Parked::default());
        let up = FallbackPublisher::new(
            Arc::new(MemoryTransport::new()),
            parked.clone(),
            Duration::from_secs(1),
        );
        let r = up.publish(&msgs()).await.unwrap();
        assert_eq!((r.published, r.parked), (3, 0));
        assert!(parked.0.lock().unwrap().is_empty());

        let down = FallbackPublisher::new(Arc::new(Down), parked.clone(), Duration::from_secs(1));
        let m = msgs();
        let r = down.publish(&m).await.unwrap();
        assert_eq!((r.published, r.parked), (0, 3));
        let ids: Vec<_> = parked.0.lock().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, m.iter().map(|m| m.id).collect::<Vec<_>>());
    }
}
