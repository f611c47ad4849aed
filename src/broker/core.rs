//! `Broker`: topics, consumer groups and subscriptions as one state machine.
//!
//! Time comes in as plain milliseconds (`now_ms` monotonic, `wall_ms` Unix);
//! IO requests go out as [`Action`]s that the reactor carries out; deliveries
//! are pulled by the reactor with [`Broker::next_delivery`] only when the
//! HTTP/2 stream can take them, so credit and send window are checked
//! together and nothing queues beyond them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use log::debug;

use super::credit::CreditWindow;
use super::ledger::DeliveryLedger;
use super::message::StoredMessage;
use super::message_id::MessageId;
use super::tail::MessageTail;
use super::topic_name::validate_topic_name;

/// Longest Nack delay honoured (a longer one is cut to this).
const MAX_REDELIVERY_DELAY_MS: u32 = 24 * 3600 * 1000;

/// Removes the timers of redeliveries that will no longer happen.
fn drop_redelivery_timers(
    timers: &mut BTreeSet<(u64, Timer)>,
    sub: SubId,
    pending: BTreeMap<u64, u64>,
) {
    for (seq, due) in pending {
        timers.remove(&(due, Timer::Redeliver { sub, seq }));
    }
}

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

/// Removes every timer of a subscription that is gone.
fn drop_subscription_timers(timers: &mut BTreeSet<(u64, Timer)>, sub: SubId, gone: Subscription) {
    if let Some(at) = gone.heartbeat_at {
        timers.remove(&(at, Timer::Heartbeat { sub }));
    }
    drop_redelivery_timers(timers, sub, gone.redeliver_pending);
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
}

/// Why the broker ends a subscription stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Another consumer subscribed with the same topic and group.
    TakenOver,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Redeliver { sub: SubId, seq: u64 },
    Heartbeat { sub: SubId },
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

    // ---- publishing ----

    /// Messages of `topic` were committed (ascending sequences). Creates the
    /// topic if this is the first the broker hears of it.
    pub fn on_committed(
        &mut self,
        topic: &str,
        created_at_ms: i64,
        messages: &[Arc<StoredMessage>],
    ) {
        let _core = AbortOnUnwind;
        let name = self.ensure_topic(topic, created_at_ms);
        let Some(t) = self.topics.get_mut(&name) else {
            return;
        };
        if let (Some(first), Some(last)) = (messages.first(), messages.last()) {
            if t.view.first_seq == 0 {
                t.view.first_seq = first.sequence;
                t.view.first_ordinal = first.ordinal;
                t.view.first_ts = first.timestamp_ms;
            }
            t.view.last_seq = last.sequence;
            t.view.last_ordinal = last.ordinal;
            t.view.last_ts = last.timestamp_ms;
            self.last_seq = self.last_seq.max(last.sequence);
        }
        self.tail.append(&name, messages);
        let subs = t.subs.clone();
        for sub in subs {
            self.poke(sub);
        }
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

    // ---- subscriptions ----

    /// Opens a subscription. Creates the topic if needed; takes the group over
    /// from its previous consumer, which is ended with `TakenOver`.
    pub fn subscribe(
        &mut self,
        sub: SubId,
        request: SubscribeRequest,
        now_ms: u64,
        wall_ms: i64,
    ) -> Result<(), String> {
        let _core = AbortOnUnwind;
        validate_topic_name(&request.topic)?;
        if self.subs.contains_key(&sub) {
            return Err("subscription already initialised".into());
        }
        let known = self.topics.contains_key(request.topic.as_str());
        let topic = self.ensure_topic(&request.topic, wall_ms);
        if !known {
            self.actions.push_back(Action::CreateTopic {
                topic: topic.clone(),
                created_at_ms: wall_ms,
            });
        }
        let start_next = match request.start {
            Start::Latest => self.last_seq + 1,
            Start::Earliest => 1,
            Start::Offset(o) => o.max(1),
        };
        let ledger_cap = self.config.ledger_cap;
        let Some(t) = self.topics.get_mut(&topic) else {
            return Err("topic vanished".into());
        };
        let (group, next, own_ledger) = match request.group {
            None => (None, start_next, Some(DeliveryLedger::new(ledger_cap))),
            Some(g) => {
                let g: Arc<str> = if g.is_empty() {
                    "default".into()
                } else {
                    g.into()
                };
                let next = match t.groups.get_mut(&g) {
                    Some(existing) => {
                        if let Some(old) = existing.active.take() {
                            self.actions.push_back(Action::End {
                                sub: old,
                                reason: EndReason::TakenOver,
                            });
                            t.subs.retain(|s| *s != old);
                            if let Some(gone) = self.subs.remove(&old) {
                                drop_subscription_timers(&mut self.timers, old, gone);
                            }
                        }
                        existing.active = Some(sub);
                        existing.cursor.saturating_add(1)
                    }
                    None => {
                        let cursor = start_next - 1;
                        let cursor_ordinal = if cursor >= t.view.last_seq {
                            t.view.last_ordinal
                        } else {
                            0
                        };
                        t.groups.insert(
                            g.clone(),
                            Group {
                                cursor,
                                cursor_ordinal,
                                last_ack_ms: 0,
                                active: Some(sub),
                                ledger: DeliveryLedger::new(ledger_cap),
                                fences: 0,
                            },
                        );
                        self.actions.push_back(Action::PersistCursor {
                            topic: topic.clone(),
                            group: g.clone(),
                            sequence: cursor,
                            acked_at_ms: 0,
                        });
                        start_next
                    }
                };
                (Some(g), next, None)
            }
        };
        // Positions in a range retention deleted continue from the oldest
        // message left, as they do for open streams when it deletes. (A
        // read there finds nothing; and once retention emptied the topic,
        // and the store's newest message with it, a short page's `end` lies
        // below such a position, which would be read again and again.)
        let next = next.max(oldest_stored(&t.view));
        t.subs.push(sub);
        self.subs.insert(
            sub,
            Subscription {
                topic,
                group,
                credit: CreditWindow::default(),
                next,
                page: VecDeque::new(),
                page_fetch: None,
                redeliver_due: VecDeque::new(),
                redeliver_pending: BTreeMap::new(),
                redeliver_fetches: HashMap::new(),
                own_ledger,
                recent: VecDeque::new(),
                last_sent_ms: now_ms,
                heartbeat_at: None,
            },
        );
        self.arm_heartbeat(sub, now_ms + self.config.heartbeat_interval_ms);
        Ok(())
    }

    /// The stream ended (client gone, error, or shutdown).
    pub fn unsubscribe(&mut self, sub: SubId) {
        let _core = AbortOnUnwind;
        let Some(s) = self.subs.remove(&sub) else {
            return;
        };
        let (topic, group) = (s.topic.clone(), s.group.clone());
        drop_subscription_timers(&mut self.timers, sub, s);
        if let Some(t) = self.topics.get_mut(&topic) {
            t.subs.retain(|x| *x != sub);
            if let Some(g) = group.as_ref().and_then(|g| t.groups.get_mut(g)) {
                if g.active == Some(sub) {
                    g.active = None;
                }
            }
        }
    }

    pub fn grant(&mut self, sub: SubId, credits: u32) {
        let _core = AbortOnUnwind;
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if credits == 0 {
            return;
        }
        s.credit.grant(credits);
        self.poke(sub);
    }

    /// Cumulative ack of one message. Unknown or stale ids are ignored.
    pub fn ack(&mut self, sub: SubId, message_id: &str, wall_ms: i64) {
        let _core = AbortOnUnwind;
        self.ack_many(sub, std::iter::once(message_id), wall_ms);
    }

    /// Cumulative ack to the highest of the ids. Unknown ids are ignored.
    pub fn ack_many<'a>(
        &mut self,
        sub: SubId,
        ids: impl IntoIterator<Item = &'a str>,
        wall_ms: i64,
    ) {
        let _core = AbortOnUnwind;
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let Some(group_name) = s.group.clone() else {
            debug!("sub {sub}: ack in BROWSE mode ignored");
            return;
        };
        let Some(t) = self.topics.get_mut(&s.topic) else {
            return;
        };
        let Some(g) = t.groups.get_mut(&group_name) else {
            return;
        };
        let mut best = None;
        for id in ids {
            match MessageId::sequence_in(id, &s.topic) {
                Some(seq) if seq > g.cursor && seq <= g.ledger.delivered_max() => {
                    best = best.max(Some(seq));
                }
                Some(seq) => debug!(
                    "sub {sub}: ack of {id} (seq {seq}) ignored: already acked or never sent"
                ),
                None => debug!("sub {sub}: ack of unknown id {id:?} ignored"),
            }
        }
        let Some(seq) = best else {
            return;
        };
        let i = s.recent.partition_point(|(q, _)| *q < seq);
        let ordinal = match s.recent.get(i) {
            Some(&(q, o)) if q == seq => Some(o),
            _ => self.tail.get(&s.topic, seq).map(|m| m.ordinal),
        };
        s.recent.drain(..i.min(s.recent.len()));
        g.cursor = seq;
        // Unknown here: the writer looks it up when it stores the cursor.
        g.cursor_ordinal = ordinal.unwrap_or(g.cursor_ordinal);
        g.last_ack_ms = wall_ms;
        g.ledger.forget_through(seq);
        let keep = s.redeliver_pending.split_off(&(seq + 1));
        let acked = std::mem::replace(&mut s.redeliver_pending, keep);
        drop_redelivery_timers(&mut self.timers, sub, acked);
        s.redeliver_due.retain(|m| m.sequence > seq);
        s.redeliver_fetches.retain(|_, q| *q > seq);
        if g.fences > 0 {
            // Persisted when the admin operation fails, forgotten if it commits.
            return;
        }
        self.actions.push_back(Action::PersistCursor {
            topic: s.topic.clone(),
            group: group_name,
            sequence: seq,
            acked_at_ms: wall_ms,
        });
    }

    /// The ordinal of the message at a group's cursor, once storage knows it.
    pub fn set_cursor_ordinal(&mut self, topic: &str, group: &str, cursor: u64, ordinal: u64) {
        let _core = AbortOnUnwind;
        if let Some(g) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        {
            if g.cursor == cursor {
                g.cursor_ordinal = ordinal;
            }
        }
    }

    /// Asks for one message to be sent again, not before `delay_ms`.
    pub fn nack(&mut self, sub: SubId, message_id: &str, delay_ms: u32, now_ms: u64) {
        let _core = AbortOnUnwind;
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let Some(seq) = MessageId::sequence_in(message_id, &s.topic) else {
            debug!("sub {sub}: nack of unknown id {message_id:?} ignored");
            return;
        };
        let (cursor, delivered_max) = match (&s.group, &s.own_ledger) {
            (_, Some(l)) => (0, l.delivered_max()),
            (Some(g), None) => match self.topics.get(&s.topic).and_then(|t| t.groups.get(g)) {
                Some(g) => (g.cursor, g.ledger.delivered_max()),
                None => return,
            },
            (None, None) => return,
        };
        if seq <= cursor || seq > delivered_max || s.redeliver_pending.contains_key(&seq) {
            debug!(
                "sub {sub}: nack of {message_id} ignored (acked, never sent, or already pending)"
            );
            return;
        }
        if s.redeliver_pending.len() >= self.config.max_pending_redeliveries {
            crate::log_limited!(
                log::Level::Warn,
                "sub {sub}: too many pending redeliveries, nack of {message_id} dropped"
            );
            return;
        }
        let due = now_ms + u64::from(delay_ms.min(MAX_REDELIVERY_DELAY_MS));
        s.redeliver_pending.insert(seq, due);
        self.timers.insert((due, Timer::Redeliver { sub, seq }));
    }

    /// A page requested by [`Action::Fetch`] arrived. `end` is set when the
    /// page is short: storage holds nothing more for the topic up to `end`.
    pub fn on_page(
        &mut self,
        sub: SubId,
        fetch: u64,
        messages: Vec<Arc<StoredMessage>>,
        end: Option<u64>,
    ) {
        let _core = AbortOnUnwind;
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if let Some(seq) = s.redeliver_fetches.remove(&fetch) {
            if messages.is_empty() && end.is_none() {
                // The read failed (an empty page that is not short): the
                // nack still stands, so read again.
                self.redeliver(sub, seq);
                return;
            }
            match messages.into_iter().find(|m| m.sequence == seq) {
                Some(m) if s.redeliver_pending.contains_key(&seq) => s.redeliver_due.push_back(m),
                _ => {
                    s.redeliver_pending.remove(&seq);
                }
            }
            self.poke(sub);
            return;
        }
        if s.page_fetch != Some(fetch) {
            return; // stale: the position moved while it was read
        }
        s.page_fetch = None;
        let from = s.next;
        // A page read just before retention deleted its start is trimmed.
        let oldest = self
            .topics
            .get(&s.topic)
            .map_or(0, |t| oldest_stored(&t.view));
        s.page.extend(
            messages
                .into_iter()
                .filter(|m| m.sequence >= from && m.sequence >= oldest),
        );
        if let Some(last) = s.page.back() {
            s.next = last.sequence + 1;
        }
        if let Some(end) = end {
            s.next = s.next.max(end + 1);
        }
        self.poke(sub);
    }

    /// Pulls the next delivery for a subscription that can send one now.
    /// Spends one credit; `None` when there is no credit or nothing ready
    /// (a backlog read is requested if needed).
    pub fn next_delivery(&mut self, sub: SubId, now_ms: u64) -> Option<Delivery> {
        let _core = AbortOnUnwind;
        let s = self.subs.get_mut(&sub)?;
        if s.credit.is_empty() {
            return None;
        }
        let message = if let Some(m) = s.redeliver_due.pop_front() {
            s.redeliver_pending.remove(&m.sequence);
            m
        } else if let Some(m) = s.page.pop_front() {
            m
        } else if let Some(m) = self.tail.first_from(&s.topic, s.next) {
            s.next = m.sequence + 1;
            m.clone()
        } else {
            self.request_page(sub);
            return None;
        };
        s.credit.spend();
        s.last_sent_ms = now_ms;
        if s.recent.back().is_none_or(|(q, _)| *q < message.sequence) {
            if s.recent.len() >= RECENT_CAP {
                s.recent.pop_front();
            }
            s.recent.push_back((message.sequence, message.ordinal));
        }
        let ledger = match (&mut s.own_ledger, &s.group) {
            (Some(l), _) => Some(l),
            (None, Some(g)) => self
                .topics
                .get_mut(&s.topic)
                .and_then(|t| t.groups.get_mut(g))
                .map(|g| &mut g.ledger),
            (None, None) => None,
        };
        let delivery_count = ledger.map_or(1, |l| l.record(message.sequence));
        Some(Delivery {
            message,
            delivery_count,
        })
    }

    /// Whether the subscription has credit and a message it could send
    /// without waiting for storage.
    pub fn has_ready(&self, sub: SubId) -> bool {
        let Some(s) = self.subs.get(&sub) else {
            return false;
        };
        !s.credit.is_empty()
            && (!s.redeliver_due.is_empty()
                || !s.page.is_empty()
                || self.tail.first_from(&s.topic, s.next).is_some())
    }

    /// Wakes the subscription if it can deliver, or asks for a page.
    fn poke(&mut self, sub: SubId) {
        if self.has_ready(sub) {
            self.actions.push_back(Action::Wake(sub));
        } else {
            self.request_page(sub);
        }
    }

    fn request_page(&mut self, sub: SubId) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if s.credit.is_empty() || !s.page.is_empty() || s.page_fetch.is_some() {
            return;
        }
        if !self.tail.needs_disk(&s.topic, s.next) {
            return;
        }
        let topic_last = self.topics.get(&s.topic).map_or(0, |t| t.view.last_seq);
        if topic_last < s.next {
            // Nothing stored at or after `next`: whatever comes will come via
            // commits, all of which land in the tail.
            s.next = s.next.max(self.tail.floor(&s.topic).min(self.last_seq + 1));
            return;
        }
        let id = self.next_fetch_id;
        self.next_fetch_id += 1;
        s.page_fetch = Some(id);
        let limit = s.credit.available().min(u64::from(self.config.page_max)) as u32;
        self.actions.push_back(Action::Fetch(Fetch {
            sub,
            id,
            topic: s.topic.clone(),
            from: s.next,
            limit,
        }));
    }

    // ---- timers ----

    /// Sets the subscription's heartbeat timer to fire at `at` (its only
    /// one: the subscription remembers it so it can be removed with it).
    fn arm_heartbeat(&mut self, sub: SubId, at: u64) {
        if self.config.heartbeat_interval_ms == 0 {
            return;
        }
        if let Some(s) = self.subs.get_mut(&sub) {
            s.heartbeat_at = Some(at);
            self.timers.insert((at, Timer::Heartbeat { sub }));
        }
    }

    /// When `tick` next has work, in `now_ms` terms.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Fires every timer due at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) {
        let _core = AbortOnUnwind;
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now_ms {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Heartbeat { sub } => {
                    let Some(s) = self.subs.get_mut(&sub) else {
                        continue;
                    };
                    let due = s.last_sent_ms + self.config.heartbeat_interval_ms;
                    if due <= now_ms {
                        s.last_sent_ms = now_ms;
                        let latest_seq = self.topics.get(&s.topic).map_or(0, |t| t.view.last_seq);
                        self.actions
                            .push_back(Action::Heartbeat { sub, latest_seq });
                        self.arm_heartbeat(sub, now_ms + self.config.heartbeat_interval_ms);
                    } else {
                        self.arm_heartbeat(sub, due);
                    }
                }
                Timer::Redeliver { sub, seq } => self.redeliver(sub, seq),
            }
        }
    }

    fn redeliver(&mut self, sub: SubId, seq: u64) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if !s.redeliver_pending.contains_key(&seq) {
            return;
        }
        if let Some(m) = self.tail.get(&s.topic, seq) {
            s.redeliver_due.push_back(m.clone());
            self.poke(sub);
            return;
        }
        let id = self.next_fetch_id;
        self.next_fetch_id += 1;
        s.redeliver_fetches.insert(id, seq);
        self.actions.push_back(Action::Fetch(Fetch {
            sub,
            id,
            topic: s.topic.clone(),
            from: seq,
            limit: 1,
        }));
    }

    /// Retention removed a topic's oldest messages; `first` is the oldest
    /// left (sequence, ordinal, timestamp), `None` when none is left.
    pub fn on_trimmed(&mut self, topic: &str, first: Option<(u64, u64, i64)>) {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        let oldest = match first {
            Some((seq, ordinal, ts)) => {
                t.view.first_seq = seq;
                t.view.first_ordinal = ordinal;
                t.view.first_ts = ts;
                seq
            }
            None => {
                t.view.first_seq = 0;
                t.view.first_ordinal = t.view.last_ordinal + 1;
                t.view.first_ts = 0;
                t.view.last_seq + 1
            }
        };
        // What is gone from disk is gone everywhere: the in-memory tail,
        // pages and redeliveries; positions in the deleted range continue
        // from the oldest message left.
        self.tail.trim_before(topic, oldest);
        for sub in t.subs.clone() {
            if let Some(s) = self.subs.get_mut(&sub) {
                s.page.retain(|m| m.sequence >= oldest);
                s.redeliver_due.retain(|m| m.sequence >= oldest);
                let keep = s.redeliver_pending.split_off(&oldest);
                let gone = std::mem::replace(&mut s.redeliver_pending, keep);
                drop_redelivery_timers(&mut self.timers, sub, gone);
                // A read in flight for a dropped nack must not answer a
                // later nack of the same message (nor bring it back).
                s.redeliver_fetches.retain(|_, q| *q >= oldest);
                if s.next < oldest && s.page.is_empty() {
                    s.next = oldest;
                    // An in-flight read of the deleted range is now stale:
                    // ask again from the new position.
                    s.page_fetch = None;
                }
            }
            self.poke(sub);
        }
    }

    // ---- operator actions ----

    /// Forgets a topic; its subscriptions end with `TopicDeleted`.
    pub fn delete_topic(&mut self, topic: &str) -> bool {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.remove(topic) else {
            return false;
        };
        self.tail.remove_topic(topic);
        for sub in t.subs {
            if let Some(gone) = self.subs.remove(&sub) {
                drop_subscription_timers(&mut self.timers, sub, gone);
            }
            self.actions.push_back(Action::End {
                sub,
                reason: EndReason::TopicDeleted,
            });
        }
        true
    }

    /// Holds back a group's cursor writes while an admin operation on it
    /// commits (see [`Broker::unfence_group`]). False if there is no such group.
    pub fn fence_group(&mut self, topic: &str, group: &str) -> bool {
        let _core = AbortOnUnwind;
        match self
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        {
            Some(g) => {
                g.fences += 1;
                true
            }
            None => false,
        }
    }

    /// An admin operation on the group failed: its cursor as it is now is
    /// persisted again, so acks held back meanwhile are not lost.
    pub fn unfence_group(&mut self, topic: &str, group: &str, wall_ms: i64) {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        let Some(name) = t.groups.get_key_value(group).map(|(k, _)| k.clone()) else {
            return;
        };
        let Some(g) = t.groups.get_mut(group) else {
            return;
        };
        g.fences = g.fences.saturating_sub(1);
        if g.fences == 0 && g.cursor > 0 {
            self.actions.push_back(Action::PersistCursor {
                topic: t.view.name.clone(),
                group: name.clone(),
                sequence: g.cursor,
                acked_at_ms: if g.last_ack_ms > 0 {
                    g.last_ack_ms
                } else {
                    wall_ms
                },
            });
        }
    }

    /// A topic's delete failed: every group's cursor is persisted again (their
    /// coalesced writes were dropped when the delete was asked for).
    pub fn repersist_cursors(&mut self, topic: &str) {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get(topic) else {
            return;
        };
        for (name, g) in &t.groups {
            if g.cursor > 0 && g.fences == 0 {
                self.actions.push_back(Action::PersistCursor {
                    topic: t.view.name.clone(),
                    group: name.clone(),
                    sequence: g.cursor,
                    acked_at_ms: g.last_ack_ms,
                });
            }
        }
    }

    /// Forgets a group; its active consumer ends with `GroupDeleted`.
    pub fn delete_group(&mut self, topic: &str, group: &str) -> bool {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get_mut(topic) else {
            return false;
        };
        let Some(g) = t.groups.remove(group) else {
            return false;
        };
        if let Some(sub) = g.active {
            t.subs.retain(|s| *s != sub);
            if let Some(gone) = self.subs.remove(&sub) {
                drop_subscription_timers(&mut self.timers, sub, gone);
            }
            self.actions.push_back(Action::End {
                sub,
                reason: EndReason::GroupDeleted,
            });
        }
        true
    }

    /// Moves a group's cursor (its last acknowledged sequence) once the move
    /// is committed, lifting the fence taken for it; an active consumer
    /// continues from the message after it.
    pub fn reset_cursor(&mut self, topic: &str, group: &str, sequence: u64) -> bool {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get_mut(topic) else {
            return false;
        };
        let oldest = oldest_stored(&t.view);
        let Some(g) = t.groups.get_mut(group) else {
            return false;
        };
        g.fences = g.fences.saturating_sub(1);
        g.cursor = sequence;
        g.cursor_ordinal = match sequence {
            0 => 0,
            s if s >= t.view.last_seq => t.view.last_ordinal,
            _ => t.view.first_ordinal.saturating_sub(1), // refined by the writer
        };
        g.ledger.reset();
        if let Some(sub) = g.active {
            if let Some(s) = self.subs.get_mut(&sub) {
                s.next = sequence.saturating_add(1).max(oldest);
                s.page.clear();
                s.page_fetch = None;
                s.redeliver_due.clear();
                let gone = std::mem::take(&mut s.redeliver_pending);
                drop_redelivery_timers(&mut self.timers, sub, gone);
                s.redeliver_fetches.clear();
                s.recent.clear();
            }
            self.poke(sub);
        }
        true
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
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sim;
