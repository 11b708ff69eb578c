//! Mapping sqlx errors onto herald's error, keeping the source.

use herald_core::Error;

/// Wraps a sqlx error; lost connections, pool timeouts, serialization failures, deadlocks and
/// server shutdowns are transient.
pub(crate) fn db(context: &str, e: sqlx::Error) -> Error {
    let transient = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            c.starts_with("08")
                || matches!(c.as_ref(), "40001" | "40P01" | "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    };
    Error::Database {
        context: context.to_owned(),
        transient,
        source: Box::new(e),
    }
}
