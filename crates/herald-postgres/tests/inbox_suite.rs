//! The inbox conformance suite on postgres.

#[path = "../../herald-testkit/support/pg_effects.rs"]
mod effects;

herald_testkit::inbox_suite!(effects::open());
