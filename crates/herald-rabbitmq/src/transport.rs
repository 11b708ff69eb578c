//! Publishing to and consuming from RabbitMQ.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use herald_core::{
    Delivery, Error, Kind, Message, Received, Result, SecretUrl, Subscriber, Subscription,
    Transport, Undecodable,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Publishes with publisher confirms: events to a durable topic exchange named after the topic
/// (routing key: the message type), commands to the owner's queue through the default exchange
/// with `mandatory`, so a command nobody owns comes back as an error instead of vanishing.
/// Messages are persistent (`delivery_mode=2`). The connection is re-opened after any failure.
pub struct RabbitTransport {
    url: SecretUrl,
    confirm_timeout: Duration,
    state: Mutex<Option<Link>>,
}

struct Link {
    connection: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

fn lapin_err(what: &str, e: lapin::Error) -> Error {
    Error::unavailable(format!("RabbitMQ ({what})"), e)
}

impl RabbitTransport {
    /// A transport for `url` (`amqp://user:pass@host:5672/vhost`). Connects lazily, on the first
    /// publish; use [`RabbitTransport::check`] to fail fast at start-up.
    pub fn new(url: SecretUrl) -> Result<RabbitTransport> {
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(Error::config(format!(
                "broker URL scheme {:?} is not amqp:// or amqps://",
                url.scheme()
            )));
        }
        // Parameters lapin would only refuse while connecting (taken for an outage and retried
        // forever) are checked now.
        let parsed: lapin::uri::AMQPUri = url.expose().parse().map_err(|e: String| {
            Error::config(format!(
                "broker URL {url} is not a valid AMQP URI: {}",
                e.replace(url.expose(), "<url>")
            ))
        })?;
        if parsed.query.frame_max.is_some_and(|f| f != 0 && f < 4096) {
            return Err(Error::config(
                "broker URL parameter frame_max must be 0 (no limit) or at least 4096 (AMQP's minimum frame size)",
            ));
        }
        if parsed.query.auth_mechanism.is_some_and(|m| {
            m != lapin::uri::SASLMechanism::Plain && m != lapin::uri::SASLMechanism::AMQPlain
        }) {
            return Err(Error::config(
                "broker URL parameter auth_mechanism: herald logs in with a user and password (PLAIN or AMQPLAIN)",
            ));
        }
        Ok(RabbitTransport {
            url,
            confirm_timeout: Duration::from_secs(5),
            state: Mutex::new(None),
        })
    }

    /// How long to wait for the broker's confirmations before the outcome counts as unknown.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> RabbitTransport {
        self.confirm_timeout = timeout;
        self
    }

    async fn connect(&self) -> Result<Connection> {
        let props = ConnectionProperties::default().with_connection_name("herald".into());
        match tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(self.url.expose(), props),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                Err(login_refused(&self.url, &e)
                    .unwrap_or_else(|| lapin_err(&self.url.redacted(), e)))
            }
            Err(_) => Err(Error::Timeout {
                what: format!("connecting to RabbitMQ at {}", self.url.redacted()),
                after: Duration::from_secs(10),
            }),
        }
    }

    async fn link<'a>(&self, state: &'a mut Option<Link>) -> Result<&'a mut Link> {
        let healthy = state
            .as_ref()
            .is_some_and(|l| l.connection.status().connected() && l.channel.status().connected());
        if !healthy {
            if let Some(old) = state.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    old.connection.close(200, "reconnecting".into()),
                )
                .await;
            }
            let connection = self.connect().await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| lapin_err("opening a channel", e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| lapin_err("enabling publisher confirms", e))?;
            info!(broker = %self.url, "connected to RabbitMQ");
            *state = Some(Link {
                connection,
                channel,
                declared: HashSet::new(),
            });
        }
        Ok(state.as_mut().expect("link was just set"))
    }

    async fn publish_on(&self, link: &mut Link, batch: &[Message]) -> Vec<Result<()>> {
        let frame_max = link.connection.configuration().frame_max();
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            let (exchange, routing_key, mandatory) = match m.kind {
                Kind::Event => (m.destination.as_str(), m.message_type.as_str(), false),
                Kind::Command => ("", m.destination.as_str(), true),
            };
            if let Err(e) = self
                .validate(m)
                .and_then(|()| crate::wire::check_frame(m, frame_max))
            {
                pending.push(Err(e));
                continue;
            }
            if m.kind == Kind::Event
                && !link.declared.contains(&m.destination)
                && let Err(e) = declare_exchange(link, &m.destination).await
            {
                pending.push(Err(e));
                continue;
            }
            let sent = link
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &m.payload,
                    crate::wire::properties(m),
                )
                .await;
            pending.push(sent.map_err(|e| classify(link, "publishing", e)));
        }

        // Wait for every confirm first. lapin hands a `basic.return` to whichever pending
        // confirm it completes first when RabbitMQ acknowledges several deliveries at once, so
        // the return a confirm carries may belong to another message. Returns are therefore
        // collected over the whole batch and matched to messages by the `message_id` property
        // they carry, never by the confirm they arrived with.
        let mut results: Vec<Result<()>> = Vec::with_capacity(batch.len());
        let mut returns = Returns::default();
        for (i, p) in pending.into_iter().enumerate() {
            let confirm = match p {
                Ok(confirm) => confirm,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let outcome = match tokio::time::timeout(self.confirm_timeout, confirm).await {
                Err(_) => {
                    returns.all_resolved = false;
                    Err(Error::Timeout {
                        what: "RabbitMQ publisher confirm".to_owned(),
                        after: self.confirm_timeout,
                    })
                }
                Ok(Err(e)) => {
                    returns.all_resolved = false;
                    Err(lapin_err("waiting for a confirm", e))
                }
                Ok(Ok(c)) => {
                    let nacked = c.is_nack();
                    if let Some(r) = c.take_message() {
                        let why = format!("{} {}", r.reply_code, r.reply_text);
                        returns.add(
                            i,
                            r.properties.message_id().as_ref().map(|id| id.as_str()),
                            why,
                        );
                    }
                    if nacked {
                        Err(Error::unavailable(
                            "RabbitMQ",
                            "the broker nacked the message (internal error)",
                        ))
                    } else {
                        Ok(())
                    }
                }
            };
            results.push(outcome);
        }
        returns.apply(batch, &mut results);
        results
    }
}

/// Declares the durable topic exchange `name` on a channel of its own: RabbitMQ answers a refused
/// declaration (no permission, an exchange of that name with another type) by closing the
/// channel, which must not be the publishing one, where it would fail the rest of the batch.
async fn declare_exchange(link: &mut Link, name: &str) -> Result<()> {
    let channel = link
        .connection
        .create_channel()
        .await
        .map_err(|e| lapin_err("opening a channel", e))?;
    let declared = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            link.declared.insert(name.to_owned());
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) if link.connection.status().connected() => Err(Error::rejected(format!(
            "RabbitMQ refused to declare the topic exchange {name:?}: {e}"
        ))),
        Err(e) => Err(lapin_err("declaring the topic exchange", e)),
    }
}

/// The `basic.return`s of one batch, by the `message_id` they carry.
struct Returns {
    /// How many returns name each id, and RabbitMQ's reply (`312 NO_ROUTE`).
    by_id: HashMap<String, (usize, String)>,
    /// Indexes of confirms that carried a return matching no command of the batch.
    carried_by: Vec<(usize, Option<String>)>,
    /// Whether every confirm of the batch came back (else a return may still be on its way).
    all_resolved: bool,
}

impl Default for Returns {
    fn default() -> Self {
        Returns {
            by_id: HashMap::new(),
            carried_by: Vec::new(),
            all_resolved: true,
        }
    }
}

impl Returns {
    fn add(&mut self, carrier: usize, message_id: Option<&str>, reply: String) {
        if let Some(id) = message_id {
            let entry = self.by_id.entry(id.to_owned()).or_insert((0, reply));
            entry.0 += 1;
        }
        self.carried_by
            .push((carrier, message_id.map(str::to_owned)));
    }

    /// Turns provisional confirmations into rejections or unknown outcomes where the returns
    /// say so. A command counts as routed only if no return names it and every confirm of the
    /// batch came back.
    fn apply(&self, batch: &[Message], results: &mut [Result<()>]) {
        // How many commands of the batch carry each id (a producer may reuse one).
        let mut commands: HashMap<String, usize> = HashMap::new();
        for m in batch.iter().filter(|m| m.kind == Kind::Command) {
            *commands.entry(m.id.to_string()).or_default() += 1;
        }
        // A return that names no command of this batch proves nothing about the confirm that
        // carried it: that confirm's outcome is unknown.
        let stray: Vec<usize> = self
            .carried_by
            .iter()
            .filter(|(_, id)| id.as_ref().is_none_or(|id| !commands.contains_key(id)))
            .map(|(i, _)| *i)
            .collect();
        for (i, (m, result)) in batch.iter().zip(results.iter_mut()).enumerate() {
            if result.is_err() {
                continue;
            }
            if stray.contains(&i) {
                *result = Err(Error::unavailable(
                    "RabbitMQ",
                    "the confirm carried a returned message that matches no command of the batch",
                ));
                continue;
            }
            if m.kind != Kind::Command {
                continue;
            }
            if !stray.is_empty() {
                // A return that names no command may belong to any of them.
                *result = Err(Error::unavailable(
                    "RabbitMQ",
                    "a returned message of the batch could not be matched to its command",
                ));
                continue;
            }
            let id = m.id.to_string();
            let sent = commands.get(&id).copied().unwrap_or(0);
            let (n, reply) = self
                .by_id
                .get(&id)
                .map_or((0, ""), |(n, reply)| (*n, reply.as_str()));
            match n {
                0 if self.all_resolved => {}
                0 => {
                    *result = Err(Error::unavailable(
                        "RabbitMQ",
                        "a confirm of the batch never came, so this command's return may be missing",
                    ))
                }
                n if n >= sent => {
                    *result = Err(Error::rejected(format!(
                        "RabbitMQ returned the command to queue {:?} as unroutable ({reply}: no queue of that name; has its owner subscribed yet?)",
                        m.destination
                    )))
                }
                // Some, not all, of the commands sharing this id came back: which is unknown.
                _ => {
                    *result = Err(Error::unavailable(
                        "RabbitMQ",
                        "several commands of the batch share a message_id and only some were returned",
                    ))
                }
            }
        }
    }
}

/// A refused login or virtual host while connecting: retrying cannot help, so it is a
/// configuration error (fatal at start-up) that names the user, never the password.
fn login_refused(url: &SecretUrl, e: &lapin::Error) -> Option<Error> {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    let user = url.url().username();
    let vhost = url.url().path().trim_start_matches('/');
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
        | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(Error::config(format!(
            "RabbitMQ at {} refused the login for user {user:?} on virtual host {vhost:?} ({}): check the user, password and vhost in the broker URL",
            url.redacted(),
            amqp.get_message()
        ))),
        _ => None,
    }
}

/// A failure with the connection still up is about this message (the channel refused it); with
/// the connection down the outcome is unknown.
fn classify(link: &Link, what: &str, e: lapin::Error) -> Error {
    if link.connection.status().connected()
        && matches!(e.kind(), lapin::ErrorKind::ProtocolError(_))
    {
        Error::rejected(format!("RabbitMQ refused {what}: {e}"))
    } else {
        lapin_err(what, e)
    }
}

#[async_trait]
impl Transport for RabbitTransport {
    fn validate(&self, m: &Message) -> Result<()> {
        m.check_cloudevents().map_err(Error::unpublishable)?;
        crate::wire::check_limits(m)
    }

    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let mut state = self.state.lock().await;
        if let Err(e) = self.link(&mut state).await {
            let reason = e.chain();
            return herald_core::transport::fail_all(batch.len(), || {
                Error::unavailable("RabbitMQ", reason.clone())
            });
        }
        // The link is taken out for the publish and put back only if it finishes cleanly. If
        // this future is dropped half-way (the relay's publish timeout), the link goes with it:
        // its channel still has confirms pending, and lapin would hand their returns to the
        // next batch's confirms on that channel, where a command could look routed.
        let Some(mut link) = state.take() else {
            return herald_core::transport::fail_all(batch.len(), || {
                Error::unavailable("RabbitMQ", "no connection")
            });
        };
        let results = self.publish_on(&mut link, batch).await;
        // Any transient failure may have left the channel unusable: start afresh next time.
        let failed = results
            .iter()
            .any(|r| r.as_ref().is_err_and(Error::is_transient));
        if failed || !link.channel.status().connected() {
            warn!("dropping the RabbitMQ connection after a failed publish");
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                link.connection.close(200, "reconnecting".into()),
            )
            .await;
        } else {
            *state = Some(link);
        }
        results
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Box<dyn Subscriber>> {
        let connection = self.connect().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_err("opening a channel", e))?;
        let queue = declare_queue(&channel, subscription).await?;
        channel
            .basic_qos(subscription.prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(|e| lapin_err("setting the prefetch", e))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| lapin_err("starting the consumer", e))?;
        Ok(Box::new(RabbitSubscriber {
            _connection: connection,
            channel,
            consumer,
            destination: subscription.destination.clone(),
        }))
    }

    /// Declares the exchange, the queue and its binding without `basic_consume` (which would
    /// push up to the prefetch at once, to be requeued as redelivered when the channel closes).
    async fn declare(&self, subscription: &Subscription) -> Result<()> {
        let connection = self.connect().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_err("opening a channel", e))?;
        declare_queue(&channel, subscription).await?;
        let _ = channel.close(200, "declared".into()).await;
        let _ = connection.close(200, "declared".into()).await;
        Ok(())
    }

    /// Connects if needed (so a wrong URL or credentials show at start-up) and asks the broker
    /// about `amq.topic` on the publishing channel: a broker that accepts TCP and never answers
    /// fails here. A link that did not answer in time is dropped, so the next publish starts on
    /// a fresh connection.
    async fn check(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        let link = self.link(&mut state).await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let asked = tokio::time::timeout(
            self.confirm_timeout,
            link.channel.exchange_declare(
                "amq.topic".into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            ),
        )
        .await;
        let answer = match asked {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => lapin_err("checking the connection", e),
            Err(_) => Error::Timeout {
                what: "RabbitMQ's answer to a check".to_owned(),
                after: self.confirm_timeout,
            },
        };
        if let Some(old) = state.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                old.connection.close(200, "reconnecting".into()),
            )
            .await;
        }
        Err(answer)
    }

    async fn lag(&self, s: &Subscription) -> Result<Option<u64>> {
        // Messages ready in the service's queue (not counting those delivered and unacknowledged).
        let queue = match s.kind {
            Kind::Event => format!("{}.{}", s.service, s.destination),
            Kind::Command => s.destination.clone(),
        };
        let connection = self.connect().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lapin_err("opening a channel", e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let depth = match channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => Some(u64::from(q.message_count())),
            Err(_) => None,
        };
        let _ = connection.close(200, "done".into()).await;
        Ok(depth)
    }

    fn describe(&self) -> String {
        format!("rabbitmq {}", self.url.redacted())
    }
}

struct RabbitSubscriber {
    _connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    destination: String,
}

#[async_trait]
impl Subscriber for RabbitSubscriber {
    async fn next(&mut self) -> Result<Received> {
        let delivery = match self.consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(lapin_err("consuming", e)),
            None => return Err(Error::unavailable("RabbitMQ", "the consumer was cancelled")),
        };
        let tag = delivery.delivery_tag;
        let redelivered = delivery.redelivered;
        let body = delivery.data.clone();
        Ok(
            match crate::wire::decode(&self.destination, &delivery.properties, delivery.data) {
                Ok(message) => Received::Message(Delivery {
                    message,
                    redelivered,
                    tag,
                }),
                Err(e) => Received::Undecodable(Undecodable {
                    tag,
                    reason: e.to_string(),
                    body,
                }),
            },
        )
    }

    async fn ack(&mut self, tag: u64) -> Result<()> {
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| lapin_err("acknowledging", e))
    }

    async fn nack(&mut self, tag: u64) -> Result<()> {
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                },
            )
            .await
            .map_err(|e| lapin_err("rejecting", e))
    }
}

/// Declares what `subscription` consumes from (the topic exchange, the service's durable queue
/// and its binding, or the command queue) and returns the queue's name.
async fn declare_queue(channel: &lapin::Channel, subscription: &Subscription) -> Result<String> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let queue = match subscription.kind {
        Kind::Event => {
            // One durable queue per subscribing service: every service gets every event,
            // instances of one service compete for them.
            let queue = format!("{}.{}", subscription.service, subscription.destination);
            channel
                .exchange_declare(
                    subscription.destination.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| lapin_err("declaring the topic exchange", e))?;
            channel
                .queue_declare(queue.as_str().into(), durable, FieldTable::default())
                .await
                .map_err(|e| lapin_err("declaring the service's queue", e))?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    subscription.destination.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| lapin_err("binding the service's queue", e))?;
            queue
        }
        Kind::Command => {
            channel
                .queue_declare(
                    subscription.destination.as_str().into(),
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| lapin_err("declaring the command queue", e))?;
            subscription.destination.clone()
        }
    };
    Ok(queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Vec<Message> {
        vec![
            Message::raw_event("t", "E", vec![]),
            Message::raw_command("nobody", "A", vec![]),
            Message::raw_command("owned", "B", vec![]),
        ]
    }

    fn outcome(r: &Result<()>) -> &'static str {
        match r {
            Ok(()) => "ok",
            Err(e) if e.is_transient() => "unknown",
            Err(_) => "rejected",
        }
    }

    fn apply(returns: &Returns, batch: &[Message]) -> Vec<&'static str> {
        let mut results: Vec<Result<()>> = batch.iter().map(|_| Ok(())).collect();
        returns.apply(batch, &mut results);
        results.iter().map(outcome).collect()
    }

    #[test]
    fn a_return_belongs_to_the_command_it_names_not_to_its_carrier() {
        let b = batch();
        let mut r = Returns::default();
        // lapin attached A's return to the event's confirm.
        r.add(0, Some(&b[1].id.to_string()), "312 NO_ROUTE".into());
        assert_eq!(apply(&r, &b), ["ok", "rejected", "ok"]);
        assert_eq!(apply(&Returns::default(), &b), ["ok", "ok", "ok"]);
    }

    #[test]
    fn a_return_that_names_no_command_makes_every_command_unknown() {
        let b = batch();
        let mut r = Returns::default();
        r.add(2, None, "312 NO_ROUTE".into());
        assert_eq!(apply(&r, &b), ["ok", "unknown", "unknown"]);
        let mut r = Returns::default();
        r.add(
            0,
            Some("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
            "312 NO_ROUTE".into(),
        );
        assert_eq!(apply(&r, &b), ["unknown", "unknown", "unknown"]);
    }

    #[test]
    fn a_missing_confirm_leaves_commands_unknown() {
        let b = batch();
        let r = Returns {
            all_resolved: false,
            ..Returns::default()
        };
        assert_eq!(apply(&r, &b), ["ok", "unknown", "unknown"]);
    }

    #[test]
    fn commands_sharing_an_id_are_rejected_only_if_all_came_back() {
        let a = Message::raw_command("nobody", "A", vec![]);
        let mut twin = a.clone();
        twin.destination = "owned".to_owned();
        let b = vec![a.clone(), twin];
        let mut r = Returns::default();
        r.add(0, Some(&a.id.to_string()), "312 NO_ROUTE".into());
        assert_eq!(apply(&r, &b), ["unknown", "unknown"]);
        r.add(1, Some(&a.id.to_string()), "312 NO_ROUTE".into());
        assert_eq!(apply(&r, &b), ["rejected", "rejected"]);
    }
}
