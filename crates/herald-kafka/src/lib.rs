//! herald's Kafka transport, through rdkafka (librdkafka, built from source).
//!
//! * **Events** on topic `T` go to the Kafka topic `T`; **commands** to queue `Q` go to
//!   `commands.Q`. Each subscribing service is a consumer group named after it. Kafka cannot keep
//!   a second group from reading a command topic: single ownership of commands is a convention
//!   here, not enforced by the broker.
//! * The producer is idempotent with `acks=all`; herald waits for each message's delivery report
//!   before the relay marks it published. The record key is the ordering key, so a key's messages
//!   land in one partition, in order.
//! * Consumers never auto-commit: `ack` commits, per partition, the offset below which every
//!   delivered message has been acknowledged, i.e. only after the handler's transaction
//!   committed. `nack` rewinds the partition to the message.
//! * `replay` moves the group's committed offsets (from a sequence number, taken per partition as
//!   offset n-1, or from a time); Kafka allows it only while the group has no running members.
//! * CloudEvents attributes travel as `ce_` headers (the Kafka protocol binding, binary mode).
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Message, SecretUrl, Transport};
//! let kafka = herald_kafka::KafkaTransport::connect(SecretUrl::parse("broker", "kafka://127.0.0.1:9092")?).await?;
//! let results = kafka.publish(&[Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())]).await;
//! # Ok(()) }
//! ```

mod mock;
mod transport;
pub mod wire;

pub use mock::MockKafka;
pub use transport::KafkaTransport;
