//! `SubscribeCall`: one Subscribe stream. Upstream messages (Init, credit,
//! acks, nacks) are read and applied to the broker as they arrive — reading
//! never stops once the stream is subscribed, so credits and acks can't be
//! starved. (On a store several gateways share, a group's Init first waits
//! for the store to claim the group; reading resumes once it has.) Downstream, a delivery
//! is pulled from the broker only while the stream has HTTP/2 send capacity;
//! at most one encoded message waits for capacity, nothing more.

use std::sync::Arc;
use std::task::Context;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use prost::Message;

use super::inbound::{Inbound, RequestReader};
use super::outbound::Outbound;
use super::Shared;
use crate::broker::{Delivery, DeliveryPolicy, EndReason, Start, SubscribeError, SubscribeRequest};
use crate::grpc::framing::frame_status;
use crate::grpc::headers::CallInfo;
use crate::grpc::{encode_message, encode_message_with, Code, MessageDecoder, Status};
use crate::proto::{self, subscribe_downstream, subscribe_upstream};
use crate::storage::{ClaimError, WriteRequest};

pub struct SubscribeCall {
    /// Closed once the client half-closed (it may still receive).
    reader: RequestReader,
    out: Outbound,
    initialised: bool,
    /// Compress deliveries (the client negotiated gzip).
    gzip: bool,
    /// The client ended its side of the stream.
    half_closed: bool,
    /// (topic, group) for metrics, once initialised.
    labels: Option<(Arc<str>, Arc<str>)>,
    /// The Init waiting for its group to be claimed (request, group, consumer id).
    claim: Option<(SubscribeRequest, Arc<str>, String)>,
}

fn encode_delivery(d: Delivery, gzip: bool) -> Bytes {
    let m = &d.message;
    encode_message_with(
        &proto::SubscribeDownstream {
            response: Some(subscribe_downstream::Response::Delivery(
                proto::MessageDelivery {
                    message_id: m.id.to_string(),
                    sequence: m.sequence,
                    payload: m.payload.clone(),
                    attributes: m.attributes.clone(),
                    timestamp: m.timestamp_ms,
                    delivery_count: d.delivery_count,
                },
            )),
        },
        gzip,
    )
}

/// The Init's dead-letter and ack-deadline settings, checked.
fn delivery_policy(init: &proto::SubscriptionInit, group: bool) -> Result<DeliveryPolicy, Status> {
    if !group {
        if init.max_deliveries > 0 || init.ack_deadline_ms > 0 || !init.dead_letter_topic.is_empty()
        {
            return Err(Status::invalid_argument(
                "max_deliveries, dead_letter_topic and ack_deadline_ms need a consumer group \
                 (mode CONSUMER_GROUP): BROWSE streams do not ack",
            ));
        }
        return Ok(DeliveryPolicy::default());
    }
    let dead_letter_topic: Option<Arc<str>> =
        match init.max_deliveries {
            0 if init.dead_letter_topic.is_empty() => None,
            0 => return Err(Status::invalid_argument(
                "dead_letter_topic is set but max_deliveries is 0 (unlimited): set max_deliveries",
            )),
            _ if init.dead_letter_topic.is_empty() => {
                let name = format!("{}.dead-letter", init.topic);
                crate::broker::validate_topic_name(&name).map_err(|e| {
                    Status::invalid_argument(format!(
                        "the default dead-letter topic is too long ({e}): set dead_letter_topic"
                    ))
                })?;
                Some(name.into())
            }
            _ => {
                crate::broker::validate_topic_name(&init.dead_letter_topic)
                    .map_err(|e| Status::invalid_argument(format!("dead_letter_topic: {e}")))?;
                if init.dead_letter_topic == init.topic {
                    return Err(Status::invalid_argument(
                        "dead_letter_topic must differ from the topic itself",
                    ));
                }
                Some(init.dead_letter_topic.as_str().into())
            }
        };
    Ok(DeliveryPolicy {
        max_deliveries: init.max_deliveries,
        dead_letter_topic,
        ack_deadline_ms: init.ack_deadline_ms,
    })
}

/// What a `SubscriptionInit` asks the broker for, checked (topic name,
/// initial position, mode), with the group's metrics label; or the status
/// that refuses it.
pub fn subscription_request(
    init: proto::SubscriptionInit,
) -> Result<(SubscribeRequest, Arc<str>), Status> {
    crate::broker::validate_topic_name(&init.topic).map_err(Status::invalid_argument)?;
    let start = match proto::InitialPosition::try_from(init.initial_position) {
        Ok(proto::InitialPosition::Latest) => Start::Latest,
        Ok(proto::InitialPosition::Earliest) => Start::Earliest,
        Ok(proto::InitialPosition::Offset) => Start::Offset(init.offset),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown initial_position {}",
                init.initial_position
            )))
        }
    };
    let group = match proto::SubscriptionMode::try_from(init.mode) {
        Ok(proto::SubscriptionMode::ConsumerGroup) => {
            crate::broker::validate_group_name(&init.consumer_group)
                .map_err(Status::invalid_argument)?;
            Some(init.consumer_group.clone())
        }
        Ok(proto::SubscriptionMode::Browse) => None,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown mode {}",
                init.mode
            )))
        }
    };
    let label: Arc<str> = match &group {
        Some(g) if g.is_empty() => "default".into(),
        Some(g) => g.as_str().into(),
        None => "_browse".into(),
    };
    let policy = delivery_policy(&init, group.is_some())?;
    Ok((
        SubscribeRequest {
            topic: init.topic,
            group,
            start,
            policy,
        },
        label,
    ))
}

impl SubscribeCall {
    pub fn new(
        recv: RecvStream,
        send: SendStream<Bytes>,
        max_message: usize,
        info: &CallInfo,
    ) -> Self {
        SubscribeCall {
            reader: RequestReader::new(
                recv,
                MessageDecoder::new(max_message).with_gzip(info.request_gzip),
            ),
            out: Outbound::new(send),
            initialised: false,
            gzip: info.respond_gzip,
            half_closed: false,
            labels: None,
            claim: None,
        }
    }

    /// Queues a heartbeat unless something is already waiting to go out.
    pub fn heartbeat(&mut self, wall_ms: i64, latest_seq: u64) {
        if self.out.is_idle() && !self.out.is_finishing() {
            self.out.push(encode_message(&proto::SubscribeDownstream {
                response: Some(subscribe_downstream::Response::Heartbeat(
                    proto::Heartbeat {
                        timestamp: wall_ms,
                        latest_seq,
                    },
                )),
            }));
        }
    }

    /// The broker ended this subscription.
    pub fn ended_by_broker(&mut self, reason: EndReason) {
        let (code, message, status) = match reason {
            EndReason::TakenOver => (
                None,
                "",
                Status::new(
                    Code::Aborted,
                    "another consumer subscribed with the same topic and group",
                ),
            ),
            EndReason::GroupUnavailable => (
                None,
                "",
                Status::unavailable(
                    "this gateway lost contact with the NATS cluster and gave the consumer group up; subscribe again",
                ),
            ),
            EndReason::TopicDeleted => {
                (Some("TOPIC_DELETED"), "the topic was deleted", Status::ok())
            }
            EndReason::GroupDeleted => (
                Some("GROUP_DELETED"),
                "the consumer group was deleted",
                Status::ok(),
            ),
        };
        self.initialised = false; // the broker already forgot it
        if let Some(code) = code {
            self.out.push(encode_message(&proto::SubscribeDownstream {
                response: Some(subscribe_downstream::Response::Error(proto::StreamError {
                    code: code.into(),
                    message: message.into(),
                })),
            }));
        }
        self.finish(status);
    }

    /// Ends the stream with `status` (after whatever is queued).
    pub fn finish(&mut self, status: Status) {
        self.out.finish(status);
        self.reader.stop();
    }

    /// The call's request stream, for the reactor's memory rules.
    pub fn reader_mut(&mut self) -> &mut RequestReader {
        &mut self.reader
    }

    /// Drives the stream; true once it is finished and can be dropped.
    pub fn poll(&mut self, uid: u64, shared: &mut Shared, cx: &mut Context<'_>) -> bool {
        // Read first: acks sent just before a reset still count.
        self.read(uid, shared, cx);
        if self.out.poll_reset(cx) {
            log::debug!("sub {uid}: stream reset by the client");
            self.forget(uid, shared);
            return true;
        }
        let (initialised, gzip) = (self.initialised, self.gzip);
        let now = shared.clock.now_ms();
        let broker = &mut shared.broker;
        let metrics = shared.telemetry.metrics();
        let labels = &self.labels;
        let flushed = self.out.flush(cx, || {
            if !initialised {
                return None;
            }
            let d = broker.next_delivery(uid, now)?;
            if let Some((t, g)) = labels {
                metrics.delivered(t, g, 1);
                if d.delivery_count > 1 {
                    metrics.redelivered(t, g, 1);
                }
            }
            Some(encode_delivery(d, gzip))
        });
        let mut done = flushed.unwrap_or(true);
        // Half-closed and out of credit: nothing more can be sent, so the
        // stream ends normally (what a client that sent Init, a grant and
        // EOF expects).
        if !done
            && self.half_closed
            && self.initialised
            && self.out.is_idle()
            && shared.broker.credit(uid) == Some(0)
        {
            self.finish(Status::ok());
            done = self.out.flush(cx, || None).unwrap_or(true);
        }
        if done {
            self.forget(uid, shared);
        }
        done
    }

    /// Subscribes the stream in the broker.
    fn start(
        &mut self,
        uid: u64,
        request: SubscribeRequest,
        label: Arc<str>,
        consumer: &str,
        shared: &mut Shared,
    ) -> Result<(), Status> {
        let topic: Arc<str> = request.topic.as_str().into();
        let (now, wall) = (shared.clock.now_ms(), shared.clock.wall_ms());
        shared
            .broker
            .subscribe(uid, request, now, wall)
            .map_err(|e| match e {
                SubscribeError::Invalid(m) => Status::invalid_argument(m),
                SubscribeError::LimitReached(m) => Status::new(Code::ResourceExhausted, m),
            })?;
        self.initialised = true;
        log::debug!("sub {uid}: subscribed to {topic} (consumer {consumer:?})");
        self.labels = Some((topic, label));
        Ok(())
    }

    /// The store answered the claim of this stream's group: subscribe
    /// (from the cursor the previous gateway left, if it says so) or end.
    pub fn claimed(
        &mut self,
        uid: u64,
        result: Result<Option<(u64, i64)>, ClaimError>,
        deliveries: Option<crate::broker::GroupDeliveries>,
        shared: &mut Shared,
    ) {
        let Some((request, group, consumer)) = self.claim.take() else {
            return;
        };
        let topic: Arc<str> = request.topic.as_str().into();
        let started = match result {
            Ok(adopt) => {
                if let Some((cursor, acked_at_ms)) = adopt {
                    let wall = shared.clock.wall_ms();
                    shared
                        .broker
                        .adopt_cursor(&topic, &group, cursor, acked_at_ms, wall);
                }
                if let Some(d) = deliveries {
                    shared.broker.load_group_deliveries(&topic, &group, d);
                }
                self.start(uid, request, group.clone(), &consumer, shared)
            }
            Err(ClaimError::TakenOver) => Err(Status::new(
                Code::Aborted,
                "another consumer subscribed with the same topic and group",
            )),
            Err(ClaimError::Store(e)) => Err(super::rpc::storage_status(&e)),
        };
        if let Err(status) = started {
            self.finish(status);
            shared.releases.push((topic, group));
        }
    }

    /// Tells the broker this stream is gone (idempotent).
    pub fn forget(&mut self, uid: u64, shared: &mut Shared) {
        if self.initialised {
            self.initialised = false;
            shared.broker.unsubscribe(uid);
        }
    }

    fn read(&mut self, uid: u64, shared: &mut Shared, cx: &mut Context<'_>) {
        // While a claim is pending, what follows Init waits in the stream's
        // flow-control window.
        while self.reader.is_open() && self.claim.is_none() {
            match self.reader.poll_next(uid, &mut shared.inflight, cx) {
                Inbound::Message(body) => {
                    if let Err(status) = self.on_message(body, uid, shared) {
                        self.forget(uid, shared);
                        self.finish(status);
                        return;
                    }
                }
                Inbound::Pending => return,
                Inbound::End => {
                    // Half-closed: no more credit will come, but what was
                    // granted is still delivered.
                    self.half_closed = true;
                    if !self.initialised && !self.out.is_finishing() {
                        self.finish(Status::invalid_argument(
                            "stream closed before SubscriptionInit",
                        ));
                    }
                }
                Inbound::EndedInsideMessage => {
                    self.forget(uid, shared);
                    self.finish(Status::internal(
                        "Subscribe request stream ended inside a message",
                    ));
                    return;
                }
                Inbound::Bad(e) => {
                    self.forget(uid, shared);
                    self.finish(frame_status(e));
                    return;
                }
                Inbound::Reset(e) => {
                    log::debug!("sub {uid}: upstream failed: {e}");
                    self.forget(uid, shared);
                    self.finish(Status::new(Code::Cancelled, "stream reset"));
                    return;
                }
            }
        }
    }

    fn on_message(&mut self, body: Bytes, uid: u64, shared: &mut Shared) -> Result<(), Status> {
        let up = proto::SubscribeUpstream::decode(body)
            .map_err(|e| Status::internal(format!("failed to decode SubscribeUpstream: {e}")))?;
        let Some(request) = up.request else {
            return if self.initialised {
                Ok(())
            } else {
                Err(Status::invalid_argument(
                    "the first message must be SubscriptionInit",
                ))
            };
        };
        if !self.initialised {
            let subscribe_upstream::Request::Init(init) = request else {
                return Err(Status::invalid_argument(
                    "the first message must be SubscriptionInit",
                ));
            };
            let consumer = init.consumer_id.clone();
            let (request, label) = subscription_request(init)?;
            if let Start::Offset(offset) = request.start {
                let last = shared.broker.last_sequence();
                if offset > last.saturating_add(1) {
                    return Err(Status::invalid_argument(format!(
                        "offset {offset} is past the newest message (last sequence {last})"
                    )));
                }
            }
            if shared.claims_groups && request.group.is_some() {
                let topic: Arc<str> = request.topic.as_str().into();
                shared.claim_started(&topic, &label);
                shared.submit(WriteRequest::ClaimGroup {
                    token: uid,
                    topic,
                    group: label.clone(),
                });
                self.claim = Some((request, label, consumer));
                return Ok(());
            }
            return self.start(uid, request, label, &consumer, shared);
        }
        let (now, wall) = (shared.clock.now_ms(), shared.clock.wall_ms());
        match request {
            subscribe_upstream::Request::Init(_) => {
                return Err(Status::invalid_argument(
                    "SubscriptionInit may be sent only once per stream",
                ))
            }
            subscribe_upstream::Request::Credit(c) => {
                if let Some((t, g)) = &self.labels {
                    shared
                        .telemetry
                        .metrics()
                        .credits_granted(t, g, u64::from(c.credits));
                }
                shared.broker.grant(uid, c.credits)
            }
            subscribe_upstream::Request::Ack(a) => {
                if let Some((t, g)) = &self.labels {
                    shared.telemetry.metrics().acked(t, g, 1);
                }
                shared.broker.ack(uid, &a.message_id, wall)
            }
            subscribe_upstream::Request::Nack(n) => {
                shared
                    .broker
                    .nack(uid, &n.message_id, n.redelivery_delay_ms, now)
            }
            subscribe_upstream::Request::BatchAck(b) => {
                if let Some((t, g)) = &self.labels {
                    shared
                        .telemetry
                        .metrics()
                        .acked(t, g, b.message_ids.len() as u64);
                }
                shared
                    .broker
                    .ack_many(uid, b.message_ids.iter().map(String::as_str), wall)
            }
        }
        Ok(())
    }
}

/// Property-based fuzzing of the Subscribe upstream (`cargo test --lib
/// fuzz`): arbitrary bytes decoded as `SubscribeUpstream` and a
/// `SubscriptionInit` checked by `subscription_request` give a valid broker
/// request or INVALID_ARGUMENT; and a subscribed stream fed arbitrary
/// credits, acks, nacks and batch acks (real ids, re-spelled ids, garbage)
/// never panics, never delivers past its credit, and only moves its cursor
/// forward, to a delivered message named by its exact id.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::broker::{Broker, BrokerConfig, MessageId, StoredMessage};
    use crate::fuzz_support::config;

    use crate::fuzz_support::topic_rule_ok as rule_ok;

    fn init() -> impl Strategy<Value = proto::SubscriptionInit> {
        (
            prop_oneof![3 => "[a-z0-9._-]{1,8}", 1 => "\\PC{0,8}"],
            prop_oneof!["", "[a-z]{1,6}", "\\PC{0,6}"],
            prop_oneof![3 => 0i32..3, 1 => any::<i32>()],
            any::<u64>(),
            prop_oneof![3 => 0i32..2, 1 => any::<i32>()],
        )
            .prop_map(|(topic, consumer_group, initial_position, offset, mode)| {
                proto::SubscriptionInit {
                    topic,
                    consumer_group,
                    consumer_id: "c".into(),
                    initial_position,
                    offset,
                    mode,
                    ..Default::default()
                }
            })
    }

    const TOPIC: &str = "t";
    const PUBLISHED: u64 = 20;

    fn id_of(seq: u64) -> String {
        MessageId::new(1_000 + seq as i64, seq, TOPIC).to_string()
    }

    /// An id as a client might send it: one issued, re-spelled, from another
    /// topic, or garbage.
    fn message_id() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (1..=PUBLISHED + 2).prop_map(id_of),
            1 => (1..=PUBLISHED).prop_map(|s| id_of(s).to_uppercase()),
            1 => (1..=PUBLISHED).prop_map(|s| id_of(s).replace('-', "")),
            1 => (1..=PUBLISHED).prop_map(|s| MessageId::new(1_000 + s as i64, s, "u").to_string()),
            1 => "\\PC{0,40}",
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Up(subscribe_upstream::Request),
        Pull(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        use subscribe_upstream::Request as R;
        prop_oneof![
            2 => prop_oneof![0u32..5, Just(u32::MAX), any::<u32>()]
                .prop_map(|credits| Op::Up(R::Credit(proto::CreditGrant { credits }))),
            3 => message_id().prop_map(|message_id| Op::Up(R::Ack(proto::Ack { message_id }))),
            2 => (message_id(), any::<u32>()).prop_map(|(message_id, redelivery_delay_ms)| {
                Op::Up(R::Nack(proto::Nack { message_id, redelivery_delay_ms }))
            }),
            2 => vec(message_id(), 0..4)
                .prop_map(|message_ids| Op::Up(R::BatchAck(proto::BatchAck { message_ids }))),
            1 => init().prop_map(|i| Op::Up(R::Init(i))),
            3 => any::<u8>().prop_map(Op::Pull),
        ]
    }

    fn published() -> Vec<Arc<StoredMessage>> {
        (1..=PUBLISHED)
            .map(|seq| {
                Arc::new(StoredMessage {
                    sequence: seq,
                    ordinal: seq,
                    id: MessageId::new(1_000 + seq as i64, seq, TOPIC),
                    timestamp_ms: 1_000 + seq as i64,
                    payload: Bytes::from_static(b"m"),
                    attributes: Default::default(),
                })
            })
            .collect()
    }

    proptest! {
        #![proptest_config(config(512, 1))]

        #[test]
        fn fuzz_upstream_bytes_give_a_request_or_a_status(
            body in prop_oneof![
                vec(any::<u8>(), 0..64),
                (init(), vec((any::<usize>(), 1u8..=255), 0..2)).prop_map(|(i, flips)| {
                    let mut b = proto::SubscribeUpstream {
                        request: Some(subscribe_upstream::Request::Init(i)),
                    }
                    .encode_to_vec();
                    for (at, x) in flips {
                        let n = b.len();
                        b[at % n] ^= x;
                    }
                    b
                }),
            ],
        ) {
            let Ok(up) = proto::SubscribeUpstream::decode(body.as_slice()) else {
                return Ok(()); // refused with INTERNAL before any check
            };
            let Some(subscribe_upstream::Request::Init(init)) = up.request else {
                return Ok(());
            };
            let known = (0..3).contains(&init.initial_position) && (0..2).contains(&init.mode);
            // Group names follow the topic rule (empty means "default");
            // BROWSE ignores the group.
            let group_ok = init.mode == 1
                || init.consumer_group.is_empty()
                || rule_ok(&init.consumer_group);
            let topic_ok = rule_ok(&init.topic) && group_ok;
            match subscription_request(init.clone()) {
                Ok((request, label)) => {
                    prop_assert!(known && topic_ok);
                    prop_assert_eq!(&request.topic, &init.topic);
                    prop_assert_eq!(request.group.is_none(), init.mode == 1);
                    prop_assert!(!label.is_empty());
                    if init.initial_position == 2 {
                        prop_assert_eq!(request.start, Start::Offset(init.offset));
                    }
                }
                Err(status) => {
                    prop_assert!(!(known && topic_ok));
                    prop_assert_eq!(status.code, Code::InvalidArgument);
                }
            }
        }

        #[test]
        fn fuzz_subscribed_streams_obey_credit_and_cursor_rules(
            first in init(),
            ops in vec(op(), 0..40),
        ) {
            let mut broker = Broker::new(BrokerConfig::default());
            broker.on_committed(TOPIC, 1, &published());
            let first = proto::SubscriptionInit { topic: TOPIC.into(), ..first };
            let Ok((request, _)) = subscription_request(first) else {
                return Ok(());
            };
            let group = request.group.clone().map(|g| if g.is_empty() { "default".to_string() } else { g });
            broker.subscribe(1, request, 0, 0).unwrap();
            let cursor = |b: &Broker| {
                group.as_ref().and_then(|g| {
                    b.groups(TOPIC).into_iter().find(|v| &*v.name == g.as_str()).map(|v| v.cursor)
                })
            };
            let (mut granted, mut delivered, mut max_delivered) = (0u64, 0u64, 0u64);
            let mut now = 0;
            for op in ops {
                let before = cursor(&broker);
                let mut named = Vec::new();
                match op {
                    Op::Pull(n) => {
                        now += u64::from(n) * 100;
                        for _ in 0..n {
                            let Some(d) = broker.next_delivery(1, now) else { break };
                            prop_assert!((1..=PUBLISHED).contains(&d.message.sequence));
                            delivered += 1;
                            max_delivered = max_delivered.max(d.message.sequence);
                        }
                    }
                    // As SubscribeCall::on_message: a second Init is refused.
                    Op::Up(subscribe_upstream::Request::Init(_)) => {}
                    Op::Up(subscribe_upstream::Request::Credit(c)) => {
                        granted = granted.saturating_add(u64::from(c.credits));
                        broker.grant(1, c.credits);
                    }
                    Op::Up(subscribe_upstream::Request::Ack(a)) => {
                        broker.ack(1, &a.message_id, 5);
                        named.push(a.message_id);
                    }
                    Op::Up(subscribe_upstream::Request::Nack(n)) => {
                        broker.nack(1, &n.message_id, n.redelivery_delay_ms, now);
                    }
                    Op::Up(subscribe_upstream::Request::BatchAck(b)) => {
                        broker.ack_many(1, b.message_ids.iter().map(String::as_str), 5);
                        named = b.message_ids;
                    }
                }
                while broker.pop_action().is_some() {}
                prop_assert!(delivered <= granted);
                let after = cursor(&broker);
                if after != before {
                    let (before, after) = (before.unwrap(), after.unwrap());
                    prop_assert!(after > before && after <= max_delivered);
                    prop_assert!(named.contains(&id_of(after)), "cursor {after} after {named:?}");
                }
            }
        }
    }
}
