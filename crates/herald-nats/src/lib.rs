//! herald's NATS JetStream transport, through async-nats.
//!
//! * **Events** on topic `T` go to subject `herald.events.T`, kept by the stream
//!   `HERALD_EVENTS_T` (limits retention, file storage), created on first use. Each subscribing
//!   service has a durable pull consumer named after it: every service gets every event, instances
//!   of one service share the consumer and compete.
//! * **Commands** to queue `Q` go to subject `herald.commands.Q`, kept by the work-queue stream
//!   `HERALD_COMMANDS_Q`, which only the owning service creates (by subscribing). A command sent
//!   before its owner exists fails with "no stream", a rejection, not a silent drop.
//! * Every message carries `Nats-Msg-Id` = its id, so JetStream drops a re-publish of the same id
//!   within the stream's duplicate window (2 minutes): a relay that crashed between the broker's
//!   acknowledgement and its mark usually causes no duplicate at all on NATS.
//! * CloudEvents attributes travel as `ce-` headers (binary mode), as on RabbitMQ.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Message, SecretUrl, Transport};
//! let nats = herald_nats::NatsTransport::connect(SecretUrl::parse("broker", "nats://127.0.0.1:4222")?).await?;
//! let results = nats.publish(&[Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())]).await;
//! # Ok(()) }
//! ```

mod transport;
pub mod wire;

pub use transport::NatsTransport;
