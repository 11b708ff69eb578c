//! The parts of a fault-injection run that do not depend on the database or broker: the modes
//! compared, the seeded fault plan, a transport wrapper that records every delivery, and the
//! result table. `herald verify` drives them against real servers.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::{Message, Received, Result, Subscriber, Subscription, Transport};

use crate::history::{History, Verdict};
use crate::proxy::{Direction, Link};

/// How the producer gets its messages to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Publish inside the business transaction, then commit: a rollback after the publish (or a
    /// crash before the commit) leaves a phantom event.
    PublishThenSave,
    /// Commit, then publish: a crash or broker failure in between loses the event, and
    /// concurrent producers reorder a key.
    SaveThenPublish,
    /// Commit, publish, and park in durable storage when the broker fails: a crash between
    /// commit and publish still loses, and parked messages come late (out of order).
    Fallback,
    /// herald's transactional outbox with its relay.
    Outbox,
}

impl Mode {
    /// Every mode, in table order.
    pub const ALL: [Mode; 4] = [
        Mode::PublishThenSave,
        Mode::SaveThenPublish,
        Mode::Fallback,
        Mode::Outbox,
    ];

    /// The mode's name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::PublishThenSave => "publish-then-save",
            Mode::SaveThenPublish => "save-then-publish",
            Mode::Fallback => "fallback",
            Mode::Outbox => "outbox",
        }
    }

    /// Parses a name given by [`Mode::name`].
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether a relay runs beside the producers in this mode (it drains the outbox, or the
    /// fallback storage).
    pub fn uses_relay(self) -> bool {
        matches!(self, Mode::Fallback | Mode::Outbox)
    }
}

/// Points where a relay process is made to abort.
pub const RELAY_FAILPOINTS: [&str; 4] =
    ["after-claim", "mid-batch", "after-confirm", "during-mark"];

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a relay process; it is restarted when the fault ends.
    KillRelay,
    /// Restart a relay so that it aborts at this failpoint (one of [`RELAY_FAILPOINTS`]).
    RelayFailpoint(&'static str),
    /// SIGSTOP a relay past its lease, then SIGCONT it: a zombie that must not publish out of
    /// order nor mark rows it no longer owns.
    PauseRelay,
    /// Terminate the database sessions of the relays and the producers.
    TerminateSessions,
    /// Break the network between the relays (and the naive producers) and the broker.
    BrokerLink(Link),
    /// Break the network between the relays and the database.
    DatabaseLink(Link),
    /// SIGKILL the broker process and start it again when the fault ends.
    KillBroker,
    /// SIGSTOP the broker process, SIGCONT it when the fault ends.
    PauseBroker,
    /// The producing application dies at its most fragile point, over and over for a while:
    /// between its commit and its publish (save-then-publish, fallback: the message is lost), or
    /// between its publish and its commit (publish-then-save: the transaction rolls back, the
    /// event is out). The outbox has no such point: its message commits with the change.
    AppCrash,
}

impl Fault {
    /// Names of the kinds of fault, as `--faults` takes them.
    pub const KINDS: [&'static str; 9] = [
        "kill-relay",
        "relay-failpoint",
        "pause-relay",
        "terminate-sessions",
        "broker-link",
        "database-link",
        "kill-broker",
        "pause-broker",
        "app-crash",
    ];

    /// This fault's kind, one of [`Fault::KINDS`].
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillRelay => "kill-relay",
            Fault::RelayFailpoint(_) => "relay-failpoint",
            Fault::PauseRelay => "pause-relay",
            Fault::TerminateSessions => "terminate-sessions",
            Fault::BrokerLink(_) => "broker-link",
            Fault::DatabaseLink(_) => "database-link",
            Fault::KillBroker => "kill-broker",
            Fault::PauseBroker => "pause-broker",
            Fault::AppCrash => "app-crash",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = |l: &Link| match l {
            Link::Healthy => "healthy".to_owned(),
            Link::Reset => "reset".to_owned(),
            Link::Blackhole => "blackhole".to_owned(),
            Link::Drop(Direction::ToClient) => "replies dropped".to_owned(),
            Link::Drop(Direction::ToServer) => "requests dropped".to_owned(),
            Link::Latency(d) => format!("+{}ms latency", d.as_millis()),
        };
        match self {
            Fault::KillRelay => write!(f, "kill -9 relay"),
            Fault::RelayFailpoint(p) => write!(f, "relay aborts {p}"),
            Fault::PauseRelay => write!(f, "pause relay past its lease"),
            Fault::TerminateSessions => write!(f, "terminate database sessions"),
            Fault::BrokerLink(l) => write!(f, "broker link: {}", link(l)),
            Fault::DatabaseLink(l) => write!(f, "database link: {}", link(l)),
            Fault::KillBroker => write!(f, "kill -9 broker"),
            Fault::PauseBroker => write!(f, "pause broker"),
            Fault::AppCrash => write!(f, "application crash"),
        }
    }
}

/// What the environment of a run allows to break.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    /// The database is a server whose sessions can be terminated (PostgreSQL).
    pub database_sessions: bool,
    /// Relays reach the database through a chaos proxy.
    pub database_proxy: bool,
    /// Relays and producers reach the broker through a chaos proxy.
    pub broker_proxy: bool,
    /// The broker runs as a child process that may be killed and paused.
    pub broker_process: bool,
}

/// A seeded sequence of faults: the same seed gives the same faults, in the same order, with the
/// same durations (what the system does meanwhile still depends on timing).
pub struct FaultPlan {
    rng: fastrand::Rng,
    faults: Vec<Fault>,
    lease: Duration,
}

impl FaultPlan {
    /// The faults that `caps` allow for a run in `mode`, where relays hold leases of `lease`.
    pub fn new(seed: u64, mode: Mode, caps: Capabilities, lease: Duration) -> FaultPlan {
        let mut faults = vec![Fault::AppCrash];
        if mode.uses_relay() {
            faults.push(Fault::KillRelay);
            faults.push(Fault::PauseRelay);
            faults.extend(RELAY_FAILPOINTS.iter().map(|p| Fault::RelayFailpoint(p)));
        }
        if caps.database_sessions {
            faults.push(Fault::TerminateSessions);
        }
        if caps.broker_proxy {
            faults.extend([
                Fault::BrokerLink(Link::Reset),
                Fault::BrokerLink(Link::Blackhole),
                Fault::BrokerLink(Link::Drop(Direction::ToClient)),
                Fault::BrokerLink(Link::Latency(Duration::from_millis(40))),
            ]);
        }
        if caps.database_proxy && mode.uses_relay() {
            faults.extend([
                Fault::DatabaseLink(Link::Reset),
                Fault::DatabaseLink(Link::Blackhole),
                Fault::DatabaseLink(Link::Latency(Duration::from_millis(20))),
            ]);
        }
        if caps.broker_process {
            faults.extend([Fault::KillBroker, Fault::PauseBroker]);
        }
        FaultPlan {
            rng: fastrand::Rng::with_seed(seed),
            faults,
            lease,
        }
    }

    /// Keeps only the faults whose [`Fault::kind`] is in `kinds`.
    pub fn only(mut self, kinds: &[String]) -> FaultPlan {
        self.faults.retain(|f| kinds.iter().any(|k| k == f.kind()));
        self
    }

    /// The faults this plan draws from.
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// The next fault: how long to wait before it, the fault, and how long it lasts; `None` if
    /// the plan has no fault to draw from.
    pub fn next_fault(&mut self) -> Option<(Duration, Fault, Duration)> {
        if self.faults.is_empty() {
            return None;
        }
        let gap = Duration::from_millis(self.rng.u64(200..1200));
        let fault = self.faults[self.rng.usize(..self.faults.len())].clone();
        let hold = match fault {
            // Long enough that the lease expires and another relay takes the rows over.
            Fault::PauseRelay => self.lease + Duration::from_millis(self.rng.u64(500..1500)),
            _ => Duration::from_millis(self.rng.u64(200..1500)),
        };
        Some((gap, fault, hold))
    }

    /// A random index below `n` (which relay to hit), from the plan's own generator.
    pub fn pick(&mut self, n: usize) -> usize {
        self.rng.usize(..n.max(1))
    }
}

/// A transport that records every message its subscribers hand out, duplicates included, in a
/// [`History`]. `key_seq` reads a message's key and per-key sequence number.
pub struct RecordingTransport {
    inner: Arc<dyn Transport>,
    history: Arc<Mutex<History>>,
    key_seq: fn(&Message) -> (String, u64),
}

impl RecordingTransport {
    /// Wraps `inner`.
    pub fn new(
        inner: Arc<dyn Transport>,
        history: Arc<Mutex<History>>,
        key_seq: fn(&Message) -> (String, u64),
    ) -> RecordingTransport {
        RecordingTransport {
            inner,
            history,
            key_seq,
        }
    }
}

#[async_trait]
impl Transport for RecordingTransport {
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        self.inner.publish(batch).await
    }

    async fn subscribe(&self, s: &Subscription) -> Result<Box<dyn Subscriber>> {
        let inner = self.inner.subscribe(s).await?;
        Ok(Box::new(RecordingSubscriber {
            inner,
            history: self.history.clone(),
            key_seq: self.key_seq,
        }))
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        self.inner.durability_warnings().await
    }

    fn redelivery_delay(&self) -> std::time::Duration {
        self.inner.redelivery_delay()
    }

    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct RecordingSubscriber {
    inner: Box<dyn Subscriber>,
    history: Arc<Mutex<History>>,
    key_seq: fn(&Message) -> (String, u64),
}

#[async_trait]
impl Subscriber for RecordingSubscriber {
    async fn next(&mut self) -> Result<Received> {
        let r = self.inner.next().await?;
        if let Received::Message(d) = &r {
            let (key, seq) = (self.key_seq)(&d.message);
            self.history
                .lock()
                .expect("history lock")
                .delivered(d.message.id, &key, seq);
        }
        Ok(r)
    }

    async fn ack(&mut self, tag: u64) -> Result<()> {
        self.inner.ack(tag).await
    }

    async fn nack(&mut self, tag: u64) -> Result<()> {
        self.inner.nack(tag).await
    }
}

/// The outcome of one mode's run.
#[derive(Debug, Clone)]
pub struct ModeResult {
    /// The mode.
    pub mode: Mode,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Faults injected.
    pub faults: usize,
    /// How long the backlog took to drain after the faults healed; `None` if it did not drain
    /// within the bound.
    pub drained_in: Option<Duration>,
    /// The longest a committed message may wait for its first delivery in this run (the
    /// takeover bound plus the longest fault and the time to notice it healed); `None` where
    /// the mode has no relay.
    pub wait_bound: Option<Duration>,
}

impl ModeResult {
    /// The guarantees held, the backlog drained, and no message waited past the bound.
    pub fn ok(&self) -> bool {
        self.verdict.ok() && self.drained_in.is_some() && self.waits_ok()
    }

    /// No committed message waited longer than [`wait_bound`](Self::wait_bound).
    pub fn waits_ok(&self) -> bool {
        self.wait_bound
            .is_none_or(|bound| self.verdict.waits.max <= bound)
    }
}

/// The result table, one row per mode.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:>9} {:>9} {:>7} {:>9} {:>6} {:>7} {:>8} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9} {:>9}",
        "mode",
        "committed",
        "rolledbk",
        "unknown",
        "delivered",
        "lost",
        "phantom",
        "reorder",
        "dup-deliv",
        "dup-effs",
        "dead-lt",
        "faults",
        "drained",
        "wait p99",
        "wait max"
    );
    for r in results {
        let v = &r.verdict;
        let drained = r
            .drained_in
            .map_or_else(|| "NO".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
        let secs = |d: Duration| format!("{:.2}s", d.as_secs_f64());
        let max = if r.waits_ok() {
            secs(v.waits.max)
        } else {
            format!("{}!", secs(v.waits.max))
        };
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>9} {:>7} {:>9} {:>6} {:>7} {:>8} {:>9} {:>8} {:>7} {:>6} {:>9} {:>9} {:>9}",
            r.mode.name(),
            v.committed,
            v.rolled_back,
            v.unknown + v.settled,
            v.delivered,
            v.lost.len(),
            v.phantom.len(),
            v.out_of_order.len(),
            v.duplicates,
            v.duplicate_effects.len(),
            v.dead_lettered.len(),
            r.faults,
            drained,
            secs(v.waits.p99),
            max
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_faults() {
        let caps = Capabilities {
            database_sessions: true,
            database_proxy: true,
            broker_proxy: true,
            broker_process: true,
        };
        let lease = Duration::from_secs(2);
        let mut a = FaultPlan::new(7, Mode::Outbox, caps, lease);
        let mut b = FaultPlan::new(7, Mode::Outbox, caps, lease);
        let xs: Vec<_> = (0..50).map(|_| a.next_fault().unwrap()).collect();
        let ys: Vec<_> = (0..50).map(|_| b.next_fault().unwrap()).collect();
        assert_eq!(xs, ys);
        let mut c = FaultPlan::new(8, Mode::Outbox, caps, lease);
        let zs: Vec<_> = (0..50).map(|_| c.next_fault().unwrap()).collect();
        assert_ne!(xs, zs);
        // A pause always outlasts the lease.
        assert!(
            xs.iter()
                .filter(|(_, f, _)| *f == Fault::PauseRelay)
                .all(|(_, _, hold)| *hold > lease)
        );
    }

    #[test]
    fn faults_follow_what_the_environment_allows() {
        let none = Capabilities::default();
        let plan = FaultPlan::new(1, Mode::SaveThenPublish, none, Duration::from_secs(1));
        assert_eq!(plan.faults(), &[Fault::AppCrash]);
        let plan = FaultPlan::new(1, Mode::Outbox, none, Duration::from_secs(1));
        assert!(plan.faults().contains(&Fault::PauseRelay));
        assert!(
            plan.faults()
                .contains(&Fault::RelayFailpoint("during-mark"))
        );
        assert!(!plan.faults().contains(&Fault::TerminateSessions));
        let mut plan = plan.only(&["pause-relay".to_owned()]);
        assert_eq!(plan.faults(), &[Fault::PauseRelay]);
        let mut none = FaultPlan::new(1, Mode::SaveThenPublish, none, Duration::from_secs(1))
            .only(&["pause-relay".to_owned()]);
        assert_eq!(none.next_fault(), None);
        assert!(plan.next_fault().is_some());
    }

    #[test]
    fn modes_round_trip_their_names() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()), Some(m));
        }
        assert_eq!(Mode::parse("yolo"), None);
    }
}
