//! An outbox store in memory, for running the real relay against a real transport without a
//! database (the transport suite's relay checks). It keeps the store contracts of
//! `herald_core::store`: committed leases with fencing tokens, head-of-key claiming, retry delays
//! that hold a key back, dead letters with their reason. Not durable, one process only.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use herald_core::{
    Claim, DestinationStats, Lease, Message, OutboxRow, OutboxStore, RejectionOutcome, Result,
};

struct Row {
    seq: i64,
    attempts: u32,
    message: Message,
    token: Option<i64>,
    /// Leased or waiting for a retry until then.
    until: Option<Instant>,
}

/// The in-memory outbox.
#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<Vec<Row>>,
    dead: Mutex<Vec<(Message, String)>>,
    next: Mutex<i64>,
}

impl MemoryStore {
    /// An empty outbox.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Adds `message` as a committed row; returns its sequence number.
    pub fn enqueue(&self, message: Message) -> i64 {
        let mut next = self.next.lock().expect("store lock");
        *next += 1;
        let seq = *next;
        self.rows.lock().expect("store lock").push(Row {
            seq,
            attempts: 0,
            message,
            token: None,
            until: None,
        });
        seq
    }

    /// Rows still in the outbox.
    pub fn pending(&self) -> usize {
        self.rows.lock().expect("store lock").len()
    }

    /// Dead letters with their reasons.
    pub fn dead_letters(&self) -> Vec<(Message, String)> {
        self.dead.lock().expect("store lock").clone()
    }
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn claim(&self, owner: &str, max: usize, lease: Duration) -> Result<Claim> {
        let _ = owner;
        let handle = Lease::start(lease);
        let now = Instant::now();
        let mut rows = self.rows.lock().expect("store lock");
        let busy: HashSet<String> = rows
            .iter()
            .filter(|r| r.until.is_some_and(|u| u >= now))
            .filter_map(|r| r.message.ordering_key.clone())
            .collect();
        let mut claimed = Vec::new();
        for r in rows.iter_mut() {
            if claimed.len() == max {
                break;
            }
            let free = r.until.is_none_or(|u| u < now);
            let key_free = r
                .message
                .ordering_key
                .as_ref()
                .is_none_or(|k| !busy.contains(k));
            if free && key_free {
                r.token = Some(handle.token);
                r.until = Some(now + lease);
                claimed.push(OutboxRow {
                    seq: r.seq,
                    attempts: r.attempts,
                    message: r.message.clone(),
                });
            }
        }
        Ok(Claim {
            lease: handle,
            rows: claimed,
            parked: 0,
        })
    }

    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64> {
        let mut rows = self.rows.lock().expect("store lock");
        let before = rows.len();
        rows.retain(|r| !(r.token == Some(lease.token) && seqs.contains(&r.seq)));
        Ok((before - rows.len()) as u64)
    }

    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        let _ = reason;
        let mut n = 0;
        for r in self.rows.lock().expect("store lock").iter_mut() {
            if r.token == Some(lease.token) && seqs.contains(&r.seq) {
                r.token = None;
                r.until = None;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> Result<RejectionOutcome> {
        let mut rows = self.rows.lock().expect("store lock");
        let Some(i) = rows
            .iter()
            .position(|r| r.seq == seq && r.token == Some(lease.token))
        else {
            return Ok(RejectionOutcome::LeaseLost);
        };
        rows[i].attempts += 1;
        if rows[i].attempts >= max_attempts {
            let row = rows.remove(i);
            self.dead
                .lock()
                .expect("store lock")
                .push((row.message, reason.to_owned()));
            return Ok(RejectionOutcome::DeadLettered);
        }
        rows[i].token = None;
        rows[i].until = Some(Instant::now() + retry_after);
        Ok(RejectionOutcome::WillRetry)
    }

    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        let rows = self.rows.lock().expect("store lock");
        let mut out: Vec<DestinationStats> = Vec::new();
        for r in rows.iter() {
            match out
                .iter_mut()
                .find(|s| s.destination == r.message.destination)
            {
                Some(s) => s.pending += 1,
                None => out.push(DestinationStats {
                    destination: r.message.destination.clone(),
                    pending: 1,
                    oldest: Some(r.message.created_at),
                    dead_letters: 0,
                }),
            }
        }
        Ok(out)
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(vec![
            "the in-memory outbox keeps nothing across a restart".to_owned(),
        ])
    }
}
