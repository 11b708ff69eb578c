//! Publishing to and consuming from Redis Streams.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use herald_core::{
    Delivery, Error, Kind, Message, Received, ReplayFrom, Result, SecretUrl, Subscriber,
    Subscription, Transport, Undecodable, cloudevents,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use tracing::info;

use crate::wire;

/// The Redis Streams transport. Cheap to share; one multiplexed connection for publishing, which
/// reconnects by itself, and one connection per subscriber (its reads block).
pub struct RedisTransport {
    url: SecretUrl,
    client: redis::Client,
    conn: ConnectionManager,
    visibility: Duration,
    max_entry: usize,
}

fn redis_err(what: &str, e: RedisError) -> Error {
    Error::unavailable(format!("Redis ({what})"), e)
}

async fn manager(
    client: &redis::Client,
    url: &SecretUrl,
    response: Duration,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response))
        .set_number_of_retries(3);
    tokio::time::timeout(
        Duration::from_secs(15),
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    .map_err(|_| Error::Timeout {
        what: format!("connecting to Redis at {}", url.redacted()),
        after: Duration::from_secs(15),
    })?
    .map_err(|e| {
        // A refused password or user is fatal, not an outage to retry forever.
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        {
            Error::config(format!(
                "Redis at {} refused the login ({e}): check the user and password in the broker URL",
                url.redacted()
            ))
        } else {
            redis_err(&url.redacted(), e)
        }
    })
}

impl RedisTransport {
    /// Connects to `url` (`redis://host:6379/0`, credentials in the URL if any). `rediss://`
    /// (TLS) is refused: this build has no TLS for Redis. A refused login is
    /// [`Error::Config`].
    pub async fn connect(url: SecretUrl) -> Result<RedisTransport> {
        if url.scheme() == "rediss" {
            return Err(Error::config(
                "rediss:// (Redis over TLS) is not supported by this build; use redis:// on a trusted network or a TLS tunnel",
            ));
        }
        if url.scheme() != "redis" {
            return Err(Error::config(format!(
                "broker URL scheme {:?} is not redis://",
                url.scheme()
            )));
        }
        let client = redis::Client::open(url.expose())
            .map_err(|e| Error::config(format!("broker URL {url} is not a Redis URL: {e}")))?;
        let mut conn = manager(&client, &url, Duration::from_secs(5)).await?;
        // Redis refuses a bulk string over proto-max-bulk-len (512 MB by default) by closing the
        // connection; refuse such a message before sending it, with a reason.
        let max_entry = config_get(&mut conn, "proto-max-bulk-len")
            .await
            .ok()
            .flatten()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(512 * 1024 * 1024);
        info!(broker = %url, "connected to Redis");
        Ok(RedisTransport {
            url,
            client,
            conn,
            visibility: Duration::from_secs(30),
            max_entry,
        })
    }

    /// How long a delivery may stay unacknowledged before another consumer of the group claims it
    /// (`XAUTOCLAIM` min-idle-time): the time after which a crashed consumer's messages are
    /// redelivered. Default 30 s.
    pub fn with_visibility_timeout(mut self, visibility: Duration) -> RedisTransport {
        self.visibility = visibility;
        self
    }

    /// The largest payload this server takes (its `proto-max-bulk-len`).
    pub fn max_payload(&self) -> usize {
        self.max_entry
    }

    async fn ensure_group(&self, key: &str, group: &str) -> Result<()> {
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(redis_err("creating the consumer group", e)),
        }
    }
}

async fn config_get(
    conn: &mut ConnectionManager,
    name: &str,
) -> redis::RedisResult<Option<String>> {
    let v: Value = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await?;
    let pairs = pairs(v);
    Ok(pairs
        .into_iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| text(&v)))
}

/// Key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| text(&k).map(|k| (k, v)))
            .collect(),
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = text(&k) {
                    out.push((k, v));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

/// A stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// The per-stream entry lists of an `XREADGROUP` reply: `[[key, entries], ...]` in RESP2, a map
/// from key to entries in RESP3; nil when the read timed out.
fn streams(v: Value) -> Vec<Value> {
    match v {
        Value::Map(m) => m.into_iter().map(|(_, entries)| entries).collect(),
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Stream entries `[[id, [field, value, ...]], ...]`; entries without fields (deleted) are skipped.
fn entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.len() != 2 {
            continue;
        }
        let fields = parts.pop().expect("two parts");
        let Some(id) = text(&parts[0]) else { continue };
        let fields = pairs(fields)
            .into_iter()
            .map(|(k, v)| {
                let bytes = match v {
                    Value::BulkString(b) => b,
                    other => text(&other).unwrap_or_default().into_bytes(),
                };
                (k, bytes)
            })
            .collect();
        out.push((id, fields));
    }
    out
}

#[async_trait]
impl Transport for RedisTransport {
    fn validate(&self, m: &Message) -> Result<()> {
        m.check_cloudevents().map_err(Error::unpublishable)?;
        wire::check_destination(&m.destination)?;
        // Every field is a bulk string; Redis closes the connection on one over its limit.
        let largest = cloudevents::attributes(m)
            .iter()
            .map(|(_, v)| v.len())
            .chain([m.payload.len(), m.content_type.len()])
            .max()
            .unwrap_or(0);
        if largest > self.max_entry {
            return Err(Error::unpublishable(format!(
                "a field of {largest} bytes is over this Redis server's limit of {} bytes (proto-max-bulk-len)",
                self.max_entry
            )));
        }
        Ok(())
    }

    async fn publish(&self, batch: &[Message]) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(batch.len());
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            if let Err(e) = self.validate(m) {
                results.push(Some(Err(e)));
                continue;
            }
            let cmd = pipe
                .cmd("XADD")
                .arg(wire::stream_key(m.kind, &m.destination))
                .arg("*");
            for (k, v) in wire::fields(m) {
                cmd.arg(k).arg(v);
            }
            results.push(None);
            sent.push(i);
        }
        if !sent.is_empty() {
            // One pipeline on one connection: entries of a key are added in batch order.
            let replies: redis::RedisResult<Vec<redis::RedisResult<String>>> =
                pipe.query_async(&mut self.conn.clone()).await;
            match replies {
                Ok(replies) if replies.len() == sent.len() => {
                    for (i, reply) in sent.iter().zip(replies) {
                        results[*i] = Some(reply.map(|_| ()).map_err(|e| {
                            if e.code() == Some("WRONGTYPE") {
                                Error::rejected(format!(
                                    "key {:?} on Redis is not a stream: {e}",
                                    wire::stream_key(batch[*i].kind, &batch[*i].destination)
                                ))
                            } else {
                                redis_err("adding to a stream", e)
                            }
                        }));
                    }
                }
                Ok(replies) => {
                    let n = replies.len();
                    for i in &sent {
                        results[*i] = Some(Err(Error::unavailable(
                            "Redis",
                            format!("{n} replies to {} XADD commands", sent.len()),
                        )));
                    }
                }
                Err(e) => {
                    let reason = e.to_string();
                    for i in &sent {
                        results[*i] = Some(Err(Error::unavailable(
                            "Redis (adding to a stream)",
                            reason.clone(),
                        )));
                    }
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
        let key = wire::stream_key(s.kind, &s.destination);
        self.ensure_group(&key, &s.service).await?;
        // Reads block for up to a second: the response timeout must be longer.
        let conn = manager(&self.client, &self.url, Duration::from_secs(10)).await?;
        Ok(Box::new(RedisSubscriber {
            kind: s.kind,
            destination: s.destination.clone(),
            key,
            group: s.service.clone(),
            consumer: format!("{}-{}", s.service, uuid::Uuid::new_v4().simple()),
            conn,
            prefetch: usize::from(s.prefetch.max(1)),
            visibility: self.visibility,
            buffer: VecDeque::new(),
            unacked: HashMap::new(),
            next_tag: 1,
            last_claim: None,
            claim_cursor: "0-0".to_owned(),
        }))
    }

    async fn replay(&self, s: &Subscription, from: ReplayFrom) -> Result<()> {
        let key = wire::stream_key(s.kind, &s.destination);
        self.ensure_group(&key, &s.service).await?;
        let mut conn = self.conn.clone();
        // SETID sets the group's last-delivered id: delivery resumes after it.
        let last = match from {
            ReplayFrom::Seq(n) if n <= 1 => "0".to_owned(),
            ReplayFrom::Seq(n) => {
                let v: Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(n - 1)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| redis_err("finding the replay position", e))?;
                entries(v)
                    .pop()
                    .map_or_else(|| "0".to_owned(), |(id, _)| id)
            }
            ReplayFrom::Time(t) => {
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                if ms == 0 {
                    "0".to_owned()
                } else {
                    format!("{}-{}", ms - 1, u64::MAX)
                }
            }
        };
        redis::cmd("XGROUP")
            .arg("SETID")
            .arg(&key)
            .arg(&s.service)
            .arg(&last)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_err("moving the consumer group", e))
    }

    /// `PING`.
    async fn check(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| redis_err("checking the connection", e))
    }

    async fn lag(&self, s: &Subscription) -> Result<Option<u64>> {
        let key = wire::stream_key(s.kind, &s.destination);
        let v: redis::RedisResult<Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query_async(&mut self.conn.clone())
            .await;
        let Ok(Value::Array(groups)) = v else {
            return Ok(None);
        };
        for g in groups {
            let fields: HashMap<String, Value> = pairs(g).into_iter().collect();
            if fields.get("name").and_then(text).as_deref() != Some(s.service.as_str()) {
                continue;
            }
            let num = |k: &str| {
                fields
                    .get(k)
                    .and_then(text)
                    .and_then(|t| t.parse::<u64>().ok())
            };
            return Ok(num("lag").map(|lag| lag + num("pending").unwrap_or(0)));
        }
        Ok(None)
    }

    async fn durability_warnings(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let (Ok(aof), Ok(fsync), Ok(policy)) = (
            config_get(&mut conn, "appendonly").await,
            config_get(&mut conn, "appendfsync").await,
            config_get(&mut conn, "maxmemory-policy").await,
        ) else {
            return Ok(vec![
                "Redis refuses CONFIG GET here, so herald cannot check persistence: confirmed messages survive a \
                 restart only with appendonly yes (and appendfsync always), and eviction must be noeviction."
                    .to_owned(),
            ]);
        };
        let mut warnings = Vec::new();
        if aof.as_deref() != Some("yes") {
            warnings.push(
                "Redis appendonly=no: a confirmed message lives in memory (and in the next snapshot, if any); a \
                 restart of the server loses it. Set appendonly yes and appendfsync always."
                    .to_owned(),
            );
        } else if fsync.as_deref() != Some("always") {
            warnings.push(format!(
                "Redis appendfsync={}: a power loss can lose up to a second of confirmed messages. Set appendfsync \
                 always where that matters.",
                fsync.unwrap_or_default()
            ));
        }
        if let Some(p) = policy.filter(|p| p != "noeviction") {
            warnings.push(format!(
                "Redis maxmemory-policy={p}: under memory pressure the server may evict a stream with its \
                 unconsumed messages. Set maxmemory-policy noeviction."
            ));
        }
        Ok(warnings)
    }

    fn redelivery_delay(&self) -> Duration {
        self.visibility
    }

    fn describe(&self) -> String {
        format!("redis {}", self.url.redacted())
    }
}

struct RedisSubscriber {
    kind: Kind,
    destination: String,
    key: String,
    group: String,
    consumer: String,
    conn: ConnectionManager,
    prefetch: usize,
    visibility: Duration,
    buffer: VecDeque<Received>,
    unacked: HashMap<u64, String>,
    next_tag: u64,
    last_claim: Option<Instant>,
    claim_cursor: String,
}

impl RedisSubscriber {
    fn take(&mut self, found: Vec<Entry>, redelivered: bool) {
        for (id, fields) in found {
            let tag = self.next_tag;
            self.next_tag += 1;
            self.unacked.insert(tag, id);
            let body = fields
                .iter()
                .find(|(k, _)| k == wire::DATA)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            self.buffer
                .push_back(match wire::decode(self.kind, &self.destination, fields) {
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
                });
        }
    }

    /// Takes over entries that stayed unacknowledged longer than the visibility timeout (their
    /// consumer crashed, or gave them back).
    async fn autoclaim(&mut self) -> Result<()> {
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.visibility.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.prefetch)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| redis_err("claiming stuck messages", e))?;
        let Value::Array(mut parts) = v else {
            return Ok(());
        };
        if parts.len() < 2 {
            return Ok(());
        }
        let claimed = parts.remove(1);
        self.claim_cursor = text(&parts[0]).unwrap_or_else(|| "0-0".to_owned());
        self.take(entries(claimed), true);
        Ok(())
    }
}

#[async_trait]
impl Subscriber for RedisSubscriber {
    async fn next(&mut self) -> Result<Received> {
        loop {
            if let Some(r) = self.buffer.pop_front() {
                return Ok(r);
            }
            if self
                .last_claim
                .is_none_or(|t| t.elapsed() >= self.visibility / 4)
            {
                self.last_claim = Some(Instant::now());
                self.autoclaim().await?;
                if !self.buffer.is_empty() {
                    continue;
                }
            }
            let count = self.prefetch.saturating_sub(self.unacked.len()).max(1);
            let v: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(">")
                .query_async(&mut self.conn)
                .await
                .map_err(|e| redis_err("reading the stream", e))?;
            for stream in streams(v) {
                self.take(entries(stream), false);
            }
        }
    }

    async fn ack(&mut self, tag: u64) -> Result<()> {
        let id = self
            .unacked
            .remove(&tag)
            .ok_or_else(|| Error::config(format!("unknown delivery tag {tag}")))?;
        redis::cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&id)
            .query_async::<i64>(&mut self.conn)
            .await
            .map(|_| ())
            .map_err(|e| redis_err("acknowledging", e))
    }

    async fn nack(&mut self, tag: u64) -> Result<()> {
        let id = self
            .unacked
            .remove(&tag)
            .ok_or_else(|| Error::config(format!("unknown delivery tag {tag}")))?;
        // Streams have no "give back": mark the entry idle for the whole visibility timeout, so
        // the next XAUTOCLAIM of any consumer of the group (this one included) takes it at once.
        redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(&id)
            .arg("IDLE")
            .arg(self.visibility.as_millis() as u64)
            .arg("JUSTID")
            .query_async::<Value>(&mut self.conn)
            .await
            .map_err(|e| redis_err("giving a message back", e))?;
        self.last_claim = None;
        self.claim_cursor = "0-0".to_owned();
        Ok(())
    }
}
