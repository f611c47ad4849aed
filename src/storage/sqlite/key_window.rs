//! `KeyWindow`: the idempotency keys stored within the dedup window, for
//! the writer thread only.
//!
//! Their rows make them durable: one row per call that claimed keys
//! (`idempotency_key_sets`, keyed by the highest sequence among them,
//! appended in sequence order, no index) holding its keys packed in a blob:
//! a row per key was about a third of what keys added to a BatchPublish's
//! cost in the writer. An in-memory index finds them: a hash of (topic, key)
//! -> the sequence of the message stored under it, checked against its row
//! on a hit (so a collision, or an entry whose row is gone, is harmless).
//! The hash is keyed per process (`RandomState`), so a client cannot choose
//! keys that pile into one bucket; the index tables then use that hash as
//! is instead of hashing it again.
//!
//! The index is two generations: keys go into the current one; when it
//! holds half of `--dedup-max-keys` it becomes the previous one and the
//! previous one is dropped, the oldest keys first, in one step (no per-key
//! bookkeeping); its rows are deleted a chunk per commit. The dropped
//! table's memory becomes the new current one, so a busy window allocates
//! nothing after it first fills (fresh pages and rehashing while growing
//! cost the writer more than the lookups). Rows whose window passed are
//! deleted as it passes (`marks`). At most `--dedup-max-keys` entries,
//! in tables of 16-byte slots at most half full: 32 to 64 bytes a key
//! (measured: a full 1,000,000 keys, 48 MB more peak RSS than no keys).
//!
//! Calls only SQLite, on the writer's connection and inside its
//! transaction.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::time::Duration;

use rusqlite::{params, Connection};

use super::key_index::KeyIndex;
use crate::broker::MessageId;
use crate::storage::{Duplicate, NewMessage};

/// Once keys are expired or forgotten, their rows are deleted a chunk at a
/// time: twice as many as were inserted since the last chunk, so the table
/// keeps up, after every `PURGE_EVERY` rows inserted (or in any commit
/// that inserts none), and at least `PURGE_MIN`. Each chunk rewrites the
/// pages at the table's head whatever its size: a chunk in every commit
/// gave a keyed BatchPublish a p999 of 13.5–14 ms, one after every 32 rows
/// 10.7–11.4 ms, and a fixed few hundred rows at a time after each
/// generation was dropped 27 ms.
const PURGE_EVERY: i64 = 32;
const PURGE_MIN: i64 = 64;

#[derive(Debug, Default)]
pub struct KeyWindow {
    hasher: RandomState,
    current: KeyIndex,
    previous: KeyIndex,
    /// The highest sequence in `current` and in `previous`.
    current_last: u64,
    previous_last: u64,
    /// Rows at or below this belong to a dropped generation: deleted a
    /// chunk per commit.
    purge_upto: u64,
    /// (stored at, highest sequence stored then), oldest first, one per
    /// second with keys.
    marks: VecDeque<(i64, u64)>,
    /// Key set rows inserted since the last chunk was purged, and in this
    /// commit.
    inserted: i64,
    inserted_now: bool,
    /// A call's scratch, kept from call to call (allocations of this size
    /// per call made the allocator consolidate its free lists every
    /// time): its key hashes, the keys it claimed (sequence, message
    /// index), and those keys packed.
    hashes: Vec<u64>,
    fresh: Vec<(u64, usize)>,
    blob: Vec<u8>,
}

impl KeyWindow {
    /// Reads the stored keys back (at start-up, or after a failed commit);
    /// `now_ms` starts their window over (a lookup also checks each key's
    /// own time). Past `max_keys` the oldest are dropped, as in `expire`.
    pub fn load(conn: &Connection, now_ms: i64, max_keys: u64) -> rusqlite::Result<KeyWindow> {
        let mut keys = KeyWindow::default();
        let mut stmt =
            conn.prepare("SELECT seq, topic_id, keys FROM idempotency_key_sets ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let mut newest = None;
        while let Some(r) = rows.next()? {
            let last = r.get::<_, i64>(0)? as u64;
            let topic_id = r.get(1)?;
            for (seq, key) in unpack(last, r.get_ref(2)?.as_blob().unwrap_or_default()) {
                let h = keys.hash(topic_id, key);
                keys.current.insert(h, seq);
            }
            keys.current_last = last;
            keys.rotate_if_full(max_keys);
            newest = Some(last);
        }
        if let Some(newest) = newest {
            keys.marks.push_back((now_ms, newest));
        }
        Ok(keys)
    }

    /// How many keys the index holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    fn hash(&self, topic_id: i64, key: &str) -> u64 {
        key_hash(&self.hasher, topic_id, key)
    }

    /// Claims the idempotency keys of an append's messages (message i would
    /// be stored as sequence `base + i`), in transaction `tx`: a key not
    /// stored within the window (`ts`, `cutoff`) gets a row and its message
    /// is fresh; else the message is a duplicate of the original, of an
    /// earlier call or of an earlier message of this one. Returns the
    /// duplicates by ascending index. On a failed commit the writer must
    /// `load` the window again.
    pub fn claim(
        &mut self,
        tx: &Connection,
        (topic_id, topic): (i64, &str),
        messages: &[NewMessage],
        base: u64,
        (ts, cutoff): (i64, i64),
    ) -> rusqlite::Result<Vec<Duplicate>> {
        self.hashes.clear();
        for m in messages {
            let key = m.idempotency_key.as_deref();
            let h = key.map_or(0, |k| key_hash(&self.hasher, topic_id, k));
            self.hashes.push(h);
        }
        // The lookups below wait on memory (the tables are megabytes):
        // start every key's fetch first so that they overlap.
        let mut sink = 0;
        for &h in &self.hashes {
            sink ^= self.current.touch(h) ^ self.previous.touch(h);
        }
        std::hint::black_box(sink);
        // (sequence, message index) of the keys claimed.
        self.fresh.clear();
        let mut duplicates = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let Some(key) = m.idempotency_key.as_deref() else {
                continue;
            };
            let seq = base + i as u64;
            let h = self.hashes[i];
            let original = |original: u64| -> rusqlite::Result<Option<Duplicate>> {
                let stored_at = if (base..seq).contains(&original) {
                    // An earlier message of this call (its row is not
                    // written yet). Anything else is checked against its
                    // row (the writer loads the window again after a
                    // failed commit, so no entry of one is left).
                    let same = messages
                        .get((original - base) as usize)
                        .and_then(|m| m.idempotency_key.as_deref())
                        == Some(key);
                    same.then_some(ts)
                } else {
                    stored_at(tx, original, topic_id, key, cutoff)?
                };
                Ok(stored_at.map(|stored_at| Duplicate {
                    index: i,
                    sequence: original,
                    id: MessageId::new(stored_at, original, topic),
                    timestamp_ms: stored_at,
                }))
            };
            if let Some(found) = self.current.get(h).or_else(|| self.previous.get(h)) {
                if let Some(d) = original(found)? {
                    duplicates.push(d);
                    continue;
                }
            }
            self.current.insert(h, seq);
            self.fresh.push((seq, i));
        }
        if let Some(&(last, _)) = self.fresh.last() {
            let keys = self.fresh.iter().map(|&(seq, i)| {
                let key = messages[i].idempotency_key.as_deref();
                (seq, key.unwrap_or_default())
            });
            pack(&mut self.blob, last, keys);
            tx.prepare_cached(
                "INSERT INTO idempotency_key_sets (seq, topic_id, ts, keys) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![last as i64, topic_id, ts, &self.blob[..]])?;
            self.inserted += 1;
            self.inserted_now = true;
            // Sequences only grow: this call's last is the newest.
            self.current_last = last;
            match self.marks.back_mut() {
                Some((at, seq)) if *at / 1000 == ts / 1000 => {
                    // The mark's time is its newest key's: none expires early.
                    *at = ts;
                    *seq = last;
                }
                _ => self.marks.push_back((ts, last)),
            }
        }
        Ok(duplicates)
    }

    /// Forgets the keys whose window has passed at `ts`; when the current
    /// generation is full, drops the previous one (the oldest keys, which
    /// are then forgotten before their window ends, with a warning). Deletes
    /// a chunk of the forgotten keys' rows.
    pub fn expire(
        &mut self,
        tx: &Connection,
        ts: i64,
        window: Duration,
        max_keys: u64,
    ) -> rusqlite::Result<()> {
        let cutoff = ts.saturating_sub(window.as_millis() as i64);
        let mut upto = None;
        while let Some(&(at, seq)) = self.marks.front() {
            if at >= cutoff {
                break;
            }
            upto = Some(seq);
            self.marks.pop_front();
        }
        if let Some(seq) = upto {
            self.purge_upto = self.purge_upto.max(seq);
            // Generations whose keys all expired go too, memory with them.
            if self.previous_last <= seq {
                self.previous = KeyIndex::default();
            }
            if self.current_last <= seq {
                self.current = KeyIndex::default();
            }
        }
        let dropped = self.rotate_if_full(max_keys);
        if dropped > 0 {
            crate::log_limited!(
                log::Level::Warn,
                "writer: more than --dedup-max-keys={max_keys} idempotency keys within the \
                 window: the oldest {dropped} were forgotten early"
            );
        }
        let inserted_now = std::mem::take(&mut self.inserted_now);
        if self.purge_upto == 0 {
            self.inserted = 0;
        } else if self.inserted >= PURGE_EVERY || !inserted_now {
            let chunk = (2 * std::mem::take(&mut self.inserted)).max(PURGE_MIN);
            let n = tx
                .prepare_cached(
                    // A range of rowids (an IN list of them cost a
                    // temporary table per commit).
                    "DELETE FROM idempotency_key_sets WHERE seq <= min(?1, coalesce( \
                     (SELECT seq FROM idempotency_key_sets ORDER BY seq LIMIT 1 OFFSET ?2 - 1), ?1))",
                )?
                .execute(params![self.purge_upto as i64, chunk])?;
            if (n as i64) < chunk {
                self.purge_upto = 0;
            }
        }
        Ok(())
    }

    /// When the current generation holds half of `max_keys`, makes it the
    /// previous one, dropping the previous one's keys (their rows are then
    /// purged) and reusing its table. Returns how many keys were dropped.
    fn rotate_if_full(&mut self, max_keys: u64) -> usize {
        let half = (max_keys / 2).max(1) as usize;
        if self.current.len() < half {
            return 0;
        }
        let mut recycled = std::mem::take(&mut self.previous);
        let dropped = recycled.len();
        recycled.recycle(self.previous_last);
        self.previous = std::mem::replace(&mut self.current, recycled);
        if dropped > 0 {
            self.purge_upto = self.purge_upto.max(self.previous_last);
        }
        self.previous_last = self.current_last;
        dropped
    }

    /// Deletes a deleted topic's key rows (its id may be given to a new
    /// topic; their index entries then find no row).
    pub fn forget_topic(&mut self, tx: &Connection, topic_id: i64) -> rusqlite::Result<()> {
        tx.prepare_cached("DELETE FROM idempotency_key_sets WHERE topic_id = ?1")?
            .execute([topic_id])?;
        Ok(())
    }
}

/// The index's hash of a key in a topic.
fn key_hash(hasher: &RandomState, topic_id: i64, key: &str) -> u64 {
    hasher.hash_one((topic_id, key))
}

/// When key `key` of topic `topic_id` was stored as sequence `seq` at or
/// after `cutoff`: the time it was stored. (This transaction's own rows are
/// visible to it.)
fn stored_at(
    tx: &Connection,
    seq: u64,
    topic_id: i64,
    key: &str,
    cutoff: i64,
) -> rusqlite::Result<Option<i64>> {
    let mut stmt = tx.prepare_cached(
        "SELECT seq, topic_id, ts, keys FROM idempotency_key_sets \
         WHERE seq >= ?1 ORDER BY seq LIMIT 1",
    )?;
    let mut rows = stmt.query([seq as i64])?;
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    let (last, t, at) = (r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)?, r.get(2)?);
    if t != topic_id || at < cutoff {
        return Ok(None);
    }
    let found = unpack(last, r.get_ref(3)?.as_blob().unwrap_or_default())
        .any(|(s, k)| s == seq && k == key);
    Ok(found.then_some(at))
}

/// A call's claimed keys (ascending sequences, the last `last`) as one
/// blob, into `blob`: per key, how far its sequence is below `last` (u32,
/// little endian), its length (u16, little endian) and its bytes (1 to 128
/// as published; checked before they get here).
fn pack<'a>(blob: &mut Vec<u8>, last: u64, keys: impl Iterator<Item = (u64, &'a str)>) {
    blob.clear();
    for (seq, key) in keys {
        blob.extend_from_slice(&((last - seq) as u32).to_le_bytes());
        debug_assert!(key.len() <= usize::from(u16::MAX));
        let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
        blob.extend_from_slice(&len.to_le_bytes());
        blob.extend_from_slice(key.as_bytes());
    }
}

/// The (sequence, key) pairs of a blob `pack` made; stops at the first
/// entry that does not parse (a damaged row loses only its own keys).
fn unpack(last: u64, blob: &[u8]) -> impl Iterator<Item = (u64, &str)> {
    let mut rest = blob;
    std::iter::from_fn(move || {
        let (head, tail) = rest.split_first_chunk::<6>()?;
        let [a, b, c, d, len_lo, len_hi] = *head;
        let len = u16::from_le_bytes([len_lo, len_hi]);
        let below = u64::from(u32::from_le_bytes([a, b, c, d]));
        let (key, tail) = tail.split_at_checked(usize::from(len))?;
        rest = tail;
        let key = std::str::from_utf8(key).ok()?;
        Some((last.checked_sub(below)?, key))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE idempotency_key_sets (
                seq INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL,
                ts INTEGER NOT NULL, keys BLOB NOT NULL)",
        )
        .unwrap();
        conn
    }

    fn keyed(keys: &[&str]) -> Vec<NewMessage> {
        keys.iter()
            .map(|k| NewMessage {
                payload: Default::default(),
                attributes: Default::default(),
                idempotency_key: (!k.is_empty()).then(|| k.to_string()),
            })
            .collect()
    }

    /// (index, original sequence, original time) of each duplicate.
    fn claim(
        w: &mut KeyWindow,
        conn: &Connection,
        topic_id: i64,
        keys: &[&str],
        base: u64,
        ts: i64,
    ) -> Vec<(usize, u64, i64)> {
        w.claim(conn, (topic_id, "t"), &keyed(keys), base, (ts, ts - 1_000))
            .unwrap()
            .into_iter()
            .map(|d| (d.index, d.sequence, d.timestamp_ms))
            .collect()
    }

    /// The stored keys: (sequence, key), ascending.
    fn rows(conn: &Connection) -> Vec<(u64, String)> {
        let mut stmt = conn
            .prepare("SELECT seq, keys FROM idempotency_key_sets ORDER BY seq")
            .unwrap();
        let sets: Vec<(u64, Vec<u8>)> = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        sets.iter()
            .flat_map(|(last, blob)| unpack(*last, blob).map(|(s, k)| (s, k.to_string())))
            .collect()
    }

    #[test]
    fn a_repeated_key_answers_with_the_original() {
        let conn = db();
        let mut w = KeyWindow::default();
        assert!(claim(&mut w, &conn, 1, &["a", "", "b"], 1, 5_000).is_empty());
        assert_eq!(
            claim(&mut w, &conn, 1, &["b", "c"], 4, 5_500),
            [(0, 3, 5_000)]
        );
        assert_eq!(
            rows(&conn),
            [(1, "a".into()), (3, "b".into()), (5, "c".into())]
        );
    }

    #[test]
    fn a_key_repeated_within_one_call_answers_with_its_first_message() {
        let conn = db();
        let mut w = KeyWindow::default();
        let dups = claim(&mut w, &conn, 1, &["a", "b", "a", "a"], 10, 5_000);
        assert_eq!(dups, [(2, 10, 5_000), (3, 10, 5_000)]);
        assert_eq!(rows(&conn), [(10, "a".into()), (11, "b".into())]);
    }

    #[test]
    fn keys_are_per_topic_and_expire_with_the_window() {
        let conn = db();
        let mut w = KeyWindow::default();
        claim(&mut w, &conn, 1, &["a"], 1, 5_000);
        assert!(claim(&mut w, &conn, 2, &["a"], 2, 5_000).is_empty());
        // 1,001 ms later the first "a" is past the 1,000 ms cutoff.
        assert!(claim(&mut w, &conn, 1, &["a"], 3, 6_001).is_empty());
        assert_eq!(claim(&mut w, &conn, 1, &["a"], 4, 6_002), [(0, 3, 6_001)]);
    }

    #[test]
    fn an_entry_whose_row_is_another_key_is_not_a_duplicate() {
        let conn = db();
        let mut w = KeyWindow::default();
        claim(&mut w, &conn, 1, &["y"], 1, 5_000);
        // As if "x" hashed like "y": the row tells them apart.
        let h = w.hash(1, "x");
        w.current.insert(h, 1);
        assert!(claim(&mut w, &conn, 1, &["x"], 2, 5_000).is_empty());
        assert_eq!(claim(&mut w, &conn, 1, &["x"], 3, 5_000), [(0, 2, 5_000)]);
    }

    #[test]
    fn entries_of_a_rolled_back_claim_are_not_taken_for_duplicates() {
        let mut conn = db();
        let mut w = KeyWindow::default();
        let tx = conn.transaction().unwrap();
        claim(&mut w, &tx, 1, &["a", "b"], 10, 5_000);
        tx.rollback().unwrap();
        // The same sequences come again (the writer would load the window
        // again first; this checks the index does not trust them anyway).
        assert!(claim(&mut w, &conn, 1, &["a", "b", "a"], 10, 5_000) == [(2, 10, 5_000)]);
        assert!(claim(&mut w, &conn, 1, &["x", "b"], 12, 5_000) == [(1, 11, 5_000)]);
        assert_eq!(
            rows(&conn),
            [(10, "a".into()), (11, "b".into()), (12, "x".into())]
        );
    }

    #[test]
    fn past_the_bound_the_oldest_generation_goes_and_its_table_is_reused() {
        let conn = db();
        let mut w = KeyWindow::default();
        let window = Duration::from_secs(60);
        claim(&mut w, &conn, 1, &["a", "b"], 1, 5_000);
        w.expire(&conn, 5_000, window, 4).unwrap();
        assert_eq!((w.current.len(), w.previous.len()), (0, 2));
        claim(&mut w, &conn, 1, &["c", "d"], 3, 5_000);
        let table = w.previous.capacity();
        w.expire(&conn, 5_000, window, 4).unwrap();
        // A commit without keys purges.
        w.expire(&conn, 5_000, window, 4).unwrap();
        // "a" and "b" are forgotten, rows too; "c" and "d" still answer.
        assert_eq!((w.current.len(), w.previous.len()), (0, 2));
        assert_eq!(w.current.capacity(), table);
        assert_eq!(rows(&conn), [(3, "c".into()), (4, "d".into())]);
        assert!(claim(&mut w, &conn, 1, &["a"], 5, 5_000).is_empty());
        assert_eq!(claim(&mut w, &conn, 1, &["d"], 6, 5_000), [(0, 4, 5_000)]);
    }

    #[test]
    fn expired_keys_lose_their_rows_and_memory() {
        let conn = db();
        let mut w = KeyWindow::default();
        let window = Duration::from_secs(1);
        claim(&mut w, &conn, 1, &["a", "b"], 1, 5_000);
        claim(&mut w, &conn, 1, &["c"], 3, 6_500);
        w.expire(&conn, 6_200, window, 100).unwrap();
        w.expire(&conn, 6_200, window, 100).unwrap();
        assert_eq!(rows(&conn), [(3, "c".into())]);
        assert_eq!(
            w.len(),
            3,
            "a generation goes only when all its keys expired"
        );
        w.expire(&conn, 7_600, window, 100).unwrap();
        assert!(rows(&conn).is_empty());
        assert_eq!((w.len(), w.current.capacity()), (0, 0));
    }

    #[test]
    fn under_steady_keyed_commits_the_rows_stay_bounded() {
        let conn = db();
        let mut w = KeyWindow::default();
        let window = Duration::from_secs(60);
        let mut most = 0;
        for n in 1..=2_000u64 {
            claim(&mut w, &conn, 1, &[&format!("k{n}")], n, 5_000);
            w.expire(&conn, 5_000, window, 20).unwrap();
            most = most.max(rows(&conn).len());
        }
        assert!(w.len() <= 20);
        // At most the keys remembered, plus what awaits the next chunk.
        assert!(most <= 20 + 2 * PURGE_EVERY as usize, "{most} rows");
        assert_eq!(claim(&mut w, &conn, 1, &["k2000"], 2_001, 5_000).len(), 1);
    }

    #[test]
    fn load_reads_the_keys_back_within_the_bound() {
        let conn = db();
        let mut w = KeyWindow::default();
        claim(&mut w, &conn, 1, &["a", "b"], 1, 8_500);
        claim(&mut w, &conn, 1, &["c", "d"], 3, 8_500);
        claim(&mut w, &conn, 1, &["e"], 5, 8_500);
        let mut w = KeyWindow::load(&conn, 9_000, 4).unwrap();
        // Two full generations; "e" in the current one, "a" and "b" dropped
        // (their rows purged by the next expire).
        assert_eq!((w.current.len(), w.previous.len()), (1, 2));
        w.expire(&conn, 9_000, Duration::from_secs(60), 4).unwrap();
        assert_eq!(rows(&conn).len(), 3);
        assert_eq!(
            claim(&mut w, &conn, 1, &["c", "a"], 6, 9_000),
            [(0, 3, 8_500)]
        );
    }
}

#[cfg(test)]
mod packing {
    use super::*;

    #[test]
    fn keys_pack_and_unpack_to_the_same_pairs() {
        let long = "k".repeat(128);
        let keys = [(7, "a"), (9, long.as_str()), (1_000_007, "~!")];
        let mut blob = vec![9; 3];
        pack(&mut blob, 1_000_007, keys.into_iter());
        assert_eq!(unpack(1_000_007, &blob).collect::<Vec<_>>(), keys);
    }

    #[test]
    fn a_damaged_blob_yields_its_whole_entries_only() {
        let mut blob = Vec::new();
        pack(&mut blob, 10, [(9, "abc"), (10, "de")].into_iter());
        for cut in 0..blob.len() {
            let got: Vec<_> = unpack(10, &blob[..cut]).collect();
            let whole = if cut >= 9 { 1 } else { 0 };
            assert_eq!(got, [(9, "abc")][..whole], "cut at {cut}");
        }
        // An offset below sequence 0 ends the entries too.
        assert_eq!(unpack(0, &blob).count(), 0);
    }
}
