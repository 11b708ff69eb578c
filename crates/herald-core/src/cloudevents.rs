//! CloudEvents 1.0 in binary mode, as every transport puts it on the wire: the attributes travel
//! beside the payload (as headers, properties or fields, each transport with its own prefix,
//! `ce-` or `ce_`), the payload is the message body. See `docs/WIRE.md`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::message::{Kind, Message, parse_rfc3339, rfc3339};

/// Sent as `source` when a message has none (CloudEvents requires a non-empty one).
pub const DEFAULT_SOURCE: &str = "/herald";

/// Attribute names herald writes itself; message headers of these names are not sent.
pub const RESERVED: [&str; 7] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "partitionkey",
    "heraldkind",
];

/// The attributes of `m`, names without a prefix: `specversion`, `id`, `source`, `type`, `time`,
/// `heraldkind`, `partitionkey` (when keyed), then one per message header.
pub fn attributes(m: &Message) -> Vec<(String, String)> {
    let mut out = vec![
        ("specversion".to_owned(), "1.0".to_owned()),
        ("id".to_owned(), m.id.to_string()),
        (
            "source".to_owned(),
            if m.source.is_empty() {
                DEFAULT_SOURCE.to_owned()
            } else {
                m.source.clone()
            },
        ),
        ("type".to_owned(), m.message_type.clone()),
        ("time".to_owned(), rfc3339(m.created_at)),
        ("heraldkind".to_owned(), m.kind.as_str().to_owned()),
    ];
    if let Some(key) = &m.ordering_key {
        out.push(("partitionkey".to_owned(), key.clone()));
    }
    out.extend(
        m.headers
            .iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    out
}

/// Rebuilds a message from its attributes (names without a prefix; `prefix` is the transport's
/// spelling, for error messages). The attributes left over become the message's headers.
pub fn from_attributes(
    mut attrs: BTreeMap<String, String>,
    prefix: &str,
    kind: Kind,
    destination: &str,
    content_type: Option<String>,
    payload: Vec<u8>,
) -> Result<Message> {
    let missing = |what: &str| Error::Decode {
        reason: format!("missing CloudEvents attribute {prefix}{what}"),
    };
    let id_text = attrs.remove("id").ok_or_else(|| missing("id"))?;
    let id = uuid::Uuid::parse_str(&id_text).map_err(|e| Error::Decode {
        reason: format!("{prefix}id {id_text:?} is not a UUID: {e}"),
    })?;
    let message_type = attrs.remove("type").ok_or_else(|| missing("type"))?;
    attrs.remove("heraldkind");
    attrs.remove("specversion");
    Ok(Message {
        id,
        kind,
        message_type,
        source: attrs.remove("source").unwrap_or_default(),
        destination: destination.to_owned(),
        ordering_key: attrs.remove("partitionkey"),
        created_at: attrs
            .remove("time")
            .and_then(|t| parse_rfc3339(&t))
            .unwrap_or_else(SystemTime::now),
        headers: attrs,
        content_type: content_type.unwrap_or_else(|| "application/octet-stream".to_owned()),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let m = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec())
            .with_key("o-1")
            .with_source("/shop")
            .with_header("traceparent", "00-ab-cd-01")
            .with_header("id", "ignored: reserved");
        let attrs: BTreeMap<String, String> = attributes(&m).into_iter().collect();
        assert_eq!(
            attrs["id"],
            m.id.to_string(),
            "a reserved header never overrides"
        );
        let back = from_attributes(
            attrs,
            "ce-",
            Kind::Event,
            "orders",
            Some(m.content_type.clone()),
            m.payload.clone(),
        )
        .unwrap();
        let mut expected = m.clone();
        expected.headers.remove("id");
        assert_eq!(back, expected);
        let err = from_attributes(BTreeMap::new(), "ce_", Kind::Event, "t", None, vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ce_id"), "{err}");
    }
}
