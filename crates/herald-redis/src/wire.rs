//! Stream keys and entry fields on Redis. See `docs/WIRE.md`.

use std::collections::BTreeMap;

use herald_core::{Error, Kind, Message, Result, cloudevents};

/// The entry field holding the payload.
pub const DATA: &str = "data";

/// Checks that a topic or queue name is usable in a stream key: 1 to 200 bytes of letters,
/// digits, `_`, `-`, `.` and `:`.
pub fn check_destination(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        let name: String = name.chars().take(80).collect();
        Err(Error::unpublishable(format!(
            "destination {name:?} is not usable on Redis: use 1 to 200 letters, digits, '_', '-', '.' and ':'"
        )))
    }
}

/// The stream a message of `kind` for `destination` is added to.
pub fn stream_key(kind: Kind, destination: &str) -> String {
    match kind {
        Kind::Event => format!("herald:events:{destination}"),
        Kind::Command => format!("herald:commands:{destination}"),
    }
}

/// The entry fields for `m`, in order: CloudEvents attributes as `ce-` fields (binary mode, as on
/// the other brokers), `content-type`, then the payload as `data`.
pub fn fields(m: &Message) -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = cloudevents::attributes(m)
        .into_iter()
        .map(|(k, v)| (format!("ce-{k}"), v.into_bytes()))
        .collect();
    f.push(("content-type".into(), m.content_type.as_bytes().to_vec()));
    f.push((DATA.into(), m.payload.clone()));
    f
}

/// Rebuilds a message from an entry's fields. The error says what is wrong; the caller parks the
/// entry with it.
pub fn decode(kind: Kind, destination: &str, fields: Vec<(String, Vec<u8>)>) -> Result<Message> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    let mut content_type = None;
    let mut payload = None;
    for (name, value) in fields {
        if name == DATA {
            payload = Some(value);
            continue;
        }
        let text = String::from_utf8(value).map_err(|_| Error::Decode {
            reason: format!("field {name:?} is not UTF-8"),
        })?;
        if let Some(attr) = name.strip_prefix("ce-") {
            attrs.insert(attr.to_owned(), text);
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(text);
        }
    }
    let Some(payload) = payload else {
        // Report a missing attribute first: an entry that is not herald's at all says so.
        cloudevents::from_attributes(attrs, "ce-", kind, destination, content_type, Vec::new())?;
        return Err(Error::Decode {
            reason: format!("missing field {DATA:?}"),
        });
    };
    cloudevents::from_attributes(attrs, "ce-", kind, destination, content_type, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message::raw_event("orders", "OrderPlaced", b"\x00{}".to_vec())
            .with_key("o-1")
            .with_source("/shop")
            .with_header("traceparent", "00-ab-cd-01");
        assert_eq!(decode(Kind::Event, "orders", fields(&m)).unwrap(), m);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = decode(Kind::Event, "t", vec![("hello".into(), b"x".to_vec())]).unwrap_err();
        assert!(err.to_string().contains("ce-id"), "{err}");
        for bad in ["", "a b", "a\nb", "a*", &"x".repeat(201)] {
            assert!(check_destination(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            stream_key(Kind::Command, "billing"),
            "herald:commands:billing"
        );
    }
}
