//! `KeyWindow`: the idempotency keys stored within the dedup window, for
//! the writer thread only.
//!
//! Their rows (`idempotency_keys`, appended in sequence order, no index)
//! make them durable; an in-memory index finds them: a hash of (topic, key)
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
//! about 50 bytes each with the tables' slack (measured: 1,000,000 keys,
//! 51 MB).
//!
//! Calls only SQLite, on the writer's connection and inside its
//! transaction.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::broker::MessageId;
use crate::storage::{Duplicate, NewMessage};

/// Key rows deleted per commit once expired or forgotten: more than a
/// commit inserts, so the table keeps up.
const PURGE_CHUNK: i64 = 4_096;
/// Key rows per multi-row INSERT.
const ROWS_PER_INSERT: usize = 16;

/// Hashes nothing: the index's keys are already keyed hashes.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are u64); kept correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Key hash -> the sequence of the message stored under it.
type Index = HashMap<u64, u64, BuildHasherDefault<Prehashed>>;

#[derive(Debug, Default)]
pub struct KeyWindow {
    hasher: RandomState,
    current: Index,
    previous: Index,
    /// The highest sequence in `current` and in `previous`.
    current_last: u64,
    previous_last: u64,
    /// Rows at or below this belong to a dropped generation: deleted a
    /// chunk per commit.
    purge_upto: u64,
    /// (stored at, highest sequence stored then), oldest first, one per
    /// second with keys.
    marks: VecDeque<(i64, u64)>,
}

impl KeyWindow {
    /// Reads the stored keys back (at start-up, or after a failed commit);
    /// `now_ms` starts their window over (a lookup also checks each key's
    /// own time). Past `max_keys` the oldest are dropped, as in `expire`.
    pub fn load(conn: &Connection, now_ms: i64, max_keys: u64) -> rusqlite::Result<KeyWindow> {
        let mut keys = KeyWindow::default();
        let mut stmt =
            conn.prepare("SELECT seq, topic_id, key FROM idempotency_keys ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        let mut newest = None;
        while let Some(r) = rows.next()? {
            let seq = r.get::<_, i64>(0)? as u64;
            let h = keys.hash(r.get(1)?, r.get_ref(2)?.as_str().unwrap_or(""));
            keys.current.insert(h, seq);
            keys.current_last = seq;
            keys.rotate_if_full(max_keys);
            newest = Some(seq);
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
        self.hasher.hash_one((topic_id, key))
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
        let mut fresh: Vec<(u64, &str)> = Vec::with_capacity(messages.len());
        let mut duplicates = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let Some(key) = m.idempotency_key.as_deref() else {
                continue;
            };
            let seq = base + i as u64;
            let h = self.hash(topic_id, key);
            let original = |original: u64| -> rusqlite::Result<Option<Duplicate>> {
                let stored_at = if original >= base {
                    // An earlier message of this call (its row is not
                    // written yet).
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
            match self.current.entry(h) {
                Entry::Occupied(mut e) => {
                    if let Some(d) = original(*e.get())? {
                        duplicates.push(d);
                        continue;
                    }
                    e.insert(seq);
                }
                Entry::Vacant(e) => {
                    if let Some(&older) = self.previous.get(&h) {
                        if let Some(d) = original(older)? {
                            duplicates.push(d);
                            continue;
                        }
                    }
                    e.insert(seq);
                }
            }
            self.current_last = self.current_last.max(seq);
            fresh.push((seq, key));
        }
        for chunk in fresh.chunks(ROWS_PER_INSERT) {
            let mut insert = tx.prepare_cached(insert_sql(chunk.len()))?;
            for (k, (seq, key)) in chunk.iter().enumerate() {
                insert.raw_bind_parameter(k * 4 + 1, *seq as i64)?;
                insert.raw_bind_parameter(k * 4 + 2, topic_id)?;
                insert.raw_bind_parameter(k * 4 + 3, *key)?;
                insert.raw_bind_parameter(k * 4 + 4, ts)?;
            }
            insert.raw_execute()?;
        }
        if let Some(&(last, _)) = fresh.last() {
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
                self.previous = Index::default();
            }
            if self.current_last <= seq {
                self.current = Index::default();
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
        if self.purge_upto > 0 {
            let n = tx
                .prepare_cached(
                    "DELETE FROM idempotency_keys WHERE seq IN \
                     (SELECT seq FROM idempotency_keys WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
                )?
                .execute(params![self.purge_upto as i64, PURGE_CHUNK])?;
            if (n as i64) < PURGE_CHUNK {
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
        recycled.clear();
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
        tx.prepare_cached("DELETE FROM idempotency_keys WHERE topic_id = ?1")?
            .execute([topic_id])?;
        Ok(())
    }
}

/// When the row of `seq` is key `key` of topic `topic_id` stored at or
/// after `cutoff`: the time it was stored. (This transaction's own rows are
/// visible to it.)
fn stored_at(
    tx: &Connection,
    seq: u64,
    topic_id: i64,
    key: &str,
    cutoff: i64,
) -> rusqlite::Result<Option<i64>> {
    let row: Option<(i64, String, i64)> = tx
        .prepare_cached("SELECT topic_id, key, ts FROM idempotency_keys WHERE seq = ?1")?
        .query_row([seq as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(row.and_then(|(t, k, at)| (t == topic_id && k == key && at >= cutoff).then_some(at)))
}

/// `INSERT … VALUES (…), …` for `n` idempotency keys.
fn insert_sql(n: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        (0..=ROWS_PER_INSERT)
            .map(|n| {
                let rows: Vec<String> = (0..n)
                    .map(|k| {
                        let b = k * 4;
                        format!("(?{}, ?{}, ?{}, ?{})", b + 1, b + 2, b + 3, b + 4)
                    })
                    .collect();
                format!(
                    "INSERT INTO idempotency_keys (seq, topic_id, key, ts) VALUES {}",
                    rows.join(", ")
                )
            })
            .collect()
    });
    &all[n.min(ROWS_PER_INSERT)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE idempotency_keys (
                seq INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL,
                key TEXT NOT NULL, ts INTEGER NOT NULL)",
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

    fn rows(conn: &Connection) -> Vec<(u64, String)> {
        let mut stmt = conn
            .prepare("SELECT seq, key FROM idempotency_keys ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
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
    fn load_reads_the_keys_back_within_the_bound() {
        let conn = db();
        let mut w = KeyWindow::default();
        claim(&mut w, &conn, 1, &["a", "b", "c", "d", "e"], 1, 8_500);
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
