//! Validated configuration values: identifiers that go into SQL, URLs that may hold secrets, and
//! the relay's tuning knobs.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};

/// A SQL identifier (table name) that has been checked against `^[A-Za-z_][A-Za-z0-9_]{0,62}$`.
///
/// Identifiers cannot be bind parameters, so this allow-list is what keeps configuration from
/// injecting SQL. Only an `Identifier` is ever formatted into a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identifier(String);

impl Identifier {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Identifier> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if first_ok && rest_ok && name.len() <= 63 {
            Ok(Identifier(name.to_owned()))
        } else {
            Err(Error::config(format!(
                "table name {name:?} is not allowed: use 1 to 63 letters, digits or underscores, not starting with a digit"
            )))
        }
    }

    /// The identifier as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A derived identifier, `self` + `suffix`, validated again (it may get too long).
    pub fn with_suffix(&self, suffix: &str) -> Result<Identifier> {
        Identifier::new(&format!("{}{suffix}", self.0))
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection URL whose password never appears in `Debug` or `Display`.
///
/// Besides ordinary URLs it takes a list of hosts for brokers that bootstrap from several
/// (`kafka://h1:9092,h2:9092`): the first host is validated as a URL, the list is kept as written.
/// Such a list may not carry credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl {
    url: url::Url,
    host_list: Option<String>,
}

impl SecretUrl {
    /// Parses `raw`; the error names the problem but never echoes the URL (it may hold a password).
    pub fn parse(what: &str, raw: &str) -> Result<SecretUrl> {
        let bad = |e: url::ParseError| {
            Error::config(format!(
                "{what} URL is not a valid URL ({e}); expected something like postgres://user@host:5432/db"
            ))
        };
        match url::Url::parse(raw) {
            Ok(url) => Ok(SecretUrl {
                url,
                host_list: None,
            }),
            Err(e) => {
                // scheme://h1:p1,h2:p2[/rest]: validate with the first host alone.
                let Some((scheme, rest)) = raw.split_once("://") else {
                    return Err(bad(e));
                };
                let (hosts, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                if !hosts.contains(',') {
                    return Err(bad(e));
                }
                if hosts.contains('@') {
                    return Err(Error::config(format!(
                        "{what} URL lists several hosts and credentials: give credentials another way"
                    )));
                }
                let first = hosts.split(',').next().unwrap_or_default();
                for h in hosts.split(',') {
                    url::Url::parse(&format!("{scheme}://{h}")).map_err(bad)?;
                }
                let url = url::Url::parse(&format!("{scheme}://{first}{path}")).map_err(bad)?;
                Ok(SecretUrl {
                    url,
                    host_list: Some(raw.to_owned()),
                })
            }
        }
    }

    /// The URL scheme, e.g. `postgres`.
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// The full URL including any password. Pass it to a driver; never log it.
    pub fn expose(&self) -> &str {
        self.host_list.as_deref().unwrap_or(self.url.as_str())
    }

    /// The parsed URL, including any password (for a host list, the first host).
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The URL with the password replaced by `***`, safe for logs.
    pub fn redacted(&self) -> String {
        if let Some(list) = &self.host_list {
            // No credentials (refused by `parse`); a query may still hold secrets.
            return match list.split_once('?') {
                Some((head, _)) => format!("{head}?***"),
                None => list.clone(),
            };
        }
        let mut u = self.url.clone();
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        // Query parameters such as `password=` are removed wholesale.
        if u.query().is_some() {
            u.set_query(Some("***"));
        }
        u.to_string()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The relay's tuning knobs. Defaults are documented on each field; [`RelayConfig::validate`]
/// rejects values that cannot work.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Name of this relay instance, recorded with its heartbeats. Default: host-pid-random.
    pub relay_id: String,
    /// Rows claimed per batch. Default 256.
    pub batch_size: usize,
    /// Concurrent claim-publish-mark loops in this process. Default 2.
    pub workers: usize,
    /// The takeover bound: once this relay stops heart-beating (killed, paused, cut off from the
    /// database), another relay holds its partitions within this. The relay heart-beats every
    /// eighth of it ([`heartbeat_interval`](Self::heartbeat_interval)), counts as alive for
    /// three quarters of it after each heartbeat ([`liveness`](Self::liveness)), and stops
    /// publishing an eighth before that runs out. Default 2 s.
    pub lease: Duration,
    /// Longest wait between polls when idle; polling starts at 1 ms after activity and doubles
    /// up to this. Default 100 ms.
    pub poll_interval: Duration,
    /// How long to wait for the broker's confirmations of one batch. Default 10 s.
    pub publish_timeout: Duration,
    /// Attempts for a message the broker rejects (an unroutable command, a refusal by the
    /// broker) before it is dead-lettered, if [`RelayConfig::retry_window`] has also passed.
    /// Broker outages never count. Default 5.
    pub max_attempts: u32,
    /// How long a rejected message keeps being retried before it may be dead-lettered: a
    /// command whose owner is still being deployed must not become a dead letter in seconds.
    /// Retries come after `backoff_initial`, doubling up to `retry_delay_max`; the message is
    /// dead-lettered once it was attempted `max_attempts` times *and* those delays add up to the
    /// window. Zero: `max_attempts` alone decides. Default 5 minutes.
    pub retry_window: Duration,
    /// Longest delay between two attempts of a rejected message. Default 30 s.
    pub retry_delay_max: Duration,
    /// Largest message (payload plus headers) published; larger ones are dead-lettered at once.
    /// Default 1 MiB (NATS's default limit; RabbitMQ and Kafka allow more).
    pub max_message_bytes: usize,
    /// First backoff after a broker or database outage. Default 100 ms.
    pub backoff_initial: Duration,
    /// Backoff cap. Default 5 s.
    pub backoff_max: Duration,
    /// How often the relay samples the outbox (rows pending, the oldest one's age, dead
    /// letters) for its metrics and `/readyz`, and asks an idle broker whether it answers.
    /// Default 5 s.
    pub sample_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: default_relay_id(),
            batch_size: 256,
            workers: 2,
            lease: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
            publish_timeout: Duration::from_secs(10),
            max_attempts: 5,
            retry_window: Duration::from_secs(300),
            retry_delay_max: Duration::from_secs(30),
            max_message_bytes: 1024 * 1024,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            sample_interval: Duration::from_secs(5),
        }
    }
}

impl RelayConfig {
    /// Checks that the values can work together; the error says which value to change.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(Error::config(format!(
                "batch size {} must be between 1 and 10000",
                self.batch_size
            )));
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(Error::config(format!(
                "workers {} must be between 1 and 64",
                self.workers
            )));
        }
        if self.lease < Duration::from_millis(200) {
            return Err(Error::config(format!(
                "lease {:?} is too short: use at least 200ms (the relay heart-beats every eighth of it)",
                self.lease
            )));
        }
        if self.max_attempts == 0 || self.max_attempts > 1000 {
            return Err(Error::config(format!(
                "max attempts {} must be between 1 and 1000",
                self.max_attempts
            )));
        }
        if self.publish_timeout < Duration::from_millis(10) {
            return Err(Error::config(format!(
                "publish timeout {:?} is too short: use at least 10ms (nothing could ever be confirmed)",
                self.publish_timeout
            )));
        }
        if self.lease > Duration::from_secs(3600) {
            return Err(Error::config(format!(
                "lease {:?} is too long: use at most 1h (a crashed relay's keys would wait that long)",
                self.lease
            )));
        }
        if !(1024..=1 << 30).contains(&self.max_message_bytes) {
            return Err(Error::config(format!(
                "max message bytes {} must be between 1024 and 1073741824 (1 GiB)",
                self.max_message_bytes
            )));
        }
        if self.retry_window > Duration::from_secs(30 * 24 * 3600) {
            return Err(Error::config(format!(
                "retry window {:?} must be at most 30 days",
                self.retry_window
            )));
        }
        if self.retry_delay_max < self.backoff_initial {
            return Err(Error::config(
                "retry delay max must be at least the initial backoff",
            ));
        }
        if self.poll_interval > Duration::from_secs(60) {
            return Err(Error::config(format!(
                "poll interval {:?} must be at most 60s",
                self.poll_interval
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::config("poll interval must be greater than zero"));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&self.sample_interval)
        {
            return Err(Error::config(format!(
                "sample interval {:?} must be between 100ms and 1h",
                self.sample_interval
            )));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err(Error::config("backoff must satisfy 0 < initial <= max"));
        }
        if self.relay_id.is_empty()
            || self.relay_id.len() > 200
            || self.relay_id.chars().any(char::is_control)
        {
            return Err(Error::config(
                "relay id must be 1 to 200 bytes without control characters",
            ));
        }
        Ok(())
    }

    /// How often the relay heart-beats: an eighth of the lease.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 8
    }

    /// How long the database counts this relay as alive after a heartbeat: the lease less two
    /// heartbeat intervals (one for the survivor's next heartbeat, one in reserve).
    pub fn liveness(&self) -> Duration {
        self.lease - 2 * self.heartbeat_interval()
    }

    /// Until when after sending a successful heartbeat the relay may publish: the liveness less
    /// one heartbeat interval, so a publish started just before still lands before anyone can
    /// take over.
    pub fn publish_window(&self) -> Duration {
        self.liveness() - self.heartbeat_interval()
    }

    /// The delay before attempt `attempts + 1` of a rejected message.
    pub fn retry_delay(&self, attempts: u32) -> Duration {
        self.backoff_initial
            .saturating_mul(1 << attempts.min(20))
            .min(self.retry_delay_max)
    }

    /// How many rejections a message must have had before it is dead-lettered: at least
    /// `max_attempts`, and enough that the delays between them (after the 1st, 2nd, ...
    /// rejection, before the last) add up to `retry_window`. The delays double until
    /// `retry_delay_max`, then stay there, so this takes a few dozen steps whatever the window.
    pub fn attempts_before_dead_letter(&self) -> u32 {
        if self.retry_window.is_zero() {
            return self.max_attempts;
        }
        // Rejections n = 1, 2, ...: before the n-th, n - 1 delays have passed.
        let mut waited = Duration::ZERO;
        let mut n: u32 = 1;
        while waited < self.retry_window {
            let delay = self.retry_delay(n - 1);
            if delay >= self.retry_delay_max {
                // From here on every delay is the cap: finish in one step.
                let left = self.retry_window - waited;
                let more = left
                    .as_nanos()
                    .div_ceil(self.retry_delay_max.as_nanos().max(1));
                n = n.saturating_add(u32::try_from(more).unwrap_or(u32::MAX));
                break;
            }
            waited += delay;
            n += 1;
        }
        n.max(self.max_attempts)
    }
}

fn default_relay_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_allow_listed() {
        for ok in ["herald_outbox", "_x", "A1", &"a".repeat(63)] {
            assert!(Identifier::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "outbox\"; DROP TABLE x;--",
            "a b",
            "a-b",
            "ü",
            &"a".repeat(64),
            "x.y",
        ] {
            let err = Identifier::new(bad).unwrap_err().to_string();
            assert!(err.contains("is not allowed"), "{bad}: {err}");
        }
    }

    #[test]
    fn host_lists_are_kept_and_checked() {
        let u = SecretUrl::parse("broker", "kafka://k1:9092,k2:9093,k3:9094").unwrap();
        assert_eq!(u.scheme(), "kafka");
        assert_eq!(u.expose(), "kafka://k1:9092,k2:9093,k3:9094");
        assert_eq!(u.redacted(), "kafka://k1:9092,k2:9093,k3:9094");
        let err = SecretUrl::parse("broker", "kafka://u:s3cr3t@k1:9092,k2:9092")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("credentials") && !err.contains("s3cr3t"),
            "{err}"
        );
        assert!(SecretUrl::parse("broker", "kafka://k1:9092,k2:notaport").is_err());
    }

    #[test]
    fn urls_never_show_passwords() {
        let u = SecretUrl::parse(
            "database",
            "postgres://app:s3cr3t-sentinel@db:5432/x?password=p2",
        )
        .unwrap();
        assert!(!format!("{u} {u:?} {}", u.redacted()).contains("s3cr3t-sentinel"));
        assert!(!u.redacted().contains("p2"));
        assert!(u.expose().contains("s3cr3t-sentinel"));
        let err = SecretUrl::parse("database", "not a url s3cr3t")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn the_retry_window_sets_the_attempts() {
        let cfg = RelayConfig::default();
        // Delays after the 1st..9th rejections: 0.1 + 0.2 + ... + 25.6 s = 51.1 s; then 30 s
        // each: 9 more make 321.1 s >= 300 s, so the 19th rejection (18 delays) dead-letters.
        assert_eq!(cfg.attempts_before_dead_letter(), 19);
        let waited: Duration = (0..18).map(|i| cfg.retry_delay(i)).sum();
        assert!(waited >= cfg.retry_window);
        let one_less: Duration = (0..17).map(|i| cfg.retry_delay(i)).sum();
        assert!(one_less < cfg.retry_window);
        // A month of 100 ms retries is computed at once, not in 26 million steps.
        let long = RelayConfig {
            retry_window: Duration::from_secs(30 * 24 * 3600),
            retry_delay_max: Duration::from_millis(100),
            ..RelayConfig::default()
        };
        assert_eq!(long.attempts_before_dead_letter(), 25_920_001);
        let none = RelayConfig {
            retry_window: Duration::ZERO,
            max_attempts: 1,
            ..RelayConfig::default()
        };
        assert_eq!(none.attempts_before_dead_letter(), 1);
        let many = RelayConfig {
            retry_window: Duration::from_secs(1),
            max_attempts: 40,
            ..RelayConfig::default()
        };
        assert_eq!(many.attempts_before_dead_letter(), 40);
    }

    #[test]
    fn zero_and_absurd_values_are_refused() {
        for (bad, what) in [
            (
                RelayConfig {
                    publish_timeout: Duration::ZERO,
                    ..RelayConfig::default()
                },
                "publish timeout",
            ),
            (
                RelayConfig {
                    max_message_bytes: 0,
                    ..RelayConfig::default()
                },
                "max message bytes",
            ),
            (
                RelayConfig {
                    max_attempts: 0,
                    ..RelayConfig::default()
                },
                "max attempts",
            ),
            (
                RelayConfig {
                    lease: Duration::from_secs(100 * 24 * 3600),
                    ..RelayConfig::default()
                },
                "lease",
            ),
            (
                RelayConfig {
                    poll_interval: Duration::ZERO,
                    ..RelayConfig::default()
                },
                "poll interval",
            ),
            (
                RelayConfig {
                    workers: 0,
                    ..RelayConfig::default()
                },
                "workers",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err} should name {what}");
        }
    }

    #[test]
    fn relay_config_validation_says_what_to_fix() {
        assert!(RelayConfig::default().validate().is_ok());
        let bad = RelayConfig {
            batch_size: 0,
            ..RelayConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("batch size")
        );
        let bad = RelayConfig {
            lease: Duration::from_millis(100),
            ..RelayConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("heart-beats")
        );
    }
}
