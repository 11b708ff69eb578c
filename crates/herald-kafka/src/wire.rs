//! Topics, keys and headers on Kafka: the CloudEvents Kafka protocol binding (binary mode). See
//! `docs/WIRE.md`.

use std::collections::BTreeMap;

use herald_core::{Error, Kind, Message, Result, cloudevents};
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Checks that a topic or queue name is a legal Kafka topic name (after the `commands.` prefix
/// for commands): 1 to 240 letters, digits, `.`, `_` and `-`.
pub fn check_destination(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 240
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        let name: String = name.chars().take(80).collect();
        Err(Error::unpublishable(format!(
            "destination {name:?} is not a usable Kafka topic name: use 1 to 240 letters, digits, '.', '_' and '-'"
        )))
    }
}

/// librdkafka's default `message.max.bytes`: the largest record (key, headers and value) the
/// producer sends.
pub const MAX_RECORD_BYTES: usize = 1_000_000;

/// Bytes a record for `m` takes, roughly: key, value, header names and values, and the
/// per-field overhead of the record format.
pub fn record_bytes(m: &Message) -> usize {
    let headers: usize = cloudevents::attributes(m)
        .iter()
        .map(|(k, v)| 3 + k.len() + v.len() + 10)
        .sum();
    m.payload.len()
        + m.ordering_key.as_ref().map_or(0, String::len)
        + headers
        + m.content_type.len()
        + 64
}

/// Checks `m` against Kafka's limits: a legal topic name and a record within
/// [`MAX_RECORD_BYTES`].
pub fn check_limits(m: &Message) -> Result<()> {
    check_destination(&m.destination)?;
    let size = record_bytes(m);
    if size > MAX_RECORD_BYTES {
        return Err(Error::unpublishable(format!(
            "the record takes {size} bytes, over the Kafka producer's size limit (message.max.bytes) of {MAX_RECORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The Kafka topic of `destination`: events go to the topic named by it, commands to
/// `commands.<queue>`, so a queue and a topic of one name never mix.
pub fn topic(kind: Kind, destination: &str) -> String {
    match kind {
        Kind::Event => destination.to_owned(),
        Kind::Command => format!("commands.{destination}"),
    }
}

/// The record headers for `m`: `ce_` attributes and `content-type`.
pub fn headers(m: &Message) -> OwnedHeaders {
    // The partition key travels as the record key (the Kafka binding), not as a header.
    let attrs = cloudevents::attributes(m);
    let mut h = OwnedHeaders::new_with_capacity(attrs.len() + 1);
    for (k, v) in attrs.iter().filter(|(k, _)| k != "partitionkey") {
        h = h.insert(Header {
            key: &format!("ce_{k}"),
            value: Some(v.as_str()),
        });
    }
    h = h.insert(Header {
        key: "content-type",
        value: Some(m.content_type.as_str()),
    });
    h
}

/// Rebuilds a message from a record's headers, key and payload.
pub fn decode(
    kind: Kind,
    destination: &str,
    headers: Option<&impl Headers>,
    key: Option<&[u8]>,
    payload: Vec<u8>,
) -> Result<Message> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    let mut content_type = None;
    if let Some(h) = headers {
        for header in h.iter() {
            let Some(value) = header.value else { continue };
            let value = String::from_utf8(value.to_vec()).map_err(|_| Error::Decode {
                reason: format!("header {:?} is not UTF-8", header.key),
            })?;
            if let Some(attr) = header.key.strip_prefix("ce_") {
                attrs.insert(attr.to_owned(), value);
            } else if header.key.eq_ignore_ascii_case("content-type") {
                content_type = Some(value);
            }
        }
    }
    // The record key is the partition key.
    if let Some(k) = key {
        let key = String::from_utf8(k.to_vec()).map_err(|_| Error::Decode {
            reason: "the record key is not UTF-8".to_owned(),
        })?;
        attrs.insert("partitionkey".to_owned(), key);
    }
    cloudevents::from_attributes(attrs, "ce_", kind, destination, content_type, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())
            .with_key("o-1")
            .with_source("/shop")
            .with_header("traceparent", "00-ab-cd-01");
        let h = headers(&m);
        let back = decode(
            Kind::Event,
            "orders",
            Some(&h),
            m.ordering_key.as_deref().map(str::as_bytes),
            m.payload.clone(),
        )
        .unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn names() {
        for bad in ["", "a b", "a/b", ".", "..", &"x".repeat(241)] {
            assert!(check_destination(bad).is_err(), "{bad:?}");
        }
        assert_eq!(topic(Kind::Command, "billing"), "commands.billing");
        assert_eq!(topic(Kind::Event, "shop.orders"), "shop.orders");
    }
}
