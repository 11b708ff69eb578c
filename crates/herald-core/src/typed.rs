//! Typed messages: payloads serialized with serde (JSON by default), the message type named
//! after the Rust type.
//!
//! ```
//! use herald_core::Message;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct OrderPlaced { order: u64, total_cents: i64 }
//!
//! let m = Message::event("orders", &OrderPlaced { order: 7, total_cents: 1250 })?.with_key("order-7");
//! assert_eq!(m.message_type, "OrderPlaced");
//! assert_eq!(m.content_type, "application/json");
//! assert_eq!(m.json::<OrderPlaced>()?, OrderPlaced { order: 7, total_cents: 1250 });
//! # Ok::<(), herald_core::Error>(())
//! ```
//!
//! **The type name** is serde's name for the type: the struct's or enum's name, or the
//! `#[serde(rename = "...")]` given to it, so sender and receiver agree without repeating a
//! string. Types serde does not name (a `String`, a `#[serde(transparent)]` wrapper, an untagged
//! enum) take their Rust name without the module path. [`Message::with_type`] overrides it for
//! one message.

use serde::Serialize;
use serde::de::{DeserializeOwned, Visitor};
use serde::ser::Impossible;

use crate::{Error, Kind, Message, Result};

/// How a typed payload becomes bytes and back. [`Json`] is herald's default; another format
/// (MessagePack, Protobuf through serde, ...) implements this and is used with
/// [`Message::encoded`] and [`Message::decode_with`].
pub trait Codec {
    /// The media type stored in the message's `content_type` (CloudEvents `datacontenttype`).
    fn content_type(&self) -> &str;
    /// Serializes `value`.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> std::result::Result<Vec<u8>, String>;
    /// Deserializes a payload.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> std::result::Result<T, String>;
}

/// JSON through `serde_json`, content type `application/json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    fn content_type(&self) -> &str {
        "application/json"
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> std::result::Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| e.to_string())
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> std::result::Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// Whether `content_type` is JSON: `application/json`, `text/json` or a `+json` suffix, with or
/// without parameters. An empty content type counts as JSON (herald's default).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence.is_empty()
        || essence == "application/json"
        || essence == "text/json"
        || essence.ends_with("+json")
}

impl Message {
    /// An event for `topic` whose payload is `value` as JSON, named after its type (see the
    /// [module docs](crate::typed)). Fails with [`Error::Unpublishable`] if the value does not
    /// serialize (a map with non-string keys, a failing `Serialize` impl).
    pub fn event<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> Result<Message> {
        Message::encoded(Kind::Event, topic, value, &Json)
    }

    /// A command for the owner's queue `queue`, otherwise like [`Message::event`].
    pub fn command<T: Serialize + ?Sized>(queue: impl Into<String>, value: &T) -> Result<Message> {
        Message::encoded(Kind::Command, queue, value, &Json)
    }

    /// A message whose payload is `value` encoded with `codec` (its content type set
    /// accordingly), named after the value's type.
    pub fn encoded<T: Serialize + ?Sized, C: Codec>(
        kind: Kind,
        destination: impl Into<String>,
        value: &T,
        codec: &C,
    ) -> Result<Message> {
        let message_type = type_name_of_value(value);
        let payload = codec.encode(value).map_err(|e| {
            Error::unpublishable(format!(
                "the {message_type} payload does not serialize as {}: {e}",
                codec.content_type()
            ))
        })?;
        let mut m = match kind {
            Kind::Event => Message::raw_event(destination, message_type, payload),
            Kind::Command => Message::raw_command(destination, message_type, payload),
        };
        m.content_type = codec.content_type().to_owned();
        Ok(m)
    }

    /// Sets the message type, overriding the name taken from the payload's type.
    pub fn with_type(mut self, message_type: impl Into<String>) -> Message {
        self.message_type = message_type.into();
        self
    }

    /// The payload as JSON of type `T`. Fails with [`Error::Decode`] naming the type and serde's
    /// error (never the payload), which a consumer parks at once: retrying cannot help.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        self.decode_with(&Json)
    }

    /// The payload decoded by its content type: JSON for `application/json` (and `+json`,
    /// `text/json`, empty). Any other content type fails with [`Error::Decode`]: decode those
    /// with [`decode_with`](Self::decode_with) and their codec.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        if !is_json(&self.content_type) {
            let shown: String = self.content_type.chars().take(80).collect();
            return Err(Error::Decode {
                reason: format!(
                    "message {} has content type {shown:?}, not JSON: decode it with its codec (Message::decode_with)",
                    self.id
                ),
            });
        }
        self.json()
    }

    /// The payload decoded with `codec`, whatever the content type says.
    pub fn decode_with<T: DeserializeOwned, C: Codec>(&self, codec: &C) -> Result<T> {
        codec.decode(&self.payload).map_err(|e| Error::Decode {
            reason: format!(
                "message {} (type {:?}) is not a valid {} as {}: {}",
                self.id,
                self.message_type.chars().take(80).collect::<String>(),
                short_type_name::<T>(),
                codec.content_type(),
                without_values(&e)
            ),
        })
    }
}

/// A decoder's error without the payload's values: serde describes a value it did not expect
/// (`invalid type: string "4111 1111 1111 1111", expected u64`), and payloads never appear in
/// herald's errors or logs. What is kept: the kind of value, what was expected, field and variant
/// names, and the position.
pub fn without_values(error: &str) -> String {
    let mut out = String::with_capacity(error.len());
    let mut rest = error;
    for lead in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(tail) = rest.strip_prefix(lead) {
            out.push_str(lead);
            let (value, after) = tail.split_once(", expected").unwrap_or((tail, ""));
            // The kind of value is its first word: string, integer, map, sequence, ...
            let kind: String = value
                .chars()
                .take_while(|c| c.is_ascii_alphabetic() || *c == ' ')
                .collect();
            out.push_str(kind.trim_end());
            if !after.is_empty() {
                out.push_str(", expected");
            }
            rest = after;
            break;
        }
    }
    out.push_str(rest);
    out.chars().take(400).collect()
}

/// The message type a value of type `T` is sent as: serde's name for it, else its Rust name.
pub fn type_name_of_value<T: Serialize + ?Sized>(value: &T) -> String {
    match value.serialize(NameOf) {
        Err(Probed(Some(name))) => name.to_owned(),
        _ => short_type_name::<T>(),
    }
}

/// The message type `T` is received as: serde's name for it, else its Rust name. Agrees with
/// [`type_name_of_value`] for structs and enums, renamed or not.
pub fn type_name_of<T: DeserializeOwned>() -> String {
    match T::deserialize(NameOf) {
        Err(Probed(Some(name))) => name.to_owned(),
        _ => short_type_name::<T>(),
    }
}

/// `std::any::type_name` without module paths: `Vec<shop::Line>` is `Vec<Line>`.
pub fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            segment.push(c);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or_default());
            segment.clear();
            out.push(c);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or_default());
    out
}

/// A serializer and deserializer that does no work: it stops at the first call, reporting the
/// name serde gave the type if that call carries one.
struct NameOf;

#[derive(Debug)]
struct Probed(Option<&'static str>);

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("type name probe")
    }
}

impl std::error::Error for Probed {}

impl serde::ser::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Probed {
        Probed(None)
    }
}

impl serde::de::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Probed {
        Probed(None)
    }
}

type Never = Impossible<(), Probed>;
type Probe<T = ()> = std::result::Result<T, Probed>;

/// Unnamed values: no name to report.
macro_rules! unnamed {
    ($($method:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $method(self, $(_: $arg),*) -> Probe { Err(Probed(None)) })*
    };
}

impl serde::Serializer for NameOf {
    type Ok = ();
    type Error = Probed;
    type SerializeSeq = Never;
    type SerializeTuple = Never;
    type SerializeTupleStruct = Never;
    type SerializeTupleVariant = Never;
    type SerializeMap = Never;
    type SerializeStruct = Never;
    type SerializeStructVariant = Never;

    unnamed!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_none(),
        serialize_unit(),
    );

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Probe {
        Err(Probed(None))
    }
    fn serialize_unit_struct(self, name: &'static str) -> Probe {
        Err(Probed(Some(name)))
    }
    fn serialize_unit_variant(self, name: &'static str, _: u32, _: &'static str) -> Probe {
        Err(Probed(Some(name)))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, name: &'static str, _: &T) -> Probe {
        Err(Probed(Some(name)))
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Probe {
        Err(Probed(Some(name)))
    }
    fn serialize_seq(self, _: Option<usize>) -> Probe<Never> {
        Err(Probed(None))
    }
    fn serialize_tuple(self, _: usize) -> Probe<Never> {
        Err(Probed(None))
    }
    fn serialize_tuple_struct(self, name: &'static str, _: usize) -> Probe<Never> {
        Err(Probed(Some(name)))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Probe<Never> {
        Err(Probed(Some(name)))
    }
    fn serialize_map(self, _: Option<usize>) -> Probe<Never> {
        Err(Probed(None))
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Probe<Never> {
        Err(Probed(Some(name)))
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Probe<Never> {
        Err(Probed(Some(name)))
    }
}

impl<'de> serde::Deserializer<'de> for NameOf {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Probe<V::Value> {
        Err(Probed(None))
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, _: V) -> Probe<V::Value> {
        Err(Probed(Some(name)))
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: V,
    ) -> Probe<V::Value> {
        Err(Probed(Some(name)))
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: usize,
        _: V,
    ) -> Probe<V::Value> {
        Err(Probed(Some(name)))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Probe<V::Value> {
        Err(Probed(Some(name)))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Probe<V::Value> {
        Err(Probed(Some(name)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit seq tuple map identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OrderPlaced {
        order: u64,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename = "order.cancelled.v2")]
    struct OrderCancelled {
        order: u64,
    }

    #[derive(Serialize, Deserialize)]
    enum Payment {
        Captured { cents: i64 },
        Failed,
    }

    #[derive(Serialize, Deserialize)]
    struct Sku(String);

    #[derive(Serialize, Deserialize)]
    struct Ping;

    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct Note(String);

    #[test]
    fn the_sent_and_the_received_name_agree() {
        fn both<T: Serialize + DeserializeOwned>(v: &T) -> (String, String) {
            (type_name_of_value(v), type_name_of::<T>())
        }
        let cases = [
            (both(&OrderPlaced { order: 1 }), "OrderPlaced"),
            (both(&OrderCancelled { order: 1 }), "order.cancelled.v2"),
            (both(&Payment::Captured { cents: 1 }), "Payment"),
            (both(&Payment::Failed), "Payment"),
            (both(&Sku("x".into())), "Sku"),
            (both(&Ping), "Ping"),
            (both(&Note("n".into())), "Note"),
            (both(&"text".to_owned()), "String"),
            (both(&vec![OrderPlaced { order: 1 }]), "Vec<OrderPlaced>"),
        ];
        for ((sent, received), want) in cases {
            assert_eq!((sent.as_str(), received.as_str()), (want, want));
        }
    }

    #[test]
    fn typed_constructors_and_views() {
        let m = Message::command("billing", &OrderPlaced { order: 3 }).unwrap();
        assert_eq!(m.kind, Kind::Command);
        assert_eq!(m.destination, "billing");
        assert_eq!(m.payload, br#"{"order":3}"#);
        assert_eq!(m.decode::<OrderPlaced>().unwrap(), OrderPlaced { order: 3 });
        let renamed = m.clone().with_type("billing.charge");
        assert_eq!(renamed.message_type, "billing.charge");

        let bad = Message::raw_event(
            "orders",
            "OrderPlaced",
            br#"{"order":"seven","secret":"x"}"#.to_vec(),
        );
        let e = bad.json::<OrderPlaced>().unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Decode { .. }));
        assert!(
            text.contains("OrderPlaced") && text.contains("invalid type"),
            "{text}"
        );
        assert!(
            !text.contains("seven"),
            "the payload's value leaked: {text}"
        );
        let missing = Message::raw_event("orders", "OrderPlaced", b"{}".to_vec());
        let text = missing.json::<OrderPlaced>().unwrap_err().to_string();
        assert!(text.contains("missing field `order`"), "{text}");

        let xml = Message::raw_event("orders", "OrderPlaced", b"<o/>".to_vec())
            .with_content_type("application/xml");
        assert!(
            xml.decode::<OrderPlaced>()
                .unwrap_err()
                .to_string()
                .contains("not JSON")
        );
    }

    #[test]
    fn values_that_do_not_serialize_are_unpublishable() {
        let mut map = std::collections::HashMap::new();
        map.insert(vec![1u8], 1);
        let e = Message::event("t", &map).unwrap_err();
        assert!(matches!(e, Error::Unpublishable { .. }), "{e}");
    }

    #[test]
    fn json_content_types() {
        for ct in [
            "application/json",
            "application/cloudevents+json; charset=utf-8",
            "",
            "TEXT/JSON",
        ] {
            assert!(is_json(ct), "{ct}");
        }
        for ct in [
            "application/xml",
            "application/octet-stream",
            "application/jsonx",
        ] {
            assert!(!is_json(ct), "{ct}");
        }
    }
}
