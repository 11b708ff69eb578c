//! Mapping sqlx errors onto herald's error, keeping the source.

use herald_core::Error;
use sqlx::mysql::MySqlDatabaseError;

/// Server error numbers that mean "try again": deadlock (1213), lock wait timeout (1205), too many
/// connections (1040), server shutdown (1053), connection killed (1927, MariaDB), query
/// interrupted (1317), read-only during a failover (1290, 1836), idle disconnect (4031, MySQL).
const TRANSIENT: [u16; 9] = [1213, 1205, 1040, 1053, 1927, 1317, 1290, 1836, 4031];

/// Wraps a sqlx error; lost connections, pool timeouts, deadlocks, lock wait timeouts and server
/// shutdowns are transient.
pub(crate) fn db(context: &str, e: sqlx::Error) -> Error {
    let transient = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|m| TRANSIENT.contains(&m.number())),
        _ => false,
    };
    Error::Database {
        context: context.to_owned(),
        transient,
        source: Box::new(e),
    }
}

/// Whether `e` is a duplicate-key error (1062).
pub(crate) fn is_duplicate_key(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d)
        if d.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|m| m.number() == 1062))
}
