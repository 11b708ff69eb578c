//! The mapping between herald's [`Message`] and AMQP 0-9-1, following the CloudEvents RabbitMQ
//! binding in binary content mode: attributes as `ce-` headers, `datacontenttype` in the
//! `content_type` property, the payload as the body. See `docs/WIRE.md`.

use std::collections::BTreeMap;

use herald_core::{Kind, Message, Result, cloudevents};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// AMQP properties and headers for `m`.
pub fn properties(m: &Message) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        headers.insert(
            ShortString::from(format!("ce-{k}")),
            AMQPValue::LongString(v.into()),
        );
    };
    for (k, v) in cloudevents::attributes(m) {
        put(&k, &v);
    }
    let micros = m.created_at_micros();
    BasicProperties::default()
        .with_message_id(m.id.to_string().into())
        .with_content_type(m.content_type.as_str().into())
        .with_type(m.message_type.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp((micros / 1_000_000).max(0) as u64)
        .with_headers(headers)
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Rebuilds a message from a delivery's properties and body. `destination` is the topic or queue
/// the subscription reads.
pub fn decode(destination: &str, props: &BasicProperties, body: Vec<u8>) -> Result<Message> {
    let mut attrs: BTreeMap<String, String> = BTreeMap::new();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            if let (Some(name), Some(value)) = (k.as_str().strip_prefix("ce-"), text(v)) {
                attrs.insert(name.to_owned(), value);
            }
        }
    }
    if !attrs.contains_key("id")
        && let Some(id) = props.message_id()
    {
        attrs.insert("id".to_owned(), id.to_string());
    }
    let kind = match attrs.get("heraldkind").map(String::as_str) {
        Some("command") => Kind::Command,
        _ => Kind::Event,
    };
    cloudevents::from_attributes(
        attrs,
        "ce-",
        kind,
        destination,
        props.content_type().as_ref().map(|c| c.to_string()),
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_amqp_properties() {
        let m = Message::command("billing", "ChargeCard", br#"{"amount":5}"#.to_vec())
            .with_key("order-7")
            .with_source("/shop")
            .with_header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
        let props = properties(&m);
        let back = decode("billing", &props, m.payload.clone()).unwrap();
        assert_eq!(back, m);
        let h = props.headers().as_ref().unwrap();
        assert!(h.inner().contains_key("ce-specversion"));
        assert_eq!(props.delivery_mode(), &Some(2));
    }

    #[test]
    fn missing_id_is_a_decode_error() {
        let err = decode("t", &BasicProperties::default(), vec![]).unwrap_err();
        assert!(err.to_string().contains("ce-id"), "{err}");
    }
}
