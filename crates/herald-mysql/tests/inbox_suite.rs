//! The inbox conformance suite on MySQL/MariaDB (a fresh database per test).
//!
//! Needs the server at `HERALD_TEST_MYSQL` (default `mysql://root@127.0.0.1:3306/test`).

#[path = "../../herald-testkit/support/mysql_effects.rs"]
mod effects;

herald_testkit::inbox_suite!(effects::open());
