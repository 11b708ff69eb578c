//! Typed handlers, routed by message type: one subscription, a handler per type, each inside the
//! inbox transaction.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use herald_core::{BoxError, Error, Identifier, Kind, Message, Result};
use serde::de::DeserializeOwned;

use crate::db::{SqlDb, Stmt};
use crate::error::db;
use crate::{Dialect, Handler, OutboxWriter};

type Conn<D> = <<D as Dialect>::DB as sqlx::Database>::Connection;

/// A typed handler of messages of type `T`, for a [`Router`]. It runs inside the inbox
/// transaction: what it writes through [`Context::tx`], and the messages it publishes or sends
/// through the context, commit with the inbox record or not at all.
///
/// Side effects outside the database (an email API, a payment provider) are at least once: a
/// crash after the call and before the commit repeats it. Pass [`Context::idempotency_key`] to
/// such services so they can recognise the repeat.
#[async_trait]
pub trait Handle<D: Dialect, T: Send + 'static>: Send + Sync + 'static {
    /// Handles one message. An error rolls the transaction back; the consumer retries, then parks
    /// the message with the error as the reason (a database error is waited out instead).
    async fn handle(
        &self,
        ctx: &mut Context<'_, D>,
        message: T,
    ) -> std::result::Result<(), BoxError>;
}

/// What a typed handler sees: the transaction, the message's envelope, and the outbox to send
/// the next messages through.
pub struct Context<'a, D: Dialect> {
    tx: &'a mut Conn<D>,
    message: &'a Message,
    writer: &'a OutboxWriter<D>,
}

impl<'a, D: Dialect> Context<'a, D> {
    /// The inbox transaction's connection, for the handler's own sqlx statements
    /// (`.execute(ctx.tx())`).
    pub fn tx(&mut self) -> &mut Conn<D> {
        self.tx
    }

    /// The message being handled: id, ordering key, headers, time.
    pub fn message(&self) -> &Message {
        self.message
    }

    /// A key unique to this message, the same on every redelivery of it: give it to services
    /// outside the transaction so that they apply a repeated call once.
    pub fn idempotency_key(&self) -> String {
        self.message.id.to_string()
    }

    /// Publishes `event` in this transaction, as caused by the message being handled (trace,
    /// correlation and causation ids).
    pub async fn publish(&mut self, event: Message) -> Result<i64> {
        let event = event.caused_by(self.message);
        self.writer.publish(self.tx, &event).await
    }

    /// Sends `command` to its owner in this transaction, as caused by the message being handled.
    pub async fn send(&mut self, command: Message) -> Result<i64> {
        let command = command.caused_by(self.message);
        self.writer.send(self.tx, &command).await
    }

    /// A [`Statement`] run in this transaction: SQL written once for every database.
    pub fn sql(&mut self, sql: &str) -> Bound<'_, D> {
        Bound {
            stmt: Statement::new(sql),
            conn: self.tx,
        }
    }
}

/// What a [`Router`] does with a message type it has no handler for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Parks it at once with [`Error::Unhandled`] as the reason; `herald dlq replay` applies it
    /// once a handler exists. The default for commands: every command sent to a queue is its
    /// owner's to handle.
    Park,
    /// Acknowledges it without effect (recorded in the inbox, counted as applied). The default
    /// for events: a topic carries many types, and a subscriber takes those it wants.
    Skip,
}

/// Routes each message to the typed handler registered for its type, decoding the payload
/// first (a payload that does not decode is parked at once, with serde's error). A [`Handler`]:
/// install it with an applier (`SqliteApplier::new(pool, &table, router)`) or give it to the
/// host.
pub struct Router<D: Dialect> {
    routes: BTreeMap<String, Arc<dyn Route<D>>>,
    unknown: Option<Unknown>,
    writer: Option<OutboxWriter<D>>,
    conflicts: Vec<String>,
    skipped: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl<D: Dialect> Default for Router<D> {
    fn default() -> Self {
        Router::new()
    }
}

impl<D: Dialect> std::fmt::Debug for Router<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("types", &self.routes.keys().collect::<Vec<_>>())
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl<D: Dialect> Router<D> {
    /// A router with no handlers yet.
    pub fn new() -> Router<D> {
        Router {
            routes: BTreeMap::new(),
            unknown: None,
            writer: None,
            conflicts: Vec::new(),
            skipped: Default::default(),
        }
    }

    /// Routes messages of `T`'s type (see [`herald_core::typed`] for how it is named) to
    /// `handler`.
    pub fn on<T, H>(self, handler: H) -> Router<D>
    where
        T: DeserializeOwned + Send + 'static,
        H: Handle<D, T>,
    {
        let name = herald_core::typed::type_name_of::<T>();
        self.on_type(name, handler)
    }

    /// Routes messages whose type is `message_type` to `handler`, decoding them as `T`: for a
    /// type sent under another name, or several names into one Rust type.
    pub fn on_type<T, H>(mut self, message_type: impl Into<String>, handler: H) -> Router<D>
    where
        T: DeserializeOwned + Send + 'static,
        H: Handle<D, T>,
    {
        let name = message_type.into();
        let route: Arc<dyn Route<D>> = Arc::new(Typed {
            handler,
            of: PhantomData::<fn() -> T>,
        });
        if self.routes.insert(name.clone(), route).is_some() {
            self.conflicts.push(name);
        }
        self
    }

    /// Sets what happens to a type no handler is registered for (by default: commands are
    /// parked, events skipped).
    pub fn unknown(mut self, rule: Unknown) -> Router<D> {
        self.unknown = Some(rule);
        self
    }

    /// The message types routed, in order.
    pub fn types(&self) -> Vec<&str> {
        self.routes.keys().map(String::as_str).collect()
    }

    /// Logs the first skip of each type at `info` (later ones at `debug`): a type skipped
    /// because sender and receiver name it differently shows at once.
    fn skipping(&self, message: &Message) {
        let first = {
            let mut seen = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
            seen.len() < 256 && seen.insert(message.message_type.clone())
        };
        let shown: String = message.message_type.chars().take(80).collect();
        if first {
            tracing::info!(message_type = %shown, handled = %self.types().join(", "), "skipping events of a type this router has no handler for (Router::on_type routes a type sent under another name)");
        } else {
            tracing::debug!(message_type = %shown, id = %message.id, "no handler for this type; skipped");
        }
    }

    fn rule_for(&self, kind: Kind) -> Unknown {
        self.unknown.unwrap_or(match kind {
            Kind::Command => Unknown::Park,
            Kind::Event => Unknown::Skip,
        })
    }
}

#[async_trait]
impl<D: Dialect> Handler<D::DB> for Router<D> {
    async fn handle(
        &self,
        tx: &mut Conn<D>,
        message: &Message,
    ) -> std::result::Result<(), BoxError> {
        let writer = self
            .writer
            .as_ref()
            .ok_or("the router was not installed with an applier (its outbox is unknown)")?;
        let Some(route) = self.routes.get(&message.message_type) else {
            return match self.rule_for(message.kind) {
                Unknown::Skip => {
                    self.skipping(message);
                    Ok(())
                }
                Unknown::Park => Err(Box::new(Error::Unhandled {
                    message_type: message.message_type.chars().take(80).collect(),
                    handled: if self.routes.is_empty() {
                        "nothing".to_owned()
                    } else {
                        self.types().join(", ")
                    },
                })),
            };
        };
        let mut ctx = Context {
            tx,
            message,
            writer,
        };
        route.handle(&mut ctx).await
    }

    fn bind_outbox(&mut self, table: &Identifier) -> Result<()> {
        if !self.conflicts.is_empty() {
            return Err(Error::config(format!(
                "the router has two handlers for the message type(s) {}",
                self.conflicts.join(", ")
            )));
        }
        self.writer = Some(OutboxWriter::new(table));
        Ok(())
    }
}

/// One registered handler, its payload type erased.
trait Route<D: Dialect>: Send + Sync {
    fn handle<'a, 'c>(
        &'a self,
        ctx: &'a mut Context<'c, D>,
    ) -> BoxFuture<'a, std::result::Result<(), BoxError>>;
}

struct Typed<T, H> {
    handler: H,
    of: PhantomData<fn() -> T>,
}

impl<D, T, H> Route<D> for Typed<T, H>
where
    D: Dialect,
    T: DeserializeOwned + Send + 'static,
    H: Handle<D, T>,
{
    fn handle<'a, 'c>(
        &'a self,
        ctx: &'a mut Context<'c, D>,
    ) -> BoxFuture<'a, std::result::Result<(), BoxError>> {
        Box::pin(async move {
            let value: T = ctx.message.decode()?;
            self.handler.handle(ctx, value).await
        })
    }
}

/// A statement written once for every database herald supports: `?` placeholders (rendered as
/// `$1, $2, ...` on PostgreSQL), values bound in order as integers, text or bytes. For services
/// whose handlers run on more than one database; code for one database uses sqlx directly.
/// Every `?` is a placeholder, also inside a string literal or a PostgreSQL JSON operator: bind
/// such text as a value instead.
pub struct Statement<D: Dialect> {
    stmt: Stmt<D::DB>,
}

impl<D: Dialect> Statement<D> {
    /// A statement of `sql`, with `?` for each value.
    pub fn new(sql: &str) -> Statement<D> {
        Statement {
            stmt: Stmt::new(&D::render(sql)),
        }
    }

    /// Binds an integer.
    pub fn int(self, v: i64) -> Statement<D> {
        Statement {
            stmt: self.stmt.int(v),
        }
    }

    /// Binds text.
    pub fn text(self, v: &str) -> Statement<D> {
        Statement {
            stmt: self.stmt.text(v),
        }
    }

    /// Binds bytes.
    pub fn bytes(self, v: &[u8]) -> Statement<D> {
        Statement {
            stmt: self.stmt.bytes(v),
        }
    }

    /// Runs it on `conn` (`&mut *tx`, or a pool connection); returns the rows affected.
    pub async fn execute(self, conn: &mut Conn<D>) -> Result<u64> {
        let done = self
            .stmt
            .execute(conn)
            .await
            .map_err(|e| db::<D>("running a statement", e))?;
        Ok(D::rows_affected(&done))
    }

    /// Runs a query whose rows have one integer column (`SELECT COUNT(*) ...`) and returns the
    /// first row's value, if there is a row.
    pub async fn fetch_int(self, conn: &mut Conn<D>) -> Result<Option<i64>> {
        let what = "running a query";
        match self
            .stmt
            .fetch_optional(conn)
            .await
            .map_err(|e| db::<D>(what, e))?
        {
            Some(row) => Ok(Some(
                <D::DB as SqlDb>::get_i64_at(&row, 0).map_err(|e| db::<D>(what, e))?,
            )),
            None => Ok(None),
        }
    }
}

/// A [`Statement`] bound to a handler's transaction ([`Context::sql`]).
pub struct Bound<'c, D: Dialect> {
    stmt: Statement<D>,
    conn: &'c mut Conn<D>,
}

impl<D: Dialect> Bound<'_, D> {
    /// Binds an integer.
    pub fn int(mut self, v: i64) -> Self {
        self.stmt = self.stmt.int(v);
        self
    }

    /// Binds text.
    pub fn text(mut self, v: &str) -> Self {
        self.stmt = self.stmt.text(v);
        self
    }

    /// Binds bytes.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.stmt = self.stmt.bytes(v);
        self
    }

    /// Runs it; returns the rows affected.
    pub async fn execute(self) -> Result<u64> {
        self.stmt.execute(self.conn).await
    }

    /// Runs a one-integer-column query; returns the first row's value.
    pub async fn fetch_int(self) -> Result<Option<i64>> {
        self.stmt.fetch_int(self.conn).await
    }
}
