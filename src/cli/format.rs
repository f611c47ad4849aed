//! Output formatting for the CLI: RFC 3339 times, JSON deliveries and topic
//! stats (serde_json; non-UTF-8 payloads as base64), status code names.
//! Pure functions.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;

use crate::grpc::Code;
use crate::proto;

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Unix milliseconds as RFC 3339 UTC (`-` for 0).
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// One delivery as `subscribe --json` prints it.
#[derive(Serialize)]
struct DeliveryJson<'a> {
    sequence: u64,
    message_id: &'a str,
    timestamp: i64,
    delivery_count: u32,
    /// Sorted by key, so the same message always prints the same line.
    attributes: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

/// One delivery as a JSON object on one line. The payload is text when it
/// is UTF-8, else `payload_base64` (standard alphabet, padded).
pub fn delivery_json(d: &proto::MessageDelivery) -> String {
    let text = std::str::from_utf8(&d.payload).ok();
    let line = DeliveryJson {
        sequence: d.sequence,
        message_id: &d.message_id,
        timestamp: d.timestamp,
        delivery_count: d.delivery_count,
        attributes: d
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        payload: text,
        payload_base64: text.is_none().then(|| STANDARD.encode(&d.payload)),
    };
    serde_json::to_string(&line).expect("a struct of strings and numbers serializes")
}

/// A consumer group within `stats --json`.
#[derive(Serialize)]
struct GroupJson<'a> {
    group_name: &'a str,
    cursor_sequence: u64,
    pending_count: u64,
    last_ack_timestamp: i64,
}

/// One topic as `stats --json` prints it: the fields of `TopicStats`, with
/// their proto names, timestamps in Unix milliseconds.
#[derive(Serialize)]
struct TopicStatsJson<'a> {
    topic: &'a str,
    total_messages: u64,
    first_sequence: u64,
    last_sequence: u64,
    first_message_timestamp: i64,
    last_message_timestamp: i64,
    created_at: i64,
    consumer_groups: Vec<GroupJson<'a>>,
}

/// One topic's stats as a JSON object on one line.
pub fn topic_stats_json(s: &proto::TopicStats) -> String {
    let line = TopicStatsJson {
        topic: &s.topic,
        total_messages: s.total_messages,
        first_sequence: s.first_sequence,
        last_sequence: s.last_sequence,
        first_message_timestamp: s.first_message_timestamp,
        last_message_timestamp: s.last_message_timestamp,
        created_at: s.created_at,
        consumer_groups: s
            .consumer_groups
            .iter()
            .map(|g| GroupJson {
                group_name: &g.group_name,
                cursor_sequence: g.cursor_sequence,
                pending_count: g.pending_count,
                last_ack_timestamp: g.last_ack_timestamp,
            })
            .collect(),
    };
    serde_json::to_string(&line).expect("a struct of strings and numbers serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn delivery_json_escapes() {
        let d = proto::MessageDelivery {
            message_id: "id".into(),
            sequence: 7,
            payload: bytes::Bytes::from_static(b"a\"b\n"),
            attributes: [("k".to_string(), "v".to_string())].into_iter().collect(),
            timestamp: 5,
            delivery_count: 1,
        };
        assert_eq!(
            delivery_json(&d),
            r#"{"sequence":7,"message_id":"id","timestamp":5,"delivery_count":1,"attributes":{"k":"v"},"payload":"a\"b\n"}"#
        );
        let bin = proto::MessageDelivery {
            payload: bytes::Bytes::from_static(&[0xff, 0]),
            ..d
        };
        assert!(delivery_json(&bin).ends_with(r#""payload_base64":"/wA="}"#));
        // Control characters, quotes and non-ASCII text in keys and values.
        let odd = proto::MessageDelivery {
            payload: bytes::Bytes::from_static("\u{1}é\t".as_bytes()),
            attributes: [("b\"k".to_string(), "\\v".to_string())]
                .into_iter()
                .collect(),
            ..bin
        };
        let line = delivery_json(&odd);
        assert!(
            line.ends_with(r#""attributes":{"b\"k":"\\v"},"payload":"\u0001é\t"}"#),
            "{line}"
        );
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["payload"], "\u{1}é\t");
        assert_eq!(back["attributes"]["b\"k"], "\\v");
    }

    #[test]
    fn payload_base64_is_rfc4648() {
        for (raw, b64) in [
            (&[0xffu8][..], "/w=="),
            (&[0xff, 0xfe][..], "//4="),
            (&[0xff, 0xfe, 0xfd][..], "//79"),
        ] {
            let d = proto::MessageDelivery {
                payload: bytes::Bytes::copy_from_slice(raw),
                ..Default::default()
            };
            let v: serde_json::Value = serde_json::from_str(&delivery_json(&d)).unwrap();
            assert_eq!(v["payload_base64"], b64);
            assert!(v.get("payload").is_none());
        }
    }

    #[test]
    fn topic_stats_json_has_every_field() {
        let s = proto::TopicStats {
            topic: "orders".into(),
            total_messages: 3,
            first_sequence: 1,
            last_sequence: 3,
            first_message_timestamp: 10,
            last_message_timestamp: 30,
            created_at: 5,
            consumer_groups: vec![proto::ConsumerGroupStats {
                group_name: "billing".into(),
                cursor_sequence: 2,
                pending_count: 1,
                last_ack_timestamp: 20,
            }],
        };
        assert_eq!(
            topic_stats_json(&s),
            r#"{"topic":"orders","total_messages":3,"first_sequence":1,"last_sequence":3,"first_message_timestamp":10,"last_message_timestamp":30,"created_at":5,"consumer_groups":[{"group_name":"billing","cursor_sequence":2,"pending_count":1,"last_ack_timestamp":20}]}"#
        );
    }
}
