//! Where Sluice's data lives in JetStream and how a message is written
//! there: the stream, subject and bucket names derived from `--nats-prefix`,
//! the headers that carry a message's timestamp, topic ordinal and
//! attributes, and the KV values of topics and cursors. Pure: calls only
//! `nats::subject_token` and `nats::headers`.
//!
//! - stream `<PREFIX>` (upper case), subjects `<prefix>.t.<topic token>`
//!   (one token per topic, see `subject_token`) and `<prefix>.gap` (filler
//!   messages `sluice migrate` uses to keep sequences, purged at its end)
//!   and `<prefix>.admin` (`AdminEvent`s: deletes and cursor resets made
//!   through one gateway, which every other gateway's follower applies);
//! - the stream sequence is the message's `sequence`; its `message_id` is
//!   derived from (timestamp, sequence, topic) as on SQLite, so it is never
//!   stored;
//! - headers `Sluice-Ts` (Unix ms), `Sluice-Ordinal` (position within the
//!   topic) and, when there are any, `Sluice-Attrs` (the attributes as one
//!   JSON object); `Nats-Msg-Id` is a fresh UUID per publish (the message
//!   id itself for messages `sluice migrate` copied), so a retry of one
//!   publish is stored once;
//! - bucket `<prefix>_topics`: key = topic token, value `{"created_at_ms":N}`;
//! - bucket `<prefix>_cursors`: key = `<topic token>.<group token>`, value
//!   `{"seq":N,"acked_at_ms":N,"gateway":ID}`;
//! - bucket `<prefix>_gateways`: one key per running gateway (its id),
//!   kept while it renews it;
//! - bucket `<prefix>_leases`: the same keys, value
//!   `{"gateway":ID,"inbox":SUBJECT,"free":BOOL}` (see `leases`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::nats::headers::Headers;
use crate::nats::subject_token::{decode_topic, encode_topic};

pub const TS_HEADER: &str = "Sluice-Ts";
pub const ORDINAL_HEADER: &str = "Sluice-Ordinal";
pub const ATTRS_HEADER: &str = "Sluice-Attrs";

/// The names one deployment (`--nats-prefix`) uses.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
    stream: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.to_string(),
            stream: prefix.to_uppercase(),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The stream's subjects.
    pub fn stream_subjects(&self) -> Vec<String> {
        vec![self.all_topics(), self.gap_subject(), self.admin_subject()]
    }

    /// The subjects of streams made before admin events existed: such a
    /// stream is updated to `stream_subjects`.
    pub fn legacy_stream_subjects(&self) -> Vec<String> {
        vec![self.all_topics(), self.gap_subject()]
    }

    pub fn admin_subject(&self) -> String {
        format!("{}.admin", self.prefix)
    }

    /// Every topic's subject (a wildcard).
    pub fn all_topics(&self) -> String {
        format!("{}.t.*", self.prefix)
    }

    pub fn gap_subject(&self) -> String {
        format!("{}.gap", self.prefix)
    }

    pub fn topics_bucket(&self) -> String {
        format!("{}_topics", self.prefix)
    }

    pub fn cursors_bucket(&self) -> String {
        format!("{}_cursors", self.prefix)
    }

    /// The gateways running now: key = gateway id, renewed every few
    /// seconds (see `follower`).
    pub fn gateways_bucket(&self) -> String {
        format!("{}_gateways", self.prefix)
    }

    /// Delivery counts and dead-letter settings of groups with
    /// `max_deliveries`: key = `cursor_key`, value a `DeliveriesValue`.
    pub fn deliveries_bucket(&self) -> String {
        format!("{}_deliveries", self.prefix)
    }

    /// Idempotency keys stored within the dedup window: key =
    /// `idempotency_key`, value a `KeyValue` (the bucket's max age is the
    /// window).
    pub fn keys_bucket(&self) -> String {
        format!("{}_keys", self.prefix)
    }

    /// Which gateway serves each group's consumer (see `leases`).
    pub fn leases_bucket(&self) -> String {
        format!("{}_leases", self.prefix)
    }

    /// The subject of a topic; `None` for a name no valid topic has.
    pub fn subject(&self, topic: &str) -> Option<String> {
        Some(format!("{}.t.{}", self.prefix, encode_topic(topic).ok()?))
    }

    /// The topic a subject belongs to.
    pub fn topic_of(&self, subject: &str) -> Option<String> {
        let token = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".t.")?;
        decode_topic(token).ok()
    }
}

/// The KV key of a topic.
pub fn topic_key(topic: &str) -> Option<String> {
    encode_topic(topic).ok()
}

/// The KV key of a group's cursor.
pub fn cursor_key(topic: &str, group: &str) -> Option<String> {
    Some(format!(
        "{}.{}",
        encode_topic(topic).ok()?,
        encode_topic(group).ok()?
    ))
}

/// The KV key (and, prefixed, the `Nats-Msg-Id`) of a publish's
/// idempotency key in a topic: the topic's token, its creation time (a
/// topic deleted and created again does not know the old one's keys), then
/// the key in hex (a key may hold any printable byte; the id must be one
/// KV key).
pub fn idempotency_key(topic: &str, created_at_ms: i64, key: &str) -> Option<String> {
    let mut out = encode_topic(topic).ok()?;
    out.push_str(&format!(".{}.", created_at_ms.max(0)));
    for b in key.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    Some(out)
}

/// What the deliveries bucket holds for a group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveriesValue {
    #[serde(default)]
    pub max_deliveries: u32,
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    #[serde(default)]
    pub delivered_max: u64,
    /// (sequence, count) of messages delivered more than once, above the
    /// group's cursor.
    #[serde(default)]
    pub counts: Vec<(u64, u32)>,
}

/// What the keys bucket holds for a key: the message stored under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub seq: u64,
    pub ts: i64,
}

/// (topic, group) of a cursor key.
pub fn parse_cursor_key(key: &str) -> Option<(String, String)> {
    let (t, g) = key.split_once('.')?;
    Some((decode_topic(t).ok()?, decode_topic(g).ok()?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicValue {
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorValue {
    pub seq: u64,
    pub acked_at_ms: i64,
    /// The gateway that stored it (empty: `sluice migrate`); a gateway
    /// skips its own puts when it watches the bucket.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// A change made through one gateway that the others apply to their own
/// broker (its store change is already done). Stored on the admin subject
/// as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminEvent {
    /// The gateway that made it (it applied the change itself).
    pub origin: String,
    #[serde(flatten)]
    pub change: AdminChange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminChange {
    TopicDeleted {
        topic: String,
    },
    GroupDeleted {
        topic: String,
        group: String,
    },
    CursorReset {
        topic: String,
        group: String,
        sequence: u64,
    },
}

/// The headers of a message stored at `timestamp_ms` as the topic's
/// `ordinal`-th, with `attributes`.
pub fn message_headers(
    timestamp_ms: i64,
    ordinal: u64,
    attributes: &HashMap<String, String>,
) -> Headers {
    let mut h = Headers::new();
    h.insert(TS_HEADER, timestamp_ms.to_string());
    h.insert(ORDINAL_HEADER, ordinal.to_string());
    if !attributes.is_empty() {
        // serde_json escapes control characters: the value is one line.
        let json = serde_json::to_string(attributes).unwrap_or_else(|_| "{}".into());
        h.insert(ATTRS_HEADER, json);
    }
    h
}

/// What the headers of a stored message say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub timestamp_ms: i64,
    pub ordinal: u64,
    pub attributes: HashMap<String, String>,
}

/// Reads the headers `message_headers` wrote; `Err` names what is missing
/// or malformed (a message not written by Sluice).
pub fn message_meta(headers: Option<&Headers>) -> Result<MessageMeta, String> {
    let h = headers.ok_or("no headers")?;
    let timestamp_ms = h
        .get(TS_HEADER)
        .and_then(|v| v.parse().ok())
        .ok_or("no valid Sluice-Ts header")?;
    let ordinal = h
        .get(ORDINAL_HEADER)
        .and_then(|v| v.parse().ok())
        .ok_or("no valid Sluice-Ordinal header")?;
    let attributes = match h.get(ATTRS_HEADER) {
        None => HashMap::new(),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("bad Sluice-Attrs header: {e}"))?,
    };
    Ok(MessageMeta {
        timestamp_ms,
        ordinal,
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix_and_round_trip_topics() {
        let l = Layout::new("sluice");
        assert_eq!(l.stream(), "SLUICE");
        assert_eq!(
            l.subject("orders.eu_1").unwrap(),
            "sluice.t.orders_2Eeu_5F1"
        );
        assert_eq!(
            l.topic_of("sluice.t.orders_2Eeu_5F1").as_deref(),
            Some("orders.eu_1")
        );
        assert_eq!(l.topic_of("other.t.x"), None);
        assert_eq!(l.topic_of("sluice.gap"), None);
        assert_eq!(l.topic_of("sluice.admin"), None);
        let e = AdminEvent {
            origin: "g1".into(),
            change: AdminChange::CursorReset {
                topic: "a".into(),
                group: "b".into(),
                sequence: 7,
            },
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"origin":"g1","kind":"cursor_reset","topic":"a","group":"b","sequence":7}"#
        );
        assert_eq!(serde_json::from_str::<AdminEvent>(&json).unwrap(), e);
        assert_eq!(l.subject("a b"), None);
        assert_eq!(l.topics_bucket(), "sluice_topics");
        let key = cursor_key("a.b", "g_1").unwrap();
        assert!(crate::nats::kv_bucket::valid_key(&key), "{key}");
        assert_eq!(
            parse_cursor_key(&key),
            Some(("a.b".to_string(), "g_1".to_string()))
        );
    }

    #[test]
    fn headers_round_trip_including_awkward_attributes() {
        let mut attrs = HashMap::new();
        attrs.insert(
            "line\r\nbreak".to_string(),
            "tab\tvalue ü \"q\"".to_string(),
        );
        attrs.insert("k".to_string(), String::new());
        let h = message_headers(1_700_000_000_123, 42, &attrs);
        let bytes = h.to_bytes().unwrap();
        let back = Headers::decode(&bytes).unwrap();
        let meta = message_meta(Some(&back)).unwrap();
        assert_eq!(meta.timestamp_ms, 1_700_000_000_123);
        assert_eq!(meta.ordinal, 42);
        assert_eq!(meta.attributes, attrs);
        let plain = message_meta(Some(&message_headers(1, 1, &HashMap::new()))).unwrap();
        assert!(plain.attributes.is_empty());
        assert!(message_meta(None).is_err());
        assert!(message_meta(Some(&Headers::new())).is_err());
    }
}
