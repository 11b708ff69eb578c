//! What the relay and the consumers report about themselves: metrics through the [`metrics`]
//! facade (any recorder; `herald-telemetry` installs a Prometheus one), and the health that
//! `/healthz` and `/readyz` serve.
//!
//! Metric names follow the Prometheus conventions: units in the name, `_total` for counters.
//! They are listed in [`names`] and described by [`describe`].

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Every metric herald records.
pub mod names {
    /// Gauge, `{destination}`: rows waiting in the outbox.
    pub const OUTBOX_PENDING: &str = "herald_outbox_pending_messages";
    /// Gauge, `{destination}`: age of the oldest waiting row.
    pub const OUTBOX_OLDEST_AGE: &str = "herald_outbox_oldest_pending_age_seconds";
    /// Gauge, `{side}` (`outbox`, `consumer`): dead letters.
    pub const DEAD_LETTERS: &str = "herald_dead_letters";
    /// Counter, `{destination}`: messages confirmed by the broker and marked.
    pub const PUBLISHED: &str = "herald_relay_published_total";
    /// Counter: messages given back after a broker outage or an unknown outcome.
    pub const RELEASED: &str = "herald_relay_released_total";
    /// Counter: broker rejections that will be retried.
    pub const REJECTED: &str = "herald_relay_rejected_total";
    /// Counter: messages the relay moved to the dead-letter table.
    pub const DEAD_LETTERED: &str = "herald_relay_dead_lettered_total";
    /// Counter: messages whose partition was lost before they were marked (published again).
    pub const LEASE_LOST: &str = "herald_relay_lease_lost_total";
    /// Counter: batches that hit a broker outage.
    pub const BROKER_ERRORS: &str = "herald_relay_broker_errors_total";
    /// Counter: heartbeats that failed.
    pub const HEARTBEAT_ERRORS: &str = "herald_relay_heartbeat_errors_total";
    /// Counter: partitions taken over from relays that stopped heart-beating.
    pub const PARTITIONS_TAKEN_OVER: &str = "herald_relay_partitions_taken_over_total";
    /// Counter: times this relay was itself taken over and rejoined.
    pub const TAKEN_OVER: &str = "herald_relay_taken_over_total";
    /// Gauge: partitions this relay holds.
    pub const PARTITIONS_HELD: &str = "herald_relay_partitions_held";
    /// Histogram: one publish wave, from sending to the broker's last confirmation.
    pub const PUBLISH_DURATION: &str = "herald_relay_publish_duration_seconds";
    /// Histogram: one read of a batch from the outbox.
    pub const CLAIM_DURATION: &str = "herald_relay_claim_duration_seconds";
    /// Counter, `{service, outcome}`: deliveries handled (`applied`, `duplicate`, `stale`,
    /// `retried`, `parked`).
    pub const HANDLED: &str = "herald_consumer_handled_total";
    /// Gauge, `{service, topic}`: messages the service's group has not acknowledged.
    pub const CONSUMER_LAG: &str = "herald_consumer_lag_messages";
    /// Histogram, `{service}`: one handler transaction, from start to commit.
    pub const HANDLE_DURATION: &str = "herald_consumer_handle_duration_seconds";
    /// Counter, `{service}`: acknowledgements that failed after the effect committed.
    pub const ACK_FAILURES: &str = "herald_consumer_ack_failures_total";

    /// The histograms, for recorders that need buckets set per name.
    pub const HISTOGRAMS: [&str; 3] = [PUBLISH_DURATION, CLAIM_DURATION, HANDLE_DURATION];
}

/// Describes every metric to the installed recorder (help text and unit). Call once after
/// installing it.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(
        OUTBOX_PENDING,
        Unit::Count,
        "Rows waiting in the outbox, per destination."
    );
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest row waiting in the outbox, per destination."
    );
    describe_gauge!(
        DEAD_LETTERS,
        Unit::Count,
        "Dead letters, per side (outbox, consumer)."
    );
    describe_counter!(
        PUBLISHED,
        Unit::Count,
        "Messages confirmed by the broker and marked."
    );
    describe_counter!(
        RELEASED,
        Unit::Count,
        "Messages given back after a broker outage or an unknown outcome (published again)."
    );
    describe_counter!(
        REJECTED,
        Unit::Count,
        "Broker rejections that will be retried."
    );
    describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Messages moved to the dead-letter table."
    );
    describe_counter!(
        LEASE_LOST,
        Unit::Count,
        "Messages whose partition was lost before they were marked (published again)."
    );
    describe_counter!(
        BROKER_ERRORS,
        Unit::Count,
        "Batches that hit a broker outage."
    );
    describe_counter!(HEARTBEAT_ERRORS, Unit::Count, "Heartbeats that failed.");
    describe_counter!(
        PARTITIONS_TAKEN_OVER,
        Unit::Count,
        "Partitions taken over from relays that stopped heart-beating."
    );
    describe_counter!(
        TAKEN_OVER,
        Unit::Count,
        "Times this relay was taken over and rejoined."
    );
    describe_gauge!(
        PARTITIONS_HELD,
        Unit::Count,
        "Outbox partitions this relay holds."
    );
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "One publish wave, from sending to the broker's last confirmation."
    );
    describe_histogram!(
        CLAIM_DURATION,
        Unit::Seconds,
        "One read of a batch from the outbox."
    );
    describe_counter!(
        HANDLED,
        Unit::Count,
        "Deliveries handled, per service and outcome (applied, duplicate, stale, retried, parked)."
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Messages the service's group has not acknowledged, where the broker can tell."
    );
    describe_histogram!(
        HANDLE_DURATION,
        Unit::Seconds,
        "One handler transaction, from start to commit."
    );
    describe_counter!(
        ACK_FAILURES,
        Unit::Count,
        "Acknowledgements that failed after the effect committed (redelivered, then skipped)."
    );
}

/// The state of one dependency (the database, the broker) as the relay last saw it.
#[derive(Debug, Default, Clone)]
struct Link {
    ok_at: Option<Instant>,
    failing_since: Option<Instant>,
    /// The last failure (not the first, as `failing_since`).
    failed_at: Option<Instant>,
    error: Option<String>,
}

impl Link {
    fn ok(&mut self, now: Instant) {
        self.ok_at = Some(now);
        self.failing_since = None;
        self.error = None;
    }

    /// A call that began at `started` failed. The outage began then, or at the last success
    /// if that came later (another call answered meanwhile).
    fn failed(&mut self, started: Instant, error: String) {
        let since = self.ok_at.map_or(started, |ok| ok.max(started));
        self.failing_since.get_or_insert(since);
        self.failed_at = Some(Instant::now());
        self.error = Some(error);
    }
}

#[derive(Debug, Default)]
struct State {
    database: Link,
    broker: Link,
    /// The last time the relay confirmed (or dead-lettered) something, or found nothing to do.
    progress_at: Option<Instant>,
    /// From the last outbox sample: rows waiting, and the oldest one's age at `sampled_at` and
    /// creation time.
    pending: Option<u64>,
    oldest: Option<Duration>,
    oldest_created: Option<std::time::SystemTime>,
    sampled_at: Option<Instant>,
    /// Partitions held and of how many.
    held: (usize, u32),
    heartbeat_turn: Option<Instant>,
    worker_turns: Vec<Option<Instant>>,
    running: bool,
}

/// When `/readyz` says not ready.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// The database or the broker failing this long makes the relay not ready.
    pub unreachable_after: Duration,
    /// The oldest waiting row older than this, while the relay made no progress for as long,
    /// makes it not ready (a stall).
    pub stall_after: Duration,
    /// A loop (heartbeat, worker) that has not turned for this long makes `/healthz` fail.
    pub loop_bound: Duration,
}

/// One reason the relay is not ready (or not live).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reason {
    /// `database`, `broker`, `stalled`, `heartbeat`, `worker` or `stopped`.
    pub check: &'static str,
    /// What is wrong, in a sentence (errors carry no secrets).
    pub message: String,
    /// How long it has been so, in seconds.
    pub for_seconds: f64,
}

/// The answer of `/healthz` or `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Empty when `status` is `ok`.
    pub reasons: Vec<Reason>,
    /// Rows waiting at the last sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// The oldest waiting row's age now (from the last sample), in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_seconds: Option<f64>,
    /// Seconds since the relay last made progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_since_progress: Option<f64>,
    /// Partitions held.
    pub partitions_held: usize,
    /// Partitions in the outbox (0 before the first heartbeat).
    pub partitions: u32,
}

impl Report {
    /// Whether every check passed.
    pub fn is_ok(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// What the relay's loops record for `/healthz` and `/readyz`. Cheap to update.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn started(&self, workers: usize) {
        let now = Instant::now();
        self.with(|s| {
            s.running = true;
            s.heartbeat_turn = Some(now);
            s.worker_turns = vec![Some(now); workers];
            s.progress_at.get_or_insert(now);
        });
    }

    pub(crate) fn stopped(&self) {
        self.with(|s| s.running = false);
    }

    /// The outcome of a call to the database that started at `started`: a failure counts from
    /// when the call began, so a call that hangs until its timeout is not a shorter outage.
    pub(crate) fn database(&self, started: Instant, result: Result<(), String>) {
        self.with(|s| match result {
            Ok(()) => s.database.ok(Instant::now()),
            Err(e) => s.database.failed(started, e),
        });
    }

    /// Like [`database`](Self::database), for the broker.
    pub(crate) fn broker(&self, started: Instant, result: Result<(), String>) {
        self.with(|s| match result {
            Ok(()) => s.broker.ok(Instant::now()),
            Err(e) => s.broker.failed(started, e),
        });
    }

    /// When the broker last answered or last failed a call, to decide whether to probe it: while
    /// publishes keep failing, a check that happens to pass must not hide the outage.
    pub(crate) fn broker_seen(&self) -> Option<Instant> {
        self.with(|s| s.broker.ok_at.max(s.broker.failed_at))
    }

    pub(crate) fn progress(&self) {
        let now = Instant::now();
        self.with(|s| s.progress_at = Some(now));
    }

    /// An outbox sample: rows waiting, the oldest one's age and creation time.
    pub(crate) fn sampled(
        &self,
        pending: u64,
        oldest: Option<Duration>,
        oldest_created: Option<std::time::SystemTime>,
    ) {
        let now = Instant::now();
        self.with(|s| {
            // Nothing waiting is not a stall, however long ago the last publish was; and a head
            // that moved on (the oldest row is younger than before) was published by someone,
            // this relay or another one sharing the outbox.
            let moved = matches!((s.oldest_created, oldest_created), (Some(a), Some(b)) if b > a);
            if pending == 0 || moved {
                s.progress_at = Some(now);
            }
            s.pending = Some(pending);
            s.oldest = oldest;
            s.oldest_created = oldest_created;
            s.sampled_at = Some(now);
        });
    }

    pub(crate) fn held(&self, held: usize, of: u32) {
        self.with(|s| s.held = (held, of));
    }

    pub(crate) fn heartbeat_turned(&self) {
        let now = Instant::now();
        self.with(|s| s.heartbeat_turn = Some(now));
    }

    pub(crate) fn worker_turned(&self, worker: usize) {
        let now = Instant::now();
        self.with(|s| {
            if let Some(t) = s.worker_turns.get_mut(worker) {
                *t = Some(now);
            }
        });
    }

    fn report(&self, s: &State, reasons: Vec<Reason>, now: Instant) -> Report {
        Report {
            status: if reasons.is_empty() {
                "ok"
            } else {
                "unavailable"
            },
            reasons,
            pending: s.pending,
            oldest_pending_age_seconds: oldest_now(s, now).map(|d| d.as_secs_f64()),
            seconds_since_progress: s.progress_at.map(|t| (now - t).as_secs_f64()),
            partitions_held: s.held.0,
            partitions: s.held.1,
        }
    }

    /// `/healthz`: the relay is running and its loops are turning.
    pub fn liveness(&self, t: &Thresholds) -> Report {
        let now = Instant::now();
        self.with(|s| {
            let mut reasons = Vec::new();
            if !s.running {
                reasons.push(Reason {
                    check: "stopped",
                    message: "the relay is not running".to_owned(),
                    for_seconds: 0.0,
                });
            }
            let stuck = |at: Option<Instant>| at.map_or(Duration::ZERO, |at| now - at);
            let beat = stuck(s.heartbeat_turn);
            if s.running && beat > t.loop_bound {
                reasons.push(Reason {
                    check: "heartbeat",
                    message: format!(
                        "the heartbeat loop has not turned for {:.1}s",
                        beat.as_secs_f64()
                    ),
                    for_seconds: beat.as_secs_f64(),
                });
            }
            for (i, at) in s.worker_turns.iter().enumerate() {
                let d = stuck(*at);
                if s.running && d > t.loop_bound {
                    reasons.push(Reason {
                        check: "worker",
                        message: format!("worker {i} has not turned for {:.1}s", d.as_secs_f64()),
                        for_seconds: d.as_secs_f64(),
                    });
                }
            }
            self.report(s, reasons, now)
        })
    }

    /// `/readyz`: the database and the broker answer, and the outbox is not stalled.
    pub fn readiness(&self, t: &Thresholds) -> Report {
        let now = Instant::now();
        let live = self.liveness(t);
        self.with(|s| {
            let mut reasons = live.reasons;
            for (check, link) in [("database", &s.database), ("broker", &s.broker)] {
                if let Some(since) = link.failing_since
                    && now - since >= t.unreachable_after
                {
                    let d = now - since;
                    reasons.push(Reason {
                        check,
                        message: format!(
                            "{check} unreachable for {:.1}s: {}",
                            d.as_secs_f64(),
                            link.error.as_deref().unwrap_or("no answer")
                        ),
                        for_seconds: d.as_secs_f64(),
                    });
                }
            }
            // A relay holding no partition (others hold them all) has nothing it could publish.
            let standby = s.held.0 == 0 && s.held.1 > 0;
            if let (Some(oldest), Some(progress), false) =
                (oldest_now(s, now), s.progress_at, standby)
            {
                let idle = now - progress;
                if oldest > t.stall_after && idle > t.stall_after {
                    reasons.push(Reason {
                        check: "stalled",
                        message: format!(
                            "the oldest pending message is {:.0}s old and this relay made no progress for {:.0}s ({} messages pending; it holds {} of {} partitions)",
                            oldest.as_secs_f64(),
                            idle.as_secs_f64(),
                            s.pending.unwrap_or(0),
                            s.held.0,
                            s.held.1
                        ),
                        for_seconds: idle.as_secs_f64(),
                    });
                }
            }
            self.report(s, reasons, now)
        })
    }
}

/// The oldest row's age now: its age when sampled plus the time since.
fn oldest_now(s: &State, now: Instant) -> Option<Duration> {
    Some(s.oldest? + (now - s.sampled_at?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            unreachable_after: Duration::from_secs(10),
            stall_after: Duration::from_secs(60),
            loop_bound: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_names_each_reason() {
        let h = Health::default();
        let t = thresholds();
        assert_eq!(h.liveness(&t).reasons[0].check, "stopped");
        h.started(2);
        h.database(Instant::now(), Ok(()));
        h.broker(Instant::now(), Ok(()));
        h.held(16, 16);
        h.sampled(3, Some(Duration::from_secs(1)), Some(std::time::UNIX_EPOCH));
        assert!(h.readiness(&t).is_ok());

        // A broker failing for less than the threshold is not yet a reason.
        h.broker(Instant::now(), Err("connection refused".to_owned()));
        tokio::time::advance(Duration::from_secs(5)).await;
        h.heartbeat_turned();
        h.worker_turned(0);
        h.worker_turned(1);
        assert!(h.readiness(&t).is_ok());
        tokio::time::advance(Duration::from_secs(6)).await;
        let r = h.readiness(&t);
        assert_eq!(r.reasons.len(), 1, "{r:?}");
        assert_eq!(r.reasons[0].check, "broker");
        assert!(r.reasons[0].message.contains("connection refused"));
        h.broker(Instant::now(), Ok(()));
        assert!(h.readiness(&t).is_ok());

        // Old rows and no progress for longer than stall_after: stalled, and live loops.
        for _ in 0..7 {
            tokio::time::advance(Duration::from_secs(10)).await;
            h.heartbeat_turned();
            h.worker_turned(0);
            h.worker_turned(1);
            h.database(Instant::now(), Ok(()));
        }
        let r = h.readiness(&t);
        assert_eq!(
            r.reasons.iter().map(|r| r.check).collect::<Vec<_>>(),
            ["stalled"]
        );
        assert!(h.liveness(&t).is_ok());
        // A standby relay (it holds no partition) is not the one stalled.
        h.held(0, 16);
        assert!(h.readiness(&t).is_ok(), "a standby relay reports no stall");
        h.held(16, 16);
        assert_eq!(h.readiness(&t).reasons[0].check, "stalled");
        // Another relay publishing the head (the oldest row is now a younger one) is progress.
        h.sampled(
            3,
            Some(Duration::from_secs(1)),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1)),
        );
        assert!(h.readiness(&t).is_ok(), "a head that moved is progress");
        for _ in 0..7 {
            tokio::time::advance(Duration::from_secs(10)).await;
            h.heartbeat_turned();
            h.worker_turned(0);
            h.worker_turned(1);
        }
        assert_eq!(h.readiness(&t).reasons[0].check, "stalled");
        h.progress();
        assert!(h.readiness(&t).is_ok(), "progress ends the stall");

        // A worker stuck past the loop bound fails liveness (and so readiness).
        tokio::time::advance(Duration::from_secs(31)).await;
        h.heartbeat_turned();
        h.worker_turned(0);
        let r = h.liveness(&t);
        assert_eq!(r.reasons.len(), 1);
        assert_eq!(r.reasons[0].check, "worker");
        assert!(r.reasons[0].message.starts_with("worker 1"));
        // An empty outbox is never a stall.
        h.worker_turned(1);
        h.sampled(0, None, None);
        assert!(h.readiness(&t).is_ok());
    }
}
