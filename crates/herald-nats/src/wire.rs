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
        let shown: String = name.chars().take(80).collect();
        Err(Error::unpublishable(format!(
            "destination {shown:?} is not usable on NATS: use 1 to 200 letters, digits, '_', '-' and '.' between tokens"
        )))
    }
}

/// Largest header block NATS JetStream stores (the server refuses more, error 10097).
pub const MAX_HEADER_BYTES: usize = 65_535;

/// Bytes the header block of `m` takes on the wire (`NATS/1.0`, one `name: value` line each).
pub fn header_bytes(m: &Message) -> usize {
    let lines: usize = header_pairs(m)
        .iter()
        .map(|(k, v)| k.len() + 2 + v.len() + 2)
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// Checks `m` against what NATS can carry: a subject-safe destination, header names and values
/// async-nats accepts (it panics on others: no control characters, no ':' in names), a header
/// block within [`MAX_HEADER_BYTES`], and headers plus payload within the server's
/// `max_payload` (0: unknown).
pub fn check_limits(m: &Message, max_payload: usize) -> Result<()> {
    check_destination(&m.destination)?;
    for (name, value) in header_pairs(m) {
        let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !name_ok {
            return Err(Error::unpublishable(format!(
                "header name {:?} is not a valid NATS header name",
                name.chars().take(40).collect::<String>()
            )));
        }
        if value.contains(['\r', '\n']) {
            return Err(Error::unpublishable(format!(
                "header {name:?} holds a line break, which NATS headers cannot carry"
            )));
        }
    }
    let headers = header_bytes(m);
    if headers > MAX_HEADER_BYTES {
        return Err(Error::unpublishable(format!(
            "the message's headers take {headers} bytes, over NATS JetStream's limit of {MAX_HEADER_BYTES} bytes"
        )));
    }
    let total = headers + m.payload.len();
    if max_payload > 0 && total > max_payload {
        return Err(Error::unpublishable(format!(
            "headers and payload take {total} bytes, over the NATS server's size limit (max_payload) of {max_payload} bytes"
        )));
    }
    Ok(())
}

fn header_pairs(m: &Message) -> Vec<(String, String)> {
    let mut out = vec![
        ("Nats-Msg-Id".to_owned(), m.id.to_string()),
        ("content-type".to_owned(), m.content_type.clone()),
    ];
    out.extend(
        cloudevents::attributes(m)
            .into_iter()
            .map(|(k, v)| (format!("ce-{k}"), v)),
    );
    out
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

/// Headers for `m`. Call [`check_limits`] first: async-nats panics on an invalid name or value.
pub fn headers(m: &Message) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in header_pairs(m) {
        h.insert(k.as_str(), v.as_str());
    }
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
        let m = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())
            .with_key("o-1")
            .with_source("/shop")
            .with_header("traceparent", "00-ab-cd-01");
        let back = decode(Kind::Event, "orders", Some(&headers(&m)), m.payload.clone()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn values_async_nats_would_panic_on_are_refused_first() {
        let ok = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec()).with_key("k");
        assert!(check_limits(&ok, 1 << 20).is_ok());
        let mut newline_key = ok.clone();
        newline_key.ordering_key = Some("a\nb".to_owned());
        let mut newline_type = ok.clone();
        newline_type.message_type = "A\r\nB".to_owned();
        let mut bad_name = ok.clone();
        bad_name.headers.insert("a b".to_owned(), "v".to_owned());
        let mut colon = ok.clone();
        colon.headers.insert("a:b".to_owned(), "v".to_owned());
        for (m, what) in [
            (newline_key, "line break"),
            (newline_type, "line break"),
            (bad_name, "not a valid NATS header name"),
            (colon, "not a valid NATS header name"),
            (ok.clone().with_header("big", "v".repeat(70_000)), "65535"),
            (
                Message::raw_event("orders", "T", vec![0; 2000]),
                "max_payload) of 1000",
            ),
        ] {
            let err = check_limits(&m, 1000).unwrap_err();
            assert!(matches!(err, Error::Unpublishable { .. }), "{err}");
            assert!(err.to_string().contains(what), "{err} should say {what}");
        }
        // What passes the check never panics async-nats.
        let _ = headers(&ok.with_header("tenant", "été"));
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
