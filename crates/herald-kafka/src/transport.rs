//! Publishing to and consuming from Kafka through rdkafka (librdkafka).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::{
    Delivery, Error, Kind, Message, Received, ReplayFrom, Result, SecretUrl, Subscriber,
    Subscription, Transport, Undecodable,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Mutex;
use tracing::info;

use crate::wire;

const META_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kafka transport: an idempotent producer with `acks=all`, and consumer groups that commit
/// offsets only for acknowledged messages.
pub struct KafkaTransport {
    url: SecretUrl,
    servers: String,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    topics: Mutex<HashSet<String>>,
    partitions: i32,
    replication: i32,
    create_topics: bool,
    session_timeout: Duration,
}

/// Settings of the producer that the caller may change.
fn producer(servers: &str, delivery_timeout: Duration) -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("client.id", "herald-relay")
        // Exactly one copy per send, in order per partition, even across internal retries.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "2")
        // An unknown outcome after this long: the relay releases the rows and retries.
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        )
        .create()
        .map_err(|e| Error::config(format!("cannot configure the Kafka producer: {e}")))
}

fn kafka_err(what: &str, e: KafkaError) -> Error {
    Error::unavailable(format!("Kafka ({what})"), e)
}

/// `kafka://host:9092,host2:9092` to librdkafka's `bootstrap.servers`.
fn bootstrap(url: &SecretUrl) -> Result<String> {
    if url.scheme() != "kafka" {
        return Err(Error::config(format!(
            "broker URL scheme {:?} is not kafka://",
            url.scheme()
        )));
    }
    let rest = url
        .expose()
        .strip_prefix("kafka://")
        .unwrap_or_default()
        .trim_end_matches('/');
    if rest.is_empty() || rest.contains('@') {
        return Err(Error::config(
            "a Kafka URL is kafka://host:port[,host:port...]; SASL credentials go in HERALD_KAFKA_* settings, \
             not in the URL",
        ));
    }
    Ok(rest.to_owned())
}

impl KafkaTransport {
    /// A producer and admin client for the brokers in `url` (`kafka://host:9092[,host:9092]`).
    /// librdkafka connects lazily; the first publish or subscribe reports an unreachable cluster.
    pub async fn connect(url: SecretUrl) -> Result<KafkaTransport> {
        let servers = bootstrap(&url)?;
        let producer = producer(&servers, Duration::from_secs(30))?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .create()
            .map_err(|e| Error::config(format!("cannot configure the Kafka admin client: {e}")))?;
        info!(broker = %url, "Kafka producer ready");
        Ok(KafkaTransport {
            url,
            servers,
            producer,
            admin,
            topics: Mutex::new(HashSet::new()),
            partitions: 6,
            replication: 3,
            create_topics: true,
            session_timeout: Duration::from_secs(10),
        })
    }

    /// Partitions and replication factor of topics herald creates (defaults 6 and 3). Topics
    /// that exist are used as they are.
    pub fn with_topic_layout(mut self, partitions: i32, replication: i32) -> KafkaTransport {
        self.partitions = partitions.max(1);
        self.replication = replication.max(1);
        self
    }

    /// How long librdkafka keeps trying to deliver a message before reporting an unknown outcome
    /// (`message.timeout.ms`, default 30 s); the relay then releases the row and retries later.
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Result<KafkaTransport> {
        self.producer = producer(&self.servers, timeout)?;
        Ok(self)
    }

    /// Whether herald creates missing topics through the admin API (default) or leaves that to
    /// the broker's `auto.create.topics.enable` (librdkafka's mock cluster has no admin API).
    pub fn with_topic_creation(mut self, create: bool) -> KafkaTransport {
        self.create_topics = create;
        self
    }

    /// How long a silent consumer keeps its partitions before the group gives them to another
    /// instance (`session.timeout.ms`, default 10 s).
    pub fn with_session_timeout(mut self, timeout: Duration) -> KafkaTransport {
        self.session_timeout = timeout;
        self
    }

    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        if !self.create_topics || self.topics.lock().await.contains(topic) {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            self.partitions,
            TopicReplication::Fixed(self.replication),
        );
        let results = self
            .admin
            .create_topics(
                [&new],
                &AdminOptions::new()
                    .operation_timeout(Some(META_TIMEOUT))
                    .request_timeout(Some(META_TIMEOUT)),
            )
            .await
            .map_err(|e| kafka_err("creating a topic", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::unavailable(
                        "Kafka (creating a topic)",
                        format!("topic {name}: {code}"),
                    ));
                }
            }
        }
        self.topics.lock().await.insert(topic.to_owned());
        Ok(())
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.servers)
            .set("group.id", group)
            .set("client.id", "herald-consumer")
            // Offsets are committed by `ack`, only for messages whose effects committed.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("allow.auto.create.topics", "true")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout.as_millis() / 5).max(100).to_string(),
            );
        c
    }

    /// A consumer of `group` that does not join it, to read and move the group's offsets.
    fn admin_consumer(&self, group: &str) -> Result<BaseConsumer> {
        self.consumer_config(group)
            .create()
            .map_err(|e| Error::config(format!("cannot configure a Kafka consumer: {e}")))
    }
}

/// A record the broker refused for good (too large, invalid, not allowed) versus an unknown
/// outcome (timeout, broker down, leader change), which the relay retries.
fn classify(m: &Message, e: KafkaError) -> Error {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge) => Error::unpublishable(format!(
            "message of {} bytes is over the Kafka limit (message.max.bytes): {e}",
            m.payload.len()
        )),
        Some(C::InvalidRecord | C::InvalidTopic | C::InvalidMessageSize) => {
            Error::unpublishable(format!("Kafka refused the message: {e}"))
        }
        Some(C::TopicAuthorizationFailed) => {
            Error::rejected(format!("Kafka refused the message: {e}"))
        }
        _ => kafka_err("publishing", e),
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn validate(&self, m: &Message) -> Result<()> {
        m.check_cloudevents().map_err(Error::unpublishable)?;
        wire::check_limits(m)
    }

    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            if let Err(e) = self.validate(m) {
                pending.push(Err(e));
                continue;
            }
            let topic = wire::topic(m.kind, &m.destination);
            if let Err(e) = self.ensure_topic(&topic).await {
                pending.push(Err(e));
                continue;
            }
            let mut record = FutureRecord::to(&topic)
                .payload(m.payload.as_slice())
                .headers(wire::headers(m));
            if let Some(key) = &m.ordering_key {
                record = record.key(key.as_str());
            }
            // Hand records to librdkafka in batch order; it keeps that order per partition (the
            // idempotent producer keeps it across retries too).
            let sent = loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    Err((e, back))
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                    {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => break Err(classify(m, e)),
                }
            };
            pending.push(sent);
        }
        let mut results = Vec::with_capacity(batch.len());
        for (m, p) in batch.iter().zip(pending) {
            results.push(match p {
                Err(e) => Err(e),
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(classify(m, e)),
                    Err(_) => Err(Error::unavailable(
                        "Kafka",
                        "the producer dropped the delivery report",
                    )),
                },
            });
        }
        results
    }

    async fn subscribe(&self, s: &Subscription) -> Result<Box<dyn Subscriber>> {
        wire::check_destination(&s.destination)?;
        let topic = wire::topic(s.kind, &s.destination);
        self.ensure_topic(&topic).await?;
        let consumer: StreamConsumer = self
            .consumer_config(&s.service)
            .create()
            .map_err(|e| Error::config(format!("cannot configure a Kafka consumer: {e}")))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_err("subscribing", e))?;
        Ok(Box::new(KafkaSubscriber {
            kind: s.kind,
            destination: s.destination.clone(),
            topic,
            consumer,
            unacked: HashMap::new(),
            outstanding: HashMap::new(),
            next_offset: HashMap::new(),
            committed: HashMap::new(),
            rewound: HashMap::new(),
            next_tag: 1,
        }))
    }

    async fn replay(&self, s: &Subscription, from: ReplayFrom) -> Result<()> {
        // Kafka moves a group's offsets only while the group has no members: stop the service's
        // consumers first (herald's consumer rejoins by itself when restarted).
        let topic = wire::topic(s.kind, &s.destination);
        self.ensure_topic(&topic).await?;
        let consumer = self.admin_consumer(&s.service)?;
        let partitions = partitions_of(&consumer, &topic)?;
        let mut tpl = TopicPartitionList::new();
        match from {
            ReplayFrom::Seq(n) => {
                for p in &partitions {
                    let (low, _) = consumer
                        .fetch_watermarks(&topic, *p, META_TIMEOUT)
                        .map_err(|e| kafka_err("reading offsets", e))?;
                    // Offsets are per partition: sequence n is offset n-1 in each partition.
                    let at = (n.saturating_sub(1) as i64).max(low);
                    tpl.add_partition_offset(&topic, *p, Offset::Offset(at))
                        .map_err(|e| kafka_err("building the replay position", e))?;
                }
            }
            ReplayFrom::Time(t) => {
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let mut times = TopicPartitionList::new();
                for p in &partitions {
                    times
                        .add_partition_offset(&topic, *p, Offset::Offset(ms))
                        .map_err(|e| kafka_err("building the replay position", e))?;
                }
                let found = consumer
                    .offsets_for_times(times, META_TIMEOUT)
                    .map_err(|e| kafka_err("finding offsets by time", e))?;
                for e in found.elements() {
                    let at = match e.offset() {
                        Offset::Offset(o) => o,
                        // No message at or after the time: start at the end.
                        _ => {
                            consumer
                                .fetch_watermarks(&topic, e.partition(), META_TIMEOUT)
                                .map_err(|e| kafka_err("reading offsets", e))?
                                .1
                        }
                    };
                    tpl.add_partition_offset(&topic, e.partition(), Offset::Offset(at))
                        .map_err(|e| kafka_err("building the replay position", e))?;
                }
            }
        }
        // Offsets of a group are moved by a member of it: join (the group must have no other
        // members, or they would keep their partitions), wait for the assignment, commit, leave.
        let member: BaseConsumer = self
            .consumer_config(&s.service)
            .create()
            .map_err(|e| Error::config(format!("cannot configure a Kafka consumer: {e}")))?;
        member
            .subscribe(&[&topic])
            .map_err(|e| kafka_err("joining the group to move its offsets", e))?;
        let deadline = std::time::Instant::now() + self.session_timeout * 2 + META_TIMEOUT;
        loop {
            let _ = member.poll(Duration::from_millis(100));
            let assigned = member
                .assignment()
                .map_err(|e| kafka_err("reading the assignment", e))?;
            if assigned.count() >= partitions.len() && !partitions.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::config(format!(
                    "cannot move the offsets of group {:?}: other members still hold partitions of {topic}; \
                     stop the service's consumers and replay again",
                    s.service
                )));
            }
            tokio::task::yield_now().await;
        }
        member
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| kafka_err("moving the group's offsets", e))?;
        member.unsubscribe();
        Ok(())
    }

    /// Fetches the cluster's metadata through the producer's client.
    async fn check(&self) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, META_TIMEOUT)
                .map(|_| ())
                .map_err(|e| kafka_err("checking the cluster", e))
        })
        .await
        .map_err(|e| Error::unavailable("Kafka (checking the cluster)", e))?
    }

    async fn lag(&self, s: &Subscription) -> Result<Option<u64>> {
        let topic = wire::topic(s.kind, &s.destination);
        let consumer = self.admin_consumer(&s.service)?;
        // librdkafka's calls block (up to their timeout each): off the async workers.
        tokio::task::spawn_blocking(move || group_lag(&consumer, &topic))
            .await
            .map_err(|e| Error::unavailable("Kafka (reading the lag)", e))?
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(vec![format!(
            "Kafka: herald publishes with acks=all and an idempotent producer, so a confirmed message is on every \
             in-sync replica. That survives the loss of a broker only if topics have replication.factor >= 3 and \
             min.insync.replicas >= 2 (herald creates topics with replication factor {}; it does not read \
             min.insync.replicas).",
            self.replication
        )])
    }

    fn describe(&self) -> String {
        format!("kafka {}", self.url.redacted())
    }
}

struct KafkaSubscriber {
    kind: Kind,
    destination: String,
    topic: String,
    consumer: StreamConsumer,
    /// Delivery tag to (partition, offset).
    unacked: HashMap<u64, (i32, i64)>,
    /// Per partition: offsets delivered and not yet acknowledged.
    outstanding: HashMap<i32, BTreeMap<i64, u32>>,
    /// Per partition: one past the highest offset delivered.
    next_offset: HashMap<i32, i64>,
    /// Per partition: the offset last committed.
    committed: HashMap<i32, i64>,
    /// Per partition: where a `nack` rewound to; deliveries below it are redeliveries.
    rewound: HashMap<i32, i64>,
    next_tag: u64,
}

impl KafkaSubscriber {
    /// Commits, for `partition`, the offset below which every delivered message is acknowledged.
    fn commit(&mut self, partition: i32) -> Result<()> {
        let upto = self
            .outstanding
            .get(&partition)
            .and_then(|o| o.keys().next().copied())
            .or_else(|| self.next_offset.get(&partition).copied());
        let Some(upto) = upto else { return Ok(()) };
        if self.committed.get(&partition).is_some_and(|c| *c >= upto) {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(upto))
            .map_err(|e| kafka_err("committing an offset", e))?;
        self.consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| kafka_err("committing an offset", e))?;
        self.committed.insert(partition, upto);
        Ok(())
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn next(&mut self) -> Result<Received> {
        // librdkafka reconnects and re-resolves by itself; consumer errors are reports (a topic
        // not created yet, a broker gone for a moment), not the end of the subscription.
        let msg = loop {
            match self.consumer.recv().await {
                Ok(msg) => break msg,
                Err(e) => {
                    tracing::debug!(topic = %self.topic, error = %e, "Kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let (partition, offset) = (msg.partition(), msg.offset());
        let tag = self.next_tag;
        self.next_tag += 1;
        let redelivered = self.rewound.get(&partition).is_some_and(|r| offset < *r)
            || self.committed.get(&partition).is_some_and(|c| offset < *c);
        *self
            .outstanding
            .entry(partition)
            .or_default()
            .entry(offset)
            .or_default() += 1;
        let next = self.next_offset.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
        self.unacked.insert(tag, (partition, offset));
        let body = msg.payload().unwrap_or_default().to_vec();
        let decoded = wire::decode(
            self.kind,
            &self.destination,
            msg.headers(),
            msg.key(),
            body.clone(),
        );
        Ok(match decoded {
            Ok(message) => Received::Message(Delivery {
                message,
                redelivered,
                tag,
            }),
            Err(e) => Received::Undecodable(Undecodable {
                tag,
                reason: e.to_string(),
                body,
            }),
        })
    }

    async fn ack(&mut self, tag: u64) -> Result<()> {
        let (partition, offset) = self
            .unacked
            .remove(&tag)
            .ok_or_else(|| Error::config(format!("unknown delivery tag {tag}")))?;
        if let Some(o) = self.outstanding.get_mut(&partition)
            && let Some(n) = o.get_mut(&offset)
        {
            *n -= 1;
            if *n == 0 {
                o.remove(&offset);
            }
        }
        self.commit(partition)
    }

    async fn nack(&mut self, tag: u64) -> Result<()> {
        // Kafka has no per-message "give back": rewind the partition to this message, so it and
        // everything after it come again (the inbox drops the ones already applied).
        let (partition, offset) = self
            .unacked
            .remove(&tag)
            .ok_or_else(|| Error::config(format!("unknown delivery tag {tag}")))?;
        self.consumer
            .seek(&self.topic, partition, Offset::Offset(offset), META_TIMEOUT)
            .map_err(|e| kafka_err("rewinding to a message given back", e))?;
        self.rewound.insert(partition, offset + 1);
        // Forget this and later deliveries of the partition (they come again) and hold the commit
        // at this offset until its redelivery is acknowledged.
        let o = self.outstanding.entry(partition).or_default();
        o.retain(|k, _| *k < offset);
        self.next_offset.insert(partition, offset);
        Ok(())
    }
}

fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let meta = consumer
        .fetch_metadata(Some(topic), META_TIMEOUT)
        .map_err(|e| kafka_err("reading topic metadata", e))?;
    Ok(meta
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// The lag of `consumer`'s group on `topic`: what is past its committed offsets. Blocking.
fn group_lag(consumer: &BaseConsumer, topic: &str) -> Result<Option<u64>> {
    let partitions = partitions_of(consumer, topic)?;
    if partitions.is_empty() {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, META_TIMEOUT)
        .map_err(|e| kafka_err("reading committed offsets", e))?;
    let mut lag = 0u64;
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), META_TIMEOUT)
            .map_err(|e| kafka_err("reading offsets", e))?;
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - at).max(0) as u64;
    }
    Ok(Some(lag))
}
