//! Pull consumers for reading a stream in pages: create one (ephemeral, or
//! named with an inactivity threshold) filtered to a subject and starting at
//! a sequence (or at the last message per subject), fetch up to N messages
//! per request, delete it. Owns `PullConsumerConfig`, `PulledMessage` and the
//! parsing of `$JS.ACK.…` reply subjects (stream sequence, timestamp,
//! pending count). Calls `jetstream` (request helper, errors) and `client`
//! (an inbox subscription for the batch) only.
//!
//! Consumers here use `ack_policy: none`: a page read moves the consumer
//! past what it delivered, and nothing is redelivered. A fetch cut short by
//! our deadline may leave messages in flight to an inbox nobody reads: the
//! caller resumes from the last stream sequence it got (a new consumer at
//! `seq + 1`), never from the consumer's own position.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::headers::Headers;
use super::jetstream::{JetStream, JetStreamError};

/// Where a consumer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverFrom {
    /// At this stream sequence (or the first later one matching the filter).
    Sequence(u64),
    /// The newest message of every subject matching the filter.
    LastPerSubject,
    /// The stream's first message.
    All,
}

/// What a page-reading pull consumer looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullConsumerConfig {
    /// None: an ephemeral consumer (the server names it). Some: a durable
    /// one under this name, removed by the server after `inactive_threshold`.
    pub name: Option<String>,
    pub filter_subject: Option<String>,
    pub deliver: DeliverFrom,
    /// Deliver headers only (payload omitted; `Nats-Msg-Size` header says its size).
    pub headers_only: bool,
    /// The server deletes the consumer after this long without a pull.
    pub inactive_threshold: Duration,
}

impl PullConsumerConfig {
    /// An ephemeral consumer on `filter_subject` from `start_seq`, removed
    /// by the server 30 s after its last pull.
    pub fn from_sequence(filter_subject: impl Into<String>, start_seq: u64) -> Self {
        PullConsumerConfig {
            name: None,
            filter_subject: Some(filter_subject.into()),
            deliver: DeliverFrom::Sequence(start_seq.max(1)),
            headers_only: false,
            inactive_threshold: Duration::from_secs(30),
        }
    }
}

#[derive(Serialize)]
struct WireConsumerConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    durable_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter_subject: Option<&'a str>,
    deliver_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    opt_start_seq: Option<u64>,
    ack_policy: &'static str,
    replay_policy: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    headers_only: bool,
    inactive_threshold: u64,
    /// In memory: the consumer's state is ours to lose (pages are re-readable).
    mem_storage: bool,
    num_replicas: usize,
}

#[derive(Serialize)]
struct CreateConsumerRequest<'a> {
    stream_name: &'a str,
    config: WireConsumerConfig<'a>,
}

/// The part of `ConsumerInfo` we use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ConsumerInfo {
    pub stream_name: String,
    pub name: String,
    /// Messages matching the filter not yet delivered.
    pub num_pending: u64,
}

/// One message delivered by a fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PulledMessage {
    pub subject: String,
    pub headers: Option<Headers>,
    pub payload: Vec<u8>,
    pub info: DeliveryInfo,
}

/// What a `$JS.ACK.…` reply subject says about a delivered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryInfo {
    pub stream: String,
    pub consumer: String,
    pub delivered: u64,
    pub stream_seq: u64,
    pub consumer_seq: u64,
    /// When the stream stored it, nanoseconds since the Unix epoch.
    pub timestamp_nanos: u64,
    /// Messages matching the filter still to deliver after this one.
    pub pending: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`
/// (nats-server ≤ 2.9) or the 2.10+ form with domain and account hash
/// (`$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<token>`).
pub fn parse_ack_subject(subject: &str) -> Option<DeliveryInfo> {
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.len() < 2 || tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let fields: &[&str] = match tokens.len() {
        9 => &tokens[2..9],
        n if n >= 11 => &tokens[4..11],
        _ => return None,
    };
    let n = |i: usize| fields[i].parse::<u64>().ok();
    Some(DeliveryInfo {
        stream: fields[0].to_string(),
        consumer: fields[1].to_string(),
        delivered: n(2)?,
        stream_seq: n(3)?,
        consumer_seq: n(4)?,
        timestamp_nanos: n(5)?,
        pending: n(6)?,
    })
}

#[derive(Serialize)]
struct NextRequest {
    batch: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_wait: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
}

/// Pull status codes that end a fetch normally.
const STATUS_NO_MESSAGES: u16 = 404;
const STATUS_REQUEST_TIMEOUT: u16 = 408;
/// Idle heartbeat / flow control: not a message, not the end.
const STATUS_CONTROL: u16 = 100;

impl JetStream {
    /// Creates a pull consumer on `stream` with `ack_policy: none`.
    pub fn create_pull_consumer(
        &self,
        stream: &str,
        config: &PullConsumerConfig,
    ) -> Result<ConsumerInfo, JetStreamError> {
        let (deliver_policy, opt_start_seq) = match config.deliver {
            DeliverFrom::Sequence(seq) => ("by_start_sequence", Some(seq.max(1))),
            DeliverFrom::LastPerSubject => ("last_per_subject", None),
            DeliverFrom::All => ("all", None),
        };
        let request = CreateConsumerRequest {
            stream_name: stream,
            config: WireConsumerConfig {
                durable_name: config.name.as_deref(),
                filter_subject: config.filter_subject.as_deref(),
                deliver_policy,
                opt_start_seq,
                ack_policy: "none",
                replay_policy: "instant",
                headers_only: config.headers_only,
                inactive_threshold: config
                    .inactive_threshold
                    .as_nanos()
                    .min(u128::from(u64::MAX)) as u64,
                mem_storage: true,
                num_replicas: 1,
            },
        };
        let subject = match &config.name {
            Some(name) => format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}"),
            None => format!("$JS.API.CONSUMER.CREATE.{stream}"),
        };
        self.api_json(&subject, &request)
    }

    /// Deletes a consumer; Ok(false) when it did not exist.
    pub fn delete_consumer(&self, stream: &str, consumer: &str) -> Result<bool, JetStreamError> {
        #[derive(Deserialize)]
        struct Reply {
            #[serde(default)]
            success: bool,
        }
        match self.api::<Reply>(&format!("$JS.API.CONSUMER.DELETE.{stream}.{consumer}"), b"") {
            Ok(r) => Ok(r.success),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Up to `batch` messages from a pull consumer. `wait` None: only what
    /// is stored now (`no_wait`); Some(d): wait up to `d` for the first
    /// message. Returns early once the server says nothing more is pending.
    /// `batch` must not exceed the client's subscription capacity (the batch
    /// is buffered there), so memory is bounded by the caller's N.
    /// A consumer that does not exist (deleted, or removed after its
    /// inactive threshold) gets no answer at all from nats-server 2.9.10:
    /// the fetch fails with `Client(Timeout)` after `wait` + the timeout.
    pub fn fetch(
        &self,
        stream: &str,
        consumer: &str,
        batch: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<PulledMessage>, JetStreamError> {
        if batch == 0 {
            return Ok(Vec::new());
        }
        let client = self.client();
        if batch > client.subscription_capacity() {
            return Err(JetStreamError::Invalid(format!(
                "fetch batch {batch} exceeds the subscription capacity {}",
                client.subscription_capacity()
            )));
        }
        let inbox = client.new_inbox();
        let sub = client.subscribe(&inbox)?;
        let request = NextRequest {
            batch,
            no_wait: wait.is_none(),
            expires: wait.map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64),
        };
        let body =
            serde_json::to_vec(&request).map_err(|e| JetStreamError::Decode(e.to_string()))?;
        client.publish_with_reply(
            &format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            &inbox,
            None,
            &body,
        )?;
        let deadline = Instant::now() + wait.unwrap_or_default() + self.timeout();
        let mut out = Vec::with_capacity(batch.min(1024));
        while out.len() < batch {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match sub.next_timeout(left) {
                Ok(m) => m,
                Err(super::Error::Timeout) if !out.is_empty() => break,
                Err(e) => return Err(e.into()),
            };
            if let Some(code) = msg.headers.as_ref().and_then(Headers::status) {
                match code {
                    STATUS_CONTROL => continue,
                    STATUS_NO_MESSAGES | STATUS_REQUEST_TIMEOUT => break,
                    _ => {
                        let description = msg
                            .headers
                            .as_ref()
                            .map(|h| h.description().to_string())
                            .unwrap_or_default();
                        return Err(JetStreamError::PullStatus { code, description });
                    }
                }
            }
            let info = msg
                .reply
                .as_deref()
                .and_then(parse_ack_subject)
                .ok_or_else(|| {
                    JetStreamError::Decode(format!(
                        "pulled message on {:?} has no $JS.ACK reply subject",
                        msg.subject
                    ))
                })?;
            let done = info.pending == 0;
            out.push(PulledMessage {
                subject: msg.subject,
                headers: msg.headers,
                payload: msg.payload,
                info,
            });
            if done {
                break;
            }
        }
        Ok(out)
    }
}

/// A pull consumer read without end: one inbox, one request outstanding at
/// a time, the next sent as soon as the last one is used up, so messages
/// flow as they are stored (the way an ordered push consumer would, with
/// flow control by batch). The caller waits on `receiver()` and hands each
/// message to `take`; `stale` says when the consumer seems gone (no reply
/// to a request past its expiry, a gap in consumer sequences, a 409) and
/// the caller should make a new one from its own position.
pub struct ContinuousPull {
    stream: String,
    consumer: String,
    inbox: String,
    sub: super::client::Subscription,
    batch: usize,
    expires: Duration,
    /// Messages still due on the outstanding request (0: none outstanding).
    outstanding: usize,
    deadline: Instant,
    last_consumer_seq: u64,
    lost: bool,
    /// Messages delivered on the outstanding request.
    delivered: usize,
    /// A request ended with nothing delivered: the read is at the end of
    /// what the stream holds (for now).
    at_end: bool,
    /// When the outstanding request was sent.
    requested_at: Instant,
}

/// What `ContinuousPull::take` made of one incoming message.
#[derive(Debug)]
pub enum Pulled {
    Message(PulledMessage),
    /// Not a message (heartbeat, request ended).
    Nothing,
}

impl ContinuousPull {
    /// Creates an ephemeral consumer per `config` and starts pulling.
    pub fn start(
        js: &JetStream,
        stream: &str,
        config: &PullConsumerConfig,
        batch: usize,
        expires: Duration,
    ) -> Result<ContinuousPull, JetStreamError> {
        let info = js.create_pull_consumer(stream, config)?;
        let client = js.client();
        let inbox = client.new_inbox();
        let batch = batch.clamp(1, client.subscription_capacity().max(2) / 2);
        // Room for one request's messages and its status lines.
        let sub = client.subscribe_with_capacity(&inbox, batch * 2 + 16)?;
        let mut pull = ContinuousPull {
            stream: stream.to_string(),
            consumer: info.name,
            inbox,
            sub,
            batch,
            expires,
            outstanding: 0,
            deadline: Instant::now(),
            last_consumer_seq: 0,
            lost: false,
            delivered: 0,
            at_end: false,
            requested_at: Instant::now(),
        };
        pull.request(js)?;
        Ok(pull)
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn receiver(&self) -> &crossbeam_channel::Receiver<super::Message> {
        self.sub.receiver()
    }

    fn request(&mut self, js: &JetStream) -> Result<(), JetStreamError> {
        let body = serde_json::to_vec(&NextRequest {
            batch: self.batch,
            no_wait: false,
            expires: Some(self.expires.as_nanos().min(u128::from(u64::MAX)) as u64),
        })
        .map_err(|e| JetStreamError::Decode(e.to_string()))?;
        js.client().publish_with_reply(
            &format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                self.stream, self.consumer
            ),
            &self.inbox,
            None,
            &body,
        )?;
        self.outstanding = self.batch;
        self.delivered = 0;
        self.requested_at = Instant::now();
        self.deadline = Instant::now() + self.expires + js.timeout();
        Ok(())
    }

    /// Classifies one message from `receiver()`.
    pub fn take(&mut self, msg: super::Message) -> Pulled {
        if let Some(code) = msg.headers.as_ref().and_then(Headers::status) {
            match code {
                STATUS_CONTROL => {}
                STATUS_NO_MESSAGES | STATUS_REQUEST_TIMEOUT => {
                    if self.delivered == 0 {
                        self.at_end = true;
                    }
                    self.outstanding = 0;
                }
                _ => {
                    // 409: consumer deleted, leadership change, …
                    log::debug!(
                        "pull on {} ended with status {code} {}",
                        self.consumer,
                        msg.headers.as_ref().map_or("", |h| h.description())
                    );
                    self.lost = true;
                }
            }
            return Pulled::Nothing;
        }
        let Some(info) = msg.reply.as_deref().and_then(parse_ack_subject) else {
            return Pulled::Nothing;
        };
        if self.last_consumer_seq != 0 && info.consumer_seq != self.last_consumer_seq + 1 {
            // Something was lost on the way (a reconnect): start again.
            self.lost = true;
            return Pulled::Nothing;
        }
        self.last_consumer_seq = info.consumer_seq;
        self.outstanding = self.outstanding.saturating_sub(1);
        self.delivered += 1;
        Pulled::Message(PulledMessage {
            subject: msg.subject,
            headers: msg.headers,
            payload: msg.payload,
            info,
        })
    }

    /// Sends the next request when the last one is used up or expired;
    /// false when the consumer should be replaced.
    pub fn keep_going(&mut self, js: &JetStream) -> bool {
        if self.lost {
            return false;
        }
        if self.outstanding > 0 && Instant::now() < self.deadline {
            return true;
        }
        if self.outstanding > 0 {
            // No end of the request came: the consumer (or its server) is gone.
            return false;
        }
        self.request(js).is_ok()
    }

    /// Once after a request ended with nothing to deliver: when that
    /// request was sent (everything stored before then has been read).
    pub fn take_at_end(&mut self) -> Option<Instant> {
        std::mem::take(&mut self.at_end).then_some(self.requested_at)
    }

    /// When `keep_going` should be called again at the latest.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Deletes the consumer (best effort).
    pub fn stop(self, js: &JetStream) {
        let _ = js.delete_consumer(&self.stream, &self.consumer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_ack_subject_forms() {
        let v1 = parse_ack_subject("$JS.ACK.MSGS.c1.1.42.3.1672914030000000000.5").unwrap();
        assert_eq!(
            v1,
            DeliveryInfo {
                stream: "MSGS".into(),
                consumer: "c1".into(),
                delivered: 1,
                stream_seq: 42,
                consumer_seq: 3,
                timestamp_nanos: 1_672_914_030_000_000_000,
                pending: 5,
            }
        );
        let v2 = parse_ack_subject("$JS.ACK.dom.ACCHASH.MSGS.c1.1.42.3.1672914030000000000.5.tok")
            .unwrap();
        assert_eq!(v2, v1);
        assert_eq!(parse_ack_subject("$JS.ACK.MSGS.c1.1.x.3.4.5"), None);
        assert_eq!(parse_ack_subject("$JS.ACK.MSGS.c1.1.2"), None);
        assert_eq!(parse_ack_subject("_INBOX.a.b.c.d.e.f.g.h"), None);
        assert_eq!(parse_ack_subject(""), None);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz_support::config;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(config(512, 1))]

        /// Arbitrary reply subjects never panic the parser; well-formed ones parse.
        #[test]
        fn ack_subjects(s in "\\PC{0,80}", seq in any::<u64>(), ts in any::<u64>(), pending in any::<u64>()) {
            let _ = parse_ack_subject(&s);
            let mut tail = s.clone();
            tail.insert_str(0, "$JS.ACK.");
            let _ = parse_ack_subject(&tail);
            let good = format!("$JS.ACK.S.C.1.{seq}.2.{ts}.{pending}");
            let info = parse_ack_subject(&good).unwrap();
            prop_assert_eq!((info.stream_seq, info.timestamp_nanos, info.pending), (seq, ts, pending));
        }
    }
}
