//! The inbox conformance suite: the database side of a consumer ([`Apply`]) on every store. Each
//! store's test file implements [`InboxHarness`] and calls [`crate::inbox_suite!`].
//!
//! The consumer suite ([`crate::consumer_suite`]) runs the inbox behind a real broker; this one
//! pins down the database contract alone: a message's effect commits once with its inbox record,
//! a failed handler leaves no trace, dead letters keep the message and the reason, and a replayed
//! dead letter is applied once and removed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::consumer::Applied;
use herald_core::{Apply, Error, Message};
use uuid::Uuid;

/// What the suite needs from a store. Each harness works in its own schema, database or file.
#[async_trait]
pub trait InboxHarness: Send + Sync {
    /// `service`'s consumer database side: its handler records an effect row per message, in the
    /// inbox transaction, and fails every message whose ordering key is `fail_key`.
    fn applier(&self, service: &str, fail_key: Option<&str>) -> Arc<dyn Apply>;
    /// The same, skipping messages whose integer `header` is not newer than the last applied
    /// version of their key.
    fn versioned_applier(&self, service: &str, header: &str) -> Arc<dyn Apply>;
    /// The effects `service` applied, in commit order: (message id, ordering key).
    async fn effects(&self, service: &str) -> Vec<(Uuid, Option<String>)>;
    /// `service`'s dead letters: (message id if decodable, reason, attempts).
    async fn dead_letters(&self, service: &str) -> Vec<(Option<Uuid>, String, i64)>;
    /// Marks all of `service`'s dead letters for replay, as `herald dlq replay` does.
    async fn request_replay(&self, service: &str);
    /// Removes what the harness created.
    async fn cleanup(&self) {}
}

fn event(key: &str) -> Message {
    Message::raw_event("t", "E", b"{}".to_vec()).with_key(key)
}

/// A message applied twice: the second time is a duplicate and runs nothing.
pub async fn duplicate_is_applied_once(h: &dyn InboxHarness) {
    let a = h.applier("svc", None);
    let m = event("k");
    assert_eq!(a.apply("svc", &m, None).await.unwrap(), Applied::Done);
    assert_eq!(a.apply("svc", &m, None).await.unwrap(), Applied::Duplicate);
    assert_eq!(h.effects("svc").await, vec![(m.id, Some("k".to_owned()))]);
}

/// Two instances applying one message at the same moment: exactly one applies it.
pub async fn concurrent_duplicates_apply_once(h: &dyn InboxHarness) {
    let a = h.applier("svc", None);
    let b = h.applier("svc", None);
    for i in 0..20 {
        let m = event(&format!("k{i}"));
        let (x, y) = tokio::join!(apply_retrying(&a, &m), apply_retrying(&b, &m));
        let mut outcomes = [x, y];
        outcomes.sort_by_key(|o| *o == Applied::Duplicate);
        assert_eq!(outcomes, [Applied::Done, Applied::Duplicate], "message {i}");
    }
    assert_eq!(h.effects("svc").await.len(), 20);
}

/// Applies, retrying transient errors (a deadlock between two concurrent inserts of one inbox
/// key is such an error on some databases; the consumer retries it the same way).
async fn apply_retrying(a: &Arc<dyn Apply>, m: &Message) -> Applied {
    for _ in 0..20 {
        match a.apply("svc", m, None).await {
            Ok(outcome) => return outcome,
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("apply failed: {e}"),
        }
    }
    panic!("apply kept failing transiently");
}

/// Each consumer (service) has its own inbox: one service's record does not stop another.
pub async fn services_have_separate_inboxes(h: &dyn InboxHarness) {
    let m = event("k");
    assert_eq!(
        h.applier("billing", None)
            .apply("billing", &m, None)
            .await
            .unwrap(),
        Applied::Done
    );
    assert_eq!(
        h.applier("shipping", None)
            .apply("shipping", &m, None)
            .await
            .unwrap(),
        Applied::Done
    );
    assert_eq!(h.effects("billing").await.len(), 1);
    assert_eq!(h.effects("shipping").await.len(), 1);
}

/// A failing handler rolls back the inbox record with its effects, so the message is applied
/// when it is retried by a handler that works.
pub async fn failed_handler_leaves_no_trace(h: &dyn InboxHarness) {
    let m = event("bad");
    let err = h
        .applier("svc", Some("bad"))
        .apply("svc", &m, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handler { .. }), "{err}");
    assert!(
        err.chain().contains("refuses key bad"),
        "the handler's reason is kept: {}",
        err.chain()
    );
    assert!(h.effects("svc").await.is_empty());
    assert_eq!(
        h.applier("svc", None).apply("svc", &m, None).await.unwrap(),
        Applied::Done,
        "the failed attempt must not have left an inbox record"
    );
    assert_eq!(h.effects("svc").await.len(), 1);
}

/// Versions not newer than the key's last applied one are skipped, per key.
pub async fn stale_versions_are_skipped_per_key(h: &dyn InboxHarness) {
    let a = h.versioned_applier("svc", "version");
    let v = |key: &str, v: &str| event(key).with_header("version", v);
    let p1_2 = v("p1", "2");
    assert_eq!(a.apply("svc", &p1_2, None).await.unwrap(), Applied::Done);
    assert_eq!(
        a.apply("svc", &v("p1", "1"), None).await.unwrap(),
        Applied::Stale
    );
    assert_eq!(
        a.apply("svc", &v("p1", "2"), None).await.unwrap(),
        Applied::Stale,
        "an equal version is not newer"
    );
    assert_eq!(
        a.apply("svc", &v("p2", "1"), None).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        a.apply("svc", &v("p1", "3"), None).await.unwrap(),
        Applied::Done
    );
    assert_eq!(h.effects("svc").await.len(), 3);
    let err = a.apply("svc", &v("p1", "x"), None).await.unwrap_err();
    assert!(err.to_string().contains("not an integer version"), "{err}");
}

/// A dead letter keeps the message and the reason; replaying it applies it once and removes it,
/// and replaying a message that was applied meanwhile removes it without applying it again.
pub async fn dead_letters_keep_the_reason_and_replay_once(h: &dyn InboxHarness) {
    let a = h.applier("svc", None);
    let parked = event("p").with_header("traceparent", "00-ab-cd-01");
    let applied_meanwhile = event("q");
    a.dead_letter("svc", &parked, "handler kept failing: boom", 5)
        .await
        .unwrap();
    a.dead_letter("svc", &applied_meanwhile, "handler kept failing", 5)
        .await
        .unwrap();
    assert_eq!(
        a.apply("svc", &applied_meanwhile, None).await.unwrap(),
        Applied::Done
    );
    let dead = h.dead_letters("svc").await;
    assert_eq!(
        dead,
        vec![
            (Some(parked.id), "handler kept failing: boom".to_owned(), 5),
            (
                Some(applied_meanwhile.id),
                "handler kept failing".to_owned(),
                5
            )
        ]
    );
    assert!(
        a.replays("svc", 10).await.unwrap().is_empty(),
        "nothing replays before an operator asks"
    );
    h.request_replay("svc").await;
    let replays = a.replays("svc", 10).await.unwrap();
    assert_eq!(replays.len(), 2);
    assert_eq!(
        replays[0].message, parked,
        "the message comes back whole, headers included"
    );
    assert_eq!(
        a.apply("svc", &replays[0].message, Some(replays[0].id))
            .await
            .unwrap(),
        Applied::Done
    );
    assert_eq!(
        a.apply("svc", &replays[1].message, Some(replays[1].id))
            .await
            .unwrap(),
        Applied::Duplicate
    );
    assert!(h.dead_letters("svc").await.is_empty(), "replayed: removed");
    assert_eq!(h.effects("svc").await.len(), 2, "each effect once");
}

/// An undecodable delivery is parked with its raw body and the reason.
pub async fn undecodable_is_parked_with_reason(h: &dyn InboxHarness) {
    let a = h.applier("svc", None);
    a.dead_letter_undecodable("svc", "t", b"\xff\x00garbage", "missing header ce-id")
        .await
        .unwrap();
    let dead = h.dead_letters("svc").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, None);
    assert!(dead[0].1.contains("missing header ce-id"), "{:?}", dead[0]);
    assert!(
        a.replays("svc", 10).await.unwrap().is_empty(),
        "an undecodable delivery has no message to replay"
    );
}

/// Inbox rows older than the retention are purged, a batch at a time; newer ones are kept.
pub async fn inbox_retention_purges_in_batches(h: &dyn InboxHarness) {
    let a = h.applier("svc", None);
    let first = event("k");
    a.apply("svc", &first, None).await.unwrap();
    for i in 0..4 {
        a.apply("svc", &event(&format!("k{i}")), None)
            .await
            .unwrap();
    }
    assert_eq!(
        a.purge_inbox(Duration::from_secs(3600), 10).await.unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(a.purge_inbox(Duration::ZERO, 2).await.unwrap(), 2);
    assert_eq!(a.purge_inbox(Duration::ZERO, 10).await.unwrap(), 3);
    assert_eq!(
        a.apply("svc", &first, None).await.unwrap(),
        Applied::Done,
        "past the retention window a message is no longer known (why the window must outlast redelivery)"
    );
}

/// Runs every check of the inbox suite, each against a fresh harness from `make`.
#[macro_export]
macro_rules! inbox_suite {
    ($make:expr) => {
        $crate::inbox_suite!(@one $make, duplicate_is_applied_once);
        $crate::inbox_suite!(@one $make, concurrent_duplicates_apply_once);
        $crate::inbox_suite!(@one $make, services_have_separate_inboxes);
        $crate::inbox_suite!(@one $make, failed_handler_leaves_no_trace);
        $crate::inbox_suite!(@one $make, stale_versions_are_skipped_per_key);
        $crate::inbox_suite!(@one $make, dead_letters_keep_the_reason_and_replay_once);
        $crate::inbox_suite!(@one $make, undecodable_is_parked_with_reason);
        $crate::inbox_suite!(@one $make, inbox_retention_purges_in_batches);
    };
    (@one $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let harness = $make.await;
            $crate::inbox_suite::$name(&harness).await;
            $crate::inbox_suite::InboxHarness::cleanup(&harness).await;
        }
    };
}
