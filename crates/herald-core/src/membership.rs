//! Which relay publishes what: partitions of the ordering keys, owned by live relays.
//!
//! Every ordering key belongs to one of the outbox's partitions (a hash of the key; a row without
//! a key by its id). A partition has at most one owner, a relay *incarnation* (one run of one
//! relay process, a random 63-bit number). The owner renews its liveness with a heartbeat, one
//! row write per interval whatever the traffic; reading and publishing its partitions' rows
//! writes nothing until the rows are deleted. When a relay stops heart-beating (killed, paused,
//! cut off from the database), its row expires after the time-to-live, and the next heartbeat of
//! another relay marks it taken over and takes its partitions. The mark and the dead relay's own
//! renewal update the same row, so the database orders them: either the renewal came first (the
//! relay is alive, nothing is taken) or the mark did (the renewal fails, and that relay knows it
//! lost everything). A relay that was marked never renews again: it rejoins as a new
//! incarnation, with no partitions, and its old incarnation is the fencing token that the store
//! refuses on every mark.
//!
//! A relay publishes only while its local deadline, taken from the moment it *sent* its last
//! successful renewal plus the time-to-live minus a margin, has not passed. The database starts
//! counting the time-to-live later than that, so a relay that was paused or cut off stops
//! publishing before anyone can take its partitions over.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// One relay process as the outbox records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInfo {
    /// The configured relay id (`RelayConfig::relay_id`).
    pub relay_id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
}

impl RelayInfo {
    /// This process, under `relay_id`.
    pub fn this_process(relay_id: &str) -> RelayInfo {
        RelayInfo {
            relay_id: relay_id.to_owned(),
            host: host_name(),
            pid: std::process::id(),
        }
    }
}

/// The machine's host name: `$HOSTNAME`, else `/etc/hostname`, else `unknown`.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A fresh incarnation number (positive, never 0).
pub fn new_incarnation() -> i64 {
    fastrand::i64(1..i64::MAX)
}

/// One heartbeat of a relay incarnation.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    /// The incarnation beating.
    pub incarnation: i64,
    /// Its first heartbeat: register it (otherwise renew, and fail if it was taken over).
    pub joining: bool,
    /// Who it is.
    pub relay: &'a RelayInfo,
    /// How long it counts as alive after this heartbeat.
    pub ttl: Duration,
    /// Partitions it gives up (idle ones beyond its fair share).
    pub release: &'a [u32],
}

/// What a heartbeat found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// False if this incarnation was taken over (or never joined): it holds nothing and must
    /// rejoin as a new incarnation.
    pub alive: bool,
    /// The outbox's partition count.
    pub partitions: u32,
    /// The partitions this incarnation holds now, ascending.
    pub held: Vec<u32>,
    /// Held partitions beyond the fair share, to release once idle.
    pub surplus: Vec<u32>,
    /// Live relays, this one included.
    pub live_relays: u32,
    /// Partitions this heartbeat took over from relays that had stopped heart-beating.
    pub took_over: Vec<Takeover>,
}

/// Partitions taken from one relay that stopped heart-beating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The relay id of the incarnation taken over.
    pub from: String,
    /// That incarnation.
    pub incarnation: i64,
    /// The partitions taken.
    pub partitions: Vec<u32>,
}

/// A partition as a heartbeat reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOwner {
    /// The partition.
    pub partition: u32,
    /// Its owning incarnation, if any.
    pub owner: Option<i64>,
    /// Whether that owner is alive (heart-beating, not stopped, not taken over).
    pub owner_live: bool,
}

/// What a heartbeat should change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions to take, with the dead incarnation that owned each (`None`: it was free).
    pub acquire: Vec<(u32, Option<i64>)>,
    /// Partitions `me` holds beyond its share, highest first.
    pub surplus: Vec<u32>,
}

/// The fair share of `partitions` among `live` relays, rounded up.
pub fn fair_share(partitions: u32, live: u32) -> u32 {
    partitions.div_ceil(live.max(1))
}

/// Decides what incarnation `me` takes and gives up, given every partition's owner and the
/// number of live relays: it takes free partitions and those of dead owners, lowest first, up
/// to its fair share, and reports what it holds beyond it. Every store runs this same rule.
pub fn plan(me: i64, parts: &[PartitionOwner], live_relays: u32) -> Plan {
    let share = fair_share(parts.len() as u32, live_relays) as usize;
    let held: Vec<u32> = parts
        .iter()
        .filter(|p| p.owner == Some(me))
        .map(|p| p.partition)
        .collect();
    let acquire = parts
        .iter()
        .filter(|p| p.owner != Some(me) && !(p.owner.is_some() && p.owner_live))
        .take(share.saturating_sub(held.len()))
        .map(|p| (p.partition, p.owner))
        .collect();
    let surplus = held
        .iter()
        .rev()
        .take(held.len().saturating_sub(share))
        .copied()
        .collect();
    Plan { acquire, surplus }
}

/// The partition of a row: `hash(key) mod n` for a keyed row, `id mod n` otherwise. The SQL
/// stores compute the same in SQL; this is the in-memory store's.
pub fn partition_of(key: Option<&str>, id: i64, n: u32) -> u32 {
    let n = u64::from(n.max(1));
    match key {
        // FNV-1a: stable across processes and versions, unlike the std hasher.
        Some(k) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in k.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            (h % n) as u32
        }
        None => (id.unsigned_abs() % n) as u32,
    }
}

/// A relay's standing, shared by every batch it reads: the incarnation that holds its
/// partitions and the local instant until which it may publish.
#[derive(Debug)]
pub struct Standing {
    incarnation: AtomicI64,
    deadline: Mutex<Instant>,
}

impl Standing {
    /// An incarnation that may publish until `deadline`.
    pub fn new(incarnation: i64, deadline: Instant) -> Arc<Standing> {
        Arc::new(Standing {
            incarnation: AtomicI64::new(incarnation),
            deadline: Mutex::new(deadline),
        })
    }

    /// The current incarnation.
    pub fn incarnation(&self) -> i64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Moves to a new incarnation (the old one was taken over): every batch of the old one
    /// stops being publishable.
    pub fn reincarnate(&self, incarnation: i64) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.incarnation.store(incarnation, Ordering::Release);
    }

    /// Extends the deadline after a successful renewal.
    pub fn renew(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = deadline;
    }

    /// Until when the current incarnation may publish.
    pub fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether incarnation `token` may publish now.
    pub fn may_publish(&self, token: i64) -> bool {
        self.incarnation() == token && Instant::now() < self.deadline()
    }
}

/// A relay incarnation as `herald status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStatus {
    /// Who it is.
    pub relay: RelayInfo,
    /// Its incarnation.
    pub incarnation: i64,
    /// When it joined.
    pub started_at: Option<SystemTime>,
    /// Its last heartbeat.
    pub heartbeat_at: Option<SystemTime>,
    /// Whether it is alive, and if not, how it ended.
    pub state: RelayState,
    /// The partitions it holds.
    pub partitions: Vec<u32>,
}

/// How a relay incarnation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayState {
    /// Heart-beating.
    Live,
    /// Stopped heart-beating; not taken over yet.
    Silent,
    /// Stopped gracefully, its partitions released.
    Stopped {
        /// When.
        at: Option<SystemTime>,
    },
    /// Stopped heart-beating and was taken over.
    TakenOver {
        /// The relay id that took it over.
        by: String,
        /// When.
        at: Option<SystemTime>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(owners: &[(Option<i64>, bool)]) -> Vec<PartitionOwner> {
        owners
            .iter()
            .enumerate()
            .map(|(i, (owner, owner_live))| PartitionOwner {
                partition: i as u32,
                owner: *owner,
                owner_live: *owner_live,
            })
            .collect()
    }

    #[test]
    fn a_lone_relay_takes_everything_and_a_second_gets_half() {
        let free = parts(&[(None, false); 4]);
        let p = plan(1, &free, 1);
        assert_eq!(p.acquire, vec![(0, None), (1, None), (2, None), (3, None)]);
        // Relay 1 holds all four; relay 2 joins: relay 1 has two too many, relay 2 finds none free.
        let all1 = parts(&[(Some(1), true); 4]);
        assert_eq!(plan(1, &all1, 2).surplus, vec![3, 2]);
        assert_eq!(plan(2, &all1, 2).acquire, vec![]);
    }

    #[test]
    fn a_dead_relays_partitions_are_taken_and_a_live_ones_never() {
        let p = parts(&[
            (Some(1), true),
            (Some(2), false),
            (Some(2), false),
            (None, false),
        ]);
        let plan3 = plan(3, &p, 2);
        assert_eq!(plan3.acquire, vec![(1, Some(2)), (2, Some(2))]);
        assert!(plan(3, &p, 1).acquire.iter().all(|(part, _)| *part != 0));
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(
            partition_of(Some("order-1"), 5, 16),
            partition_of(Some("order-1"), 9, 16)
        );
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            seen[partition_of(Some(&format!("k{i}")), 0, 16) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(partition_of(None, 17, 16), 1);
        assert_eq!(partition_of(Some("x"), 1, 1), 0);
    }
}
