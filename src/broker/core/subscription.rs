//! Subscription lifecycle: what a consumer asks for on its stream (subscribe,
//! credit grants, acks, nacks, leaving). Owns the subscriptions and the
//! groups' cursors as acks move them; calls `poke` (delivery) to wake a
//! subscription and the timer helpers to arm and drop its timers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use log::debug;

use super::timers::{drop_deadline_timers, drop_redelivery_timers, drop_subscription_timers};
use super::SubscribeError;
use super::{
    oldest_stored, AbortOnUnwind, Action, Broker, CreditWindow, DeliveryLedger, DeliveryPolicy,
    EndReason, Group, MessageId, Start, SubId, SubscribeRequest, Subscription, Timer,
    MAX_REDELIVERY_DELAY_MS,
};
use crate::broker::topic_name::{validate_group_name, validate_topic_name};

impl Broker {
    /// Opens a subscription. Creates the topic if needed; takes the group over
    /// from its previous consumer, which is ended with `TakenOver`.
    pub fn subscribe(
        &mut self,
        sub: SubId,
        request: SubscribeRequest,
        now_ms: u64,
        wall_ms: i64,
    ) -> Result<(), SubscribeError> {
        let _core = AbortOnUnwind;
        validate_topic_name(&request.topic).map_err(SubscribeError::Invalid)?;
        if let Some(g) = &request.group {
            validate_group_name(g).map_err(SubscribeError::Invalid)?;
        }
        if self.subs.contains_key(&sub) {
            return Err(SubscribeError::Invalid(
                "subscription already initialised".into(),
            ));
        }
        let known = self.topics.contains_key(request.topic.as_str());
        if !known && self.topics.len() >= self.config.max_topics {
            return Err(SubscribeError::LimitReached(format!(
                "cannot create topic {:?}: the limit of {} topics is reached (--max-topics)",
                request.topic, self.config.max_topics
            )));
        }
        // A dead-letter topic that does not exist yet is created by the
        // first message moved there: it must fit under the limit too.
        if let (Some(_), Some(dlq)) = (&request.group, &request.policy.dead_letter_topic) {
            let new = 1 + usize::from(!known && *dlq.as_ref() != *request.topic);
            if !self.topics.contains_key(&**dlq) && self.topics.len() + new > self.config.max_topics
            {
                return Err(SubscribeError::LimitReached(format!(
                    "cannot create dead-letter topic {dlq:?}: the limit of {} topics is reached \
                     (--max-topics)",
                    self.config.max_topics
                )));
            }
        }
        if let (Some(g), Some(t)) = (&request.group, self.topics.get(request.topic.as_str())) {
            let name = if g.is_empty() { "default" } else { g.as_str() };
            if !t.groups.contains_key(name) && t.groups.len() >= self.config.max_groups_per_topic {
                return Err(SubscribeError::LimitReached(format!(
                    "cannot create consumer group {name:?}: topic {:?} has the limit of {} groups \
                     (--max-groups-per-topic)",
                    request.topic, self.config.max_groups_per_topic
                )));
            }
        }
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
            return Err(SubscribeError::Invalid("topic vanished".into()));
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
                                deleting: false,
                                policy: DeliveryPolicy::default(),
                                dead: BTreeMap::new(),
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
                // The group keeps the dead-letter settings of its latest Init.
                if let Some(existing) = t.groups.get_mut(&g) {
                    let policy = DeliveryPolicy {
                        ack_deadline_ms: 0,
                        ..request.policy.clone()
                    };
                    if existing.policy != policy {
                        existing.policy = policy.clone();
                        self.actions.push_back(Action::PersistPolicy {
                            topic: topic.clone(),
                            group: g.clone(),
                            max_deliveries: policy.max_deliveries,
                            dead_letter_topic: policy.dead_letter_topic,
                        });
                    }
                }
                (Some(g), next, None)
            }
        };
        let ack_deadline_ms = if group.is_some() {
            u64::from(request.policy.ack_deadline_ms)
        } else {
            0
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
                ack_deadline_ms,
                unacked: BTreeMap::new(),
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
            if let Some(name) = group {
                if let Some(g) = t.groups.get_mut(&name) {
                    if g.active == Some(sub) {
                        g.active = None;
                        self.actions.push_back(Action::GroupIdle {
                            topic: t.view.name.clone(),
                            group: name,
                        });
                    }
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
        let keep = s.unacked.split_off(&(seq + 1));
        let acked = std::mem::replace(&mut s.unacked, keep);
        drop_deadline_timers(&mut self.timers, sub, acked);
        g.dead = g.dead.split_off(&(seq + 1));
        if g.fences > 0 {
            // Persisted when the admin operation fails, forgotten if it commits.
            return;
        }
        let topic = s.topic.clone();
        let first_ordinal = t.view.first_ordinal;
        skip_dead(g, first_ordinal);
        self.actions.push_back(Action::PersistCursor {
            topic,
            group: group_name,
            sequence: g.cursor,
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
        // The nack's own redelivery replaces the ack deadline's.
        if let Some(at) = s.unacked.remove(&seq) {
            self.timers.remove(&(at, Timer::AckDeadline { sub, seq }));
        }
        s.redeliver_pending.insert(seq, due);
        self.timers.insert((due, Timer::Redeliver { sub, seq }));
    }
}

/// Moves a group's cursor past the dead-lettered messages right after it
/// whose dead-letter appends are durable (they need no ack); forgets
/// those it passed. `first_ordinal` is the topic's oldest stored message's.
pub(super) fn skip_dead(g: &mut Group, first_ordinal: u64) -> bool {
    let mut moved = false;
    g.dead = g.dead.split_off(&(g.cursor + 1));
    while let Some((&seq, &entry)) = g.dead.first_key_value() {
        let next_ordinal = g.cursor_ordinal.max(first_ordinal.saturating_sub(1)) + 1;
        if !entry.committed
            || entry.ordinal != next_ordinal
            || g.cursor_ordinal == 0 && g.cursor > 0
        {
            break;
        }
        g.dead.pop_first();
        g.cursor = seq;
        g.cursor_ordinal = entry.ordinal;
        g.ledger.forget_through(seq);
        moved = true;
    }
    moved
}
