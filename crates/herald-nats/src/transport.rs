//! Publishing to and consuming from NATS JetStream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use herald_core::{
    Delivery, Error, Kind, Message, Received, ReplayFrom, Result, SecretUrl, Subscriber,
    Subscription, Transport, Undecodable,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::wire;

/// The JetStream transport. Cheap to share; one NATS connection underneath, which async-nats
/// reconnects by itself.
pub struct NatsTransport {
    url: SecretUrl,
    js: jetstream::Context,
    streams: Mutex<HashSet<String>>,
    ack_wait: Duration,
    max_deliver: i64,
    /// The server's `max_payload`, read once per batch (reading it clones the server's info,
    /// too much for every message).
    max_payload: std::sync::atomic::AtomicUsize,
}

/// Decodes `%xx` escapes of a URL's user or password (the url crate keeps them encoded).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn nats_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::unavailable(format!("NATS ({what})"), e)
}

impl NatsTransport {
    /// Connects to `url` (`nats://host:4222`, credentials in the URL if any).
    pub async fn connect(url: SecretUrl) -> Result<NatsTransport> {
        if !matches!(url.scheme(), "nats" | "tls") {
            return Err(Error::config(format!(
                "broker URL scheme {:?} is not nats:// or tls://",
                url.scheme()
            )));
        }
        // async-nats ignores credentials in the server URL: pass them as options (`user:pass@`
        // or a token as `token@`), and connect to the URL without them.
        let mut plain = url.url().clone();
        let user = percent_decode(plain.username());
        let pass = plain.password().map(percent_decode);
        let _ = plain.set_username("");
        let _ = plain.set_password(None);
        let options = || {
            let o = async_nats::ConnectOptions::new().name("herald");
            match (user.as_str(), &pass) {
                ("", _) => o,
                (token, None) => o.token(token.to_owned()),
                (user, Some(pass)) => o.user_and_password(user.to_owned(), pass.clone()),
            }
        };
        // One plain attempt first, so a refused login is reported at once (fatal) instead of
        // being retried in the background forever; a server that is not up yet is retried.
        let first =
            tokio::time::timeout(Duration::from_secs(10), options().connect(plain.as_str())).await;
        let client = match first {
            Ok(Ok(client)) => client,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    async_nats::ConnectErrorKind::AuthorizationViolation
                        | async_nats::ConnectErrorKind::Authentication
                ) =>
            {
                return Err(Error::config(format!(
                    "NATS at {} refused the login ({e}): check the user and password or token in the broker URL",
                    url.redacted()
                )));
            }
            Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::Tls => {
                return Err(Error::config(format!(
                    "NATS at {}: TLS setup failed ({e})",
                    url.redacted()
                )));
            }
            _ => {
                warn!(broker = %url, "NATS not reachable yet; connecting in the background");
                tokio::time::timeout(
                    Duration::from_secs(10),
                    options().retry_on_initial_connect().connect(plain.as_str()),
                )
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("connecting to NATS at {}", url.redacted()),
                    after: Duration::from_secs(10),
                })?
                .map_err(|e| nats_err(&url.redacted(), e))?
            }
        };
        info!(broker = %url, "connected to NATS");
        Ok(NatsTransport {
            url,
            js: jetstream::new(client),
            streams: Mutex::new(HashSet::new()),
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_payload: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn refresh_max_payload(&self) -> usize {
        let max = self.js.client().server_info().max_payload;
        self.max_payload
            .store(max, std::sync::atomic::Ordering::Relaxed);
        max
    }

    /// How long a delivery may stay unacknowledged before JetStream delivers it again. Default 30 s.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> NatsTransport {
        self.ack_wait = ack_wait;
        self
    }

    async fn ensure_stream(&self, kind: Kind, destination: &str) -> Result<stream::Stream> {
        let name = wire::stream_name(kind, destination);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![wire::subject(kind, destination)],
            retention: match kind {
                Kind::Event => stream::RetentionPolicy::Limits,
                Kind::Command => stream::RetentionPolicy::WorkQueue,
            },
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let subject = wire::subject(kind, destination);
        let mut s = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| nats_err("creating a stream", e))?;
        // Stream names fold '.' into '_', so `a.b` and `a_b` share one: the stream that exists
        // may serve the other spelling, and publishing would find no stream for this subject.
        let subjects = s
            .info()
            .await
            .map_err(|e| nats_err("reading a stream", e))?
            .config
            .subjects
            .clone();
        if !subjects.contains(&subject) {
            return Err(Error::unpublishable(format!(
                "destination {destination:?} maps to the JetStream stream {name}, which already serves {}: \
                 destinations that differ only in '.' and '_' cannot both be used on NATS",
                subjects.join(", ")
            )));
        }
        self.streams.lock().await.insert(subject);
        Ok(s)
    }

    /// Publishes `batch[i]` for every `i` of `wave`, pipelined, and waits for the acknowledgements;
    /// one result per index, in order.
    async fn publish_wave(&self, batch: &[Message], wave: &[usize]) -> Vec<Result<()>> {
        let mut pending = Vec::with_capacity(wave.len());
        for m in wave.iter().map(|i| &batch[*i]) {
            if let Err(e) = self.validate(m) {
                pending.push(Err(e));
                continue;
            }
            // Event streams are created on first use; command streams only by their owner.
            if m.kind == Kind::Event
                && !self
                    .streams
                    .lock()
                    .await
                    .contains(&wire::subject(m.kind, &m.destination))
                && let Err(e) = self.ensure_stream(Kind::Event, &m.destination).await
            {
                pending.push(Err(e));
                continue;
            }
            let sent = self
                .js
                .publish_with_headers(
                    wire::subject(m.kind, &m.destination),
                    wire::headers(m),
                    m.payload.clone().into(),
                )
                .await;
            pending.push(sent.map_err(|e| classify(m, e)));
        }
        let mut results = Vec::with_capacity(wave.len());
        for (m, p) in wave.iter().map(|i| &batch[*i]).zip(pending) {
            results.push(match p {
                Err(e) => Err(e),
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| classify(m, e)),
            });
        }
        results
    }

    fn consumer_config(
        &self,
        s: &Subscription,
        deliver_policy: consumer::DeliverPolicy,
    ) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(wire::durable_name(&s.service)),
            filter_subject: wire::subject(s.kind, &s.destination),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: i64::from(s.prefetch.max(1)),
            max_deliver: self.max_deliver,
            deliver_policy,
            ..Default::default()
        }
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn validate(&self, m: &Message) -> Result<()> {
        m.check_cloudevents().map_err(Error::unpublishable)?;
        let mut max_payload = self.max_payload.load(std::sync::atomic::Ordering::Relaxed);
        if max_payload == 0 {
            max_payload = self.refresh_max_payload();
        }
        wire::check_limits(m, max_payload)
    }

    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        // The limit may change when the client reconnects to another server: read it per batch.
        self.refresh_max_payload();
        // async-nats reconnects by itself, even in the middle of a batch: a message written just
        // before the connection dropped is lost while the next one goes out on the new
        // connection and is confirmed. Pipelining a key's messages across that would put them on
        // the stream out of order (verify saw it under kill -9). So the batch goes out in waves:
        // each wave holds the next message of every key (and every unkeyed message), pipelined;
        // a key's next message waits for the previous one's acknowledgement, and is not sent at
        // all if that one was not confirmed.
        let mut results: Vec<Option<Result<()>>> = (0..batch.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        while !pending.is_empty() {
            let mut keys = HashSet::new();
            let (wave, rest): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|i| {
                batch[*i]
                    .ordering_key
                    .as_ref()
                    .is_none_or(|k| keys.insert(k))
            });
            let mut failed_keys = HashSet::new();
            for (i, r) in wave.iter().zip(self.publish_wave(batch, &wave).await) {
                if r.is_err()
                    && let Some(k) = &batch[*i].ordering_key
                {
                    failed_keys.insert(k);
                }
                results[*i] = Some(r);
            }
            pending = Vec::with_capacity(rest.len());
            for i in rest {
                match &batch[i].ordering_key {
                    Some(k) if failed_keys.contains(k) => {
                        results[i] = Some(Err(Error::unavailable(
                            "NATS",
                            "not sent: an earlier message of its key was not confirmed",
                        )));
                    }
                    _ => pending.push(i),
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every message has a result"))
            .collect()
    }

    async fn subscribe(&self, s: &Subscription) -> Result<Box<dyn Subscriber>> {
        wire::check_destination(&s.destination)?;
        let stream = self.ensure_stream(s.kind, &s.destination).await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &wire::durable_name(&s.service),
                self.consumer_config(s, consumer::DeliverPolicy::All),
            )
            .await
            .map_err(|e| nats_err("creating the durable consumer", e))?;
        // Nothing is pulled until the first `next`: a consumer that resubscribes after an outage
        // first waits out the redelivery delay, and must not hold messages meanwhile.
        Ok(Box::new(NatsSubscriber {
            kind: s.kind,
            destination: s.destination.clone(),
            consumer,
            messages: None,
            unacked: HashMap::new(),
        }))
    }

    async fn replay(&self, s: &Subscription, from: ReplayFrom) -> Result<()> {
        // A durable consumer's position cannot be moved: delete it and create it again from the
        // requested point. Its subscribers must reconnect (herald's consumer does by itself).
        let stream = self.ensure_stream(s.kind, &s.destination).await?;
        let name = wire::durable_name(&s.service);
        let _ = stream.delete_consumer(&name).await;
        let policy = match from {
            ReplayFrom::Seq(n) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: n.max(1),
            },
            ReplayFrom::Time(t) => {
                let secs = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(secs)
                    .map_err(|e| Error::config(format!("replay time out of range: {e}")))?;
                consumer::DeliverPolicy::ByStartTime { start_time }
            }
        };
        stream
            .create_consumer(self.consumer_config(s, policy))
            .await
            .map_err(|e| nats_err("re-creating the durable consumer", e))?;
        Ok(())
    }

    /// Asks JetStream for the account's information: a round trip through the server.
    async fn check(&self) -> Result<()> {
        self.js
            .query_account()
            .await
            .map(|_| ())
            .map_err(|e| nats_err("checking JetStream", e))
    }

    async fn lag(&self, s: &Subscription) -> Result<Option<u64>> {
        let mut stream = match self
            .js
            .get_stream(wire::stream_name(s.kind, &s.destination))
            .await
        {
            Ok(stream) => stream,
            Err(_) => return Ok(None),
        };
        let _ = stream.info().await;
        match stream.consumer_info(wire::durable_name(&s.service)).await {
            Ok(info) => Ok(Some(info.num_pending + info.num_ack_pending as u64)),
            Err(_) => Ok(None),
        }
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        Ok(vec![
            "NATS JetStream acknowledges a message once it is written, and by default fsyncs every 2 minutes: \
             a power loss of the server can lose confirmed messages. herald cannot read the server's setting; \
             set `jetstream { sync_interval: always }` (NATS 2.10+) where that matters."
                .to_owned(),
        ])
    }

    fn redelivery_delay(&self) -> Duration {
        self.ack_wait
    }

    fn describe(&self) -> String {
        format!("nats {}", self.url.redacted())
    }
}

/// A missing stream (a command nobody owns) and an oversized message are about this message;
/// everything else is an outage or an unknown outcome.
fn classify(m: &Message, e: jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::StreamNotFound => Error::rejected(format!(
            "no JetStream stream takes subject {:?}: {}",
            wire::subject(m.kind, &m.destination),
            if m.kind == Kind::Command {
                "the command's owner has not subscribed yet"
            } else {
                "the stream is missing"
            }
        )),
        K::MaxPayloadExceeded => {
            Error::unpublishable(format!("message too large for the NATS server: {e}"))
        }
        K::Other if refused_headers(&e) => Error::unpublishable(format!(
            "NATS JetStream refused the message's headers (over {} bytes): {e}",
            wire::MAX_HEADER_BYTES
        )),
        _ => nats_err("publishing", e),
    }
}

/// Whether JetStream answered the publish with "header size exceeds maximum" (10097).
fn refused_headers(e: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM)
}

struct NatsSubscriber {
    kind: Kind,
    destination: String,
    consumer: consumer::PullConsumer,
    messages: Option<consumer::pull::Stream>,
    unacked: HashMap<u64, jetstream::Message>,
}

#[async_trait]
impl Subscriber for NatsSubscriber {
    async fn next(&mut self) -> Result<Received> {
        if self.messages.is_none() {
            self.messages = Some(
                self.consumer
                    .messages()
                    .await
                    .map_err(|e| nats_err("starting to consume", e))?,
            );
        }
        let messages = self.messages.as_mut().expect("started above");
        let msg = match messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(nats_err("consuming", e)),
            None => return Err(Error::unavailable("NATS", "the consumer stream ended")),
        };
        let (tag, redelivered) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.delivered > 1),
            Err(e) => return Err(Error::unavailable("NATS", e.to_string())),
        };
        let body = msg.payload.to_vec();
        let decoded = wire::decode(
            self.kind,
            &self.destination,
            msg.headers.as_ref(),
            body.clone(),
        );
        self.unacked.insert(tag, msg);
        Ok(match decoded {
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
        })
    }

    async fn ack(&mut self, tag: u64) -> Result<()> {
        // The tag is the stream sequence. JetStream may deliver a message again (ack wait
        // passed, or after the broker restarted) while the first delivery is still being
        // handled: the newest delivery replaces the older one here, and the second ack of that
        // sequence finds it already acknowledged. Nothing to do then (an ack that does nothing
        // can at worst cause one more redelivery, which the inbox recognises); failing would
        // stop the consumer.
        let Some(msg) = self.unacked.remove(&tag) else {
            tracing::debug!(
                tag,
                "ack of a delivery already acknowledged through a redelivery"
            );
            return Ok(());
        };
        // Double ack: wait for the server to confirm the ack, so "acked" means it will not come back.
        msg.double_ack()
            .await
            .map_err(|e| Error::unavailable("NATS (acknowledging)", e.to_string()))
    }

    async fn nack(&mut self, tag: u64) -> Result<()> {
        // As in `ack`: a sequence already settled through a redelivery needs nothing more.
        let Some(msg) = self.unacked.remove(&tag) else {
            return Ok(());
        };
        msg.ack_with(jetstream::AckKind::Nak(None))
            .await
            .map_err(|e| Error::unavailable("NATS (rejecting)", e.to_string()))
    }
}
