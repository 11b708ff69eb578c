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
//! **The type name** is the name serde's derived `Deserialize` gives the type: the struct's or
//! enum's name, or the `#[serde(rename = "...")]` given to it. Sender ([`Message::event`]) and
//! receiver (the router) both read it from the type, so they agree without a string repeated.
//! Types whose `Deserialize` names nothing (a `String`, an untagged or internally tagged enum, a
//! struct with a `#[serde(flatten)]` field, whose `rename` serde then does not pass on) take their
//! Rust name without module paths; a `#[serde(transparent)]` wrapper takes the name of what it
//! wraps; generic types share one name whatever their parameters. Rename those, or name them
//! with [`Message::with_type`] (one message) and `Router::on_type` (the receiver). Typed
//! payloads are owned types (`DeserializeOwned`): a type that borrows from the payload is read
//! from the raw bytes in a plain handler.

use serde::Serialize;
use serde::de::{DeserializeOwned, Visitor};

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
    pub fn event<T: Serialize + DeserializeOwned>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Message> {
        Message::encoded(Kind::Event, topic, value, &Json)
    }

    /// A command for the owner's queue `queue`, otherwise like [`Message::event`].
    pub fn command<T: Serialize + DeserializeOwned>(
        queue: impl Into<String>,
        value: &T,
    ) -> Result<Message> {
        Message::encoded(Kind::Command, queue, value, &Json)
    }

    /// A message whose payload is `value` encoded with `codec` (its content type set
    /// accordingly), named after the value's type.
    pub fn encoded<T: Serialize + DeserializeOwned, C: Codec>(
        kind: Kind,
        destination: impl Into<String>,
        value: &T,
        codec: &C,
    ) -> Result<Message> {
        let message_type = type_name_of::<T>();
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
/// herald's errors or logs. Kept: the kind of value, what the type expected, the type's own
/// field names, and the position. A message of a shape not known to be free of values (a
/// type's own `deserialize_with` or `try_from` error, say) is withheld, keeping the position.
pub fn without_values(error: &str) -> String {
    let (message, position) = split_position(error);
    let kept = |lead: &str| message.strip_prefix(lead);
    // What serde puts after ", expected" comes from the type (its visitor), so the last one is
    // the type's even when a quoted value holds the same words.
    let expected = |tail: &str| tail.rsplit_once(", expected ").map(|(_, e)| e.to_owned());
    let out = if VALUE_FREE.contains(&message)
        || kept("missing field `").is_some()
        || kept("duplicate field `").is_some()
    {
        message.to_owned()
    } else if let Some(tail) = kept("invalid type: ").or_else(|| kept("invalid value: ")) {
        // The kind of value is its first word: string, integer, map, sequence, ...
        let kind: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphabetic() || *c == ' ')
            .collect();
        let lead = &message[..message.len() - tail.len()];
        match expected(tail) {
            Some(e) => format!("{lead}{}, expected {e}", kind.trim_end()),
            None => format!("{lead}{}", kind.trim_end()),
        }
    } else if let Some(tail) = kept("invalid length ") {
        let n: String = tail.chars().take_while(char::is_ascii_digit).collect();
        match expected(tail) {
            Some(e) => format!("invalid length {n}, expected {e}"),
            None => format!("invalid length {n}"),
        }
    } else if let Some(tail) = kept("unknown variant ").or_else(|| kept("unknown field ")) {
        let lead = &message[..message.len() - tail.len() - 1];
        // serde lists the type's names, in backquotes, or says there are none.
        let names = expected(tail).filter(|e| e.starts_with('`') || e.starts_with("one of `"));
        if tail.ends_with(", there are no fields") {
            format!("{lead}, there are no fields")
        } else if tail.ends_with(", there are no variants") {
            format!("{lead}, there are no variants")
        } else {
            match names {
                Some(e) => format!("{lead}, expected {e}"),
                None => lead.to_owned(),
            }
        }
    } else {
        "the type's own deserialization refused the payload (its message is withheld: it may quote the payload)".to_owned()
    };
    format!("{out}{position}").chars().take(400).collect()
}

/// Splits serde_json's trailing ` at line L column C` off `error`, if it ends with exactly that.
fn split_position(error: &str) -> (&str, &str) {
    let Some(i) = error.rfind(" at line ") else {
        return (error, "");
    };
    let tail = &error[i + " at line ".len()..];
    let numbers: Vec<&str> = tail.split(" column ").collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if numbers.len() == 2 && numbers.iter().all(|n| digits(n)) {
        error.split_at(i)
    } else {
        (error, "")
    }
}

/// serde_json's syntax errors, word for word: they quote nothing of the input.
const VALUE_FREE: &[&str] = &[
    "EOF while parsing a list",
    "EOF while parsing an object",
    "EOF while parsing a string",
    "EOF while parsing a value",
    "expected `:`",
    "expected `,` or `]`",
    "expected `,` or `}`",
    "expected ident",
    "expected value",
    "expected `\"`",
    "invalid escape",
    "invalid number",
    "number out of range",
    "invalid unicode code point",
    "control character (\\u0000-\\u001F) found while parsing a string",
    "key must be a string",
    "invalid value: expected key to be a number in quotes",
    "float key must be finite (got NaN or +/-inf)",
    "lone leading surrogate in hex escape",
    "trailing comma",
    "trailing characters",
    "unexpected end of hex escape",
    "recursion limit exceeded",
];

/// The message type of `T`, sent and received: the name serde's derived `Deserialize` gives the
/// type (a struct's or enum's name, or its `#[serde(rename = "...")]`), else the Rust name without
/// module paths. Sender and receiver compute it from the same type, so they agree.
pub fn type_name_of<T: DeserializeOwned>() -> String {
    match T::deserialize(NameOf) {
        Err(Probed(Some(name))) => name.to_owned(),
        _ => short_type_name::<T>(),
    }
}

/// `std::any::type_name` without module paths: `Vec<shop::Line>` is `Vec<Line>`.
pub fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>()
        .trim_start_matches('&')
        .trim_start_matches("mut ");
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

/// A deserializer that does no work: it stops at the first call, reporting the name serde gave
/// the type if that call carries one.
struct NameOf;

#[derive(Debug)]
struct Probed(Option<&'static str>);

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("type name probe")
    }
}

impl std::error::Error for Probed {}

impl serde::de::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Probed {
        Probed(None)
    }
}

type Probe<T = ()> = std::result::Result<T, Probed>;

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

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "kind")]
    enum Tagged {
        A { n: i64 },
        B(OrderPlaced),
    }

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Loose {
        A { n: i64 },
        B(String),
    }

    #[test]
    fn message_types_are_serde_names_and_the_sender_uses_the_receivers_rule() {
        fn sent<T: Serialize + DeserializeOwned>(v: &T) -> String {
            let sent = Message::event("t", v).unwrap().message_type;
            assert_eq!(sent, type_name_of::<T>(), "sender and receiver agree");
            sent
        }
        assert_eq!(sent(&OrderPlaced { order: 1 }), "OrderPlaced");
        assert_eq!(sent(&OrderCancelled { order: 1 }), "order.cancelled.v2");
        assert_eq!(sent(&Payment::Captured { cents: 1 }), "Payment");
        assert_eq!(sent(&Payment::Failed), "Payment");
        assert_eq!(sent(&Sku("x".into())), "Sku");
        assert_eq!(sent(&Ping), "Ping");
        assert_eq!(sent(&Note("n".into())), "Note");
        assert_eq!(sent(&"text".to_owned()), "String");
        assert_eq!(sent(&vec![OrderPlaced { order: 1 }]), "Vec<OrderPlaced>");
        // Variants of internally tagged and untagged enums do not pass their names through
        // `Deserialize`: the Rust name, the same on both sides.
        assert_eq!(sent(&Tagged::A { n: 1 }), "Tagged");
        assert_eq!(sent(&Tagged::B(OrderPlaced { order: 1 })), "Tagged");
        assert_eq!(sent(&Loose::B("x".into())), "Loose");
        assert_eq!(short_type_name::<&&OrderPlaced>(), "OrderPlaced");
    }

    #[test]
    fn decode_errors_keep_the_shape_and_drop_the_values() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Strict {
            n: u64,
            pay: Payment,
            list: [u8; 2],
        }
        fn reason(json: &str) -> String {
            let e = serde_json::from_str::<Strict>(json)
                .err()
                .expect("must not decode");
            without_values(&e.to_string())
        }
        let cases = [
            (
                r#"{"n":"4111, expected 9999"}"#,
                "invalid type: string, expected u64 at line 1 column",
            ),
            (
                r#"{"n":-4111}"#,
                "invalid value: integer, expected u64 at line 1",
            ),
            (
                r#"{"n":1,"pay":"Secret4111","list":[1,2]}"#,
                "unknown variant, expected `Captured` or `Failed`",
            ),
            (
                r#"{"n":1,"card4111":1}"#,
                "unknown field, expected one of `n`, `pay`, `list`",
            ),
            (
                r#"{"n":1,"pay":"Failed","list":[1]}"#,
                "invalid length 1, expected",
            ),
            (r#"{"n":1}"#, "missing field `pay`"),
            (r#"{"n":1,"n":2}"#, "duplicate field `n`"),
            (r#"{"n":1"#, "EOF while parsing an object"),
            (
                r#"{"n":1,"pay":"Failed","list":[1,2]} 4111"#,
                "trailing characters",
            ),
        ];
        for (json, want) in cases {
            let got = reason(json);
            assert!(got.starts_with(want), "{json}: {got}");
            assert!(
                !got.contains("4111") && !got.contains("Secret"),
                "{json}: {got}"
            );
        }
        let custom = without_values("bad card number 4111 1111 at line 1 column 9");
        assert!(
            custom.contains("withheld") && custom.ends_with("at line 1 column 9"),
            "{custom}"
        );
        for hostile in [
            "expected 16 digits, got 4111 at line 1 column 9",
            "unknown field `a, expected 4111`, there are no fields at line 1 column 3",
            "unknown variant `4111, expected x`, there are no variants",
            "invalid type: string \"4111, expected 4111\", expected u64",
            "bad value 4111 at line x column 4111",
        ] {
            let got = without_values(hostile);
            assert!(!got.contains("4111"), "{hostile} -> {got}");
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
