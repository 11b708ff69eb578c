//! Subjects, stream names and headers on NATS. See `docs/WIRE.md`.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use herald_core::{Error, Kind, Message, Result, cloudevents};

/// Checks that a topic or queue name can be a subject suffix: letters, digits, `_`, `-` and `.`
/// between tokens, at most 200 bytes. Wildcards and `$`-prefixed system subjects are refused so
/// that a destination taken from data cannot reach another subject or the JetStream API.
pub fn check_destination(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::rejected(format!(
            "destination {name:?} is not usable on NATS: use letters, digits, '_', '-' and '.' between tokens"
        )))
    }
}

/// The subject a message of `kind` for `destination` is published on.
pub fn subject(kind: Kind, destination: &str) -> String {
    match kind {
        Kind::Event => format!("herald.events.{destination}"),
        Kind::Command => format!("herald.commands.{destination}"),
    }
}

/// The stream keeping `destination`'s messages.
pub fn stream_name(kind: Kind, destination: &str) -> String {
    let safe: String = destination
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match kind {
        Kind::Event => format!("HERALD_EVENTS_{safe}"),
        Kind::Command => format!("HERALD_COMMANDS_{safe}"),
    }
}

/// A durable consumer name for a service.
pub fn durable_name(service: &str) -> String {
    service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Headers for `m`.
pub fn headers(m: &Message) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", m.id.to_string().as_str());
    for (k, v) in cloudevents::attributes(m) {
        h.insert(format!("ce-{k}").as_str(), v.as_str());
    }
    h.insert("content-type", m.content_type.as_str());
    h
}

/// Rebuilds a message from a JetStream message's headers and payload.
pub fn decode(
    kind: Kind,
    destination: &str,
    headers: Option<&HeaderMap>,
    body: Vec<u8>,
) -> Result<Message> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    let mut content_type = None;
    if let Some(h) = headers {
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            let Some(value) = values.first() else {
                continue;
            };
            if let Some(attr) = name.strip_prefix("ce-") {
                attrs.insert(attr.to_owned(), value.as_str().to_owned());
            } else if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(value.as_str().to_owned());
            }
        }
    }
    cloudevents::from_attributes(attrs, "ce-", kind, destination, content_type, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message::event("orders", "OrderPlaced", b"{}".to_vec())
            .with_key("o-1")
            .with_source("/shop")
            .with_header("traceparent", "00-ab-cd-01");
        let back = decode(Kind::Event, "orders", Some(&headers(&m)), m.payload.clone()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn destinations_cannot_reach_other_subjects() {
        for bad in [
            "",
            "a.*",
            "a.>",
            "$JS.API.STREAM.DELETE.x",
            "a b",
            "a..b",
            ".a",
            "_INBOX x",
        ] {
            assert!(check_destination(bad).is_err(), "{bad}");
        }
        for ok in ["orders", "shop.orders", "billing-commands_1"] {
            assert!(check_destination(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            subject(Kind::Event, "shop.orders"),
            "herald.events.shop.orders"
        );
        assert_eq!(
            stream_name(Kind::Command, "shop.orders"),
            "HERALD_COMMANDS_shop_orders"
        );
    }
}
