//! herald's error type, shared by the traits every backend implements.

use std::time::Duration;

/// A boxed error source, kept so callers can walk the chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with herald's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in herald. Match on [`Error::is_transient`] to decide between
/// retrying (with backoff) and dead-lettering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration is invalid; the message says what to change. Never transient.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A database or broker could not be reached or dropped the connection. Transient.
    #[error("{what} unavailable")]
    Unavailable {
        /// What was being reached, with any password already redacted.
        what: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },

    /// An operation did not finish in time; its outcome is unknown. Transient.
    #[error("{what} timed out after {after:?}; outcome unknown")]
    Timeout {
        /// What timed out.
        what: String,
        /// How long was waited.
        after: Duration,
    },

    /// A database statement failed.
    #[error("database error while {context}")]
    Database {
        /// What herald was doing.
        context: String,
        /// Whether retrying may succeed (lost connection, serialization failure, pool timeout).
        transient: bool,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// A table herald needs is missing or does not have the documented columns.
    #[error(
        "table {table} is missing or incomplete ({detail}); run `herald migrate` or fix the table to match docs/OUTBOX.md"
    )]
    Schema {
        /// The table.
        table: String,
        /// What is wrong with it.
        detail: String,
    },

    /// The broker refused this one message for a reason that retrying will not fix soon
    /// (too large, unroutable). Poison: bounded attempts, then the dead-letter table.
    #[error("message rejected: {reason}")]
    Rejected {
        /// Why, in the broker's or herald's words.
        reason: String,
    },

    /// The message can never be published as it is: it breaks a CloudEvents rule or a limit of
    /// the broker's wire (a name over 255 bytes on AMQP, headers over the frame size, a newline in
    /// a NATS header). Retrying cannot help, so the relay dead-letters it at once; the reason
    /// names the field and the limit.
    #[error("message cannot be published: {reason}")]
    Unpublishable {
        /// Which field breaks which limit.
        reason: String,
    },

    /// A message could not be decoded from the wire or from a row.
    #[error("cannot decode message: {reason}")]
    Decode {
        /// What was wrong.
        reason: String,
    },

    /// A consumer received a message type it has no handler for, under a rule that parks those
    /// (commands, by default: every command sent to a queue is its owner's to handle). Parked at
    /// once; replay it (`herald dlq replay`) once a handler is deployed.
    #[error("no handler for message type {message_type:?}; this service handles {handled}")]
    Unhandled {
        /// The message's type (at most 80 characters of it).
        message_type: String,
        /// The types it does handle, comma-separated.
        handled: String,
    },

    /// A consumer's handler failed. Retried up to the consumer's attempt limit, then the message is
    /// dead-lettered with this error as the reason.
    #[error("handler failed")]
    Handler {
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// This relay's lease on claimed rows expired and another relay may own them now; the
    /// operation was refused so that it cannot act out of turn.
    #[error("lease {token} lost: expired or taken over by another relay")]
    LeaseLost {
        /// The fencing token of the lost lease.
        token: i64,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } => true,
            Error::Database { transient, .. } => *transient,
            Error::Config(_)
            | Error::Schema { .. }
            | Error::Rejected { .. }
            | Error::Unpublishable { .. }
            | Error::Decode { .. }
            | Error::Unhandled { .. }
            | Error::Handler { .. }
            | Error::LeaseLost { .. } => false,
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }

    /// Shorthand for [`Error::Rejected`].
    pub fn rejected(reason: impl Into<String>) -> Error {
        Error::Rejected {
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unpublishable`].
    pub fn unpublishable(reason: impl Into<String>) -> Error {
        Error::Unpublishable {
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unavailable`].
    pub fn unavailable(what: impl Into<String>, source: impl Into<BoxError>) -> Error {
        Error::Unavailable {
            what: what.into(),
            source: source.into(),
        }
    }

    /// This error, marked transient if `transient` (for a database error that a caller knows is
    /// worth retrying although its code says otherwise).
    pub fn transient_if(self, transient: bool) -> Error {
        match self {
            Error::Database {
                context,
                transient: was,
                source,
            } => Error::Database {
                context,
                transient: was || transient,
                source,
            },
            other => other,
        }
    }

    /// The full chain of causes as one line, for logs and dead-letter reasons.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classification() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(Error::unavailable("broker", io).is_transient());
        assert!(
            Error::Timeout {
                what: "confirm".into(),
                after: Duration::from_secs(1)
            }
            .is_transient()
        );
        assert!(!Error::rejected("too large").is_transient());
        assert!(!Error::LeaseLost { token: 1 }.is_transient());
    }

    #[test]
    fn chain_includes_sources() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            Error::unavailable("broker", io).chain(),
            "broker unavailable: refused"
        );
    }
}
