//! Reads of single stored messages through `$JS.API.STREAM.MSG.GET.<stream>`:
//! by sequence, last on a subject, or first on a subject at or after a
//! sequence. Owns `StoredMessage` and the decoding of the API's base64
//! headers/payload and RFC 3339 timestamp. Calls `jetstream` (the request
//! helper), `headers` and base64 only.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::headers::Headers;
use super::jetstream::{JetStream, JetStreamError};

/// One message as the stream stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub subject: String,
    pub headers: Option<Headers>,
    pub payload: Vec<u8>,
    /// When the stream stored it, as the server wrote it (RFC 3339, UTC).
    pub time: String,
    /// `time` as nanoseconds since the Unix epoch (None if it did not parse).
    pub time_unix_nanos: Option<u64>,
}

/// Which message MSG.GET returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageSelector<'a> {
    /// The message with this stream sequence.
    Seq(u64),
    /// The newest message on this subject (no wildcards).
    LastBySubject(&'a str),
    /// The first message at or after `seq` on `subject` (wildcards allowed).
    NextBySubject { seq: u64, subject: &'a str },
}

#[derive(Serialize, Default)]
struct GetRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_by_subj: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_by_subj: Option<&'a str>,
}

#[derive(Deserialize)]
struct GetReply {
    message: RawStoredMessage,
}

#[derive(Deserialize)]
struct RawStoredMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    time: String,
}

/// JetStream's err_code for "no message found" (code 404).
pub const ERR_NO_MESSAGE_FOUND: u64 = 10037;

fn base64_field(field: Option<&str>, what: &str) -> Result<Vec<u8>, JetStreamError> {
    match field {
        None | Some("") => Ok(Vec::new()),
        Some(text) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| JetStreamError::Decode(format!("{what} is not base64: {e}"))),
    }
}

impl TryFrom<RawStoredMessage> for StoredMessage {
    type Error = JetStreamError;

    fn try_from(raw: RawStoredMessage) -> Result<Self, JetStreamError> {
        let header_block = base64_field(raw.hdrs.as_deref(), "hdrs")?;
        let headers = if header_block.is_empty() {
            None
        } else {
            Some(
                Headers::decode(&header_block)
                    .map_err(|e| JetStreamError::Decode(format!("stored headers: {e}")))?,
            )
        };
        Ok(StoredMessage {
            seq: raw.seq,
            subject: raw.subject,
            headers,
            payload: base64_field(raw.data.as_deref(), "data")?,
            time_unix_nanos: parse_rfc3339_utc(&raw.time),
            time: raw.time,
        })
    }
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` as Unix nanoseconds; None for
/// anything else or a time before 1970.
pub fn parse_rfc3339_utc(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = text.get(r)?;
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[16] != b':' || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        for _ in digits..9 {
            nanos *= 10;
        }
    }
    let offset_secs: i64 = match &b[i..] {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let h = i64::from(num(i + 1..i + 3)?);
            let m = i64::from(num(i + 4..i + 6)?);
            let o = h * 3600 + m * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
        - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

impl JetStream {
    /// One stored message, or `Ok(None)` when there is none (no such
    /// sequence, deleted, or nothing on the subject).
    pub fn get_message(
        &self,
        stream: &str,
        selector: MessageSelector<'_>,
    ) -> Result<Option<StoredMessage>, JetStreamError> {
        let request = match selector {
            MessageSelector::Seq(seq) => GetRequest {
                seq: Some(seq),
                ..GetRequest::default()
            },
            MessageSelector::LastBySubject(subject) => GetRequest {
                last_by_subj: Some(subject),
                ..GetRequest::default()
            },
            MessageSelector::NextBySubject { seq, subject } => GetRequest {
                seq: Some(seq),
                next_by_subj: Some(subject),
                ..GetRequest::default()
            },
        };
        let reply: Result<GetReply, _> =
            self.api_json(&format!("$JS.API.STREAM.MSG.GET.{stream}"), &request);
        match reply {
            Ok(r) => Ok(Some(StoredMessage::try_from(r.message)?)),
            Err(JetStreamError::Api(e)) if e.err_code == ERR_NO_MESSAGE_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_timestamps() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc("2023-01-05T10:20:30.123456789Z"),
            Some(1_672_914_030_123_456_789)
        );
        assert_eq!(
            parse_rfc3339_utc("2023-01-05T11:20:30.5+01:00"),
            Some(1_672_914_030_500_000_000)
        );
        assert_eq!(
            parse_rfc3339_utc("2000-02-29T00:00:00Z"),
            Some(951_782_400 * 1_000_000_000)
        );
        assert_eq!(parse_rfc3339_utc("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339_utc("2023-01-05 10:20:30Z"), None);
        assert_eq!(parse_rfc3339_utc("2023-13-05T10:20:30Z"), None);
        assert_eq!(parse_rfc3339_utc("2023-01-05T10:20:30."), None);
        assert_eq!(parse_rfc3339_utc(""), None);
    }

    #[test]
    fn decodes_a_get_reply() {
        let reply: GetReply = serde_json::from_slice(
            br#"{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":"t.a","seq":7,"hdrs":"TkFUUy8xLjANClgtQTogMQ0KDQo=","data":"aGk=","time":"2023-01-05T10:20:30Z"}}"#,
        )
        .unwrap();
        let m = StoredMessage::try_from(reply.message).unwrap();
        assert_eq!(
            (m.seq, m.subject.as_str(), &m.payload[..]),
            (7, "t.a", &b"hi"[..])
        );
        assert_eq!(m.headers.unwrap().get("X-A"), Some("1"));
        assert_eq!(m.time_unix_nanos, Some(1_672_914_030_000_000_000));
        let bad = RawStoredMessage {
            subject: "s".into(),
            seq: 1,
            hdrs: None,
            data: Some("!!".into()),
            time: String::new(),
        };
        assert!(matches!(
            StoredMessage::try_from(bad),
            Err(JetStreamError::Decode(_))
        ));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz_support::config;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(config(512, 1))]

        /// Never panics on arbitrary text; round-trips generated UTC times.
        #[test]
        fn timestamps(s in "\\PC{0,40}", secs in 0u64..4_000_000_000, nanos in 0u64..1_000_000_000) {
            let _ = parse_rfc3339_utc(&s);
            let days = secs / 86_400;
            let rem = secs % 86_400;
            // Civil date from days (inverse algorithm), for the generated time.
            let z = days as i64 + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = doy - (153 * mp + 2) / 5 + 1;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            let y = yoe + era * 400 + i64::from(m <= 2);
            let text = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
                rem / 3600, rem % 3600 / 60, rem % 60
            );
            prop_assert_eq!(parse_rfc3339_utc(&text), Some(secs * 1_000_000_000 + nanos));
        }
    }
}
