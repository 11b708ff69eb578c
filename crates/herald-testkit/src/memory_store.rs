//! An outbox store in memory, for running the real relay against a real transport without a
//! database (the transport suite's relay checks, the engine's paused-time tests). It keeps the
//! store contracts of `herald_core::store` with the same membership rule as the SQL stores
//! (`herald_core::membership::plan`): heartbeats, partitions, takeover of silent relays, fenced
//! marks, retry delays that hold a key back, dead letters with their reason. Not durable, one
//! process only; its clock is tokio's, so paused-time tests can step through a takeover.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use async_trait::async_trait;
use herald_core::membership::{
    Heartbeat, Holdings, PartitionOwner, RelayState, RelayStatus, Takeover, partition_of, plan,
};
use herald_core::{
    Claim, DestinationStats, Lease, Message, OutboxRow, OutboxStore, RejectionOutcome, Result,
};

struct Row {
    seq: i64,
    attempts: u32,
    message: Message,
    /// Waiting for a retry until then.
    until: Option<Instant>,
}

struct Member {
    info: herald_core::RelayInfo,
    started: SystemTime,
    expires: Instant,
    stopped: bool,
    taken_over_by: Option<i64>,
}

impl Member {
    fn live(&self, now: Instant) -> bool {
        !self.stopped && self.taken_over_by.is_none() && self.expires >= now
    }
}

#[derive(Default)]
struct Members {
    relays: HashMap<i64, Member>,
    owners: Vec<Option<i64>>,
}

impl Members {
    fn standing(&self, incarnation: i64) -> bool {
        self.relays
            .get(&incarnation)
            .is_some_and(|m| !m.stopped && m.taken_over_by.is_none())
    }
}

/// The in-memory outbox.
pub struct MemoryStore {
    rows: Mutex<Vec<Row>>,
    dead: Mutex<Vec<(Message, String)>>,
    next: Mutex<i64>,
    members: Mutex<Members>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_partitions(8)
    }
}

impl MemoryStore {
    /// An empty outbox with 8 partitions.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// An empty outbox with `n` partitions (at least 1).
    pub fn with_partitions(n: u32) -> MemoryStore {
        MemoryStore {
            rows: Mutex::default(),
            dead: Mutex::default(),
            next: Mutex::default(),
            members: Mutex::new(Members {
                relays: HashMap::new(),
                owners: vec![None; n.max(1) as usize],
            }),
        }
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

    /// The owner of each partition.
    pub fn owners(&self) -> Vec<Option<i64>> {
        self.members.lock().expect("store lock").owners.clone()
    }

    fn standing(&self, incarnation: i64) -> bool {
        self.members
            .lock()
            .expect("store lock")
            .standing(incarnation)
    }
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Holdings> {
        let now = Instant::now();
        let me = beat.incarnation;
        let mut m = self.members.lock().expect("store lock");
        if beat.joining {
            m.relays.insert(
                me,
                Member {
                    info: beat.relay.clone(),
                    started: SystemTime::now(),
                    expires: now + beat.ttl,
                    stopped: false,
                    taken_over_by: None,
                },
            );
        } else {
            match m.relays.get_mut(&me) {
                Some(r) if !r.stopped && r.taken_over_by.is_none() => r.expires = now + beat.ttl,
                _ => return Ok(Holdings::default()),
            }
        }
        for p in beat.release {
            if let Some(o) = m.owners.get_mut(*p as usize)
                && *o == Some(me)
            {
                *o = None;
            }
        }
        let live = m.relays.values().filter(|r| r.live(now)).count() as u32;
        let parts: Vec<PartitionOwner> = m
            .owners
            .iter()
            .enumerate()
            .map(|(i, o)| PartitionOwner {
                partition: i as u32,
                owner: *o,
                owner_live: o
                    .and_then(|o| m.relays.get(&o))
                    .is_some_and(|r| r.live(now)),
            })
            .collect();
        let decided = plan(me, &parts, live);
        let mut took: HashMap<i64, Vec<u32>> = HashMap::new();
        for (part, owner) in decided.acquire {
            if let Some(victim) = owner {
                if let Some(v) = m.relays.get_mut(&victim)
                    && v.taken_over_by.is_none()
                    && !v.stopped
                {
                    v.taken_over_by = Some(me);
                }
                took.entry(victim).or_default().push(part);
            }
            m.owners[part as usize] = Some(me);
        }
        let took_over = took
            .into_iter()
            .map(|(incarnation, partitions)| Takeover {
                from: m
                    .relays
                    .get(&incarnation)
                    .map(|r| r.info.relay_id.clone())
                    .unwrap_or_default(),
                incarnation,
                partitions,
            })
            .collect();
        let held: Vec<u32> = (0..m.owners.len() as u32)
            .filter(|p| m.owners[*p as usize] == Some(me))
            .collect();
        let share = herald_core::membership::fair_share(m.owners.len() as u32, live) as usize;
        let surplus = held
            .iter()
            .rev()
            .take(held.len().saturating_sub(share))
            .copied()
            .collect();
        Ok(Holdings {
            alive: true,
            partitions: m.owners.len() as u32,
            held,
            surplus,
            live_relays: live,
            took_over,
        })
    }

    async fn leave(&self, incarnation: i64) -> Result<()> {
        let mut m = self.members.lock().expect("store lock");
        for o in m.owners.iter_mut() {
            if *o == Some(incarnation) {
                *o = None;
            }
        }
        if let Some(r) = m.relays.get_mut(&incarnation) {
            r.stopped = true;
        }
        Ok(())
    }

    async fn relays(&self) -> Result<Vec<RelayStatus>> {
        let now = Instant::now();
        let m = self.members.lock().expect("store lock");
        Ok(m.relays
            .iter()
            .map(|(inc, r)| RelayStatus {
                relay: r.info.clone(),
                incarnation: *inc,
                started_at: Some(r.started),
                heartbeat_at: None,
                state: if r.live(now) {
                    RelayState::Live
                } else if r.stopped {
                    RelayState::Stopped { at: None }
                } else if let Some(by) = r.taken_over_by {
                    RelayState::TakenOver {
                        by: m
                            .relays
                            .get(&by)
                            .map(|b| b.info.relay_id.clone())
                            .unwrap_or_default(),
                        at: None,
                    }
                } else {
                    RelayState::Silent
                },
                partitions: (0..m.owners.len() as u32)
                    .filter(|p| m.owners[*p as usize] == Some(*inc))
                    .collect(),
            })
            .collect())
    }

    async fn claim(
        &self,
        lease: &Lease,
        max: usize,
        hold_cap: Duration,
        exclude: &[i64],
    ) -> Result<Claim> {
        let now = Instant::now();
        let held = |r: &Row| r.until.is_some_and(|u| u >= now && u <= now + hold_cap);
        let rows = self.rows.lock().expect("store lock");
        let busy: HashSet<&str> = rows
            .iter()
            .filter(|r| held(r))
            .filter_map(|r| r.message.ordering_key.as_deref())
            .collect();
        let mine = |r: &Row| {
            lease.partitions.as_ref().is_none_or(|parts| {
                parts.contains(&partition_of(
                    r.message.ordering_key.as_deref(),
                    r.seq,
                    lease.of,
                ))
            })
        };
        let claimed = rows
            .iter()
            .filter(|r| !held(r) && mine(r) && !exclude.contains(&r.seq))
            .filter(|r| {
                r.message
                    .ordering_key
                    .as_deref()
                    .is_none_or(|k| !busy.contains(k))
            })
            .take(max)
            .map(|r| OutboxRow {
                seq: r.seq,
                attempts: r.attempts,
                message: r.message.clone(),
            })
            .collect();
        Ok(Claim {
            rows: claimed,
            parked: 0,
        })
    }

    async fn complete(&self, lease: &Lease, seqs: &[i64]) -> Result<u64> {
        if !self.standing(lease.token) {
            return Ok(0);
        }
        let mut rows = self.rows.lock().expect("store lock");
        let before = rows.len();
        rows.retain(|r| !seqs.contains(&r.seq));
        Ok((before - rows.len()) as u64)
    }

    async fn release(&self, lease: &Lease, seqs: &[i64], reason: &str) -> Result<u64> {
        let _ = reason;
        if !self.standing(lease.token) {
            return Ok(0);
        }
        let rows = self.rows.lock().expect("store lock");
        Ok(rows.iter().filter(|r| seqs.contains(&r.seq)).count() as u64)
    }

    async fn record_rejection(
        &self,
        lease: &Lease,
        seq: i64,
        reason: &str,
        max_attempts: u32,
        retry_after: Duration,
    ) -> Result<RejectionOutcome> {
        if !self.standing(lease.token) {
            return Ok(RejectionOutcome::LeaseLost);
        }
        let mut rows = self.rows.lock().expect("store lock");
        let Some(i) = rows.iter().position(|r| r.seq == seq) else {
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
