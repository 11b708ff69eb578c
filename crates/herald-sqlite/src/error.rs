//! Mapping sqlx errors onto herald's error, keeping the source.

use herald_core::Error;

/// Wraps a sqlx error, classifying lost connections, pool timeouts and busy databases as
/// transient.
pub(crate) fn db(context: &str, e: sqlx::Error) -> Error {
    let transient = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => {
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), including extended codes.
            d.code()
                .and_then(|c| c.parse::<i64>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6))
        }
        _ => false,
    };
    Error::Database {
        context: context.to_owned(),
        transient,
        source: Box::new(e),
    }
}
