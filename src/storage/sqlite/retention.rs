//! `RetentionPolicy`: server-wide limits on how long and how much each topic
//! keeps (age, message count, payload bytes; all off by default), applied by
//! the writer between batches, oldest messages first, a bounded chunk per
//! topic per pass so publishing never waits behind a large deletion. Freed
//! pages are reused by later inserts (and, when the writer is idle, handed
//! back to the file system by incremental vacuum), so the database stops
//! growing under steady load.
//! Called only by the writer, on its connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::topic_row::TopicRow;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_age: Option<Duration>,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl RetentionPolicy {
    pub fn is_enabled(&self) -> bool {
        self.max_age.is_some() || self.max_messages.is_some() || self.max_bytes.is_some()
    }
}

/// A topic that lost messages: its name, the oldest message left
/// (sequence, ordinal, timestamp) and how many were removed.
pub type Trim = (Arc<str>, Option<(u64, u64, i64)>, u64);

/// One retention pass over every topic, deleting at most `chunk` messages
/// per topic, inside the caller's transaction (the writer runs it in a
/// commit it makes anyway, so it costs no fsync of its own). Returns what was trimmed and whether any
/// topic still has more to remove. `last_seq` keeps sequences from being
/// reused if the newest messages go.
pub fn apply(
    tx: &Connection,
    policy: &RetentionPolicy,
    topics: &mut HashMap<Arc<str>, TopicRow>,
    now_ms: i64,
    chunk: i64,
    last_seq: u64,
) -> rusqlite::Result<(Vec<Trim>, bool)> {
    let mut trims = Vec::new();
    let mut more = false;
    let cutoff_ms = policy
        .max_age
        .map(|a| now_ms.saturating_sub(a.as_millis() as i64));
    for (name, row) in topics.iter_mut() {
        let stored = (row.last_ordinal + 1).saturating_sub(row.first_ordinal);
        if stored == 0 {
            continue;
        }
        let excess_count = policy.max_messages.map_or(0, |m| stored.saturating_sub(m));
        let mut excess_bytes = policy.max_bytes.map_or(0, |m| row.bytes.saturating_sub(m));
        // Walk the oldest messages, deciding how far to cut.
        let mut oldest = tx.prepare_cached(
            "SELECT seq, ts, length(payload) FROM messages WHERE topic_id = ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = oldest.query(params![row.id, chunk])?;
        let (mut cut, mut removed, mut freed, mut seen) = (None, 0u64, 0u64, 0i64);
        while let Some(r) = rows.next()? {
            seen += 1;
            let (seq, ts, len): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let expired = cutoff_ms.is_some_and(|c| ts < c);
            if !(expired || removed < excess_count || excess_bytes > 0) {
                break;
            }
            cut = Some(seq);
            removed += 1;
            freed += len as u64;
            excess_bytes = excess_bytes.saturating_sub(len as u64);
        }
        drop(rows);
        drop(oldest);
        let Some(cut) = cut else { continue };
        if removed as i64 == seen && seen == chunk {
            more = true;
        }
        tx.prepare_cached("DELETE FROM messages WHERE topic_id = ?1 AND seq <= ?2")?
            .execute(params![row.id, cut])?;
        row.first_ordinal += removed;
        row.bytes = row.bytes.saturating_sub(freed);
        let first: Option<(u64, u64, i64)> = tx
            .prepare_cached(
                "SELECT seq, ordinal, ts FROM messages WHERE topic_id = ?1 ORDER BY seq LIMIT 1",
            )?
            .query_row([row.id], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get(2)?,
                ))
            })
            .optional()?;
        // Remember the newest ordinal in case every message of the topic went.
        tx.prepare_cached("UPDATE topics SET last_ordinal = ?2 WHERE id = ?1")?
            .execute(params![row.id, row.last_ordinal as i64])?;
        trims.push((name.clone(), first, removed));
    }
    if !trims.is_empty() {
        tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'seq_floor'")?
            .execute([last_seq as i64])?;
    }
    Ok((trims, more))
}
