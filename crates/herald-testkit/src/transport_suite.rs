//! The transport conformance suite: what every broker binding must do at the [`Transport`] and
//! [`Subscriber`] level, with the capability flags of [`Capabilities`] checked both ways. Each
//! transport's test file implements [`ConsumerHarness`] once and calls [`crate::transport_suite!`]
//! beside [`crate::consumer_suite!`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use herald_core::{
    Error, Kind, Message, Received, ReplayFrom, Subscriber, Subscription, Transport,
};
use uuid::Uuid;

use crate::consumer_suite::{Capabilities, ConsumerHarness};

const WAIT: Duration = Duration::from_secs(30);

async fn publish_ok(t: &Arc<dyn Transport>, messages: &[Message]) {
    for (i, r) in t.publish(messages).await.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("publishing message {i}: {e}"));
    }
}

async fn next(s: &mut Box<dyn Subscriber>) -> Received {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("a delivery within 30 s")
        .expect("next delivery")
}

/// Waits up to `quiet` for one more delivery; `None` if none came.
async fn maybe_next(s: &mut Box<dyn Subscriber>, quiet: Duration) -> Option<Received> {
    match tokio::time::timeout(quiet, s.next()).await {
        Ok(r) => Some(r.expect("next delivery")),
        Err(_) => None,
    }
}

/// Receives and acknowledges `n` messages.
async fn take_acked(s: &mut Box<dyn Subscriber>, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = next(s).await.expect_message();
        s.ack(d.tag).await.expect("ack");
        out.push(d.message);
    }
    out
}

/// A message comes back with every attribute: id, type, source, key, headers, content type,
/// payload (binary) and time (to the millisecond).
pub async fn round_trip_keeps_every_attribute(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("attrs"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.unwrap();
    let m = Message::raw_event(
        &sub.destination,
        "OrderPlaced",
        b"\x00\xffbinary{}".to_vec(),
    )
    .with_key("order-1")
    .with_source("/shop/orders")
    .with_header(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    .with_header("tenant", "acme");
    publish_ok(&t, std::slice::from_ref(&m)).await;
    let got = next(&mut s).await.expect_message();
    s.ack(got.tag).await.unwrap();
    let back = got.message;
    assert_eq!(back.id, m.id);
    assert_eq!(back.kind, Kind::Event);
    assert_eq!(back.message_type, m.message_type);
    assert_eq!(back.source, m.source);
    assert_eq!(back.destination, m.destination);
    assert_eq!(back.ordering_key, m.ordering_key);
    assert_eq!(back.headers, m.headers);
    assert_eq!(back.content_type, m.content_type);
    assert_eq!(back.payload, m.payload);
    assert_eq!(
        back.created_at_micros() / 1000,
        m.created_at_micros() / 1000
    );
    assert!(!got.redelivered, "a first delivery is not a redelivery");
}

/// Messages of one key reach the group in publish order, across batches and interleaved keys.
pub async fn per_key_order_is_kept(h: &dyn ConsumerHarness) {
    if !h.capabilities().ordered_per_key {
        eprintln!("not applicable: this transport does not order per key");
        return;
    }
    let sub = Subscription::events(h.unique("order"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.unwrap();
    let msgs: Vec<Message> = (0..60u32)
        .map(|i| {
            Message::raw_event(&sub.destination, "E", i.to_be_bytes().to_vec())
                .with_key(format!("k{}", i % 4))
        })
        .collect();
    publish_ok(&t, &msgs[..25]).await;
    publish_ok(&t, &msgs[25..]).await;
    let got = take_acked(&mut s, msgs.len()).await;
    let mut last: HashMap<String, u32> = HashMap::new();
    for m in &got {
        let n = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
        let key = m.ordering_key.clone().unwrap();
        if let Some(prev) = last.insert(key.clone(), n) {
            assert!(prev < n, "key {key}: {n} arrived after {prev}");
        }
    }
}

/// Every subscribing service gets its own copy of each event.
pub async fn each_service_gets_every_event(h: &dyn ConsumerHarness) {
    let topic = h.unique("fanout");
    let t = h.transport().await;
    let mut a = t
        .subscribe(&Subscription::events(&topic, "billing"))
        .await
        .unwrap();
    let mut b = t
        .subscribe(&Subscription::events(&topic, "shipping"))
        .await
        .unwrap();
    let msgs: Vec<Message> = (0..5u8)
        .map(|i| Message::raw_event(&topic, "E", vec![i]))
        .collect();
    publish_ok(&t, &msgs).await;
    let ids: HashSet<Uuid> = msgs.iter().map(|m| m.id).collect();
    for s in [&mut a, &mut b] {
        let got: HashSet<Uuid> = take_acked(s, 5).await.iter().map(|m| m.id).collect();
        assert_eq!(got, ids);
    }
}

/// Two instances of one service share the messages: together they get every one, and (where the
/// broker does not rebalance) none reaches both.
pub async fn competing_instances_share_messages(h: &dyn ConsumerHarness) {
    let caps = h.capabilities();
    if !caps.competing_consumers {
        eprintln!("not applicable: no competing consumers");
        return;
    }
    let sub = Subscription::commands(h.unique("compete"), "billing");
    let t = h.transport().await;
    let a = t.subscribe(&sub).await.unwrap();
    let b = t.subscribe(&sub).await.unwrap();
    let msgs: Vec<Message> = (0..20u8)
        .map(|i| Message::raw_command(&sub.destination, "C", vec![i]).with_key(format!("k{i}")))
        .collect();
    publish_ok(&t, &msgs).await;
    // Each instance consumes on its own until it has been idle a while (a cancelled `next` may
    // have taken a delivery that then comes back after the visibility timeout, so never race
    // the two instances' `next` calls against a short timer).
    let rebalances = caps.rebalance_redelivers;
    let run = |mut s: Box<dyn Subscriber>| async move {
        let mut ids = Vec::new();
        loop {
            let quiet = Duration::from_secs(if ids.is_empty() { 15 } else { 3 });
            match tokio::time::timeout(quiet, s.next()).await {
                Ok(r) => {
                    let d = r.expect("next delivery").expect_message();
                    // A group rebalancing while the second instance joins refuses the offset
                    // commit (Kafka): the delivery comes again, which such brokers may do.
                    if let Err(e) = s.ack(d.tag).await {
                        assert!(rebalances, "ack failed: {e}");
                    }
                    ids.push(d.message.id);
                }
                Err(_) => return ids,
            }
        }
    };
    let (ids_a, ids_b) = tokio::join!(run(a), run(b));
    let mut seen: HashMap<Uuid, u32> = HashMap::new();
    for id in ids_a.into_iter().chain(ids_b) {
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), msgs.len(), "every command reached an instance");
    if !caps.rebalance_redelivers {
        assert!(
            seen.values().all(|n| *n == 1),
            "a command reached both instances: {seen:?}"
        );
    }
}

/// A delivery its instance never acknowledged (the instance crashed) reaches another instance;
/// an acknowledged one does not come back.
pub async fn unacknowledged_goes_to_another_instance(h: &dyn ConsumerHarness) {
    let caps = h.capabilities();
    let sub = Subscription::events(h.unique("crash"), "svc");
    let t = h.transport().await;
    let mut first = t.subscribe(&sub).await.unwrap();
    let done = Message::raw_event(&sub.destination, "E", b"acked".to_vec()).with_key("k");
    let lost = Message::raw_event(&sub.destination, "E", b"unacked".to_vec()).with_key("k");
    publish_ok(&t, &[done.clone(), lost.clone()]).await;
    let d = next(&mut first).await.expect_message();
    assert_eq!(d.message.id, done.id);
    first.ack(d.tag).await.unwrap();
    let d = next(&mut first).await.expect_message();
    assert_eq!(d.message.id, lost.id);
    drop(first); // crash: no ack, no nack
    let mut second = h.transport().await.subscribe(&sub).await.unwrap();
    let again = next(&mut second).await.expect_message();
    assert_eq!(
        again.message.id, lost.id,
        "the acknowledged message came back"
    );
    if caps.flags_redeliveries {
        assert!(again.redelivered, "the broker should flag the redelivery");
    }
    second.ack(again.tag).await.unwrap();
    assert!(
        maybe_next(&mut second, Duration::from_secs(1))
            .await
            .is_none(),
        "nothing else is left"
    );
}

/// A delivery given back with `nack` is delivered again.
pub async fn nack_redelivers(h: &dyn ConsumerHarness) {
    let caps = h.capabilities();
    let sub = Subscription::events(h.unique("nack"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.unwrap();
    let m = Message::raw_event(&sub.destination, "E", b"x".to_vec()).with_key("k");
    publish_ok(&t, std::slice::from_ref(&m)).await;
    let d = next(&mut s).await.expect_message();
    s.nack(d.tag).await.unwrap();
    let again = next(&mut s).await.expect_message();
    assert_eq!(again.message.id, m.id);
    if caps.flags_redeliveries {
        assert!(again.redelivered);
    }
    s.ack(again.tag).await.unwrap();
}

/// Publishing one message twice (a relay that crashed between confirmation and mark) delivers
/// it once where the broker deduplicates, twice where it does not: the flag must be true.
pub async fn republished_message_matches_the_dedup_flag(h: &dyn ConsumerHarness) {
    let dedup = h.capabilities().broker_dedup;
    let sub = Subscription::events(h.unique("dedup"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.unwrap();
    let m = Message::raw_event(&sub.destination, "E", b"x".to_vec()).with_key("k");
    publish_ok(&t, std::slice::from_ref(&m)).await;
    publish_ok(&t, std::slice::from_ref(&m)).await;
    let expected = if dedup { 1 } else { 2 };
    for d in take_acked(&mut s, expected).await {
        assert_eq!(d.id, m.id);
    }
    assert!(
        maybe_next(&mut s, Duration::from_secs(2)).await.is_none(),
        "broker_dedup={dedup} but the message arrived more than {expected} time(s)"
    );
}

/// Where the broker keeps consumed messages, a rewound group gets them again; elsewhere replay
/// says why it cannot.
pub async fn replay_matches_the_flag(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("replay"), "svc");
    let t = h.transport().await;
    if !h.capabilities().replay {
        let err = t.replay(&sub, ReplayFrom::Seq(1)).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(err.to_string().contains("cannot replay"), "{err}");
        return;
    }
    let mut s = t.subscribe(&sub).await.unwrap();
    let early: Vec<Message> = (0..4u8)
        .map(|i| Message::raw_event(&sub.destination, "E", vec![i]).with_key("k"))
        .collect();
    publish_ok(&t, &early).await;
    take_acked(&mut s, 4).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let split = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late: Vec<Message> = (4..6u8)
        .map(|i| Message::raw_event(&sub.destination, "E", vec![i]).with_key("k"))
        .collect();
    publish_ok(&t, &late).await;
    take_acked(&mut s, 2).await;
    drop(s);
    let ids = |ms: &[Message]| ms.iter().map(|m| m.id).collect::<Vec<_>>();
    t.replay(&sub, ReplayFrom::Seq(1)).await.unwrap();
    let mut s = t.subscribe(&sub).await.unwrap();
    let again = ids(&take_acked(&mut s, 6).await);
    assert_eq!(
        again,
        ids(&[early, late.clone()].concat()),
        "from the start, in order"
    );
    drop(s);
    if !h.replays_by_time() {
        eprintln!(
            "replay from a time not checked: the test broker cannot look messages up by time"
        );
        return;
    }
    t.replay(&sub, ReplayFrom::Time(split)).await.unwrap();
    let mut s = t.subscribe(&sub).await.unwrap();
    let from_time = ids(&take_acked(&mut s, 2).await);
    assert_eq!(
        from_time,
        ids(&late),
        "from the time on: only what came after it"
    );
    assert!(
        maybe_next(&mut s, Duration::from_secs(2)).await.is_none(),
        "nothing from before the time"
    );
}

/// A payload over the broker's limit is refused for that message alone, with a reason that says
/// so, and as a rejection (not an outage the relay would retry forever); its neighbours go out.
pub async fn oversized_payload_is_rejected_alone(h: &dyn ConsumerHarness) {
    let Some(max) = h.capabilities().max_payload else {
        eprintln!("not applicable: the broker's limit is too large to exercise here");
        return;
    };
    let sub = Subscription::events(h.unique("big"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.unwrap();
    let small = Message::raw_event(&sub.destination, "E", b"ok".to_vec()).with_key("a");
    let big = Message::raw_event(&sub.destination, "E", vec![7u8; max + 1]).with_key("b");
    let after = Message::raw_event(&sub.destination, "E", b"ok too".to_vec()).with_key("c");
    let results = t.publish(&[small.clone(), big, after.clone()]).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let err = results[1].as_ref().unwrap_err();
    assert!(
        !err.is_transient(),
        "an oversized message is refused for good: {err}"
    );
    let text = err.to_string().to_lowercase();
    assert!(
        text.contains("large") || text.contains("limit") || text.contains("size"),
        "the reason names the size limit: {err}"
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let got: HashSet<Uuid> = take_acked(&mut s, 2).await.iter().map(|m| m.id).collect();
    assert_eq!(got, HashSet::from([small.id, after.id]));
}

/// Something that is not a herald message is handed over as undecodable, with a reason, and the
/// subscription goes on.
pub async fn undecodable_is_surfaced_with_a_reason(h: &dyn ConsumerHarness) {
    let sub = Subscription::events(h.unique("garbage"), "svc");
    let t = h.transport().await;
    let mut s = t.subscribe(&sub).await.unwrap();
    h.publish_garbage(&sub).await;
    // Keyed like the garbage the harnesses publish, so a partitioned broker keeps the two in order.
    let good = Message::raw_event(&sub.destination, "E", b"x".to_vec()).with_key("k");
    publish_ok(&t, std::slice::from_ref(&good)).await;
    match next(&mut s).await {
        Received::Undecodable(u) => {
            assert!(!u.reason.is_empty());
            s.ack(u.tag).await.unwrap();
        }
        Received::Message(d) => panic!("garbage decoded as {:?}", d.message),
    }
    assert_eq!(take_acked(&mut s, 1).await[0].id, good.id);
}

/// A command sent before its owner subscribed is rejected where the flag says so, and otherwise
/// kept for the owner.
pub async fn command_before_owner_matches_the_flag(h: &dyn ConsumerHarness) {
    let sub = Subscription::commands(h.unique("owner"), "billing");
    let t = h.transport().await;
    let c = Message::raw_command(&sub.destination, "Charge", b"{}".to_vec());
    let result = t.publish(std::slice::from_ref(&c)).await.remove(0);
    if h.capabilities().commands_need_owner {
        let err = result.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        return;
    }
    result.unwrap();
    let mut s = t.subscribe(&sub).await.unwrap();
    assert_eq!(take_acked(&mut s, 1).await[0].id, c.id);
}

/// `declare` creates what a subscription needs without consuming: an event and a command
/// published after it (the command accepted, even where commands need an owner) reach the
/// subscriber opened later, and a message already waiting is not taken (and, where the broker
/// flags redeliveries, not flagged) by declaring again.
pub async fn declare_prepares_without_consuming(h: &dyn ConsumerHarness) {
    let t = h.transport().await;
    let events = Subscription::events(h.unique("declared"), "svc");
    let commands = Subscription::commands(h.unique("declared-q"), "owner");
    t.declare(&events).await.unwrap();
    t.declare(&commands).await.unwrap();
    let e = Message::raw_event(&events.destination, "E", b"1".to_vec());
    let c = Message::raw_command(&commands.destination, "C", b"2".to_vec());
    publish_ok(&t, std::slice::from_ref(&e)).await;
    publish_ok(&t, std::slice::from_ref(&c)).await;
    // Declaring again while they wait takes neither.
    t.declare(&events).await.unwrap();
    t.declare(&commands).await.unwrap();
    for (sub, want) in [(&events, &e), (&commands, &c)] {
        let mut s = t.subscribe(sub).await.unwrap();
        let d = next(&mut s).await.expect_message();
        s.ack(d.tag).await.unwrap();
        assert_eq!(d.message.id, want.id);
        if h.capabilities().flags_redeliveries {
            assert!(
                !d.redelivered,
                "declaring delivered {:?} once already",
                want.message_type
            );
        }
    }
}

/// The relay over this transport: a command refused because its owner is not there yet is not
/// overtaken by the later messages of its key (nothing of the key after it is delivered while it
/// waits), other keys flow, and once the owner subscribes the command arrives and then the rest
/// of its key, in order.
pub async fn refused_command_is_not_overtaken_by_its_key(h: &dyn ConsumerHarness) {
    use herald_core::{Relay, RelayConfig};
    let caps = h.capabilities();
    let topic = h.unique("after-command");
    let queue = h.unique("late-owner");
    let t = h.transport().await;
    let mut events = t
        .subscribe(&Subscription::events(&topic, "svc"))
        .await
        .unwrap();
    let store = Arc::new(crate::MemoryStore::new());
    let ev = |ty: &str, n: u8, key: &str| Message::raw_event(&topic, ty, vec![n]).with_key(key);
    store.enqueue(ev("Before", 0, "order-1"));
    store.enqueue(Message::raw_command(&queue, "Charge", vec![1]).with_key("order-1"));
    store.enqueue(ev("After", 2, "order-1"));
    store.enqueue(ev("After", 3, "order-1"));
    store.enqueue(ev("Other", 4, "order-2"));
    let config = RelayConfig {
        relay_id: "suite".to_owned(),
        workers: 1,
        max_attempts: 1000,
        retry_window: Duration::ZERO,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        retry_delay_max: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let relay = Relay::new(store.clone(), t.clone(), config).unwrap();
    let payloads = |ms: Vec<Message>| ms.into_iter().map(|m| m.payload[0]).collect::<Vec<u8>>();
    let drain = |relay: Relay, store: Arc<crate::MemoryStore>| async move {
        for _ in 0..500 {
            relay
                .tick()
                .await
                .expect("a tick never fails on a refused message");
            if store.pending() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} rows still pending", store.pending());
    };
    if caps.commands_need_owner {
        for _ in 0..10 {
            relay.tick().await.expect("tick");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut first = payloads(take_acked(&mut events, 2).await);
        first.sort_unstable();
        assert_eq!(first, [0, 4], "the key's head and the other key went out");
        assert!(
            maybe_next(&mut events, Duration::from_secs(1))
                .await
                .is_none(),
            "a message sent after a command its broker refused"
        );
        assert_eq!(store.pending(), 3, "the command and the two after it wait");
        let mut owner = t
            .subscribe(&Subscription::commands(&queue, "billing"))
            .await
            .unwrap();
        drain(relay, store).await;
        assert_eq!(payloads(take_acked(&mut owner, 1).await), [1]);
        assert_eq!(payloads(take_acked(&mut events, 2).await), [2, 3]);
    } else {
        let mut owner = t
            .subscribe(&Subscription::commands(&queue, "billing"))
            .await
            .unwrap();
        drain(relay, store).await;
        let got = payloads(take_acked(&mut events, 4).await);
        let key1: Vec<u8> = got.iter().copied().filter(|p| *p != 4).collect();
        assert_eq!(key1, [0, 2, 3], "{got:?}");
        assert_eq!(payloads(take_acked(&mut owner, 1).await), [1]);
    }
}

/// Checks that `docs/BACKENDS.md` shows `caps` in the row of `backend`, so the published matrix
/// is what the suite verified. Columns: ordered per key, competing consumers, broker dedup,
/// replay, flags redeliveries, commands need owner, rebalance redelivers.
pub fn assert_documented(backend: &str, caps: &Capabilities) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/BACKENDS.md");
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let row = doc
        .lines()
        .find(|l| l.starts_with(&format!("| {backend} |")))
        .unwrap_or_else(|| panic!("docs/BACKENDS.md has no row \"| {backend} |\""));
    let cells: Vec<&str> = row.split('|').map(str::trim).skip(2).collect();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let expected = [
        yes(caps.ordered_per_key),
        yes(caps.competing_consumers),
        yes(caps.broker_dedup),
        yes(caps.replay),
        yes(caps.flags_redeliveries),
        yes(caps.commands_need_owner),
        yes(caps.rebalance_redelivers),
    ];
    for (i, want) in expected.iter().enumerate() {
        let got = cells.get(i).copied().unwrap_or("");
        assert!(
            got.starts_with(want),
            "docs/BACKENDS.md row for {backend}, column {}: says {got:?}, the tested flag is {want:?}",
            i + 2
        );
    }
}

/// Runs every check of the transport suite, each against a fresh harness from `make`, plus the
/// check that docs/BACKENDS.md shows this backend's flags under `name`.
#[macro_export]
macro_rules! transport_suite {
    ($name:literal, $make:expr) => {
        mod transport_suite {
            use super::*;
            $crate::transport_suite!(@one $make, round_trip_keeps_every_attribute);
            $crate::transport_suite!(@one $make, per_key_order_is_kept);
            $crate::transport_suite!(@one $make, each_service_gets_every_event);
            $crate::transport_suite!(@one $make, competing_instances_share_messages);
            $crate::transport_suite!(@one $make, unacknowledged_goes_to_another_instance);
            $crate::transport_suite!(@one $make, nack_redelivers);
            $crate::transport_suite!(@one $make, republished_message_matches_the_dedup_flag);
            $crate::transport_suite!(@one $make, replay_matches_the_flag);
            $crate::transport_suite!(@one $make, oversized_payload_is_rejected_alone);
            $crate::transport_suite!(@one $make, undecodable_is_surfaced_with_a_reason);
            $crate::transport_suite!(@one $make, command_before_owner_matches_the_flag);
            $crate::transport_suite!(@one $make, refused_command_is_not_overtaken_by_its_key);
            $crate::transport_suite!(@one $make, declare_prepares_without_consuming);

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poison_messages_are_refused_alone() {
                let harness = $make.await;
                $crate::poison::messages_are_refused_alone(&harness).await;
                $crate::consumer_suite::ConsumerHarness::cleanup(&harness).await;
            }

            #[tokio::test]
            async fn capabilities_are_documented() {
                let harness = $make.await;
                $crate::transport_suite::assert_documented(
                    $name,
                    &$crate::consumer_suite::ConsumerHarness::capabilities(&harness),
                );
                $crate::consumer_suite::ConsumerHarness::cleanup(&harness).await;
            }
        }
    };
    (@one $make:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let harness = $make.await;
            $crate::transport_suite::$name(&harness).await;
            $crate::consumer_suite::ConsumerHarness::cleanup(&harness).await;
        }
    };
}
