//! Brokers, seen from herald: publish with confirmation, subscribe with acknowledgement.

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::{Kind, Message};

/// Publishes messages and reports, per message, whether the broker took responsibility for it.
///
/// Contract: `publish` returns exactly one result per input message, in input order. `Ok(())`
/// means the broker positively confirmed the message (persisted it as it is configured to). An
/// error that [`Error::is_transient`] means the outcome is unknown (the message may or may not
/// be on the broker): the relay publishes it again later, so a duplicate is possible and a loss is
/// not. A non-transient error means the broker refused this message ([`Error::Rejected`]).
/// Messages of one ordering key are handed to the broker in input order, and a key's message may
/// be confirmed only if the one before it in the batch reached the broker: either the connection
/// cannot lose one message and carry the next (one channel or pipeline, never re-established in
/// the middle of a batch), or the transport waits for each confirmation before sending the key's
/// next message (NATS, whose client reconnects by itself).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes `batch` and waits for the broker's confirmations. A message that fails
    /// [`Transport::validate`] is not sent; its result is that error.
    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>>;

    /// Checks `m` against this broker's wire before anything is sent: the CloudEvents rules
    /// ([`Message::check_cloudevents`]) and the transport's own limits (name lengths, header
    /// sizes, allowed characters). Fails with [`Error::Unpublishable`] naming the limit. Cheap
    /// and pure; the relay calls it for every claimed row and dead-letters what fails, so no
    /// client crate ever sees (and panics on) a value it cannot encode.
    fn validate(&self, m: &Message) -> Result<()> {
        m.check_cloudevents().map_err(Error::unpublishable)
    }

    /// Opens a subscription. Events reach every subscribing service (each `service` gets its own
    /// copy); commands reach exactly one instance of the owning service.
    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Subscriber>>;

    /// Creates on the broker what `subscription` needs (the service's queue and bindings, its
    /// stream and group, a command queue's owner) without consuming anything, so that what is
    /// published from now on reaches it. The default subscribes and drops the subscriber, which
    /// is right for brokers whose subscribers take nothing until their first `next`; a broker that
    /// pushes deliveries at once (RabbitMQ) declares instead.
    async fn declare(&self, subscription: &Subscription) -> Result<()> {
        drop(self.subscribe(subscription).await?);
        Ok(())
    }

    /// One round trip to the broker, to tell whether it answers: the relay calls it (under a
    /// timeout) when it has had nothing to publish for a while, so `/readyz` notices a broker
    /// that went away while the outbox was idle. The default answers `Ok` without asking.
    async fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Broker settings under which a confirmed message could vanish; sentences, empty when safe.
    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Rewinds `subscription`'s consumer group so that everything from `from` on is delivered
    /// again. Only log brokers can; the others answer [`Error::Config`]. The consumers' inbox
    /// keeps already-applied effects from being applied twice.
    async fn replay(&self, subscription: &Subscription, from: ReplayFrom) -> Result<()> {
        let _ = (subscription, from);
        Err(Error::config(format!(
            "{} cannot replay: it does not keep consumed messages",
            self.describe()
        )))
    }

    /// How many messages `subscription`'s group has not acknowledged yet, where the broker can
    /// tell (`None` where it cannot).
    async fn lag(&self, subscription: &Subscription) -> Result<Option<u64>> {
        let _ = subscription;
        Ok(None)
    }

    /// How long the broker takes to deliver again what a lost subscription had received and not
    /// acknowledged (its ack wait or visibility timeout). Zero where nothing waits: RabbitMQ puts
    /// such messages back at the head of the queue when the channel closes, Kafka resumes from the
    /// committed offset. The consumer waits this long before it subscribes again, so those
    /// messages come back before the later messages of their keys rather than after them.
    fn redelivery_delay(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// A short name for logs, e.g. `rabbitmq amqp://guest:***@127.0.0.1:5672/%2f`. No secrets.
    fn describe(&self) -> String;
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// From this sequence number of the log on (1 is the first message).
    Seq(u64),
    /// From the first message stored at or after this time.
    Time(std::time::SystemTime),
}

/// What to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Events from a topic or commands from the owner's queue.
    pub kind: Kind,
    /// The topic (events) or queue (commands).
    pub destination: String,
    /// The consuming service: its consumer group. Instances of one service compete for messages.
    pub service: String,
    /// Most messages delivered and not yet acknowledged.
    pub prefetch: u16,
}

impl Subscription {
    /// Every event published to `topic`, for `service`.
    pub fn events(topic: impl Into<String>, service: impl Into<String>) -> Subscription {
        Subscription {
            kind: Kind::Event,
            destination: topic.into(),
            service: service.into(),
            prefetch: 64,
        }
    }

    /// The commands sent to `queue`, which `service` owns.
    pub fn commands(queue: impl Into<String>, service: impl Into<String>) -> Subscription {
        Subscription {
            kind: Kind::Command,
            destination: queue.into(),
            service: service.into(),
            prefetch: 64,
        }
    }
}

/// A message handed to a consumer, to be acknowledged once its effects are committed.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Whether the broker says it delivered this message before.
    pub redelivered: bool,
    /// Broker-specific handle for [`Subscriber::ack`] and [`Subscriber::nack`].
    pub tag: u64,
}

/// A delivery whose message could not be decoded. The consumer parks it (with the raw body and
/// the reason) and acknowledges it, so one bad message cannot block the subscription.
#[derive(Debug, Clone)]
pub struct Undecodable {
    /// Broker-specific handle for [`Subscriber::ack`].
    pub tag: u64,
    /// What was wrong with it.
    pub reason: String,
    /// The raw body.
    pub body: Vec<u8>,
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Received {
    /// A decoded message.
    Message(Delivery),
    /// Something that is not a herald message.
    Undecodable(Undecodable),
}

impl Received {
    /// The tag to acknowledge.
    pub fn tag(&self) -> u64 {
        match self {
            Received::Message(d) => d.tag,
            Received::Undecodable(u) => u.tag,
        }
    }

    /// The decoded message, if it is one (panics otherwise; for tests).
    #[doc(hidden)]
    pub fn expect_message(self) -> Delivery {
        match self {
            Received::Message(d) => d,
            Received::Undecodable(u) => panic!(
                "expected a message, got an undecodable delivery: {}",
                u.reason
            ),
        }
    }
}

/// A stream of deliveries for one subscription. Deliveries are handed out in the order the
/// broker keeps them; a subscriber is used by one task at a time.
#[async_trait]
pub trait Subscriber: Send {
    /// Waits for the next delivery.
    async fn next(&mut self) -> Result<Received>;

    /// Acknowledges a delivery: the broker will not deliver it to this service again. Call it
    /// only after the delivery's effects are committed.
    async fn ack(&mut self, tag: u64) -> Result<()>;

    /// Gives a delivery back for redelivery.
    async fn nack(&mut self, tag: u64) -> Result<()>;
}

/// Helper for transports: a transient error for every message of a batch.
#[doc(hidden)]
pub fn fail_all(len: usize, make: impl Fn() -> Error) -> Vec<Result<()>> {
    (0..len).map(|_| Err(make())).collect()
}
