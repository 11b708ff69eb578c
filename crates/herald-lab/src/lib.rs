//! herald's lab: `herald demo` (the order story under an outage), `herald bench` (drain rate,
//! latency and database cost against same-run baselines) and `herald verify` (a workload under
//! injected faults, checked for loss, phantoms, reordering and double effects).
//!
//! It lives apart from the product so that a relay built without the `lab` feature links
//! neither librdkafka nor the test kit. The `herald` binary (crate herald-cli) runs these
//! commands when built with `lab`, its default.

pub mod bench;
pub mod demo;
pub mod verify;
