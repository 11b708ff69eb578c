//! A store wrapper that freezes a relay's database calls, as SIGSTOP or a cut network would:
//! while frozen every call waits, and it can freeze itself at the worst moment, right after a
//! read returned rows and before they are published.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::membership::{Heartbeat, Holdings, RelayStatus};
use herald_core::{Claim, DestinationStats, Lease, OutboxStore, RejectionOutcome, Result};
use tokio::sync::watch;

/// Wraps a store; see the module docs.
pub struct Freezable {
    inner: Arc<dyn OutboxStore>,
    frozen: watch::Sender<bool>,
    armed: AtomicBool,
}

impl Freezable {
    /// `inner`, not frozen.
    pub fn new(inner: Arc<dyn OutboxStore>) -> Arc<Freezable> {
        Arc::new(Freezable {
            inner,
            frozen: watch::channel(false).0,
            armed: AtomicBool::new(false),
        })
    }

    /// Freezes right after the next read that returns rows.
    pub fn freeze_after_next_read(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether calls are frozen now.
    pub fn is_frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    /// Lets every waiting call through.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    async fn wait(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|frozen| !frozen).await;
    }
}

#[async_trait]
impl OutboxStore for Freezable {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Holdings> {
        self.wait().await;
        self.inner.heartbeat(beat).await
    }
    async fn leave(&self, incarnation: i64) -> Result<()> {
        self.wait().await;
        self.inner.leave(incarnation).await
    }
    async fn claim(
        &self,
        lease: &Lease,
        max: usize,
        cap: Duration,
        exclude: &[i64],
    ) -> Result<Claim> {
        self.wait().await;
        let claim = self.inner.claim(lease, max, cap, exclude).await?;
        if !claim.rows.is_empty() && self.armed.swap(false, Ordering::SeqCst) {
            self.frozen.send_replace(true);
        }
        self.wait().await;
        Ok(claim)
    }
    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64> {
        self.wait().await;
        self.inner.complete(lease, seqs).await
    }
    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        self.wait().await;
        self.inner.release(lease, seqs, reason).await
    }
    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> Result<RejectionOutcome> {
        self.wait().await;
        self.inner
            .record_rejection(lease, seq, reason, max_attempts, retry_after)
            .await
    }
    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        self.inner.stats().await
    }
    async fn relays(&self) -> Result<Vec<RelayStatus>> {
        self.inner.relays().await
    }
    async fn durability_warnings(&self) -> Result<Vec<String>> {
        self.inner.durability_warnings().await
    }
}
