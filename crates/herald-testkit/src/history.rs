//! A history of what producers committed and consumers received, and a checker for the
//! guarantees: nothing lost, nothing phantom, order per key, duplicates counted.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

/// What happened to one message from the producer's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Committed,
    RolledBack,
}

/// The recorded history of one run.
#[derive(Debug, Default)]
pub struct History {
    produced: HashMap<Uuid, (Fate, String, u64)>,
    deliveries: Vec<(Uuid, String, u64)>,
    dead_lettered: HashSet<Uuid>,
}

/// The checker's verdict.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Messages whose transaction committed.
    pub committed: usize,
    /// Messages whose transaction rolled back.
    pub rolled_back: usize,
    /// Distinct messages delivered.
    pub delivered: usize,
    /// Deliveries beyond the first of a message.
    pub duplicates: usize,
    /// Committed, neither delivered nor dead-lettered.
    pub lost: Vec<Uuid>,
    /// Delivered but never committed (rolled back, or never produced at all).
    pub phantom: Vec<Uuid>,
    /// First deliveries that came after a later message of the same key.
    pub out_of_order: Vec<Uuid>,
}

impl Verdict {
    /// No loss, no phantom, no order violation.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.phantom.is_empty() && self.out_of_order.is_empty()
    }
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// A transaction with message `id` (the `seq`-th of `key`, counting from 1) committed.
    pub fn committed(&mut self, id: Uuid, key: &str, seq: u64) {
        self.produced
            .insert(id, (Fate::Committed, key.to_owned(), seq));
    }

    /// A transaction with message `id` rolled back.
    pub fn rolled_back(&mut self, id: Uuid, key: &str, seq: u64) {
        self.produced
            .insert(id, (Fate::RolledBack, key.to_owned(), seq));
    }

    /// A consumer received message `id` carrying `key` and `seq`.
    pub fn delivered(&mut self, id: Uuid, key: &str, seq: u64) {
        self.deliveries.push((id, key.to_owned(), seq));
    }

    /// Message `id` was parked in a dead-letter table (accounted for, not lost).
    pub fn dead_lettered(&mut self, id: Uuid) {
        self.dead_lettered.insert(id);
    }

    /// Checks the whole history.
    pub fn check(&self) -> Verdict {
        let mut v = Verdict::default();
        for (fate, _, _) in self.produced.values() {
            match fate {
                Fate::Committed => v.committed += 1,
                Fate::RolledBack => v.rolled_back += 1,
            }
        }
        let mut seen: HashSet<Uuid> = HashSet::new();
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        for (id, key, seq) in &self.deliveries {
            if !seen.insert(*id) {
                v.duplicates += 1;
                continue;
            }
            match self.produced.get(id) {
                Some((Fate::Committed, _, _)) => {}
                _ => v.phantom.push(*id),
            }
            let last = last_seq.entry(key.as_str()).or_insert(0);
            if *seq < *last {
                v.out_of_order.push(*id);
            } else {
                *last = *seq;
            }
        }
        v.delivered = seen.len();
        for (id, (fate, _, _)) in &self.produced {
            if *fate == Fate::Committed && !seen.contains(id) && !self.dead_lettered.contains(id) {
                v.lost.push(*id);
            }
        }
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
    fn dead_lettered_is_not_lost() {
        let id = ids(1);
        let mut h = History::new();
        h.committed(id[0], "a", 1);
        h.dead_lettered(id[0]);
        assert!(h.check().ok());
    }
}
