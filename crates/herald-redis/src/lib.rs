//! herald's Redis Streams transport, through the `redis` crate.
//!
//! * **Events** on topic `T` are entries of the stream `herald:events:T`; each subscribing
//!   service is a consumer group named after it (created at the stream's start, so a new service
//!   reads what the stream still holds). Instances of one service compete within the group.
//! * **Commands** to queue `Q` are entries of `herald:commands:Q`, consumed by the owning
//!   service's group. Redis cannot stop a second group from reading them: ownership is a
//!   convention, as on Kafka.
//! * Publishing is one `XADD` per message, pipelined on one connection, so a key's messages enter
//!   the stream in order; a reply is the confirmation. Herald never trims a stream (no `MAXLEN`):
//!   unconsumed entries stay until an operator trims (`XTRIM ... MINID`).
//! * A delivery unacknowledged for the visibility timeout (a crashed consumer's, or one given
//!   back with `nack`) is taken over by `XAUTOCLAIM` and delivered again, flagged redelivered.
//! * CloudEvents attributes travel as `ce-` fields, the payload as `data`.
//! * Redis keeps no per-message id index: a re-published message (a relay crash between the
//!   confirmation and its mark) is a second entry; consumers' inboxes drop it.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Message, SecretUrl, Transport};
//! let redis = herald_redis::RedisTransport::connect(SecretUrl::parse("broker", "redis://127.0.0.1:6379")?).await?;
//! let results = redis.publish(&[Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())]).await;
//! # Ok(()) }
//! ```

mod transport;
pub mod wire;

pub use transport::RedisTransport;
