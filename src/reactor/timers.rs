//! `TimerSet`: what the reactor must do at given times, earliest first. Its
//! poll timeout is the first entry. Owners that keep one timer each (every
//! connection) remember when it is due and move or cancel it through
//! [`TimerSet::rearm`], so a closed connection leaves nothing behind.

use std::collections::BTreeSet;
use std::time::Instant;

/// Something the reactor must do at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A call's `grpc-timeout` expires.
    Deadline(u64),
    /// A connection's keepalive and idle checks are due.
    Connection(usize),
    /// Refresh the gauge snapshot the metrics exporter reads.
    Gauges,
    /// Try `accept` again after it failed (out of file descriptors).
    AcceptRetry,
    /// A call's partial request message may have stalled past the timeout.
    MessageStall(u64),
}

/// The pending timers, ordered by due time.
#[derive(Debug, Default)]
pub struct TimerSet {
    pending: BTreeSet<(Instant, Timer)>,
}

impl TimerSet {
    pub fn add(&mut self, at: Instant, timer: Timer) {
        self.pending.insert((at, timer));
    }

    pub fn remove(&mut self, at: Instant, timer: Timer) {
        self.pending.remove(&(at, timer));
    }

    /// When the earliest timer is due.
    pub fn first_due(&self) -> Option<Instant> {
        self.pending.first().map(|(at, _)| *at)
    }

    /// Takes the earliest timer if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, Timer)> {
        match self.pending.first() {
            Some(&(at, _)) if at <= now => self.pending.pop_first(),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Moves the single `timer` an owner keeps (due at `*scheduled`) to `at`;
    /// `None` cancels it. `*scheduled` is updated to match.
    pub fn rearm(&mut self, scheduled: &mut Option<Instant>, at: Option<Instant>, timer: Timer) {
        if let Some(old) = scheduled.take() {
            self.remove(old, timer);
        }
        if let Some(at) = at {
            self.add(at, timer);
            *scheduled = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connection_churn_leaves_no_timers_behind() {
        let mut timers = TimerSet::default();
        let start = Instant::now();
        for round in 0..100usize {
            // Ten connections open, each with a keepalive check ...
            let mut owned: Vec<Option<Instant>> = vec![None; 10];
            for (i, scheduled) in owned.iter_mut().enumerate() {
                let at = start + Duration::from_secs(20 + i as u64);
                timers.rearm(scheduled, Some(at), Timer::Connection(round * 10 + i));
            }
            // ... moved earlier when they go idle ...
            for (i, scheduled) in owned.iter_mut().enumerate() {
                let at = start + Duration::from_secs(1 + i as u64);
                timers.rearm(scheduled, Some(at), Timer::Connection(round * 10 + i));
            }
            assert_eq!(timers.len(), 10);
            // ... and cancelled when they close.
            for (i, scheduled) in owned.iter_mut().enumerate() {
                timers.rearm(scheduled, None, Timer::Connection(round * 10 + i));
                assert_eq!(*scheduled, None);
            }
            assert!(timers.is_empty(), "round {round}: {} left", timers.len());
        }
    }

    #[test]
    fn pop_due_takes_only_what_is_due_in_order() {
        let mut timers = TimerSet::default();
        let now = Instant::now();
        timers.add(now + Duration::from_secs(2), Timer::Gauges);
        timers.add(now, Timer::Connection(7));
        timers.add(now, Timer::Deadline(1));
        assert_eq!(timers.pop_due(now), Some((now, Timer::Deadline(1))));
        assert_eq!(timers.pop_due(now), Some((now, Timer::Connection(7))));
        assert_eq!(timers.pop_due(now), None);
        assert_eq!(timers.first_due(), Some(now + Duration::from_secs(2)));
    }
}
