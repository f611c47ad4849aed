//! `GroupCommit`: the writer thread. It owns the one SQLite write connection,
//! drains whatever requests queued while the previous commit ran (never
//! waiting on a timer to fill a batch), applies them in one transaction with
//! one fsync, then replies in order over a channel and wakes the reactor.
//!
//! It assigns each message its global sequence (never reused, continuing
//! after restart), its topic ordinal, the batch timestamp and its id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{encode_attributes, StorageError, Wake};
use crate::broker::{MessageId, StoredMessage};

/// A message as published, before it has a sequence.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub payload: Bytes,
    pub attributes: HashMap<String, String>,
}

/// Work for the writer.
#[derive(Debug)]
pub enum WriteRequest {
    /// Append messages to a topic (creating it), atomically.
    Append { token: u64, topic: Arc<str>, messages: Vec<NewMessage> },
    /// Make sure a topic exists.
    CreateTopic { topic: Arc<str>, created_at_ms: i64 },
    /// Store a group's cursor (its last acknowledged sequence).
    SetCursor { topic: Arc<str>, group: Arc<str>, sequence: u64, acked_at_ms: i64 },
}

impl WriteRequest {
    fn payload_bytes(&self) -> usize {
        match self {
            WriteRequest::Append { messages, .. } => messages.iter().map(|m| m.payload.len() + 64).sum(),
            _ => 64,
        }
    }
    fn message_count(&self) -> usize {
        match self {
            WriteRequest::Append { messages, .. } => messages.len(),
            _ => 1,
        }
    }
}

/// A committed append.
#[derive(Debug, Clone)]
pub struct Appended {
    pub topic: Arc<str>,
    pub created_at_ms: i64,
    pub timestamp_ms: i64,
    pub messages: Vec<Arc<StoredMessage>>,
}

/// What the writer reports back, in commit order.
#[derive(Debug)]
pub enum WriteOutcome {
    Appended { token: u64, result: Result<Appended, StorageError> },
    CursorSaved { topic: Arc<str>, group: Arc<str>, sequence: u64, ordinal: u64 },
}

/// Batch limits: a batch takes what is queued, up to these.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig { max_messages: 10_000, max_bytes: 16 << 20 }
    }
}

/// Counters the writer keeps for observers (metrics, benchmarks).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub messages: AtomicU64,
    pub commit_nanos: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct TopicRow {
    id: i64,
    created_at_ms: i64,
    last_ordinal: u64,
}

struct GroupCommit {
    conn: Connection,
    config: GroupCommitConfig,
    next_seq: u64,
    last_ts: i64,
    topics: HashMap<Arc<str>, TopicRow>,
    stats: Arc<WriterStats>,
}

/// Handle to a running writer thread.
pub struct Writer {
    pub requests: Sender<WriteRequest>,
    pub stats: Arc<WriterStats>,
    pub thread: JoinHandle<()>,
}

fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Starts the writer on `conn`. Requests queue in a channel of `capacity`;
/// outcomes go to `outcomes`, each batch followed by `wake()`. The thread
/// ends once every request sender is dropped and the queue is drained.
pub fn spawn(
    conn: Connection,
    config: GroupCommitConfig,
    capacity: usize,
    outcomes: Sender<WriteOutcome>,
    wake: Wake,
) -> Result<Writer, StorageError> {
    let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
    let stats = Arc::new(WriterStats::default());
    let mut gc = GroupCommit {
        conn,
        config,
        next_seq: 1,
        last_ts: 0,
        topics: HashMap::new(),
        stats: stats.clone(),
    };
    gc.reload().map_err(|e| StorageError::from_sqlite(&e))?;
    let thread = std::thread::Builder::new()
        .name("sluice-writer".into())
        .spawn(move || gc.run(rx, outcomes, wake))
        .map_err(|e| StorageError { disk_full: false, message: e.to_string() })?;
    Ok(Writer { requests: tx, stats, thread })
}

impl GroupCommit {
    /// (Re)reads the sequence counter and topic rows from the database.
    fn reload(&mut self) -> rusqlite::Result<()> {
        self.next_seq = super::schema::last_sequence(&self.conn)? + 1;
        self.topics.clear();
        let mut stmt = self.conn.prepare(super::schema::TOPIC_ROWS)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(1)?,
                TopicRow { id: r.get(0)?, created_at_ms: r.get(2)?, last_ordinal: r.get::<_, i64>(3)? as u64 },
            ))
        })?;
        for row in rows {
            let (name, t) = row?;
            self.topics.insert(name.into(), t);
        }
        Ok(())
    }

    fn run(mut self, rx: Receiver<WriteRequest>, outcomes: Sender<WriteOutcome>, wake: Wake) {
        let mut batch = Vec::new();
        while let Ok(first) = rx.recv() {
            let (mut count, mut bytes) = (first.message_count(), first.payload_bytes());
            batch.push(first);
            while count < self.config.max_messages && bytes < self.config.max_bytes {
                match rx.try_recv() {
                    Ok(req) => {
                        count += req.message_count();
                        bytes += req.payload_bytes();
                        batch.push(req);
                    }
                    Err(_) => break,
                }
            }
            for outcome in self.commit(&mut batch) {
                if outcomes.send(outcome).is_err() {
                    return;
                }
            }
            wake();
        }
        log::debug!("writer: request channel closed, exiting");
    }

    /// Applies a batch in one transaction; on failure every append in it
    /// fails and in-memory counters are re-read from the database.
    fn commit(&mut self, batch: &mut Vec<WriteRequest>) -> Vec<WriteOutcome> {
        let started = Instant::now();
        let ts = wall_ms().max(self.last_ts);
        let mut outcomes = Vec::with_capacity(batch.len());
        let result = self.apply(batch, ts, &mut outcomes);
        let elapsed = started.elapsed();
        match result {
            Ok(messages) => {
                self.last_ts = ts;
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.messages.fetch_add(messages, Ordering::Relaxed);
                self.stats.commit_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
                batch.clear();
                outcomes
            }
            Err(e) => {
                let err = StorageError::from_sqlite(&e);
                log::error!("writer: commit of {} requests failed: {e}", batch.len());
                if let Err(e) = self.reload() {
                    log::error!("writer: re-reading state after a failed commit failed: {e}");
                }
                batch
                    .drain(..)
                    .filter_map(|req| match req {
                        WriteRequest::Append { token, .. } => {
                            Some(WriteOutcome::Appended { token, result: Err(err.clone()) })
                        }
                        _ => None,
                    })
                    .collect()
            }
        }
    }

    fn apply(&mut self, batch: &[WriteRequest], ts: i64, out: &mut Vec<WriteOutcome>) -> rusqlite::Result<u64> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let mut appended = 0u64;
        for req in batch {
            match req {
                WriteRequest::Append { token, topic, messages } => {
                    let row = topic_row(&tx, &mut self.topics, topic, ts)?;
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO messages (seq, topic_id, ordinal, ts, payload, attributes)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?;
                    let mut stored = Vec::with_capacity(messages.len());
                    for m in messages {
                        let seq = self.next_seq;
                        let ordinal = row.last_ordinal + 1;
                        insert.execute(params![
                            seq as i64,
                            row.id,
                            ordinal as i64,
                            ts,
                            m.payload.as_ref(),
                            encode_attributes(&m.attributes)
                        ])?;
                        self.next_seq += 1;
                        row.last_ordinal = ordinal;
                        stored.push(Arc::new(StoredMessage {
                            sequence: seq,
                            ordinal,
                            id: MessageId::new(ts, seq, topic),
                            timestamp_ms: ts,
                            payload: m.payload.clone(),
                            attributes: m.attributes.clone(),
                        }));
                    }
                    appended += stored.len() as u64;
                    out.push(WriteOutcome::Appended {
                        token: *token,
                        result: Ok(Appended {
                            topic: topic.clone(),
                            created_at_ms: row.created_at_ms,
                            timestamp_ms: ts,
                            messages: stored,
                        }),
                    });
                }
                WriteRequest::CreateTopic { topic, created_at_ms } => {
                    topic_row(&tx, &mut self.topics, topic, *created_at_ms)?;
                }
                WriteRequest::SetCursor { topic, group, sequence, acked_at_ms } => {
                    let row = *topic_row(&tx, &mut self.topics, topic, ts)?;
                    let ordinal: u64 = tx
                        .prepare_cached(
                            "SELECT ordinal FROM messages WHERE topic_id = ?1 AND seq <= ?2 ORDER BY seq DESC LIMIT 1",
                        )?
                        .query_row(params![row.id, *sequence as i64], |r| r.get::<_, i64>(0))
                        .optional()?
                        .unwrap_or(0) as u64;
                    tx.prepare_cached(
                        "INSERT INTO cursors (topic_id, grp, seq, ordinal, acked_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (topic_id, grp) DO UPDATE SET seq = ?3, ordinal = ?4, acked_at = ?5",
                    )?
                    .execute(params![row.id, group.as_ref(), *sequence as i64, ordinal as i64, *acked_at_ms])?;
                    out.push(WriteOutcome::CursorSaved {
                        topic: topic.clone(),
                        group: group.clone(),
                        sequence: *sequence,
                        ordinal,
                    });
                }
            }
        }
        tx.commit()?;
        Ok(appended)
    }
}

/// The row of `topic`, inserting it (created at `created_at_ms`) if new.
fn topic_row<'a>(
    tx: &Connection,
    topics: &'a mut HashMap<Arc<str>, TopicRow>,
    topic: &Arc<str>,
    created_at_ms: i64,
) -> rusqlite::Result<&'a mut TopicRow> {
    if !topics.contains_key(topic) {
        tx.prepare_cached("INSERT INTO topics (name, created_at, last_ordinal) VALUES (?1, ?2, 0)")?
            .execute(params![topic.as_ref(), created_at_ms])?;
        let id = tx.last_insert_rowid();
        topics.insert(topic.clone(), TopicRow { id, created_at_ms, last_ordinal: 0 });
    }
    topics
        .get_mut(topic)
        .ok_or(rusqlite::Error::QueryReturnedNoRows)
}
