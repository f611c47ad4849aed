//! The values that cross the core's boundary: configuration, requests, the
//! [`Action`]s it asks of its environment, deliveries and operator views.
//! Plain data; calls nothing in the broker.

use std::sync::Arc;

use crate::broker::message::StoredMessage;

/// A subscription's identity, chosen by the caller (unique for the process).
pub type SubId = u64;

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// In-memory tail budget shared by all topics.
    pub tail_max_messages: usize,
    pub tail_max_bytes: usize,
    /// Largest backlog page asked of the reader (also never above credit).
    pub page_max: u32,
    /// Heartbeat on a stream idle this long; 0 disables heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Redelivered messages whose counts a group remembers.
    pub ledger_cap: usize,
    /// Nacked messages one subscription may have waiting.
    pub max_pending_redeliveries: usize,
    /// Topics a subscription may create up to (`--max-topics`).
    pub max_topics: usize,
    /// Consumer groups one topic may have (`--max-groups-per-topic`).
    pub max_groups_per_topic: usize,
    /// Delivered messages a subscription with an ack deadline may have
    /// waiting for acks, pending redeliveries included; new deliveries
    /// pause at it (retries of failed dead-letter moves may pass it).
    pub max_unacked: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            tail_max_messages: 2048,
            tail_max_bytes: 1 << 20,
            page_max: 256,
            heartbeat_interval_ms: 5_000,
            ledger_cap: 65_536,
            max_pending_redeliveries: 10_000,
            max_topics: 10_000,
            max_groups_per_topic: 1_000,
            max_unacked: 10_000,
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeError {
    /// The request breaks a rule (a name, a repeated Init).
    Invalid(String),
    /// It would create a topic or group past a configured limit.
    LimitReached(String),
}

impl std::fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscribeError::Invalid(m) | SubscribeError::LimitReached(m) => f.write_str(m),
        }
    }
}

/// Where a subscription without a persisted cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Latest,
    Earliest,
    /// The first message with sequence >= this.
    Offset(u64),
}

#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub topic: String,
    /// `None` is BROWSE mode: no group, no cursor.
    pub group: Option<String>,
    pub start: Start,
    /// Consumer groups only (BROWSE streams ignore it).
    pub policy: DeliveryPolicy,
}

/// What a consumer group does with messages its consumers do not ack, as
/// its latest `SubscriptionInit` asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryPolicy {
    /// Deliveries a message may have; 0 = unlimited.
    pub max_deliveries: u32,
    /// Where a message past `max_deliveries` goes (set when it is > 0).
    pub dead_letter_topic: Option<Arc<str>>,
    /// Redeliver what is not acked this long after its delivery; 0 = never
    /// (kept per subscription, not per group).
    pub ack_deadline_ms: u32,
}

/// A group's delivery state as storage kept it (groups with
/// `max_deliveries` persist their counts; dead-lettered messages above the
/// cursor are remembered so they are never delivered again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupDeliveries {
    pub max_deliveries: u32,
    pub dead_letter_topic: Option<Arc<str>>,
    /// Highest sequence ever delivered to the group.
    pub delivered_max: u64,
    /// (sequence, delivery count) of messages delivered more than once.
    pub counts: Vec<(u64, u32)>,
    /// (sequence, ordinal) of dead-lettered messages above the cursor.
    pub dead: Vec<(u64, u64)>,
}

/// Why a message was dead-lettered (`sluice-dead-letter-reason`).
pub const DEAD_LETTER_REASON_MAX_DELIVERIES: &str = "max_deliveries";

/// A message to move to a dead-letter topic: append it there and record
/// that the group is done with it, in one commit (moving the group's cursor
/// to it too when `advance_cursor`), then tell `Broker::on_dead_lettered`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub topic: Arc<str>,
    pub group: Arc<str>,
    pub message: Arc<StoredMessage>,
    pub dead_letter_topic: Arc<str>,
    /// Deliveries it had.
    pub delivery_count: u32,
    pub reason: &'static str,
    /// It is the group's next unacknowledged message: the cursor moves past it.
    pub advance_cursor: bool,
}

impl DeadLetter {
    /// The dead-letter copy's attributes: the original ones plus where it
    /// came from and why.
    pub fn attributes(&self) -> std::collections::HashMap<String, String> {
        let mut a = self.message.attributes.clone();
        a.insert("sluice-dead-letter-topic".into(), self.topic.to_string());
        a.insert(
            "sluice-dead-letter-sequence".into(),
            self.message.sequence.to_string(),
        );
        a.insert(
            "sluice-dead-letter-message-id".into(),
            self.message.id.to_string(),
        );
        a.insert("sluice-dead-letter-group".into(), self.group.to_string());
        a.insert(
            "sluice-dead-letter-delivery-count".into(),
            self.delivery_count.to_string(),
        );
        a.insert("sluice-dead-letter-reason".into(), self.reason.to_string());
        a
    }
}

/// Why the broker ends a subscription stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Another consumer subscribed with the same topic and group.
    TakenOver,
    /// The gateway can no longer vouch that it alone serves the group (a
    /// store shared by several gateways that it cannot reach): subscribe again.
    GroupUnavailable,
    TopicDeleted,
    GroupDeleted,
}

/// A backlog read for the reader thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub sub: SubId,
    pub id: u64,
    pub topic: Arc<str>,
    /// First sequence wanted.
    pub from: u64,
    pub limit: u32,
}

/// What the broker asks its environment to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The subscription may have a delivery ready: pull with `next_delivery`.
    Wake(SubId),
    /// Read a page of the topic from storage, answer with `on_page`.
    Fetch(Fetch),
    /// Persist a group's cursor (the reactor may coalesce these).
    PersistCursor {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        acked_at_ms: i64,
    },
    /// Persist a topic created by a subscription.
    CreateTopic { topic: Arc<str>, created_at_ms: i64 },
    /// End this subscription's stream (it is already removed from the broker).
    End { sub: SubId, reason: EndReason },
    /// Send a heartbeat on this idle stream.
    Heartbeat { sub: SubId, latest_seq: u64 },
    /// The group's consumer ended and no other took its place (a store
    /// shared by several gateways lets another gateway serve it now).
    GroupIdle { topic: Arc<str>, group: Arc<str> },
    /// Move a message to a dead-letter topic (see [`DeadLetter`]).
    DeadLetter(DeadLetter),
    /// Persist that a group with `max_deliveries` was sent `sequence` for
    /// the `count`th time (the reactor may coalesce these per group).
    PersistDelivery {
        topic: Arc<str>,
        group: Arc<str>,
        sequence: u64,
        count: u32,
    },
    /// Persist a group's dead-letter settings (its latest Init changed them).
    PersistPolicy {
        topic: Arc<str>,
        group: Arc<str>,
        max_deliveries: u32,
        dead_letter_topic: Option<Arc<str>>,
    },
}

/// One message to send, with the count of times it has been sent.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<StoredMessage>,
    pub delivery_count: u32,
}

/// One open subscription as the gauges see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionStatus {
    pub topic: Arc<str>,
    pub group: Arc<str>,
    pub lag: u64,
    pub backpressure: bool,
}

/// A consumer group as reported to operators.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    pub name: Arc<str>,
    pub cursor: u64,
    pub cursor_ordinal: u64,
    pub last_ack_ms: i64,
}

/// A topic as reported to operators.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicView {
    pub name: Arc<str>,
    pub created_at_ms: i64,
    pub first_seq: u64,
    pub first_ordinal: u64,
    pub first_ts: i64,
    pub last_seq: u64,
    pub last_ordinal: u64,
    pub last_ts: i64,
}

impl TopicView {
    /// Messages stored for the topic now.
    pub fn total_messages(&self) -> u64 {
        if self.first_seq == 0 {
            0
        } else {
            self.last_ordinal + 1 - self.first_ordinal
        }
    }

    /// The topic's messages after a cursor whose message has `cursor_ordinal`.
    pub fn pending_after(&self, cursor: u64, cursor_ordinal: u64) -> u64 {
        if self.first_seq == 0 || cursor >= self.last_seq {
            return 0;
        }
        let acked = cursor_ordinal.max(self.first_ordinal.saturating_sub(1));
        self.last_ordinal.saturating_sub(acked)
    }
}
