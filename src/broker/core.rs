//! `Broker`: topics, consumer groups and subscriptions as one state machine.
//!
//! Time comes in as plain milliseconds (`now_ms` monotonic, `wall_ms` Unix);
//! IO requests go out as [`Action`]s that the reactor carries out; deliveries
//! are pulled by the reactor with [`Broker::next_delivery`] only when the
//! HTTP/2 stream can take them, so credit and send window are checked
//! together and nothing queues beyond them.
//!
//! This file owns the state (`Broker` and its private `Topic`, `Group`,
//! `Subscription` and `Timer` records), start-up loading and the read-only
//! queries. The `impl Broker` blocks that change it live beside it by concern:
//!
//! - `types`: the public values that cross the boundary;
//! - `subscription`: what a consumer asks for (subscribe, grant, ack, nack);
//! - `delivery`: commits, pages and trims from storage, and pulled deliveries;
//! - `timers`: heartbeats and redelivery timers;
//! - `admin`: operator actions (deletes, cursor resets, fences).

mod admin;
mod delivery;
mod subscription;
mod timers;
mod types;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use super::credit::CreditWindow;
use super::ledger::DeliveryLedger;
use super::message::StoredMessage;
use super::message_id::MessageId;
use super::tail::MessageTail;

pub use self::types::{
    Action, BrokerConfig, DeadLetter, Delivery, DeliveryPolicy, EndReason, Fetch, GroupDeliveries,
    GroupView, Start, SubId, SubscribeError, SubscribeRequest, SubscriptionStatus, TopicView,
    DEAD_LETTER_REASON_MAX_DELIVERIES,
};

/// Longest Nack delay honoured (a longer one is cut to this).
const MAX_REDELIVERY_DELAY_MS: u32 = 24 * 3600 * 1000;

/// Held while a `Broker` method runs: a panic unwinding out of the core
/// would leave it half-updated (a subscription without its topic, a timer
/// without its owner), so the process aborts instead of serving from it;
/// the service manager restarts it from storage. Panics elsewhere in a
/// connection are still contained to that connection by the reactor.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!("panic inside the broker core: aborting rather than serving from a half-updated state");
            std::process::abort();
        }
    }
}

/// The oldest sequence retention left of a topic (past its last when it
/// emptied it, 0 when it never had a message).
fn oldest_stored(view: &TopicView) -> u64 {
    if view.first_seq == 0 && view.last_seq > 0 {
        view.last_seq + 1
    } else {
        view.first_seq
    }
}

/// Unacked first deliveries a subscription remembers the ordinals of.
const RECENT_CAP: usize = 4096;

#[derive(Debug)]
struct Group {
    cursor: u64,
    /// The topic ordinal of the message at the cursor (0 before any).
    cursor_ordinal: u64,
    last_ack_ms: i64,
    active: Option<SubId>,
    ledger: DeliveryLedger,
    /// Admin operations (delete, reset) waiting for their commit: while any
    /// is, acks move the cursor here but are not persisted, so none lands
    /// after the operation's own write.
    fences: u32,
    /// A delete of the group waits for its commit: a cursor reset now would
    /// write the cursor back after the delete, so it is refused.
    deleting: bool,
    /// Dead-letter settings of its latest Init (`ack_deadline_ms` unused here).
    policy: DeliveryPolicy,
    /// Dead-lettered messages above the cursor: never delivered again.
    dead: BTreeMap<u64, DeadEntry>,
}

/// A dead-lettered message the group's cursor has not passed yet.
#[derive(Debug, Clone, Copy)]
struct DeadEntry {
    ordinal: u64,
    /// Its dead-letter append is durable (the cursor may move past it).
    committed: bool,
}

#[derive(Debug)]
struct Topic {
    view: TopicView,
    groups: BTreeMap<Arc<str>, Group>,
    subs: Vec<SubId>,
}

#[derive(Debug)]
struct Subscription {
    topic: Arc<str>,
    group: Option<Arc<str>>,
    credit: CreditWindow,
    /// Next position: messages with sequence >= next are still to be sent.
    next: u64,
    /// A backlog page read from storage, sent before anything newer.
    page: VecDeque<Arc<StoredMessage>>,
    page_fetch: Option<u64>,
    /// Nacked messages due now, waiting for credit.
    redeliver_due: VecDeque<Arc<StoredMessage>>,
    /// Nacked sequences waiting for their delay or their read.
    /// Nacked sequence -> when its redelivery timer fires.
    redeliver_pending: BTreeMap<u64, u64>,
    /// Outstanding redelivery reads: fetch id -> sequence.
    redeliver_fetches: HashMap<u64, u64>,
    /// BROWSE subscriptions count deliveries for themselves.
    own_ledger: Option<DeliveryLedger>,
    /// (sequence, ordinal) of first deliveries not yet acked, ascending and
    /// capped, so an ack learns its message's topic ordinal without IO.
    recent: VecDeque<(u64, u64)>,
    last_sent_ms: u64,
    /// When its heartbeat timer fires (None: heartbeats are off).
    heartbeat_at: Option<u64>,
    /// Redeliver what is not acked this long after it was sent (0: never).
    ack_deadline_ms: u64,
    /// Sent sequences waiting for an ack -> when their deadline fires
    /// (only with an ack deadline; at most `max_unacked`).
    unacked: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Redeliver { sub: SubId, seq: u64 },
    Heartbeat { sub: SubId },
    AckDeadline { sub: SubId, seq: u64 },
}

/// The broker state machine.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    topics: BTreeMap<Arc<str>, Topic>,
    subs: HashMap<SubId, Subscription>,
    tail: MessageTail,
    timers: BTreeSet<(u64, Timer)>,
    actions: VecDeque<Action>,
    /// Highest sequence known committed, across all topics.
    last_seq: u64,
    next_fetch_id: u64,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Self {
        Broker {
            tail: MessageTail::new(config.tail_max_messages, config.tail_max_bytes),
            config,
            topics: BTreeMap::new(),
            subs: HashMap::new(),
            timers: BTreeSet::new(),
            actions: VecDeque::new(),
            last_seq: 0,
            next_fetch_id: 1,
        }
    }

    // ---- loading state from storage at start-up ----

    /// Registers a stored topic. `last_global_seq` is the highest sequence in
    /// storage, so the tail knows everything below it is on disk.
    pub fn load_topic(&mut self, view: TopicView, last_global_seq: u64) {
        let _core = AbortOnUnwind;
        self.last_seq = self.last_seq.max(last_global_seq).max(view.last_seq);
        let name = view.name.clone();
        self.tail.add_topic(name.clone(), last_global_seq + 1);
        self.topics.insert(
            name,
            Topic {
                view,
                groups: BTreeMap::new(),
                subs: Vec::new(),
            },
        );
    }

    /// Registers a stored consumer group cursor.
    pub fn load_group(&mut self, topic: &str, group: GroupView) {
        let _core = AbortOnUnwind;
        if let Some(t) = self.topics.get_mut(topic) {
            t.groups.insert(
                group.name.clone(),
                self::Group::from_view(&group, self.config.ledger_cap),
            );
        }
    }

    /// Restores a group's dead-letter settings, persisted delivery counts
    /// and dead-lettered messages (after `load_group` at start-up, or when
    /// a group is claimed from another gateway); counts only go up.
    pub fn load_group_deliveries(&mut self, topic: &str, group: &str, d: GroupDeliveries) {
        let _core = AbortOnUnwind;
        let Some(g) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        else {
            return;
        };
        g.policy.max_deliveries = d.max_deliveries;
        g.policy.dead_letter_topic = d.dead_letter_topic;
        g.ledger.restore(d.delivered_max, &d.counts);
        g.ledger.forget_through(g.cursor);
        // Added to what it knows (a group claimed from another gateway
        // keeps what this broker learnt of it).
        let cursor = g.cursor;
        for (seq, ordinal) in d.dead.into_iter().filter(|(seq, _)| *seq > cursor) {
            g.dead.entry(seq).or_insert(DeadEntry {
                ordinal,
                committed: true,
            });
        }
    }

    pub fn set_last_sequence(&mut self, seq: u64) {
        let _core = AbortOnUnwind;
        self.last_seq = self.last_seq.max(seq);
    }

    // ---- queries ----

    pub fn last_sequence(&self) -> u64 {
        self.last_seq
    }

    pub fn topic(&self, name: &str) -> Option<&TopicView> {
        self.topics.get(name).map(|t| &t.view)
    }

    /// How many topics there are.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// The configured limits: (topics, groups per topic).
    pub fn limits(&self) -> (usize, usize) {
        (self.config.max_topics, self.config.max_groups_per_topic)
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicView> {
        self.topics.values().map(|t| &t.view)
    }

    pub fn groups(&self, topic: &str) -> Vec<GroupView> {
        self.topics.get(topic).map_or_else(Vec::new, |t| {
            t.groups
                .iter()
                .map(|(name, g)| GroupView {
                    name: name.clone(),
                    cursor: g.cursor,
                    cursor_ordinal: g.cursor_ordinal,
                    last_ack_ms: g.last_ack_ms,
                })
                .collect()
        })
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    /// Lag and backpressure of every open subscription, for gauges. Lag is
    /// the topic's latest sequence minus the group's cursor (BROWSE streams,
    /// reported as group `_browse`, count from their position).
    pub fn subscription_gauges(&self) -> Vec<SubscriptionStatus> {
        let browse: Arc<str> = Arc::from("_browse");
        self.subs
            .values()
            .filter_map(|s| {
                let t = self.topics.get(&s.topic)?;
                let (group, acked) = match &s.group {
                    Some(g) => (g.clone(), t.groups.get(g).map_or(0, |g| g.cursor)),
                    None => (browse.clone(), s.next.saturating_sub(1)),
                };
                let waiting =
                    !s.page.is_empty() || !s.redeliver_due.is_empty() || s.next <= t.view.last_seq;
                Some(SubscriptionStatus {
                    topic: s.topic.clone(),
                    group,
                    lag: t.view.last_seq.saturating_sub(acked),
                    backpressure: waiting && s.credit.is_empty(),
                })
            })
            .collect()
    }

    /// Credit the subscription holds now (None: no such subscription).
    pub fn credit(&self, sub: SubId) -> Option<u64> {
        self.subs.get(&sub).map(|s| s.credit.available())
    }

    pub fn pop_action(&mut self) -> Option<Action> {
        let _core = AbortOnUnwind;
        self.actions.pop_front()
    }

    /// Makes sure a topic exists in memory; returns its shared name.
    fn ensure_topic(&mut self, topic: &str, created_at_ms: i64) -> Arc<str> {
        if let Some((name, _)) = self.topics.get_key_value(topic) {
            return name.clone();
        }
        let name: Arc<str> = topic.into();
        // Created here: every message it will ever have arrives via commits.
        self.tail.add_topic(name.clone(), 0);
        let view = TopicView {
            name: name.clone(),
            created_at_ms,
            first_seq: 0,
            first_ordinal: 0,
            first_ts: 0,
            last_seq: 0,
            last_ordinal: 0,
            last_ts: 0,
        };
        self.topics.insert(
            name.clone(),
            Topic {
                view,
                groups: BTreeMap::new(),
                subs: Vec::new(),
            },
        );
        name
    }
}

impl Group {
    fn from_view(v: &GroupView, ledger_cap: usize) -> Group {
        Group {
            cursor: v.cursor,
            cursor_ordinal: v.cursor_ordinal,
            last_ack_ms: v.last_ack_ms,
            active: None,
            ledger: DeliveryLedger::new(ledger_cap),
            fences: 0,
            deleting: false,
            policy: DeliveryPolicy::default(),
            dead: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sim;
