//! herald-testkit: the history checker, fault-injecting wrappers and a TCP chaos proxy, used by
//! herald's own tests, `herald demo`, and anyone testing their setup.

pub mod consumer_suite;
mod flaky;
mod freeze;
mod history;
pub mod inbox_suite;
mod memory_store;
pub mod poison;
mod proxy;
pub mod sql_effects;
pub mod sql_store;
pub mod suite;
pub mod transport_suite;
pub mod verify;

pub use flaky::FlakyTransport;
pub use freeze::Freezable;
pub use history::{History, Outcome, Verdict, Waits};
pub use memory_store::MemoryStore;
pub use proxy::{ChaosProxy, Direction, Link};

/// A random lowercase suffix for names of per-test schemas, queues and exchanges.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand_u64())
}

fn fastrand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}
