//! What each unary method does with its decoded request: validate it, answer
//! at once from broker state, or submit it to the writer and answer when the
//! commit returns (`reply_for_append`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::Shared;
use crate::broker::{validate_topic_name, Broker};
use crate::grpc::headers::{CallInfo, Method};
use crate::grpc::{encode_message, Code, Status};
use crate::proto;
use crate::storage::{Appended, NewMessage, StorageError, WriteRequest};
use crate::telemetry::{PublishSpan, TraceContext};

/// The handler's answer: now, or after the writer.
pub enum Handled {
    Reply(Result<Bytes, Status>),
    Submitted,
}

fn decode<M: Message + Default>(body: Bytes) -> Result<M, Status> {
    M::decode(body).map_err(|e| {
        Status::internal(format!(
            "failed to decode {}: {e}",
            std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("request")
        ))
    })
}

/// The checks on a decoded request that need no broker state.
pub trait Validate {
    fn validate(&self) -> Result<(), Status>;
}

fn valid_topic(name: &str) -> Result<(), Status> {
    validate_topic_name(name).map_err(Status::invalid_argument)
}

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// An idempotency key is empty (none) or 1..=128 printable ASCII bytes.
fn valid_key(key: &str) -> Result<(), Status> {
    if key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        let shown: String = key.chars().take(32).collect();
        return Err(Status::invalid_argument(format!(
            "invalid idempotency_key {shown:?}: keys are 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII bytes"
        )));
    }
    Ok(())
}

fn key_of(key: String) -> Option<String> {
    (!key.is_empty()).then_some(key)
}

impl Validate for proto::PublishRequest {
    fn validate(&self) -> Result<(), Status> {
        valid_topic(&self.topic)?;
        valid_key(&self.idempotency_key)
    }
}

impl Validate for proto::BatchPublishRequest {
    fn validate(&self) -> Result<(), Status> {
        valid_topic(&self.topic)?;
        if self.messages.is_empty() {
            return Err(Status::invalid_argument(
                "BatchPublish needs at least one message",
            ));
        }
        for m in &self.messages {
            valid_key(&m.idempotency_key)?;
        }
        Ok(())
    }
}

impl Validate for proto::ListTopicsRequest {
    fn validate(&self) -> Result<(), Status> {
        Ok(())
    }
}

impl Validate for proto::GetTopicStatsRequest {
    fn validate(&self) -> Result<(), Status> {
        self.topics.iter().try_for_each(|t| valid_topic(t))
    }
}

impl Validate for proto::DeleteTopicRequest {
    fn validate(&self) -> Result<(), Status> {
        valid_topic(&self.topic)
    }
}

fn valid_group(name: &str) -> Result<(), Status> {
    crate::broker::validate_group_name(name).map_err(Status::invalid_argument)
}

impl Validate for proto::DeleteConsumerGroupRequest {
    fn validate(&self) -> Result<(), Status> {
        valid_topic(&self.topic)?;
        valid_group(&self.consumer_group)
    }
}

impl Validate for proto::ResetCursorRequest {
    fn validate(&self) -> Result<(), Status> {
        valid_topic(&self.topic)?;
        valid_group(&self.consumer_group)
    }
}

/// Decodes a request message and runs its checks: a valid request, or the
/// status to refuse it with.
pub fn decode_valid<M: Message + Default + Validate>(body: Bytes) -> Result<M, Status> {
    let m: M = decode(body)?;
    m.validate()?;
    Ok(m)
}

/// A publish in flight: what its reply must report to telemetry.
pub struct PublishMeta {
    pub topic: Arc<str>,
    pub messages: u64,
    pub batch: bool,
    pub span: PublishSpan,
}

pub fn handle_unary(
    method: Method,
    body: Bytes,
    uid: u64,
    shared: &mut Shared,
    info: &CallInfo,
    meta: &mut Option<PublishMeta>,
) -> Handled {
    if shared.storage_failed.is_some() && method != Method::HealthCheck {
        return Handled::Reply(Err(shared.stopping_status()));
    }
    match dispatch(method, body, uid, shared, info, meta) {
        Ok(h) => h,
        Err(status) => Handled::Reply(Err(status)),
    }
}

/// The trace parent of a publish: the call's metadata, else the first
/// message's own `traceparent` attribute.
fn trace_parent(info: &CallInfo, first: Option<&HashMap<String, String>>) -> Option<TraceContext> {
    if let Some(tp) = &info.traceparent {
        if let Some(cx) = TraceContext::parse(tp, info.tracestate.as_deref()) {
            return Some(cx);
        }
    }
    let attrs = first?;
    TraceContext::parse(
        attrs.get("traceparent")?,
        attrs.get("tracestate").map(String::as_str),
    )
}

/// Starts the publish span and stamps its trace context on the messages, so
/// consumers can continue the trace.
fn traced(
    shared: &Shared,
    info: &CallInfo,
    topic: &Arc<str>,
    messages: &mut [NewMessage],
    batch: bool,
) -> PublishMeta {
    let parent = trace_parent(info, messages.first().map(|m| &m.attributes));
    let span = shared
        .telemetry
        .start_publish_span(parent.as_ref(), topic, messages.len());
    if let Some(tp) = span.traceparent() {
        for m in messages.iter_mut() {
            m.attributes.insert("traceparent".into(), tp.to_string());
            if let Some(ts) = span.tracestate() {
                m.attributes.insert("tracestate".into(), ts.to_string());
            }
        }
    }
    PublishMeta {
        topic: topic.clone(),
        messages: messages.len() as u64,
        batch,
        span,
    }
}

fn dispatch(
    method: Method,
    body: Bytes,
    uid: u64,
    shared: &mut Shared,
    info: &CallInfo,
    meta: &mut Option<PublishMeta>,
) -> Result<Handled, Status> {
    match method {
        Method::Publish => {
            let req: proto::PublishRequest = decode_valid(body)?;
            let mut messages = vec![NewMessage {
                payload: req.payload,
                attributes: req.attributes,
                idempotency_key: key_of(req.idempotency_key),
            }];
            let topic: Arc<str> = req.topic.into();
            shared.admit_topic(&topic)?;
            *meta = Some(traced(shared, info, &topic, &mut messages, false));
            shared.submit(WriteRequest::Append {
                token: uid,
                topic,
                messages,
            });
            Ok(Handled::Submitted)
        }
        Method::BatchPublish => {
            let req: proto::BatchPublishRequest = decode_valid(body)?;
            if req.messages.len() > shared.max_batch_messages {
                return Err(Status::invalid_argument(format!(
                    "BatchPublish carries {} messages; at most {} are accepted per call \
                     (--max-batch-messages): split the batch",
                    req.messages.len(),
                    shared.max_batch_messages
                )));
            }
            let mut messages: Vec<NewMessage> = req
                .messages
                .into_iter()
                .map(|m| NewMessage {
                    payload: m.payload,
                    attributes: m.attributes,
                    idempotency_key: key_of(m.idempotency_key),
                })
                .collect();
            let topic: Arc<str> = req.topic.into();
            shared.admit_topic(&topic)?;
            *meta = Some(traced(shared, info, &topic, &mut messages, true));
            shared.submit(WriteRequest::Append {
                token: uid,
                topic,
                messages,
            });
            Ok(Handled::Submitted)
        }
        Method::ListTopics => {
            let _: proto::ListTopicsRequest = decode_valid(body)?;
            let topics = shared
                .broker
                .topics()
                .map(|t| proto::Topic {
                    name: t.name.to_string(),
                    created_at: t.created_at_ms,
                })
                .collect();
            Ok(Handled::Reply(Ok(encode_message(
                &proto::ListTopicsResponse { topics },
            ))))
        }
        Method::GetTopicStats => {
            let req: proto::GetTopicStatsRequest = decode_valid(body)?;
            Ok(Handled::Reply(topic_stats(&shared.broker, &req.topics)))
        }
        Method::DeleteTopic => {
            let req: proto::DeleteTopicRequest = decode_valid(body)?;
            if shared.broker.topic(&req.topic).is_none() {
                return Ok(Handled::Reply(Ok(delete_topic_reply(false))));
            }
            // The broker forgets the topic when the writer reports the delete,
            // so it is ordered with the appends around it.
            let topic: Arc<str> = req.topic.into();
            // Coalesced cursor writes for it must not land after the delete.
            shared.cursors.retain(|(t, _), _| *t != topic);
            shared.submit(WriteRequest::DeleteTopic { token: uid, topic });
            Ok(Handled::Submitted)
        }
        Method::DeleteConsumerGroup => {
            let req: proto::DeleteConsumerGroupRequest = decode_valid(body)?;
            let group = group_name(req.consumer_group);
            // The broker forgets the group when the delete is committed; until
            // then its acks are held back so none re-creates it on disk.
            if !shared.broker.begin_group_delete(&req.topic, &group) {
                return Ok(Handled::Reply(Ok(delete_group_reply(false))));
            }
            let (topic, group): (Arc<str>, Arc<str>) = (req.topic.into(), group.into());
            shared.cursors.remove(&(topic.clone(), group.clone()));
            shared.submit(WriteRequest::DeleteGroup {
                token: uid,
                topic,
                group,
            });
            Ok(Handled::Submitted)
        }
        Method::ResetCursor => {
            let req: proto::ResetCursorRequest = decode_valid(body)?;
            let group = group_name(req.consumer_group);
            let last = shared.broker.last_sequence();
            if req.sequence > last.saturating_add(1) {
                return Err(Status::invalid_argument(format!(
                    "sequence {} is past the newest message (last sequence {last})",
                    req.sequence
                )));
            }
            // The cursor moves in the broker once the move is committed.
            if !shared.broker.fence_group(&req.topic, &group) {
                return Ok(Handled::Reply(Ok(reset_reply(false))));
            }
            let (topic, group): (Arc<str>, Arc<str>) = (req.topic.into(), group.into());
            // An older coalesced ack must not land after the reset.
            shared.cursors.remove(&(topic.clone(), group.clone()));
            let acked_at_ms = shared.clock.wall_ms();
            shared.submit(WriteRequest::SetCursor {
                topic,
                group,
                sequence: req.sequence,
                acked_at_ms,
                token: Some(uid),
            });
            Ok(Handled::Submitted)
        }
        Method::HealthCheck => Ok(Handled::Reply(super::health::check(
            body,
            !shared.serving(),
        ))),
        Method::Subscribe | Method::HealthWatch | Method::Reflection { .. } => Err(
            Status::internal("a streaming method reached the unary handler"),
        ),
    }
}

/// An empty consumer group name means "default", on every RPC.
fn group_name(g: String) -> String {
    if g.is_empty() {
        "default".into()
    } else {
        g
    }
}

/// Stats for the named topics (all when none are named; names validated).
fn topic_stats(broker: &Broker, names: &[String]) -> Result<Bytes, Status> {
    let mut views = Vec::new();
    if names.is_empty() {
        views.extend(broker.topics().cloned());
    } else {
        for name in names {
            let view = broker
                .topic(name)
                .ok_or_else(|| Status::new(Code::NotFound, format!("topic {name:?} not found")))?;
            views.push(view.clone());
        }
    }
    let stats = views
        .into_iter()
        .map(|t| {
            let empty = t.total_messages() == 0;
            proto::TopicStats {
                topic: t.name.to_string(),
                total_messages: t.total_messages(),
                first_sequence: if empty { 0 } else { t.first_seq },
                last_sequence: if empty { 0 } else { t.last_seq },
                first_message_timestamp: if empty { 0 } else { t.first_ts },
                last_message_timestamp: if empty { 0 } else { t.last_ts },
                created_at: t.created_at_ms,
                consumer_groups: broker
                    .groups(&t.name)
                    .into_iter()
                    .map(|g| proto::ConsumerGroupStats {
                        group_name: g.name.to_string(),
                        cursor_sequence: g.cursor,
                        pending_count: t.pending_after(g.cursor, g.cursor_ordinal),
                        last_ack_timestamp: g.last_ack_ms,
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(encode_message(&proto::GetTopicStatsResponse { stats }))
}

pub fn reset_reply(updated: bool) -> Bytes {
    encode_message(&proto::ResetCursorResponse { updated })
}

pub fn delete_topic_reply(deleted: bool) -> Bytes {
    encode_message(&proto::DeleteTopicResponse { deleted })
}

pub fn delete_group_reply(deleted: bool) -> Bytes {
    encode_message(&proto::DeleteConsumerGroupResponse { deleted })
}

/// The status for a storage failure.
pub fn storage_status(e: &StorageError) -> Status {
    if e.disk_full {
        Status::unavailable(format!("storage is full: {}", e.message))
    } else if e.too_large {
        Status::new(Code::ResourceExhausted, e.message.clone())
    } else if e.unavailable {
        Status::unavailable(format!("storage is unavailable: {}", e.message))
    } else {
        Status::new(Code::Internal, format!("storage failure: {}", e.message))
    }
}

/// The response to send for a finished append.
pub fn reply_for_append(
    method: Method,
    result: &Result<Appended, StorageError>,
) -> Result<Bytes, Status> {
    let appended = result.as_ref().map_err(storage_status)?;
    // Stored messages and duplicates merged back into the call's order.
    let total = appended.messages.len() + appended.duplicates.len();
    let mut stored = appended.messages.iter();
    let mut dups = appended.duplicates.iter().peekable();
    let mut results = Vec::with_capacity(total);
    for i in 0..total {
        match dups.next_if(|d| d.index == i) {
            Some(d) => results.push((d.id.to_string(), d.sequence, d.timestamp_ms, true)),
            None => {
                let m = stored
                    .next()
                    .ok_or_else(|| Status::internal("append result out of step"))?;
                results.push((m.id.to_string(), m.sequence, m.timestamp_ms, false));
            }
        }
    }
    Ok(match method {
        Method::Publish => {
            let (message_id, sequence, timestamp, duplicate) = results
                .into_iter()
                .next()
                .ok_or_else(|| Status::internal("empty append"))?;
            encode_message(&proto::PublishResponse {
                message_id,
                sequence,
                timestamp,
                duplicate,
            })
        }
        _ => encode_message(&proto::BatchPublishResponse {
            results: results
                .into_iter()
                .map(
                    |(message_id, sequence, _, duplicate)| proto::PublishResult {
                        message_id,
                        sequence,
                        duplicate,
                    },
                )
                .collect(),
            timestamp: appended.timestamp_ms,
        }),
    })
}

/// Property-based fuzzing of the unary requests of `sluice.v1` (`cargo test
/// --lib fuzz`): arbitrary bytes, and encoded requests with arbitrary fields
/// and damage, decoded as each request type and checked by `decode_valid`
/// give a request that obeys the rules or an INTERNAL (undecodable) /
/// INVALID_ARGUMENT (decodable but invalid) status, never a panic.
#[cfg(test)]
mod fuzz {
    use std::fmt::Debug;

    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    use super::*;
    use crate::fuzz_support::config;
    use crate::grpc::headers::trailers;

    use crate::fuzz_support::topic_rule_ok as rule_ok;

    fn topic() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[A-Za-z0-9._-]{1,12}",
            1 => "",
            1 => "[a-z]{254,256}",
            2 => "\\PC{0,12}",
        ]
    }

    fn attrs() -> impl Strategy<Value = HashMap<String, String>> {
        btree_map("\\PC{0,8}", "\\PC{0,8}", 0..3).prop_map(|m| m.into_iter().collect())
    }

    /// An encoded request, maybe damaged (bytes flipped, cut or appended),
    /// or plain noise. The flag is set when the bytes are the intact encoding.
    fn wire<M: Message + Debug + 'static>(
        request: impl Strategy<Value = M>,
    ) -> impl Strategy<Value = (Vec<u8>, bool)> {
        let damage = (
            vec((any::<usize>(), 1u8..=255), 0..3),
            any::<Option<usize>>(),
            vec(any::<u8>(), 0..4),
        );
        prop_oneof![
            4 => (request, damage).prop_map(|(m, (flips, cut, tail))| {
                let mut b = m.encode_to_vec();
                let intact = flips.is_empty() && cut.is_none() && tail.is_empty();
                for (at, x) in flips {
                    if !b.is_empty() {
                        let n = b.len();
                        b[at % n] ^= x;
                    }
                }
                if let Some(cut) = cut {
                    b.truncate(cut % (b.len() + 1));
                }
                b.extend(tail);
                (b, intact)
            }),
            1 => vec(any::<u8>(), 0..64).prop_map(|b| (b, false)),
        ]
    }

    /// Runs `decode_valid` on `body`: a request that decodes and obeys
    /// `rules`, or the status that says which of the two failed.
    fn check<M>(body: &[u8], rules: impl Fn(&M) -> bool) -> Result<Option<M>, TestCaseError>
    where
        M: Message + Default + Validate + PartialEq + Debug,
    {
        let decoded = M::decode(body);
        match decode_valid::<M>(Bytes::copy_from_slice(body)) {
            Ok(m) => {
                prop_assert!(rules(&m), "accepted {m:?}");
                let again = M::decode(m.encode_to_vec().as_slice());
                prop_assert_eq!(again.as_ref(), Ok(&m));
                Ok(Some(m))
            }
            Err(status) => {
                match decoded {
                    Err(_) => prop_assert_eq!(status.code, Code::Internal),
                    Ok(m) => {
                        prop_assert_eq!(status.code, Code::InvalidArgument);
                        prop_assert!(!rules(&m), "refused {m:?}: {status}");
                    }
                }
                prop_assert!(!status.message.is_empty());
                prop_assert!(trailers(&status).contains_key("grpc-message"));
                Ok(None)
            }
        }
    }

    proptest! {
        #![proptest_config(config(512, 1))]

        #[test]
        fn fuzz_publish_requests(
            (body, intact) in wire((topic(), vec(any::<u8>(), 0..32), attrs()).prop_map(
                |(topic, payload, attributes)| proto::PublishRequest {
                    topic,
                    payload: payload.into(),
                    attributes,
                    idempotency_key: String::new(),
                },
            )),
        ) {
            let got = check(&body, |m: &proto::PublishRequest| rule_ok(&m.topic))?;
            if intact {
                let m = proto::PublishRequest::decode(body.as_slice()).unwrap();
                prop_assert_eq!(got.is_some(), rule_ok(&m.topic));
            }
        }

        #[test]
        fn fuzz_batch_publish_requests(
            (body, _) in wire((
                topic(),
                vec(
                    (vec(any::<u8>(), 0..16), attrs()).prop_map(|(payload, attributes)| {
                        proto::BatchMessage { payload: payload.into(), attributes, idempotency_key: String::new() }
                    }),
                    0..3,
                ),
            )
                .prop_map(|(topic, messages)| proto::BatchPublishRequest { topic, messages })),
        ) {
            check(&body, |m: &proto::BatchPublishRequest| {
                rule_ok(&m.topic) && !m.messages.is_empty()
            })?;
        }

        #[test]
        fn fuzz_list_and_stats_requests(
            (body, _) in wire(vec(topic(), 0..4).prop_map(|topics| {
                proto::GetTopicStatsRequest { topics }
            })),
        ) {
            check(&body, |_: &proto::ListTopicsRequest| true)?;
            check(&body, |m: &proto::GetTopicStatsRequest| m.topics.iter().all(|t| rule_ok(t)))?;
        }

        #[test]
        fn fuzz_delete_and_reset_requests(
            (body, _) in wire((topic(), "\\PC{0,8}", any::<u64>()).prop_map(
                |(topic, consumer_group, sequence)| proto::ResetCursorRequest {
                    topic,
                    consumer_group,
                    sequence,
                },
            )),
        ) {
            // The three share field numbers 1 (and 2): one body tests all.
            check(&body, |m: &proto::DeleteTopicRequest| rule_ok(&m.topic))?;
            let group_ok = |g: &str| g.is_empty() || rule_ok(g);
            check(&body, |m: &proto::DeleteConsumerGroupRequest| {
                rule_ok(&m.topic) && group_ok(&m.consumer_group)
            })?;
            check(&body, |m: &proto::ResetCursorRequest| {
                rule_ok(&m.topic) && group_ok(&m.consumer_group)
            })?;
        }

        #[test]
        fn fuzz_health_checks(body in vec(any::<u8>(), 0..48), service in "\\PC{0,20}", shutting_down: bool) {
            use crate::proto::health::{HealthCheckRequest, HealthCheckResponse};
            let named = HealthCheckRequest { service }.encode_to_vec();
            for body in [body, named] {
                match super::super::health::check(Bytes::from(body), shutting_down) {
                    Ok(framed) => {
                        let r = HealthCheckResponse::decode(&framed[5..]).unwrap();
                        prop_assert_eq!(r.status, if shutting_down { 2 } else { 1 });
                    }
                    Err(s) => prop_assert!(s.code == Code::NotFound || s.code == Code::Internal),
                }
            }
        }
    }
}
