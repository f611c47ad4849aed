//! `KeyIndex`: one generation of the idempotency-key index (see
//! `key_window`), a hash table from a key's hash to the sequence of the
//! message stored under it. Owns only memory; calls nothing.
//!
//! Open addressing with linear probing, hash and sequence side by side, so
//! a lookup costs one cache line where a general-purpose map costs two
//! (its control bytes, then its slot): with a fresh key per message the
//! writer spends its index time waiting on memory. Sequences only grow, so
//! a table is emptied in O(1): `recycle` raises a floor, and every slot at
//! or below it counts as free. The hashes come keyed per process, so they
//! are used as the slot position as they are. There is no removal.

/// A slot: (key hash, sequence); free when the sequence is at or below the
/// floor.
type Slot = (u64, u64);

/// Fewest slots once the table holds anything.
const MIN_SLOTS: usize = 1 << 10;

#[derive(Debug, Default)]
pub struct KeyIndex {
    slots: Vec<Slot>,
    /// Slots with a sequence at or below this are free.
    floor: u64,
    len: usize,
}

impl KeyIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated (memory is 16 bytes each).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    pub fn get(&self, hash: u64) -> Option<u64> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let (h, seq) = self.slots[i];
            if seq <= self.floor {
                return None;
            }
            if h == hash {
                return Some(seq);
            }
            i = (i + 1) & mask;
        }
    }

    /// Maps `hash` to `seq`, which must be above every sequence ever
    /// inserted before the last `recycle` (sequences only grow).
    pub fn insert(&mut self, hash: u64, seq: u64) {
        debug_assert!(seq > self.floor);
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let (h, old) = self.slots[i];
            if old <= self.floor {
                self.slots[i] = (hash, seq);
                self.len += 1;
                return;
            }
            if h == hash {
                self.slots[i].1 = seq;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Loads the slot `hash` starts at, so that the memory fetches of many
    /// keys overlap before their lookups need them; returns a value to
    /// keep the load from being optimised away.
    pub fn touch(&self, hash: u64) -> u64 {
        if self.slots.is_empty() {
            return 0;
        }
        self.slots[hash as usize & self.mask()].1
    }

    /// Empties the table, keeping its memory: everything in it is at or
    /// below `last`, the highest sequence inserted.
    pub fn recycle(&mut self, last: u64) {
        self.floor = self.floor.max(last);
        self.len = 0;
    }

    /// Doubles the table (at most half full keeps probes short).
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![(0, 0); size]);
        let floor = self.floor;
        self.floor = 0;
        self.len = 0;
        for (h, seq) in old {
            if seq > floor {
                self.insert(h, seq);
            }
        }
        // Sequences in the new table are all above the old floor, and
        // fresh slots hold 0: keep the floor for later recycling.
        self.floor = floor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_was_inserted_through_growth_and_collisions() {
        let mut t = KeyIndex::default();
        assert_eq!(t.get(5), None);
        // Hashes that share their low bits probe past each other.
        for seq in 1..=5_000u64 {
            t.insert(seq << 20 | 7, seq);
        }
        assert_eq!(t.len(), 5_000);
        assert!(t.capacity() >= 10_000);
        for seq in 1..=5_000u64 {
            assert_eq!(t.get(seq << 20 | 7), Some(seq));
        }
        assert_eq!(t.get(5_001 << 20 | 7), None);
        t.insert(3 << 20 | 7, 6_000);
        assert_eq!((t.get(3 << 20 | 7), t.len()), (Some(6_000), 5_000));
    }

    #[test]
    fn recycling_empties_the_table_but_keeps_its_memory() {
        let h = |n: u64| n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut t = KeyIndex::default();
        for seq in 1..=600u64 {
            t.insert(h(seq), seq);
        }
        let slots = t.capacity();
        t.recycle(600);
        assert_eq!((t.len(), t.capacity()), (0, slots));
        assert_eq!(t.get(0x9E37_79B9_7F4A_7C15), None);
        // New entries reuse the slots of the old ones.
        for seq in 601..=1_200u64 {
            t.insert(h(seq), seq);
        }
        assert_eq!((t.len(), t.capacity()), (600, slots));
        assert_eq!(t.get(h(601)), Some(601));
        assert_eq!(t.get(h(5)), None);
        // Growing after a recycle drops the old entries.
        for seq in 1_201..=3_000u64 {
            t.insert(h(seq), seq);
        }
        assert_eq!(t.len(), 2_400);
        assert_eq!(t.get(h(600)), None);
        assert_eq!(t.get(h(1_000)), Some(1_000));
    }
}
