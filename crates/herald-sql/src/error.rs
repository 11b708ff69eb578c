//! Mapping sqlx errors onto herald's error, keeping the source.

use herald_core::{BoxError, Error};

use crate::Dialect;

/// Wraps a sqlx error of herald's own statements, transient as the dialect classifies it. A
/// reply that is not the database's protocol is transient here too: herald's statements are
/// bounded (they never hit a driver limit such as 65535 parameters), so it can only be a
/// connection cut during its handshake, or a proxy or load balancer in between that answered for
/// a server that is gone. (A URL that points at something else than a database fails at
/// start-up, where the first connection is checked.)
pub fn db<D: Dialect>(context: &str, e: sqlx::Error) -> Error {
    Error::Database {
        context: context.to_owned(),
        transient: D::is_transient(&e) || matches!(e, sqlx::Error::Protocol(_)),
        source: Box::new(e),
    }
}

/// Whether `e` is the connection's or the pool's failure rather than the statement's: a lost
/// connection, a pool timeout or shutdown, a crashed worker. Transient on every database; each
/// dialect's [`Dialect::is_transient`] adds its server's codes.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// A handler's error: a database error anywhere in its `source()` chain (a sqlx error the
/// handler wrapped with context, say) is a database error, transient as the dialect classifies
/// it, so a lost connection is an outage to wait out, not poison to park. Anything else is the
/// handler's own failure.
pub fn handler_error<D: Dialect>(e: BoxError) -> Error {
    // Kept as they are: a payload that does not decode, or a type nobody handles, is parked at
    // once by the consumer (retrying cannot help).
    // herald's own errors keep their class: a statement through the handler's context
    // (`ctx.sql`, `ctx.send`) was classified where it failed.
    let e = match e.downcast::<Error>() {
        Ok(own)
            if matches!(
                *own,
                Error::Decode { .. }
                    | Error::Unhandled { .. }
                    | Error::Database { .. }
                    | Error::Unavailable { .. }
                    | Error::Timeout { .. }
            ) =>
        {
            return *own;
        }
        Ok(own) => own as BoxError,
        Err(other) => other,
    };
    let mut transient = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
    while let Some(err) = cur {
        // The same, wrapped with context by the handler (anyhow's `.context(..)`).
        if let Some(own @ (Error::Decode { .. } | Error::Unhandled { .. })) =
            err.downcast_ref::<Error>()
        {
            return Error::Decode {
                reason: format!("{own}"),
            };
        }
        if let Some(sqlx_err) = err.downcast_ref::<sqlx::Error>() {
            transient = Some(D::is_transient(sqlx_err));
            break;
        }
        cur = err.source();
    }
    match transient {
        Some(transient) => Error::Database {
            context: "running the handler".to_owned(),
            transient,
            source: e,
        },
        None => Error::Handler { source: e },
    }
}

/// A unique violation while moving a row to the dead letters can only be two relays giving a
/// reused id the same fresh one at once: retrying picks another, so it is transient here (a
/// permanent error would stop the relay).
pub(crate) fn dead_letter_error<D: Dialect>(e: sqlx::Error) -> Error {
    let collided = D::is_unique_violation(&e);
    db::<D>("dead-lettering an outbox row", e).transient_if(collided)
}
