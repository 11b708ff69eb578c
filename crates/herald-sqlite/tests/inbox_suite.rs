//! The inbox conformance suite on sqlite.

#[path = "../../herald-testkit/support/sqlite_effects.rs"]
mod effects;

herald_testkit::inbox_suite!(effects::open());
