//! herald's RabbitMQ transport, through lapin, with publisher confirms.
//!
//! ```no_run
//! # async fn example() -> herald_core::Result<()> {
//! use herald_core::{Message, SecretUrl, Transport};
//! let url = SecretUrl::parse("broker", "amqp://guest:guest@127.0.0.1:5672/%2f")?;
//! let rabbit = herald_rabbitmq::RabbitTransport::new(url)?;
//! let results = rabbit.publish(&[Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())]).await;
//! assert!(results[0].is_ok());
//! # Ok(()) }
//! ```

mod transport;
pub mod wire;

pub use transport::RabbitTransport;
