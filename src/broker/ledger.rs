//! `DeliveryLedger`: what a consumer group has been sent while the broker
//! runs, so `delivery_count` keeps counting across redeliveries and
//! reconnects. Bounded: it remembers counts only for redelivered messages
//! after the cursor, at most `cap` of them (the oldest are forgotten first).

use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct DeliveryLedger {
    delivered_max: u64,
    counts: BTreeMap<u64, u32>,
    cap: usize,
}

impl DeliveryLedger {
    pub fn new(cap: usize) -> Self {
        DeliveryLedger {
            delivered_max: 0,
            counts: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    /// Records a delivery of `seq` and returns its delivery count.
    pub fn record(&mut self, seq: u64) -> u32 {
        if seq > self.delivered_max {
            self.delivered_max = seq;
            self.counts.remove(&seq);
            return 1;
        }
        let count = self.counts.entry(seq).or_insert(1);
        *count = count.saturating_add(1);
        let n = *count;
        while self.counts.len() > self.cap {
            self.counts.pop_first();
        }
        n
    }

    /// The count the next delivery of `seq` would get.
    pub fn next_count(&self, seq: u64) -> u32 {
        if seq > self.delivered_max {
            1
        } else {
            self.counts
                .get(&seq)
                .copied()
                .unwrap_or(1)
                .saturating_add(1)
        }
    }

    /// Takes back what storage kept: the highest sequence delivered and the
    /// counts of messages delivered more than once.
    pub fn restore(&mut self, delivered_max: u64, counts: &[(u64, u32)]) {
        self.delivered_max = self.delivered_max.max(delivered_max);
        for &(seq, count) in counts {
            if count > 1 && seq <= self.delivered_max {
                let c = self.counts.entry(seq).or_insert(1);
                *c = (*c).max(count);
            }
        }
        while self.counts.len() > self.cap {
            self.counts.pop_first();
        }
    }

    /// Highest sequence ever delivered to the group.
    pub fn delivered_max(&self) -> u64 {
        self.delivered_max
    }

    /// Forgets counts at or below an acknowledged cursor.
    pub fn forget_through(&mut self, cursor: u64) {
        self.counts = self.counts.split_off(&(cursor + 1));
    }

    /// Forgets everything (the group's cursor was moved by an operator).
    pub fn reset(&mut self) {
        self.delivered_max = 0;
        self.counts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_first_and_repeated_deliveries() {
        let mut l = DeliveryLedger::new(10);
        assert_eq!(l.record(5), 1);
        assert_eq!(l.record(7), 1);
        assert_eq!(l.record(5), 2);
        assert_eq!(l.record(5), 3);
        assert_eq!(
            l.record(6),
            2,
            "6 <= delivered_max: it was sent before (or skipped)"
        );
        l.forget_through(5);
        assert_eq!(l.record(7), 2);
    }

    #[test]
    fn stays_within_its_cap() {
        let mut l = DeliveryLedger::new(2);
        l.record(100);
        for s in 1..=50 {
            l.record(s);
        }
        assert!(l.counts.len() <= 2);
    }
}
