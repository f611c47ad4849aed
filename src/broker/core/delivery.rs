//! Delivery: what storage reports (commits, backlog pages, retention trims)
//! and what a subscription pulls when its stream can send. Owns the flow of
//! messages into each subscription (tail, page, due redeliveries) and its
//! backlog reads; calls the timer helpers to drop trimmed redeliveries and
//! `redeliver` to retry a failed redelivery read.

use std::sync::Arc;

use super::subscription::skip_dead;
use super::timers::{drop_deadline_timers, drop_redelivery_timers};
use super::{
    oldest_stored, AbortOnUnwind, Action, Broker, DeadEntry, DeadLetter, Delivery, Fetch,
    StoredMessage, SubId, Timer, DEAD_LETTER_REASON_MAX_DELIVERIES, RECENT_CAP,
};

/// A dead-letter append that failed is tried again this much later.
const DEAD_LETTER_RETRY_MS: u64 = 1_000;

impl Broker {
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
                let keep = s.unacked.split_off(&oldest);
                let gone = std::mem::replace(&mut s.unacked, keep);
                drop_deadline_timers(&mut self.timers, sub, gone);
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
    /// (a backlog read is requested if needed). A group's message past its
    /// `max_deliveries` is dead-lettered instead (no credit spent) and the
    /// next one is tried.
    pub fn next_delivery(&mut self, sub: SubId, now_ms: u64) -> Option<Delivery> {
        let _core = AbortOnUnwind;
        loop {
            let cap = self.config.max_unacked;
            let s = self.subs.get_mut(&sub)?;
            if s.credit.is_empty() {
                return None;
            }
            let message = if let Some(m) = s.redeliver_due.pop_front() {
                s.redeliver_pending.remove(&m.sequence);
                m
            } else if s.ack_deadline_ms > 0 && s.unacked.len() + s.redeliver_pending.len() >= cap {
                // New deliveries wait for acks (redeliveries above do not).
                return None;
            } else if let Some(m) = s.page.pop_front() {
                m
            } else if let Some(m) = self.tail.first_from(&s.topic, s.next) {
                s.next = m.sequence + 1;
                m.clone()
            } else {
                self.request_page(sub);
                return None;
            };
            let group = match &s.group {
                Some(name) => self
                    .topics
                    .get_mut(&s.topic)
                    .and_then(|t| t.groups.get_mut(name)),
                None => None,
            };
            if let Some(g) = group {
                // Dead-lettered, or passed by the cursor (acked, or moved
                // past as dead-lettered) since it was queued: skipped, so
                // nothing acked is sent again (an ack of it would be ignored
                // and an ack deadline would send it forever).
                if g.dead.contains_key(&message.sequence) || message.sequence <= g.cursor {
                    continue;
                }
                let count = g.ledger.next_count(message.sequence);
                let max = g.policy.max_deliveries;
                if max > 0
                    && count > max
                    && message.sequence > g.cursor
                    && g.policy.dead_letter_topic.is_some()
                    && g.dead.len() < self.config.ledger_cap
                {
                    self.dead_letter(sub, message, count - 1);
                    continue;
                }
            }
            let s = self.subs.get_mut(&sub)?;
            s.credit.spend();
            s.last_sent_ms = now_ms;
            if s.recent.back().is_none_or(|(q, _)| *q < message.sequence) {
                if s.recent.len() >= RECENT_CAP {
                    s.recent.pop_front();
                }
                s.recent.push_back((message.sequence, message.ordinal));
            }
            if s.ack_deadline_ms > 0 {
                let due = now_ms + s.ack_deadline_ms;
                if let Some(old) = s.unacked.insert(message.sequence, due) {
                    self.timers.remove(&(
                        old,
                        Timer::AckDeadline {
                            sub,
                            seq: message.sequence,
                        },
                    ));
                }
                self.timers.insert((
                    due,
                    Timer::AckDeadline {
                        sub,
                        seq: message.sequence,
                    },
                ));
            }
            let (topic, group_name) = (s.topic.clone(), s.group.clone());
            let (ledger, persist) = match (&mut s.own_ledger, &group_name) {
                (Some(l), _) => (Some(l), false),
                (None, Some(g)) => match self
                    .topics
                    .get_mut(&topic)
                    .and_then(|t| t.groups.get_mut(g))
                {
                    Some(g) => (Some(&mut g.ledger), g.policy.max_deliveries > 0),
                    None => (None, false),
                },
                (None, None) => (None, false),
            };
            let delivery_count = ledger.map_or(1, |l| l.record(message.sequence));
            if let (true, Some(group)) = (persist, group_name) {
                self.actions.push_back(Action::PersistDelivery {
                    topic,
                    group,
                    sequence: message.sequence,
                    count: delivery_count,
                });
            }
            return Some(Delivery {
                message,
                delivery_count,
            });
        }
    }

    /// Hands a message the subscription's group has delivered too often to
    /// its dead-letter topic; until that commit the group skips it.
    fn dead_letter(&mut self, sub: SubId, message: Arc<StoredMessage>, delivery_count: u32) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let seq = message.sequence;
        if let Some(at) = s.redeliver_pending.remove(&seq) {
            self.timers.remove(&(at, Timer::Redeliver { sub, seq }));
        }
        if let Some(at) = s.unacked.remove(&seq) {
            self.timers.remove(&(at, Timer::AckDeadline { sub, seq }));
        }
        let (topic, Some(group)) = (s.topic.clone(), s.group.clone()) else {
            return;
        };
        let Some(t) = self.topics.get_mut(&topic) else {
            return;
        };
        let first_ordinal = t.view.first_ordinal;
        let Some(g) = t.groups.get_mut(&group) else {
            return;
        };
        let Some(dead_letter_topic) = g.policy.dead_letter_topic.clone() else {
            return;
        };
        let next_ordinal = g.cursor_ordinal.max(first_ordinal.saturating_sub(1)) + 1;
        let known = g.cursor == 0 || g.cursor_ordinal > 0;
        let advance_cursor =
            known && message.ordinal == next_ordinal && g.fences == 0 && !g.deleting;
        g.dead.insert(
            seq,
            DeadEntry {
                ordinal: message.ordinal,
                committed: false,
            },
        );
        self.actions.push_back(Action::DeadLetter(DeadLetter {
            topic,
            group,
            message,
            dead_letter_topic,
            delivery_count,
            reason: DEAD_LETTER_REASON_MAX_DELIVERIES,
            advance_cursor,
        }));
    }

    /// The outcome of an [`Action::DeadLetter`]. Once durable, the group
    /// forgets the message (its cursor moved past it in the same commit when
    /// `advance_cursor` was set). A failed one is delivered again later, so
    /// it is dead-lettered again.
    pub fn on_dead_lettered(
        &mut self,
        topic: &str,
        group: &str,
        sequence: u64,
        advanced: bool,
        ok: bool,
        now_ms: u64,
    ) {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        let first_ordinal = t.view.first_ordinal;
        let Some(g) = t.groups.get_mut(group) else {
            return;
        };
        if !ok {
            if g.dead.remove(&sequence).is_some() {
                if let Some(sub) = g.active {
                    if let Some(s) = self.subs.get_mut(&sub) {
                        // Unless a redelivery of it is pending already.
                        let due = now_ms + DEAD_LETTER_RETRY_MS;
                        if let std::collections::btree_map::Entry::Vacant(e) =
                            s.redeliver_pending.entry(sequence)
                        {
                            e.insert(due);
                            self.timers
                                .insert((due, Timer::Redeliver { sub, seq: sequence }));
                        }
                    }
                }
            }
            return;
        }
        let Some(entry) = g.dead.get_mut(&sequence) else {
            return; // the cursor passed it meanwhile
        };
        entry.committed = true;
        let ordinal = entry.ordinal;
        if advanced && g.cursor < sequence {
            g.cursor = sequence;
            g.cursor_ordinal = ordinal;
            g.ledger.forget_through(sequence);
        }
        if g.fences == 0 && skip_dead(g, first_ordinal) {
            let acked_at_ms = g.last_ack_ms;
            self.actions.push_back(Action::PersistCursor {
                topic: t.view.name.clone(),
                group: group.into(),
                sequence: g.cursor,
                acked_at_ms,
            });
        }
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
    pub(super) fn poke(&mut self, sub: SubId) {
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
}
