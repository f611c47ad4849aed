//! Delivery: what storage reports (commits, backlog pages, retention trims)
//! and what a subscription pulls when its stream can send. Owns the flow of
//! messages into each subscription (tail, page, due redeliveries) and its
//! backlog reads; calls the timer helpers to drop trimmed redeliveries and
//! `redeliver` to retry a failed redelivery read.

use std::sync::Arc;

use super::timers::drop_redelivery_timers;
use super::{
    oldest_stored, AbortOnUnwind, Action, Broker, Delivery, Fetch, StoredMessage, SubId, RECENT_CAP,
};

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
