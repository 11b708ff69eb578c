//! herald-core: the message model, the storage and transport traits, and the relay engine.
//!
//! herald makes sure that an event whose database transaction committed reaches the broker, and
//! that the event of a rolled-back transaction never does. The application writes the event into
//! an outbox table in its own transaction; the [`Relay`] claims outbox rows, publishes them, waits
//! for the broker's confirmation, and only then marks them done.
//!
//! ```
//! use herald_core::{Message, Kind};
//!
//! let msg = Message::raw_event("orders", "OrderPlaced", br#"{"order":42}"#.to_vec())
//!     .with_key("order-42")
//!     .with_source("/shop/orders");
//! assert_eq!(msg.kind, Kind::Event);
//! assert_eq!(msg.id.get_version_num(), 7);
//! ```

#![warn(missing_docs)]

pub mod backoff;
pub mod cloudevents;
pub mod config;
pub mod consumer;
pub mod error;
pub mod fallback;
pub mod membership;
pub mod memory;
pub mod message;
pub mod relay;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod transport;
pub mod typed;

/// What a backend (an outbox store or a transport) is written with, beyond the traits: not
/// needed to use herald, and not part of its stable surface.
#[doc(hidden)]
pub mod driver {
    pub use crate::store::{OUTBOX_COLUMNS, RawRow, with_dead_letters};
    pub use crate::transport::fail_all;
}

pub use config::{Identifier, RelayConfig, SecretUrl};
pub use consumer::{Applied, Apply, Consumer, ConsumerConfig};
pub use error::{BoxError, Error, Result};
pub use fallback::{FallbackPublisher, FallbackReport, Park};
pub use membership::{Heartbeat, Holdings, RelayInfo, RelayState, RelayStatus};
pub use message::{Kind, Message};
pub use relay::{Failpoint, Relay, TickReport, Waker};
pub use store::{Claim, DestinationStats, Lease, OutboxRow, OutboxStore, RejectionOutcome};
pub use transport::{
    Delivery, Received, ReplayFrom, Subscriber, Subscription, Transport, Undecodable,
};
pub use typed::{Codec, Json};
