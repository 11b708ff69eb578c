//! herald-nats
