//! Operator actions: deleting topics and groups, resetting cursors, and the
//! fences that hold a group's cursor writes back while such an operation
//! commits. Calls `poke` (delivery) and the timer helpers; nothing else.

use super::timers::{drop_deadline_timers, drop_redelivery_timers, drop_subscription_timers};
use super::{oldest_stored, AbortOnUnwind, Action, Broker, EndReason};

impl Broker {
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

    /// Holds back a group's cursor writes while a cursor reset commits (see
    /// [`Broker::unfence_group`]). False if there is no such group, or if
    /// its delete is waiting for its commit (the reset would write the
    /// cursor back after it).
    pub fn fence_group(&mut self, topic: &str, group: &str) -> bool {
        let _core = AbortOnUnwind;
        match self
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        {
            Some(g) if !g.deleting => {
                g.fences += 1;
                true
            }
            _ => false,
        }
    }

    /// Fences a group for its delete and marks it as being deleted until
    /// the delete commits ([`Broker::delete_group`]) or fails
    /// ([`Broker::group_delete_failed`]). False if there is no such group.
    pub fn begin_group_delete(&mut self, topic: &str, group: &str) -> bool {
        let _core = AbortOnUnwind;
        match self
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        {
            Some(g) => {
                g.fences += 1;
                g.deleting = true;
                true
            }
            None => false,
        }
    }

    /// A group's delete failed: it is no longer being deleted, and its
    /// cursor is persisted again (see [`Broker::unfence_group`]).
    pub fn group_delete_failed(&mut self, topic: &str, group: &str, wall_ms: i64) {
        let _core = AbortOnUnwind;
        if let Some(g) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.groups.get_mut(group))
        {
            g.deleting = false;
        }
        self.unfence_group(topic, group, wall_ms);
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
        // Dead-lettered messages stay dead for the group after a replay.
        g.dead = g.dead.split_off(&sequence.saturating_add(1));
        if let Some(sub) = g.active {
            if let Some(s) = self.subs.get_mut(&sub) {
                s.next = sequence.saturating_add(1).max(oldest);
                s.page.clear();
                s.page_fetch = None;
                s.redeliver_due.clear();
                let gone = std::mem::take(&mut s.redeliver_pending);
                drop_redelivery_timers(&mut self.timers, sub, gone);
                let gone = std::mem::take(&mut s.unacked);
                drop_deadline_timers(&mut self.timers, sub, gone);
                s.redeliver_fetches.clear();
                s.recent.clear();
            }
            self.poke(sub);
        }
        true
    }

    /// The group's cursor, if this broker knows the group.
    pub fn group_cursor(&self, topic: &str, group: &str) -> Option<u64> {
        self.topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map(|g| g.cursor)
    }

    /// Whether a consumer of the group is active here.
    pub fn group_active(&self, topic: &str, group: &str) -> bool {
        self.topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .is_some_and(|g| g.active.is_some())
    }

    /// Another gateway claimed the group (`TakenOver`), or this one lost
    /// contact with the shared store (`GroupUnavailable`): its consumer here
    /// ends with `reason`. False if none was active.
    pub fn end_group_consumer(&mut self, topic: &str, group: &str, reason: EndReason) -> bool {
        let _core = AbortOnUnwind;
        let Some(t) = self.topics.get_mut(topic) else {
            return false;
        };
        let Some((name, g)) = t.groups.iter_mut().find(|(n, _)| n.as_ref() == group) else {
            return false;
        };
        let Some(sub) = g.active.take() else {
            return false;
        };
        let name = name.clone();
        t.subs.retain(|s| *s != sub);
        if let Some(gone) = self.subs.remove(&sub) {
            drop_subscription_timers(&mut self.timers, sub, gone);
        }
        self.actions.push_back(Action::End { sub, reason });
        self.actions.push_back(Action::GroupIdle {
            topic: t.view.name.clone(),
            group: name,
        });
        true
    }

    /// A group's cursor as stored by the gateway that served it last: taken
    /// unless a consumer of the group is active here (this gateway then
    /// serves it and its own cursor is newer). Creates the group (and the
    /// topic, at `created_at_ms`) if this gateway did not know it.
    pub fn adopt_cursor(
        &mut self,
        topic: &str,
        group: &str,
        sequence: u64,
        acked_at_ms: i64,
        created_at_ms: i64,
    ) {
        let _core = AbortOnUnwind;
        let name = self.ensure_topic(topic, created_at_ms);
        let ledger_cap = self.config.ledger_cap;
        let Some(t) = self.topics.get_mut(&name) else {
            return;
        };
        let cursor_ordinal = match sequence {
            0 => 0,
            s if s >= t.view.last_seq => t.view.last_ordinal,
            _ => t.view.first_ordinal.saturating_sub(1),
        };
        match t.groups.get_mut(group) {
            Some(g) if g.active.is_some() => {}
            // Unchanged (this gateway served it last, before a restart):
            // its delivery counts stand.
            Some(g) if g.cursor == sequence => g.last_ack_ms = acked_at_ms,
            Some(g) => {
                g.cursor = sequence;
                g.cursor_ordinal = cursor_ordinal;
                g.last_ack_ms = acked_at_ms;
                // Counts above the new cursor stay: they are what this
                // gateway knows of those messages (the other gateway may
                // have sent them more often).
                g.ledger.forget_through(sequence);
                g.dead = g.dead.split_off(&sequence.saturating_add(1));
            }
            None => {
                t.groups.insert(
                    group.into(),
                    super::Group {
                        cursor: sequence,
                        cursor_ordinal,
                        last_ack_ms: acked_at_ms,
                        active: None,
                        ledger: super::DeliveryLedger::new(ledger_cap),
                        fences: 0,
                        deleting: false,
                        policy: Default::default(),
                        dead: Default::default(),
                    },
                );
            }
        }
    }
}
