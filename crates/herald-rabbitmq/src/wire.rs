//! The mapping between herald's [`Message`] and AMQP 0-9-1, following the CloudEvents RabbitMQ
//! binding in binary content mode: attributes as `ce-` headers, `datacontenttype` in the
//! `content_type` property, the payload as the body. See `docs/WIRE.md`.

use std::collections::BTreeMap;

use herald_core::{Error, Kind, Message, Result, cloudevents};
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

/// Longest AMQP short string: exchange and queue names, routing keys, the `type`, `content_type`
/// and `message_id` properties, header names.
pub const SHORT_STRING_MAX: usize = 255;

/// Checks `m` against AMQP 0-9-1's short-string limits (lapin panics on a longer one) and
/// RabbitMQ's reserved names. The frame-size check needs the connection: [`check_frame`].
pub fn check_limits(m: &Message) -> Result<()> {
    let short = |field: &str, value: &str| {
        if value.len() > SHORT_STRING_MAX {
            Err(Error::unpublishable(format!(
                "{field} is {} bytes, over AMQP's short-string limit of {SHORT_STRING_MAX} bytes",
                value.len()
            )))
        } else {
            Ok(())
        }
    };
    short("destination", &m.destination)?;
    short("message_type", &m.message_type)?;
    short("content_type", &m.content_type)?;
    // Header names are `ce-` plus at most 64 bytes (Message::check_cloudevents, checked first
    // by `RabbitTransport::validate`): always short strings.
    if m.destination.starts_with("amq.") {
        return Err(Error::unpublishable(format!(
            "destination {:?} starts with \"amq.\", which RabbitMQ reserves for its own exchanges and queues",
            m.destination
        )));
    }
    Ok(())
}

/// Bytes the content header frame of `m` takes: RabbitMQ cannot split it across frames, so it
/// must fit in the connection's `frame_max` (a larger one is a FRAME_ERROR that closes the
/// whole connection, taking the batch with it).
pub fn header_frame_size(m: &Message) -> usize {
    let table: usize = cloudevents::attributes(m)
        .iter()
        .map(|(k, v)| 1 + 3 + k.len() + 1 + 4 + v.len())
        .sum();
    let properties = 2 // property flags
        + (1 + m.id.to_string().len())
        + (1 + m.content_type.len())
        + (1 + m.message_type.len())
        + 1 // delivery mode
        + 8 // timestamp
        + 4 + table;
    8 /* frame envelope */ + 12 /* class, weight, body size */ + properties
}

/// Checks that the header frame of `m` fits in `frame_max` (0: no limit).
pub fn check_frame(m: &Message, frame_max: u32) -> Result<()> {
    let size = header_frame_size(m);
    if frame_max != 0 && size > frame_max as usize {
        return Err(Error::unpublishable(format!(
            "the message's headers and properties take {size} bytes, over the connection's AMQP frame size limit (frame_max) of {frame_max} bytes (RabbitMQ cannot split them across frames)"
        )));
    }
    Ok(())
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
        let m = Message::raw_command("billing", "ChargeCard", br#"{"amount":5}"#.to_vec())
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
    fn wire_limits_are_checked_before_lapin_sees_a_value() {
        let ok = Message::raw_command("billing", "ChargeCard", vec![]);
        assert!(check_limits(&ok).is_ok());
        let long = "x".repeat(256);
        for (m, what) in [
            (
                Message::raw_command(long.clone(), "T", vec![]),
                "destination",
            ),
            (
                Message::raw_command("q", long.clone(), vec![]),
                "message_type",
            ),
            (ok.clone().with_content_type(long.clone()), "content_type"),
            (Message::raw_event("amq.topic", "T", vec![]), "amq."),
        ] {
            let err = check_limits(&m).unwrap_err();
            assert!(matches!(err, Error::Unpublishable { .. }), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        let big = ok.clone().with_header("big", "v".repeat(200_000));
        let err = check_frame(&big, 131_072).unwrap_err().to_string();
        assert!(err.contains("frame_max) of 131072"), "{err}");
        assert!(check_frame(&ok, 131_072).is_ok());
    }

    #[test]
    fn missing_id_is_a_decode_error() {
        let err = decode("t", &BasicProperties::default(), vec![]).unwrap_err();
        assert!(err.to_string().contains("ce-id"), "{err}");
    }
}
