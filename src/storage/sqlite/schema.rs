//! Opening the database: pragmas, versioned migrations (`PRAGMA
//! user_version`), and loading the state the broker starts from.
//! Returns the neutral `storage::LoadedState`; calls only SQLite.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::broker::{GroupDeliveries, GroupView, TopicView};
use crate::storage::LoadedState;

/// Schema migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    // 1: topics, messages (sequence = rowid), cursors. A commit writes only the
    // message rows: the last sequence and each topic's last ordinal are read
    // back from the messages; `meta.seq_floor` and `topics.last_ordinal` are
    // raised only when messages are deleted, so nothing is ever reused.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE topics (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        last_ordinal INTEGER NOT NULL DEFAULT 0
     );
     CREATE TABLE messages (
        seq INTEGER PRIMARY KEY,
        topic_id INTEGER NOT NULL,
        ordinal INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        payload BLOB NOT NULL,
        attributes BLOB
     );
     CREATE INDEX messages_by_topic ON messages(topic_id);
     CREATE TABLE cursors (
        topic_id INTEGER NOT NULL,
        grp TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ordinal INTEGER NOT NULL DEFAULT 0,
        acked_at INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (topic_id, grp)
     ) WITHOUT ROWID;
     INSERT INTO meta (key, value) VALUES ('seq_floor', 0);",
    // 2: deleted topics whose messages are still being purged in chunks.
    "CREATE TABLE doomed_topics (id INTEGER PRIMARY KEY);",
    // 3: idempotency keys (seq = the message stored under the key; rows go
    // oldest first), dead-letter
    // settings and delivery counts of groups, and the dead-lettered
    // messages above a group's cursor.
    "CREATE TABLE idempotency_keys (
        seq INTEGER PRIMARY KEY,
        topic_id INTEGER NOT NULL,
        key TEXT NOT NULL,
        ts INTEGER NOT NULL
     );
     CREATE UNIQUE INDEX idempotency_keys_by_key ON idempotency_keys(topic_id, key);
     ALTER TABLE cursors ADD COLUMN delivered_max INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE cursors ADD COLUMN max_deliveries INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE cursors ADD COLUMN dead_letter_topic TEXT;
     CREATE TABLE delivery_counts (
        topic_id INTEGER NOT NULL,
        grp TEXT NOT NULL,
        seq INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (topic_id, grp, seq)
     ) WITHOUT ROWID;
     CREATE TABLE dead_letters (
        topic_id INTEGER NOT NULL,
        grp TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ordinal INTEGER NOT NULL,
        PRIMARY KEY (topic_id, grp, seq)
     ) WITHOUT ROWID;",
    // 4: the writer indexes idempotency keys in memory (a hash of topic and
    // key); the table is only appended to and read back at start-up.
    "DROP INDEX IF EXISTS idempotency_keys_by_key;",
    // 5: idempotency keys packed a call per row (`key_window::pack`: per
    // key, 4 bytes of how far below the row's seq its sequence is, 2 of
    // length, both little endian, then the key); the single-key rows
    // convert as they are.
    "CREATE TABLE idempotency_key_sets (
        seq INTEGER PRIMARY KEY,
        topic_id INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        keys BLOB NOT NULL
     );
     INSERT INTO idempotency_key_sets (seq, topic_id, ts, keys)
        SELECT seq, topic_id, ts,
               CAST(unhex(printf('00000000%02X%02X', length(CAST(key AS BLOB)) & 255,
                                 length(CAST(key AS BLOB)) >> 8)) || key AS BLOB)
        FROM idempotency_keys;
     DROP TABLE idempotency_keys;",
];

pub const DB_FILE: &str = "sluice.db";

/// Page cache per connection, KiB: memory is bounded by design, and the hot
/// pages (the newest) are few.
const CACHE_KIB: i64 = 512;

fn tune(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

/// Opens (creating if needed) the write connection and migrates the schema.
/// `max_bytes` caps the database size: writes past it fail as "full".
pub fn open_writer(dir: &Path, max_bytes: Option<u64>) -> rusqlite::Result<Connection> {
    let conn = Connection::open(dir.join(DB_FILE))?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        // Must precede the first table to take effect.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Checkpoints run on the checkpointer's own connection, not in commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // After a checkpoint resets the WAL, truncate it back to this size.
    conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
    tune(&conn)?;
    if let Some(max) = max_bytes {
        let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        let pages = (max as i64 / page.max(512)).max(16);
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        log::info!("storage: applied schema migration {}", i + 1);
    }
    Ok(conn)
}

/// Refuses a database this process cannot write (read-only files, or a
/// read-only WAL or shared-memory file): better a clear error at start than
/// every publish failing later.
pub fn check_writable(conn: &Connection, dir: &Path) -> Result<(), String> {
    let readonly = conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true);
    let probe = if readonly {
        Err("the database was opened read-only".to_string())
    } else {
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .map_err(|e| e.to_string())
    };
    probe.map_err(|e| {
        format!(
            "the database in {} is not writable ({e}): check the permissions and owner of {DB_FILE}, \
             {DB_FILE}-wal and {DB_FILE}-shm for the user sluice runs as",
            dir.display()
        )
    })
}

/// Opens the checkpointer's connection (the schema must exist).
pub fn open_checkpointer(dir: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(dir.join(DB_FILE), OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    tune(&conn)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// Opens a read-only connection for a reader thread.
pub fn open_reader(dir: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        dir.join(DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    tune(&conn)?;
    Ok(conn)
}

/// Topic rows with their last ordinal: (id, name, created_at, last_ordinal).
pub const TOPIC_ROWS: &str = "SELECT t.id, t.name, t.created_at,
        max(t.last_ordinal, coalesce((SELECT m.ordinal FROM messages m WHERE m.topic_id = t.id ORDER BY m.seq DESC LIMIT 1), 0))
     FROM topics t ORDER BY t.name";

/// The highest sequence ever assigned (stored, or deleted since).
pub fn last_sequence(conn: &Connection) -> rusqlite::Result<u64> {
    let v: i64 = conn.query_row(
        "SELECT max((SELECT value FROM meta WHERE key = 'seq_floor'), coalesce((SELECT max(seq) FROM messages), 0))",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

/// Reads topics, their first/last messages and the group cursors.
pub fn load_state(conn: &Connection) -> rusqlite::Result<LoadedState> {
    let mut state = LoadedState {
        last_seq: last_sequence(conn)?,
        ..Default::default()
    };
    let mut topics = conn.prepare(TOPIC_ROWS)?;
    let mut edge = conn.prepare(
        "SELECT seq, ordinal, ts FROM messages WHERE seq = (SELECT min(seq) FROM messages WHERE topic_id = ?1)
         UNION ALL
         SELECT seq, ordinal, ts FROM messages WHERE seq = (SELECT max(seq) FROM messages WHERE topic_id = ?1)",
    )?;
    let rows: Vec<(i64, String, i64, i64)> = topics
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    for (id, name, created_at, last_ordinal) in rows {
        let ends: Vec<(i64, i64, i64)> = edge
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let (first, last) = match ends.as_slice() {
            [f, l] => (*f, *l),
            _ => ((0, last_ordinal + 1, 0), (0, last_ordinal, 0)),
        };
        state.topics.push(TopicView {
            name: name.as_str().into(),
            created_at_ms: created_at,
            first_seq: first.0 as u64,
            first_ordinal: first.1 as u64,
            first_ts: first.2,
            last_seq: last.0 as u64,
            last_ordinal: last_ordinal as u64,
            last_ts: last.2,
        });
    }
    let mut cursors = conn.prepare(
        "SELECT t.name, c.grp, c.seq, c.ordinal, c.acked_at FROM cursors c JOIN topics t ON t.id = c.topic_id",
    )?;
    state.groups = cursors
        .query_map([], |r| {
            let topic: String = r.get(0)?;
            let group: String = r.get(1)?;
            Ok((
                topic,
                GroupView {
                    name: group.as_str().into(),
                    cursor: r.get::<_, i64>(2)? as u64,
                    cursor_ordinal: r.get::<_, i64>(3)? as u64,
                    last_ack_ms: r.get(4)?,
                },
            ))
        })?
        .collect::<Result<_, _>>()?;
    state.deliveries = load_deliveries(conn)?;
    Ok(state)
}

/// Dead-letter settings, delivery counts and dead-lettered messages of the
/// groups that have any (above their cursors).
fn load_deliveries(
    conn: &Connection,
) -> rusqlite::Result<Vec<(String, std::sync::Arc<str>, GroupDeliveries)>> {
    let mut groups = conn.prepare(
        "SELECT t.name, c.grp, c.topic_id, c.seq, c.delivered_max, c.max_deliveries, c.dead_letter_topic
         FROM cursors c JOIN topics t ON t.id = c.topic_id
         WHERE c.delivered_max > 0 OR c.max_deliveries > 0
            OR EXISTS (SELECT 1 FROM dead_letters d WHERE d.topic_id = c.topic_id AND d.grp = c.grp)",
    )?;
    type Row = (String, String, i64, i64, i64, i64, Option<String>);
    let rows: Vec<Row> = groups
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut counts = conn.prepare(
        "SELECT seq, count FROM delivery_counts WHERE topic_id = ?1 AND grp = ?2 AND seq > ?3",
    )?;
    let mut dead = conn.prepare(
        "SELECT seq, ordinal FROM dead_letters WHERE topic_id = ?1 AND grp = ?2 AND seq > ?3",
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (topic, group, id, cursor, delivered_max, max_deliveries, dlq) in rows {
        let args = rusqlite::params![id, group, cursor];
        out.push((
            topic,
            group.as_str().into(),
            GroupDeliveries {
                max_deliveries: max_deliveries.clamp(0, i64::from(u32::MAX)) as u32,
                dead_letter_topic: dlq.map(|d| d.as_str().into()),
                delivered_max: delivered_max.max(0) as u64,
                counts: counts
                    .query_map(args, |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, i64>(1)?.clamp(0, i64::from(u32::MAX)) as u32,
                        ))
                    })?
                    .collect::<Result<_, _>>()?,
                dead: dead
                    .query_map(args, |r| {
                        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                    })?
                    .collect::<Result<_, _>>()?,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_5_packs_the_single_key_rows() {
        let dir = std::env::temp_dir().join(format!("sluice-schema-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        for sql in &MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        let long = "x".repeat(128);
        for (seq, key) in [(3, "a"), (8, long.as_str())] {
            conn.execute(
                "INSERT INTO idempotency_keys (seq, topic_id, key, ts) VALUES (?1, 1, ?2, 5)",
                rusqlite::params![seq, key],
            )
            .unwrap();
        }
        drop(conn);
        let conn = open_writer(&dir, None).unwrap();
        let mut stmt = conn
            .prepare("SELECT seq, topic_id, ts, keys FROM idempotency_key_sets ORDER BY seq")
            .unwrap();
        let rows: Vec<(i64, i64, i64, Vec<u8>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut want_long = vec![0, 0, 0, 0, 128, 0];
        want_long.extend_from_slice(long.as_bytes());
        assert_eq!(
            rows,
            [
                (3, 1, 5, vec![0, 0, 0, 0, 1, 0, b'a']),
                (8, 1, 5, want_long)
            ]
        );
        drop(stmt);
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
