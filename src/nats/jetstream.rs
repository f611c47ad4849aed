//! A thin typed layer over the JetStream JSON API: the shared request
//! helper and error type, plus streams themselves: account info,
//! create-or-verify, stream info with per-subject message counts
//! (`subjects_filter`), purge by subject, delete, and a single
//! publish-with-ack (dedup by `Nats-Msg-Id`). Calls `client` and `headers`
//! only. The other JetStream pieces live beside it, each calling this one:
//! `publish_window` (pipelined publish), `stored_message` (reads by
//! sequence), `pull_consumer` (backlog pages) and `kv_bucket`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{Error as ClientError, NatsClient};
use super::headers::Headers;

/// The header JetStream deduplicates on within the stream's duplicate window.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// JetStream's err_code for "stream name already in use with a different configuration".
pub const ERR_STREAM_NAME_IN_USE: u64 = 10058;
/// JetStream's err_code for "stream not found".
pub const ERR_STREAM_NOT_FOUND: u64 = 10059;

/// The `error` object of a JetStream API reply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ApiError {
    pub code: u16,
    pub err_code: u64,
    pub description: String,
}

/// What a JetStream call reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JetStreamError {
    /// The connection failed, timed out, or had no responders (JetStream off,
    /// or no stream bound to a published subject).
    Client(ClientError),
    /// JetStream answered with an error.
    Api(ApiError),
    /// The stream exists with a configuration that differs from the one asked for.
    StreamMismatch {
        stream: String,
        differences: Vec<String>,
    },
    /// The reply is not the JSON we expect.
    Decode(String),
    /// A pull request ended with a status other than "no messages" or
    /// "request timeout" (409 consumer deleted, exceeded max waiting, ...).
    PullStatus { code: u16, description: String },
    /// An argument the API cannot carry (bad key, batch over the limit, ...).
    Invalid(String),
}

impl fmt::Display for JetStreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JetStreamError::Client(e) => write!(f, "{e}"),
            JetStreamError::Api(e) => write!(
                f,
                "JetStream error {} (err_code {}): {}",
                e.code, e.err_code, e.description
            ),
            JetStreamError::StreamMismatch {
                stream,
                differences,
            } => write!(
                f,
                "stream {stream:?} exists with a different configuration: {}",
                differences.join("; ")
            ),
            JetStreamError::Decode(e) => write!(f, "JetStream reply does not decode: {e}"),
            JetStreamError::PullStatus { code, description } => {
                write!(f, "JetStream pull request ended with {code} {description}")
            }
            JetStreamError::Invalid(e) => write!(f, "invalid JetStream request: {e}"),
        }
    }
}

impl std::error::Error for JetStreamError {}

impl JetStreamError {
    /// True for the JetStream API's own "not found" answers (404: stream,
    /// consumer or message not found).
    pub fn is_not_found(&self) -> bool {
        matches!(self, JetStreamError::Api(e) if e.code == 404)
    }
}

impl JetStreamError {
    /// True when the same request may succeed if retried after a short
    /// pause (~100 ms): no responders (e.g. a stream leader election: ~5-8 s
    /// on nats-server 2.9.10), a timeout or a lost connection (outcome
    /// unknown: retry a publish with the same `Nats-Msg-Id`), reconnecting,
    /// too many requests in flight, a failed socket write (the connection is
    /// being replaced), or JetStream answering 503 (no quorum, temporarily
    /// unavailable). False when the server refused it.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            JetStreamError::Client(
                ClientError::NoResponders
                    | ClientError::Timeout
                    | ClientError::NotConnected
                    | ClientError::Disconnected
                    | ClientError::TooManyPendingRequests
                    | ClientError::Io(_)
            )
        ) || matches!(self, JetStreamError::Api(e) if e.code == 503)
    }
}

impl From<ClientError> for JetStreamError {
    fn from(e: ClientError) -> Self {
        JetStreamError::Client(e)
    }
}

/// Storage kind of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    File,
    Memory,
}

/// The stream settings we set; everything else keeps the server's default
/// (limits retention, discard old). Durations are nanoseconds on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    pub name: String,
    pub subjects: Vec<String>,
    pub num_replicas: usize,
    pub storage: StorageType,
    /// Nanoseconds; 0 is unlimited.
    #[serde(default)]
    pub max_age: u64,
    /// -1 is unlimited.
    #[serde(default = "unlimited")]
    pub max_msgs_per_subject: i64,
    /// The whole stream's byte limit; -1 is unlimited.
    #[serde(default = "unlimited")]
    pub max_bytes: i64,
    /// Nanoseconds; 0 asks for the server default (2 minutes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duplicate_window: u64,
    /// Lets a publish carry `Nats-Rollup: sub` (purge the subject's older messages).
    #[serde(default)]
    pub allow_rollup_hdrs: bool,
    #[serde(default)]
    pub deny_delete: bool,
}

fn unlimited() -> i64 {
    -1
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl StreamConfig {
    /// File storage, one replica, no limits.
    pub fn new(name: impl Into<String>, subjects: Vec<String>) -> Self {
        StreamConfig {
            name: name.into(),
            subjects,
            num_replicas: 1,
            storage: StorageType::File,
            max_age: 0,
            max_msgs_per_subject: -1,
            max_bytes: -1,
            duplicate_window: 0,
            allow_rollup_hdrs: false,
            deny_delete: false,
        }
    }

    pub fn allow_rollup_hdrs(mut self, allow: bool) -> Self {
        self.allow_rollup_hdrs = allow;
        self
    }

    pub fn replicas(mut self, n: usize) -> Self {
        self.num_replicas = n;
        self
    }

    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d.as_nanos().min(u64::MAX as u128) as u64;
        self
    }

    pub fn max_msgs_per_subject(mut self, n: i64) -> Self {
        self.max_msgs_per_subject = n;
        self
    }

    pub fn max_bytes(mut self, n: i64) -> Self {
        self.max_bytes = n;
        self
    }

    pub fn duplicate_window(mut self, d: Duration) -> Self {
        self.duplicate_window = d.as_nanos().min(u64::MAX as u128) as u64;
        self
    }

    /// The fields we set that differ in `actual` (a 0 duplicate_window
    /// means "server default" and matches anything).
    fn differences(&self, actual: &StreamConfig) -> Vec<String> {
        let mut d = Vec::new();
        let mut want_subjects = self.subjects.clone();
        let mut have_subjects = actual.subjects.clone();
        want_subjects.sort();
        have_subjects.sort();
        if want_subjects != have_subjects {
            d.push(format!(
                "subjects {:?} != {:?}",
                actual.subjects, self.subjects
            ));
        }
        if self.num_replicas != actual.num_replicas {
            d.push(format!(
                "replicas {} != {}",
                actual.num_replicas, self.num_replicas
            ));
        }
        if self.storage != actual.storage {
            d.push(format!(
                "storage {:?} != {:?}",
                actual.storage, self.storage
            ));
        }
        if self.max_age != actual.max_age {
            d.push(format!(
                "max_age {}ns != {}ns",
                actual.max_age, self.max_age
            ));
        }
        if self.max_msgs_per_subject != actual.max_msgs_per_subject {
            d.push(format!(
                "max_msgs_per_subject {} != {}",
                actual.max_msgs_per_subject, self.max_msgs_per_subject
            ));
        }
        if self.max_bytes != actual.max_bytes {
            d.push(format!(
                "max_bytes {} != {}",
                actual.max_bytes, self.max_bytes
            ));
        }
        if self.allow_rollup_hdrs != actual.allow_rollup_hdrs {
            d.push(format!(
                "allow_rollup_hdrs {} != {}",
                actual.allow_rollup_hdrs, self.allow_rollup_hdrs
            ));
        }
        if self.duplicate_window != 0 && self.duplicate_window != actual.duplicate_window {
            d.push(format!(
                "duplicate_window {}ns != {}ns",
                actual.duplicate_window, self.duplicate_window
            ));
        }
        d
    }
}

/// A stream's message counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StreamState {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Distinct subjects holding messages.
    pub num_subjects: u64,
    /// Per-subject message counts: only present when asked for with
    /// `subjects_filter`, one page of them at a time.
    pub subjects: Option<BTreeMap<String, u64>>,
}

/// Where a replicated stream's leader is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ClusterInfo {
    pub name: Option<String>,
    pub leader: Option<String>,
}

/// `$JS.API.STREAM.INFO` and `STREAM.CREATE` replies.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct StreamInfo {
    pub config: StreamConfig,
    #[serde(default)]
    pub state: StreamState,
    #[serde(default)]
    pub cluster: Option<ClusterInfo>,
}

/// `$JS.API.INFO`: the account's JetStream usage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AccountInfo {
    pub memory: u64,
    pub storage: u64,
    pub streams: u64,
    pub consumers: u64,
}

/// The STREAM.INFO request body asking for per-subject counts.
#[derive(Serialize)]
struct StreamInfoRequest<'a> {
    subjects_filter: &'a str,
    offset: usize,
}

/// A STREAM.INFO reply with paging of the `subjects` map.
#[derive(Deserialize)]
struct PagedStreamInfo {
    #[serde(default)]
    state: StreamState,
    #[serde(default)]
    total: usize,
}

/// Per-subject counts of a stream, with the stream's totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectCounts {
    /// The stream's state (messages, first/last seq), without the subjects map.
    pub stream: StreamState,
    /// Subject -> messages currently stored on it (subjects with none are absent).
    pub subjects: BTreeMap<String, u64>,
    /// True when more subjects matched than the caller's limit.
    pub truncated: bool,
}

#[derive(Deserialize)]
struct PurgeReply {
    #[serde(default)]
    purged: u64,
}

#[derive(Deserialize)]
struct SuccessReply {
    #[serde(default)]
    success: bool,
}

/// The acknowledgement of a JetStream publish.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct PubAck {
    pub stream: String,
    pub seq: u64,
    #[serde(default)]
    pub duplicate: bool,
}

/// JetStream calls over a shared client; cheap to clone.
#[derive(Clone)]
pub struct JetStream {
    client: Arc<NatsClient>,
    timeout: Duration,
}

#[derive(Deserialize)]
struct ErrorReply {
    error: Option<ApiError>,
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, JetStreamError> {
    if let Ok(ErrorReply { error: Some(e) }) = serde_json::from_slice::<ErrorReply>(payload) {
        return Err(JetStreamError::Api(e));
    }
    serde_json::from_slice(payload).map_err(|e| JetStreamError::Decode(e.to_string()))
}

impl JetStream {
    /// JetStream over `client`; every API call waits at most `timeout`.
    pub fn new(client: Arc<NatsClient>, timeout: Duration) -> Self {
        JetStream { client, timeout }
    }

    pub fn client(&self) -> &Arc<NatsClient> {
        &self.client
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn api<T: for<'de> Deserialize<'de>>(
        &self,
        subject: &str,
        body: &[u8],
    ) -> Result<T, JetStreamError> {
        let reply = self.client.request(subject, None, body, self.timeout)?;
        decode(&reply.payload)
    }

    /// `api` with a JSON request body.
    pub(super) fn api_json<T: for<'de> Deserialize<'de>>(
        &self,
        subject: &str,
        body: &impl Serialize,
    ) -> Result<T, JetStreamError> {
        let body = serde_json::to_vec(body).map_err(|e| JetStreamError::Decode(e.to_string()))?;
        self.api(subject, &body)
    }

    /// Messages per subject for the subjects matching `filter` (a subject,
    /// wildcards allowed), at most `limit` of them, plus the stream's state.
    /// Pages through the server's subject map (nats-server pages it at
    /// 100 000 subjects per reply). Exact at the moment of each page.
    pub fn subject_counts(
        &self,
        stream: &str,
        filter: &str,
        limit: usize,
    ) -> Result<SubjectCounts, JetStreamError> {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        let mut out = SubjectCounts::default();
        loop {
            let request = StreamInfoRequest {
                subjects_filter: filter,
                offset: out.subjects.len(),
            };
            let mut page: PagedStreamInfo = self.api_json(&subject, &request)?;
            let subjects = page.state.subjects.take().unwrap_or_default();
            if out.subjects.is_empty() {
                out.stream = page.state;
            }
            let before = out.subjects.len();
            for (name, count) in subjects {
                if out.subjects.len() >= limit {
                    out.truncated = true;
                    return Ok(out);
                }
                out.subjects.insert(name, count);
            }
            // No progress (an empty page, or a server repeating a page) ends
            // the walk as surely as reaching the total.
            if out.subjects.len() == before || out.subjects.len() >= page.total {
                return Ok(out);
            }
        }
    }

    /// Messages currently stored on exactly `subject` (0 when none).
    pub fn subject_message_count(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<u64, JetStreamError> {
        let counts = self.subject_counts(stream, subject, 1)?;
        Ok(counts.subjects.get(subject).copied().unwrap_or(0))
    }

    /// Removes every message on subjects matching `filter`; returns how many.
    pub fn purge_subject(&self, stream: &str, filter: &str) -> Result<u64, JetStreamError> {
        #[derive(Serialize)]
        struct Purge<'a> {
            filter: &'a str,
        }
        let reply: PurgeReply =
            self.api_json(&format!("$JS.API.STREAM.PURGE.{stream}"), &Purge { filter })?;
        Ok(reply.purged)
    }

    /// Deletes the stream and all its messages and consumers.
    pub fn delete_stream(&self, stream: &str) -> Result<(), JetStreamError> {
        let reply: SuccessReply = self.api(&format!("$JS.API.STREAM.DELETE.{stream}"), b"")?;
        if reply.success {
            Ok(())
        } else {
            Err(JetStreamError::Decode(
                "stream delete did not report success".into(),
            ))
        }
    }

    /// `$JS.API.INFO`.
    pub fn account_info(&self) -> Result<AccountInfo, JetStreamError> {
        self.api("$JS.API.INFO", b"")
    }

    /// `$JS.API.STREAM.INFO.<name>`.
    pub fn stream_info(&self, name: &str) -> Result<StreamInfo, JetStreamError> {
        self.api(&format!("$JS.API.STREAM.INFO.{name}"), b"")
    }

    /// Changes an existing stream's configuration (limits; the server
    /// refuses changes it cannot make, such as the storage type).
    pub fn update_stream(&self, config: &StreamConfig) -> Result<StreamInfo, JetStreamError> {
        let body = serde_json::to_vec(config).map_err(|e| JetStreamError::Decode(e.to_string()))?;
        self.api(&format!("$JS.API.STREAM.UPDATE.{}", config.name), &body)
    }

    /// Creates the stream, or verifies that the existing one has this
    /// configuration (`StreamMismatch` listing the differences otherwise).
    pub fn create_or_verify_stream(
        &self,
        config: &StreamConfig,
    ) -> Result<StreamInfo, JetStreamError> {
        // Look first: a create with a different config may be refused for
        // another reason (replicas a single server cannot have) before the
        // server says the name is taken.
        let info = match self.stream_info(&config.name) {
            Ok(info) => info,
            Err(e) if e.is_not_found() => {
                let body = serde_json::to_vec(config)
                    .map_err(|e| JetStreamError::Decode(e.to_string()))?;
                let created: Result<StreamInfo, _> =
                    self.api(&format!("$JS.API.STREAM.CREATE.{}", config.name), &body);
                match created {
                    Ok(info) => info,
                    Err(JetStreamError::Api(e)) if e.err_code == ERR_STREAM_NAME_IN_USE => {
                        self.stream_info(&config.name)?
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let differences = config.differences(&info.config);
        if differences.is_empty() {
            Ok(info)
        } else {
            Err(JetStreamError::StreamMismatch {
                stream: config.name.clone(),
                differences,
            })
        }
    }

    /// Publishes and waits for the stream's ack. With `msg_id`, a repeat
    /// within the duplicate window is acked with `duplicate: true` and the
    /// first copy's seq. On `Client(Timeout)` the outcome is unknown: the
    /// message may be stored; retry with the same `msg_id`.
    /// `Client(NoResponders)` means no stream leader listens on `subject`:
    /// either no stream binds it, or (nats-server 2.9.10, measured in
    /// tests/nats_client.rs) its leader died and the election takes seconds.
    pub fn publish(
        &self,
        subject: &str,
        msg_id: Option<&str>,
        payload: &[u8],
    ) -> Result<PubAck, JetStreamError> {
        let mut headers = Headers::new();
        if let Some(id) = msg_id {
            headers.insert(MSG_ID_HEADER, id);
        }
        let headers = msg_id.map(|_| &headers);
        let reply = self
            .client
            .request(subject, headers, payload, self.timeout)?;
        decode(&reply.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_map_to_api_errors() {
        let e = decode::<PubAck>(
            br#"{"type":"io.nats.jetstream.api.v1.pub_ack_response","error":{"code":503,"err_code":10039,"description":"jetstream not enabled"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            JetStreamError::Api(ApiError {
                code: 503,
                err_code: 10039,
                description: "jetstream not enabled".into()
            })
        );
        let ack: PubAck = decode(br#"{"stream":"S","seq":3,"duplicate":true}"#).unwrap();
        assert_eq!(
            (ack.stream.as_str(), ack.seq, ack.duplicate),
            ("S", 3, true)
        );
        assert!(matches!(
            decode::<PubAck>(b"nope"),
            Err(JetStreamError::Decode(_))
        ));
    }

    #[test]
    fn differences_name_each_field() {
        let want = StreamConfig::new("S", vec!["a".into()]).replicas(3);
        let have = StreamConfig::new("S", vec!["a".into(), "b".into()]);
        let d = want.differences(&have);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(want.differences(&want).is_empty());
    }
}
