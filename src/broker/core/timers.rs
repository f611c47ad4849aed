//! Timers: heartbeats on idle streams, nack redelivery and ack-deadline timers, fired by
//! [`Broker::tick`], and the helpers that drop the timers of what is gone.
//! Owns the `timers` set's entries; calls `poke` (delivery) to wake a
//! subscription whose redelivery is due.

use std::collections::{BTreeMap, BTreeSet};

use super::{AbortOnUnwind, Action, Broker, Fetch, SubId, Subscription, Timer};

/// Removes the timers of redeliveries that will no longer happen.
pub(super) fn drop_redelivery_timers(
    timers: &mut BTreeSet<(u64, Timer)>,
    sub: SubId,
    pending: BTreeMap<u64, u64>,
) {
    for (seq, due) in pending {
        timers.remove(&(due, Timer::Redeliver { sub, seq }));
    }
}

/// Removes the ack-deadline timers of messages no longer waited on.
pub(super) fn drop_deadline_timers(
    timers: &mut BTreeSet<(u64, Timer)>,
    sub: SubId,
    unacked: BTreeMap<u64, u64>,
) {
    for (seq, due) in unacked {
        timers.remove(&(due, Timer::AckDeadline { sub, seq }));
    }
}

/// Removes every timer of a subscription that is gone.
pub(super) fn drop_subscription_timers(
    timers: &mut BTreeSet<(u64, Timer)>,
    sub: SubId,
    gone: Subscription,
) {
    if let Some(at) = gone.heartbeat_at {
        timers.remove(&(at, Timer::Heartbeat { sub }));
    }
    drop_redelivery_timers(timers, sub, gone.redeliver_pending);
    drop_deadline_timers(timers, sub, gone.unacked);
}

impl Broker {
    /// Sets the subscription's heartbeat timer to fire at `at` (its only
    /// one: the subscription remembers it so it can be removed with it).
    pub(super) fn arm_heartbeat(&mut self, sub: SubId, at: u64) {
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
                Timer::AckDeadline { sub, seq } => self.deadline_passed(sub, seq, at),
            }
        }
    }

    /// A delivered message was not acked in time: deliver it again (it
    /// waits for credit like a nacked one).
    fn deadline_passed(&mut self, sub: SubId, seq: u64, at: u64) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if s.unacked.get(&seq) != Some(&at) {
            return;
        }
        s.unacked.remove(&seq);
        let acked = s.group.as_ref().is_some_and(|g| {
            self.topics
                .get(&s.topic)
                .and_then(|t| t.groups.get(g))
                .is_some_and(|g| seq <= g.cursor)
        });
        if acked || s.redeliver_pending.contains_key(&seq) {
            // Nothing to send again, but a place below `max_unacked` may
            // have come free.
            self.poke(sub);
            return;
        }
        s.redeliver_pending.insert(seq, at);
        self.redeliver(sub, seq);
    }

    pub(super) fn redeliver(&mut self, sub: SubId, seq: u64) {
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
}
