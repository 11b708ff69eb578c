//! A history of what producers attempted and committed, what consumers received and applied, and
//! a checker for the guarantees: nothing lost, nothing phantom, order per key, no effect applied
//! twice, duplicate deliveries counted.
//!
//! The checker works on facts, not on what the system under test reports about itself: the
//! producer's side comes from the transaction outcomes (an outcome the client could not learn,
//! such as a commit whose connection died, is resolved from a ground-truth ledger written in the
//! same transaction); the consumer's side from every delivery the subscriber handed out and every
//! effect row the handler committed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// What happened to one message's transaction from the producer's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The transaction committed.
    Committed,
    /// The transaction rolled back (on purpose or because it failed before commit).
    RolledBack,
    /// The client does not know: the commit was sent and the connection failed. Resolve it with
    /// [`History::resolve`] from a ledger before checking; unresolved ones count as not committed.
    Unknown,
}

/// The recorded history of one run.
#[derive(Debug, Default)]
pub struct History {
    produced: HashMap<Uuid, (Outcome, String, u64)>,
    deliveries: Vec<(Uuid, String, u64)>,
    effects: Vec<(Uuid, String, u64)>,
    dead_letters: HashMap<Uuid, String>,
    settled: usize,
    /// When each committed message's commit returned, and when it was first delivered.
    committed_at: HashMap<Uuid, Instant>,
    first_delivered_at: HashMap<Uuid, Instant>,
}

/// The wait from a commit returning to the message's first delivery, over the messages whose
/// commit the producer saw (outcomes settled later have no commit time).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Waits {
    /// Messages measured.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Longest.
    pub max: Duration,
}

/// The checker's verdict.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Messages whose transaction committed.
    pub committed: usize,
    /// Messages whose transaction rolled back.
    pub rolled_back: usize,
    /// Messages whose outcome was never learned nor resolved.
    pub unknown: usize,
    /// Unknown outcomes settled by [`History::resolve`] (counted in `committed` or
    /// `rolled_back` too).
    pub settled: usize,
    /// Distinct messages delivered.
    pub delivered: usize,
    /// Deliveries beyond the first of a message.
    pub duplicates: usize,
    /// Effects applied more than once for the same message (must be zero with an inbox).
    pub duplicate_effects: Vec<Uuid>,
    /// Committed, neither delivered nor dead-lettered.
    pub lost: Vec<Uuid>,
    /// Delivered but never committed (rolled back, unknown, or never produced at all).
    pub phantom: Vec<Uuid>,
    /// Messages applied (or, in a history without effects, first delivered) after a later
    /// message of the same key.
    pub out_of_order: Vec<Uuid>,
    /// Messages parked in a dead-letter store, with the reason.
    pub dead_lettered: Vec<(Uuid, String)>,
    /// Commit to first delivery.
    pub waits: Waits,
}

impl Verdict {
    /// No loss, no phantom, no order violation, no effect applied twice.
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.phantom.is_empty()
            && self.out_of_order.is_empty()
            && self.duplicate_effects.is_empty()
    }
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Records the outcome of the transaction that carried message `id`, the `seq`-th version of
    /// `key` (versions of a key count up from 1 in commit order).
    pub fn produced(&mut self, id: Uuid, key: &str, seq: u64, outcome: Outcome) {
        if outcome == Outcome::Committed {
            self.committed_at.insert(id, Instant::now());
        }
        self.produced.insert(id, (outcome, key.to_owned(), seq));
    }

    /// A transaction with message `id` committed.
    pub fn committed(&mut self, id: Uuid, key: &str, seq: u64) {
        self.produced(id, key, seq, Outcome::Committed);
    }

    /// A transaction with message `id` rolled back.
    pub fn rolled_back(&mut self, id: Uuid, key: &str, seq: u64) {
        self.produced(id, key, seq, Outcome::RolledBack);
    }

    /// Settles every [`Outcome::Unknown`]: committed if `committed(id)` says the ledger holds it,
    /// rolled back otherwise. Returns how many were found committed.
    pub fn resolve(&mut self, committed: impl Fn(&Uuid) -> bool) -> usize {
        let mut found = 0;
        for (id, (outcome, _, _)) in self.produced.iter_mut() {
            if *outcome == Outcome::Unknown {
                self.settled += 1;
                *outcome = if committed(id) {
                    found += 1;
                    Outcome::Committed
                } else {
                    Outcome::RolledBack
                };
            }
        }
        found
    }

    /// A consumer received message `id` carrying `key` and `seq` (duplicates included).
    pub fn delivered(&mut self, id: Uuid, key: &str, seq: u64) {
        self.first_delivered_at
            .entry(id)
            .or_insert_with(Instant::now);
        self.deliveries.push((id, key.to_owned(), seq));
    }

    /// Commit-to-first-delivery waits of the messages delivered so far.
    pub fn waits(&self) -> Waits {
        let mut waits: Vec<Duration> = self
            .committed_at
            .iter()
            .filter_map(|(id, c)| {
                self.first_delivered_at
                    .get(id)
                    .map(|d| d.saturating_duration_since(*c))
            })
            .collect();
        waits.sort_unstable();
        let at = |q: f64| {
            waits
                .get(((waits.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        Waits {
            count: waits.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: waits.last().copied().unwrap_or_default(),
        }
    }

    /// A consumer's handler committed the effect of message `id`; call in the order the effects
    /// were committed.
    pub fn applied(&mut self, id: Uuid, key: &str, seq: u64) {
        self.effects.push((id, key.to_owned(), seq));
    }

    /// Message `id` was parked in a dead-letter store (accounted for, not lost).
    pub fn dead_lettered(&mut self, id: Uuid, reason: &str) {
        self.dead_letters.insert(id, reason.to_owned());
    }

    /// Every produced message: (id, key, seq, outcome), in no particular order.
    pub fn produced_records(&self) -> impl Iterator<Item = (Uuid, &str, u64, Outcome)> {
        self.produced
            .iter()
            .map(|(id, (o, k, s))| (*id, k.as_str(), *s, *o))
    }

    /// Every delivery, in the order recorded: (id, key, seq).
    pub fn delivery_records(&self) -> impl Iterator<Item = (Uuid, &str, u64)> {
        self.deliveries
            .iter()
            .map(|(id, k, s)| (*id, k.as_str(), *s))
    }

    /// Every applied effect, in commit order: (id, key, seq).
    pub fn effect_records(&self) -> impl Iterator<Item = (Uuid, &str, u64)> {
        self.effects.iter().map(|(id, k, s)| (*id, k.as_str(), *s))
    }

    /// Checks the whole history.
    pub fn check(&self) -> Verdict {
        let mut v = Verdict {
            settled: self.settled,
            ..Verdict::default()
        };
        for (outcome, _, _) in self.produced.values() {
            match outcome {
                Outcome::Committed => v.committed += 1,
                Outcome::RolledBack => v.rolled_back += 1,
                Outcome::Unknown => v.unknown += 1,
            }
        }
        let committed = |id: &Uuid| matches!(self.produced.get(id), Some((Outcome::Committed, ..)));

        let mut seen: HashSet<Uuid> = HashSet::new();
        for (id, _, _) in &self.deliveries {
            if !seen.insert(*id) {
                v.duplicates += 1;
            } else if !committed(id) {
                v.phantom.push(*id);
            }
        }
        v.delivered = seen.len();

        // Order: applied effects when the history has them (what the consumer's state saw),
        // otherwise first deliveries.
        let ordered: Vec<&(Uuid, String, u64)> = if self.effects.is_empty() {
            let mut first = HashSet::new();
            self.deliveries
                .iter()
                .filter(|(id, _, _)| first.insert(*id))
                .collect()
        } else {
            self.effects.iter().collect()
        };
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        for (id, key, seq) in ordered {
            let last = last_seq.entry(key.as_str()).or_insert(0);
            if *seq < *last {
                v.out_of_order.push(*id);
            } else {
                *last = *seq;
            }
        }

        let mut applied: HashSet<Uuid> = HashSet::new();
        for (id, _, _) in &self.effects {
            if !applied.insert(*id) {
                v.duplicate_effects.push(*id);
            }
            if !seen.contains(id) && !committed(id) {
                // An effect of a message nobody delivered and nobody committed.
                v.phantom.push(*id);
            }
        }

        for (id, (outcome, _, _)) in &self.produced {
            if *outcome == Outcome::Committed
                && !seen.contains(id)
                && !applied.contains(id)
                && !self.dead_letters.contains_key(id)
            {
                v.lost.push(*id);
            }
        }
        v.dead_lettered = self
            .dead_letters
            .iter()
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        v.waits = self.waits();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    #[test]
    fn clean_history_passes_and_counts_duplicates() {
        let id = ids(3);
        let mut h = History::new();
        h.committed(id[0], "k", 1);
        h.committed(id[1], "k", 2);
        h.rolled_back(id[2], "k", 3);
        h.delivered(id[0], "k", 1);
        h.delivered(id[1], "k", 2);
        h.delivered(id[1], "k", 2);
        let v = h.check();
        assert!(v.ok(), "{v:?}");
        assert_eq!(
            (v.committed, v.rolled_back, v.delivered, v.duplicates),
            (2, 1, 2, 1)
        );
    }

    #[test]
    fn detects_each_anomaly() {
        let id = ids(5);
        let mut h = History::new();
        h.committed(id[0], "a", 1);
        h.committed(id[1], "a", 2);
        h.committed(id[2], "b", 1);
        h.rolled_back(id[3], "c", 1);
        h.delivered(id[1], "a", 2);
        h.delivered(id[0], "a", 1); // out of order
        h.delivered(id[3], "c", 1); // phantom: rolled back
        h.delivered(id[4], "d", 1); // phantom: never produced
        let v = h.check();
        assert_eq!(v.lost, vec![id[2]]);
        assert_eq!(v.out_of_order, vec![id[0]]);
        assert_eq!(v.phantom.len(), 2);
        assert!(!v.ok());
    }

    #[test]
    fn a_redelivered_older_message_is_a_duplicate_not_a_reorder() {
        let id = ids(2);
        let mut h = History::new();
        h.committed(id[0], "a", 1);
        h.committed(id[1], "a", 2);
        for (i, s) in [(0, 1), (1, 2), (0, 1), (1, 2)] {
            h.delivered(id[i], "a", s);
        }
        let v = h.check();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.duplicates, 2);
    }

    #[test]
    fn dead_lettered_is_not_lost_and_keeps_its_reason() {
        let id = ids(1);
        let mut h = History::new();
        h.committed(id[0], "a", 1);
        h.dead_lettered(id[0], "payload over the broker's limit");
        let v = h.check();
        assert!(v.ok(), "{v:?}");
        assert_eq!(
            v.dead_lettered,
            vec![(id[0], "payload over the broker's limit".to_owned())]
        );
    }

    #[test]
    fn an_effect_applied_twice_fails_the_check() {
        let id = ids(1);
        let mut h = History::new();
        h.committed(id[0], "a", 1);
        h.delivered(id[0], "a", 1);
        h.delivered(id[0], "a", 1);
        h.applied(id[0], "a", 1);
        h.applied(id[0], "a", 1);
        let v = h.check();
        assert_eq!(v.duplicate_effects, vec![id[0]]);
        assert_eq!(v.duplicates, 1);
        assert!(!v.ok());
    }

    #[test]
    fn order_is_judged_on_applied_effects_when_there_are_any() {
        let id = ids(2);
        let mut h = History::new();
        h.committed(id[0], "a", 1);
        h.committed(id[1], "a", 2);
        // Delivered in order, but a concurrent consumer applied them the other way round.
        h.delivered(id[0], "a", 1);
        h.delivered(id[1], "a", 2);
        h.applied(id[1], "a", 2);
        h.applied(id[0], "a", 1);
        assert_eq!(h.check().out_of_order, vec![id[0]]);
    }

    #[test]
    fn unknown_outcomes_are_resolved_from_the_ledger() {
        let id = ids(3);
        let mut h = History::new();
        h.produced(id[0], "a", 1, Outcome::Unknown);
        h.produced(id[1], "b", 1, Outcome::Unknown);
        h.produced(id[2], "c", 1, Outcome::Unknown);
        assert_eq!(h.check().unknown, 3);
        // The ledger holds id[0] and id[1]; id[1] was never delivered: lost. id[2] did not
        // commit but was delivered: phantom.
        let ledger = [id[0], id[1]];
        assert_eq!(h.resolve(|i| ledger.contains(i)), 2);
        h.delivered(id[0], "a", 1);
        h.delivered(id[2], "c", 1);
        let v = h.check();
        assert_eq!(
            (v.committed, v.rolled_back, v.unknown, v.settled),
            (2, 1, 0, 3)
        );
        assert_eq!(v.lost, vec![id[1]]);
        assert_eq!(v.phantom, vec![id[2]]);
    }

    #[test]
    fn an_unresolved_unknown_delivered_is_a_phantom() {
        let id = ids(1);
        let mut h = History::new();
        h.produced(id[0], "a", 1, Outcome::Unknown);
        h.delivered(id[0], "a", 1);
        assert_eq!(h.check().phantom, vec![id[0]]);
    }
}
