//! `GroupCommit`: the writer thread. It owns the one SQLite write connection,
//! drains whatever requests queued while the previous commit ran (never
//! waiting on a timer to fill a batch), applies them in one transaction with
//! one fsync, then replies in order over a channel and wakes the reactor.
//!
//! It assigns each message its global sequence (never reused, continuing
//! after restart), its topic ordinal, the batch timestamp and its id. Between
//! batches it does bounded housekeeping: purging deleted topics and applying
//! retention a chunk at a time, so neither ever stalls publishing, and when
//! nothing is queued a short checkpoint that keeps the WAL small.
//!
//! May call `schema`, `retention`, `high_water`, `key_window`, `broker` types and
//! `telemetry`; speaks `storage::interface` types to the reactor.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::checkpointer::WalLink;
use super::encode_attributes;
use super::high_water::HighWaterMark;
use super::key_window::KeyWindow;
use super::retention::{self, RetentionPolicy};
use super::topic_row::TopicRow;
use crate::broker::{MessageId, StoredMessage};
use crate::storage::{
    Appended, NewMessage, StorageError, Wake, WakeOnExit, WriteOutcome, WriteRequest,
};
use crate::telemetry::Telemetry;

/// Rows deleted per transaction when purging a deleted topic.
const PURGE_CHUNK: i64 = 2_000;
/// Rows retention deletes per topic per pass (small: it rides in commits).
const RETENTION_CHUNK: i64 = 500;

/// Rows per multi-row INSERT.
const ROWS_PER_INSERT: usize = 16;
/// How long the writer keeps polling for the next request after answering a
/// small batch, before it sleeps. Waking a sleeping thread costs ≈ 25 µs on
/// the VMs we measure on, a sixth of a durable round trip, and a lone
/// publisher's next request arrives ≈ 80 µs after its reply.
const SPIN_FOR: Duration = Duration::from_micros(150);
/// Only after batches this small: behind big ones the reactor is busy
/// decoding and needs the CPU more than the writer needs a fast wake-up.
const SPIN_MAX_MESSAGES: usize = 4;

const SINGLE_ROW_INSERT: &str =
    "INSERT INTO messages (seq, topic_id, ordinal, ts, payload, attributes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// `INSERT ... VALUES (...), (...), ...` for `ROWS_PER_INSERT` rows.
fn multi_row_insert() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let rows: Vec<String> = (0..ROWS_PER_INSERT)
            .map(|k| {
                let b = k * 6;
                format!(
                    "(?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6
                )
            })
            .collect();
        format!(
            "INSERT OR FAIL INTO messages (seq, topic_id, ordinal, ts, payload, attributes) VALUES {}",
            rows.join(", ")
        )
    })
}

impl WriteRequest {
    fn payload_bytes(&self) -> usize {
        match self {
            WriteRequest::Append { messages, .. } => {
                messages.iter().map(|m| m.payload.len() + 64).sum()
            }
            WriteRequest::DeadLetter { message, .. } => message.payload.len() + 64,
            _ => 64,
        }
    }
    fn message_count(&self) -> usize {
        match self {
            WriteRequest::Append { messages, .. } => messages.len(),
            _ => 1,
        }
    }
    /// Messages it stores (each takes a sequence) and their payload bytes.
    fn stores(&self) -> (u64, u64) {
        match self {
            WriteRequest::Append { messages, .. } => (
                messages.len() as u64,
                messages.iter().map(|m| m.payload.len() as u64).sum(),
            ),
            WriteRequest::DeadLetter { message, .. } => (1, message.payload.len() as u64),
            _ => (0, 0),
        }
    }
}

/// Commits at least this slow are logged at debug level (with how much
/// of it the COMMIT itself took), to line them up with latency spikes.
const SLOW_COMMIT: Duration = Duration::from_millis(1);

/// Batch limits: a batch takes what is queued, up to these.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub retention: RetentionPolicy,
    /// `--max-db-bytes`: appends are refused once the database and its WAL
    /// together would pass this.
    pub max_store_bytes: Option<u64>,
    /// Requests queued before the reactor must park them.
    pub queue: usize,
    /// How long an idempotency key is remembered (`--dedup-window`).
    pub dedup_window: Duration,
    /// Most keys remembered; past it the oldest are forgotten early
    /// (`--dedup-max-keys`).
    pub dedup_max_keys: u64,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig {
            max_messages: 10_000,
            max_bytes: 16 << 20,
            retention: RetentionPolicy::default(),
            max_store_bytes: None,
            queue: 4096,
            dedup_window: Duration::from_secs(120),
            dedup_max_keys: 1_000_000,
        }
    }
}

/// Polls `rx` for up to `SPIN_FOR`, yielding the CPU between polls so a
/// runnable thread on this core goes first. `Err` when the channel closed.
fn poll_briefly(rx: &Receiver<WriteRequest>) -> Result<Option<WriteRequest>, ()> {
    let until = Instant::now() + SPIN_FOR;
    loop {
        match rx.try_recv() {
            Ok(r) => return Ok(Some(r)),
            Err(TryRecvError::Disconnected) => return Err(()),
            Err(TryRecvError::Empty) if Instant::now() >= until => return Ok(None),
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
}

/// How soon writes a failed batch carried over are tried again when nothing
/// else arrives.
const CARRY_RETRY: Duration = Duration::from_secs(1);

/// Sends a batch's outcomes, waking the reactor before blocking on a full
/// channel. False once the reactor has gone (its receiver dropped).
fn send_outcomes(outcomes: &Sender<WriteOutcome>, out: Vec<WriteOutcome>, wake: &Wake) -> bool {
    for outcome in out {
        if !crate::storage::send_waking(outcomes, wake, outcome) {
            return false;
        }
    }
    wake();
    true
}

/// The writer checkpoints by itself when it has nothing queued and this many
/// commits, or this many payload bytes, went into the WAL since it last did.
const IDLE_CHECKPOINT_COMMITS: u64 = 100;
const IDLE_CHECKPOINT_BYTES: usize = 256 << 10;

/// The checkpointer is signalled once this many payload bytes were
/// committed since the last signal: under heavy load every few
/// milliseconds, at a trickle rarely (a pass per commit would put a database
/// fsync beside every commit: `bench/RESULTS.md`, session 7).
const CHECKPOINT_SIGNAL_BYTES: usize = 512 << 10;

struct GroupCommit {
    conn: Connection,
    config: GroupCommitConfig,
    next_seq: u64,
    /// Sequences below this are never handed out again (the high-water
    /// mark's ceiling at start-up, + 1).
    min_next_seq: u64,
    /// The highest sequence known committed.
    last_committed: u64,
    hwm: HighWaterMark,
    /// Requests without a caller (topic creations, acked cursors) whose batch
    /// failed: retried first in the next batch, one per topic or group.
    carry: Vec<WriteRequest>,
    last_ts: i64,
    topics: HashMap<Arc<str>, TopicRow>,
    /// Ids of deleted topics whose messages are still being purged.
    doomed: VecDeque<i64>,
    next_retention: Instant,
    next_vacuum: Instant,

    telemetry: Arc<Telemetry>,
    /// To and from the checkpointer: see `wrap_wal`.
    wal: WalLink,
    /// Payload bytes committed since the checkpointer was last signalled.
    since_kick: usize,
    /// What was committed since this connection last checkpointed.
    unchecked: WalDebt,
    keys: KeyWindow,
    /// Set while `keys` may not match the database (a failed commit whose
    /// `reload` failed too): the next commit loads them first.
    keys_stale: bool,
    /// How long the last batch's COMMIT took (its WAL writes and fsync).
    commit_wait: Duration,
}

/// Commits and payload bytes written to the WAL since the writer last
/// checkpointed it.
#[derive(Debug, Default, Clone, Copy)]
struct WalDebt {
    commits: u64,
    bytes: usize,
}

impl WalDebt {
    /// Small enough that the checkpoint it takes is short (≈ 0.3 ms here),
    /// big enough that most commits pay nothing for it.
    fn due(&self) -> bool {
        self.commits >= IDLE_CHECKPOINT_COMMITS || self.bytes >= IDLE_CHECKPOINT_BYTES
    }
}

/// Handle to a running writer thread.
pub struct Writer {
    pub requests: Sender<WriteRequest>,
    pub thread: JoinHandle<()>,
}

/// Starts the writer on `conn`. Requests queue in a channel of `config.queue`;
/// outcomes go to `outcomes`, each batch followed by `wake()`. The thread
/// ends once every request sender is dropped and the queue is drained.
pub fn spawn(
    conn: Connection,
    config: GroupCommitConfig,
    outcomes: Sender<WriteOutcome>,
    wake: Wake,
    telemetry: Arc<Telemetry>,
    wal: WalLink,
    hwm: HighWaterMark,
) -> Result<Writer, StorageError> {
    let (tx, rx) = crossbeam_channel::bounded(config.queue.max(1));
    let gc = GroupCommit::new(conn, config, telemetry, wal, hwm)?;
    let thread = std::thread::Builder::new()
        .name("sluice-writer".into())
        .spawn(move || {
            let _exit = WakeOnExit(wake.clone());
            gc.run(rx, outcomes, wake)
        })
        .map_err(|e| StorageError::new(e.to_string()))?;
    Ok(Writer {
        requests: tx,
        thread,
    })
}

impl GroupCommit {
    fn new(
        conn: Connection,
        config: GroupCommitConfig,
        telemetry: Arc<Telemetry>,
        wal: WalLink,
        hwm: HighWaterMark,
    ) -> Result<GroupCommit, StorageError> {
        let mut gc = GroupCommit {
            conn,
            config,
            next_seq: 1,
            min_next_seq: hwm.ceiling() + 1,
            last_committed: 0,
            hwm,
            carry: Vec::new(),
            last_ts: 0,
            topics: HashMap::new(),
            doomed: VecDeque::new(),
            next_retention: Instant::now(),
            next_vacuum: Instant::now(),
            telemetry,
            wal,
            since_kick: 0,
            unchecked: WalDebt::default(),
            commit_wait: Duration::ZERO,
            keys: KeyWindow::default(),
            keys_stale: true,
        };
        gc.reload().map_err(|e| StorageError::from_sqlite(&e))?;
        gc.last_committed =
            super::schema::last_sequence(&gc.conn).map_err(|e| StorageError::from_sqlite(&e))?;
        Ok(gc)
    }

    /// (Re)reads counters and topic rows from the database.
    fn reload(&mut self) -> rusqlite::Result<()> {
        // Until the keys are read back, the next commit reads them first:
        // the index may hold keys of the transaction that failed.
        self.keys_stale = true;
        self.next_seq = (super::schema::last_sequence(&self.conn)? + 1).max(self.min_next_seq);
        self.topics.clear();
        let track_bytes = self.config.retention.max_bytes.is_some();
        let mut stmt = self.conn.prepare(super::schema::TOPIC_ROWS)?;
        let rows: Vec<(String, i64, i64, i64)> = stmt
            .query_map([], |r| Ok((r.get(1)?, r.get(0)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        for (name, id, created_at_ms, last_ordinal) in rows {
            let last_ordinal = last_ordinal as u64;
            let first_ordinal: Option<i64> = self
                .conn
                .query_row(
                    "SELECT ordinal FROM messages WHERE topic_id = ?1 ORDER BY seq LIMIT 1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let bytes: i64 = if track_bytes {
                self.conn.query_row(
                    "SELECT coalesce(sum(length(payload)), 0) FROM messages WHERE topic_id = ?1",
                    [id],
                    |r| r.get(0),
                )?
            } else {
                0
            };
            self.topics.insert(
                name.into(),
                TopicRow {
                    id,
                    created_at_ms,
                    last_ordinal,
                    first_ordinal: first_ordinal.map_or(last_ordinal + 1, |o| o as u64),
                    bytes: bytes as u64,
                },
            );
        }
        let mut stmt = self.conn.prepare("SELECT id FROM doomed_topics")?;
        self.doomed = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        self.keys = KeyWindow::load(
            &self.conn,
            crate::storage::wall_ms(),
            self.config.dedup_max_keys,
        )?;
        self.keys_stale = false;
        Ok(())
    }

    fn run(mut self, rx: Receiver<WriteRequest>, outcomes: Sender<WriteOutcome>, wake: Wake) {
        let mut batch = Vec::new();
        let mut spin_next = false;
        // Set once the reactor is gone (shutdown): queued requests are still
        // committed, their outcomes dropped.
        let mut orphaned = false;
        let mut closed = false;
        while !closed {
            let spun = if spin_next {
                match poll_briefly(&rx) {
                    Err(()) => {
                        closed = true;
                        None
                    }
                    Ok(r) => r,
                }
            } else {
                None
            };
            // Block for work only when there is no housekeeping to do.
            let first = if spun.is_some() || closed {
                spun
            } else if !self.doomed.is_empty() {
                match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        None
                    }
                }
            } else if self.config.retention.is_enabled() || !self.carry.is_empty() {
                let mut wait = if self.config.retention.is_enabled() {
                    self.next_retention
                        .saturating_duration_since(Instant::now())
                } else {
                    CARRY_RETRY
                };
                if !self.carry.is_empty() {
                    wait = wait.min(CARRY_RETRY);
                }
                match rx.recv_timeout(wait) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        None
                    }
                }
            } else {
                match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => {
                        closed = true;
                        None
                    }
                }
            };
            let mut out = Vec::new();
            spin_next = false;
            if let Some(first) = first {
                batch.push(first);
            }
            if !batch.is_empty() || !self.carry.is_empty() {
                let mut count: usize = batch.iter().map(WriteRequest::message_count).sum();
                let mut bytes: usize = batch.iter().map(WriteRequest::payload_bytes).sum();
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
                // Spin next time only after a small batch of publishes (not
                // after cursor writes: a draining consumer's reactor is busy).
                spin_next = count <= SPIN_MAX_MESSAGES
                    && batch
                        .iter()
                        .any(|r| matches!(r, WriteRequest::Append { .. }));
                out = self.commit_with_carry(&mut batch);
                self.since_kick += bytes;
                if self.since_kick >= CHECKPOINT_SIGNAL_BYTES {
                    self.since_kick = 0;
                    self.wal.committed();
                }
                self.unchecked.commits += 1;
                self.unchecked.bytes += bytes;
            }
            self.housekeeping(&mut out);
            if !out.is_empty() {
                if !orphaned {
                    orphaned = !send_outcomes(&outcomes, out, &wake);
                }
                self.wrap_wal();
                if rx.is_empty() {
                    self.checkpoint_when_idle();
                }
            }
        }
        if !self.carry.is_empty() {
            log::error!(
                "writer: {} topic creations or cursor writes could not be committed before exit",
                self.carry.len()
            );
        }
        // A clean stop: nothing above the last committed sequence was given out.
        let ceiling = self.last_committed.max(self.min_next_seq - 1);
        if let Err(e) = self.hwm.close(ceiling, self.last_committed) {
            log::warn!("writer: cannot record the high-water mark at exit: {e}");
        }
        log::debug!("writer: request channel closed and drained, exiting");
    }

    /// Once the WAL has grown (the checkpointer says so) and this batch's
    /// replies are out, finish the checkpoint from here: no write can race
    /// it, so it completes, and the next commit starts the WAL from its
    /// beginning again. The checkpointer copied most frames already, so this
    /// is short; it keeps the WAL small and reused in place.
    fn wrap_wal(&mut self) {
        if self.wal.take_wrap() {
            self.checkpoint();
        }
    }

    /// With nothing queued, copy the WAL back into the database from here
    /// once enough went into it. No write can race the writer's own
    /// checkpoint, so it completes and the next commit starts the WAL from
    /// its beginning again: the WAL stays small and is rewritten in place,
    /// and the checkpointer thread, whose I/O competes with commits, finds
    /// little left to do unless publishing never pauses.
    fn checkpoint_when_idle(&mut self) {
        if self.unchecked.due() {
            self.checkpoint();
        }
    }

    /// A checkpoint on the write connection: it always completes.
    fn checkpoint(&mut self) {
        self.unchecked = WalDebt::default();
        if let Err(e) = super::checkpointer::checkpoint(&self.conn, "PASSIVE") {
            crate::log_limited!(log::Level::Warn, "writer: checkpoint failed: {e}");
        }
    }

    /// One bounded step of purging deleted topics, and retention when due.
    fn housekeeping(&mut self, out: &mut Vec<WriteOutcome>) {
        if let Some(&id) = self.doomed.front() {
            match self.purge_chunk(id) {
                Ok(true) => {
                    self.doomed.pop_front();
                }
                Ok(false) => {}
                Err(e) => {
                    crate::log_limited!(
                        log::Level::Error,
                        "writer: purging deleted topic {id} failed: {e}"
                    );
                    // Do not spin on a failing purge: retry later.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        if self.retention_due() {
            // Trims are reported only once committed.
            let mut trims = Vec::new();
            let result =
                rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
                    .and_then(|tx| {
                        Self::run_retention(
                            &tx,
                            &self.config.retention,
                            &mut self.topics,
                            self.next_seq - 1,
                            &mut self.next_retention,
                            &mut trims,
                        )?;
                        tx.commit()
                    });
            match result {
                Ok(()) => out.append(&mut trims),
                Err(e) => {
                    crate::log_limited!(log::Level::Error, "writer: retention failed: {e}");
                    self.next_retention = Instant::now() + Duration::from_secs(5);
                    if let Err(e) = self.reload() {
                        crate::log_limited!(
                            log::Level::Error,
                            "writer: re-reading state failed: {e}"
                        );
                    }
                }
            }
        } else if Instant::now() >= self.next_vacuum {
            // Idle: hand some free pages back to the file system.
            self.next_vacuum = Instant::now() + Duration::from_secs(30);
            let vacuum = self
                .conn
                .prepare_cached("PRAGMA incremental_vacuum(512)")
                .and_then(|mut st| {
                    let mut rows = st.query([])?;
                    while rows.next()?.is_some() {}
                    Ok(())
                });
            if let Err(e) = vacuum {
                crate::log_limited!(log::Level::Warn, "writer: incremental vacuum failed: {e}");
            }
        }
    }

    fn retention_due(&self) -> bool {
        self.config.retention.is_enabled() && Instant::now() >= self.next_retention
    }

    /// One retention pass in the open transaction `tx`.
    fn run_retention(
        tx: &Connection,
        policy: &RetentionPolicy,
        topics: &mut HashMap<Arc<str>, TopicRow>,
        last_seq: u64,
        next_retention: &mut Instant,
        out: &mut Vec<WriteOutcome>,
    ) -> rusqlite::Result<()> {
        let (trimmed, more) = retention::apply(
            tx,
            policy,
            topics,
            crate::storage::wall_ms(),
            RETENTION_CHUNK,
            last_seq,
        )?;
        for (topic, first, removed) in trimmed {
            out.push(WriteOutcome::Trimmed {
                topic,
                first,
                removed,
            });
        }
        // Come back soon while a pass was cut short.
        let pause = if more {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(500)
        };
        *next_retention = Instant::now() + pause;
        Ok(())
    }

    /// Deletes up to a chunk of a deleted topic's messages; true when none are left.
    fn purge_chunk(&mut self, id: i64) -> rusqlite::Result<bool> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE topic_id = ?1 ORDER BY seq LIMIT ?2)",
            params![id, PURGE_CHUNK],
        )?;
        let done = (n as i64) < PURGE_CHUNK;
        if done {
            tx.execute("DELETE FROM doomed_topics WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(done)
    }

    /// Applies a batch in one transaction; on failure every call in it fails,
    /// writes without a caller are carried to the next batch, and in-memory
    /// counters are re-read from the database.
    fn commit(&mut self, batch: &mut Vec<WriteRequest>) -> Vec<WriteOutcome> {
        if crate::failpoint::hit("writer-panic") {
            panic!("failpoint writer-panic");
        }
        let started = Instant::now();
        let ts = crate::storage::wall_ms().max(self.last_ts);
        let mut outcomes = Vec::with_capacity(batch.len());
        let messages: u64 = batch.iter().map(|r| r.stores().0).sum();
        let payload: u64 = batch.iter().map(|r| r.stores().1).sum();
        // Within the size cap, then sequences reserved durably before any is used.
        let reserved = self.check_cap(payload).and_then(|()| {
            self.hwm
                .reserve(self.next_seq - 1 + messages, self.last_committed)
                .map_err(|e| StorageError {
                    disk_full: e.raw_os_error() == Some(28), // ENOSPC
                    ..StorageError::new(format!(
                        "cannot reserve sequences in the high-water mark: {e}"
                    ))
                })
        });
        if let Err(err) = reserved {
            // Only the appends are refused: deletes (which make room) and
            // cursor writes in the same batch still go in.
            crate::log_limited!(
                log::Level::Error,
                "writer: appends refused: {}",
                err.message
            );
            let (appends, rest): (Vec<_>, Vec<_>) = batch.drain(..).partition(|r| r.stores().0 > 0);
            let mut out: Vec<WriteOutcome> = appends
                .into_iter()
                .filter_map(|r| match r {
                    WriteRequest::Append { token, topic, .. } => Some(WriteOutcome::Appended {
                        token,
                        topic,
                        result: Err(err.clone()),
                    }),
                    WriteRequest::DeadLetter {
                        topic,
                        group,
                        sequence,
                        ..
                    } => Some(WriteOutcome::DeadLettered {
                        topic,
                        group,
                        sequence,
                        advanced: false,
                        result: Err(err.clone()),
                    }),
                    _ => None,
                })
                .collect();
            *batch = rest;
            if !batch.is_empty() {
                out.extend(self.commit(batch));
            }
            return out;
        }
        let result = self.apply(batch, ts, &mut outcomes).map_err(|e| {
            let mut err = StorageError::from_sqlite(&e);
            if err.disk_full {
                if let Some(cap) = self.config.max_store_bytes {
                    err.message = format!(
                        "the --max-db-bytes cap of {cap} bytes is reached, or the disk is full ({})",
                        err.message
                    );
                }
            }
            err
        });
        let elapsed = started.elapsed();
        match result {
            Ok(messages) => {
                self.last_ts = ts;
                self.last_committed = self.next_seq - 1;
                if messages > 0 {
                    self.telemetry.metrics().committed(messages, elapsed);
                }
                if elapsed >= SLOW_COMMIT {
                    log::debug!(
                        "writer: slow commit: {} requests, {messages} messages in {:.2} ms, \
                         {:.2} ms of it in COMMIT (WAL writes and fsync)",
                        batch.len(),
                        elapsed.as_secs_f64() * 1e3,
                        self.commit_wait.as_secs_f64() * 1e3
                    );
                }
                batch.clear();
                outcomes
            }
            Err(err) => {
                crate::log_limited!(
                    log::Level::Error,
                    "writer: commit of {} requests failed: {}",
                    batch.len(),
                    err.message
                );
                if let Err(e) = self.reload() {
                    crate::log_limited!(
                        log::Level::Error,
                        "writer: re-reading state after a failed commit failed: {e}"
                    );
                }
                let mut failed = Vec::new();
                for req in batch.drain(..) {
                    match req {
                        WriteRequest::Append { token, topic, .. } => {
                            failed.push(WriteOutcome::Appended {
                                token,
                                topic,
                                result: Err(err.clone()),
                            })
                        }
                        WriteRequest::DeleteTopic { token, topic } => {
                            failed.push(WriteOutcome::TopicDeleted {
                                token,
                                topic,
                                result: Err(err.clone()),
                            })
                        }
                        WriteRequest::DeleteGroup {
                            token,
                            topic,
                            group,
                        } => failed.push(WriteOutcome::GroupDeleted {
                            token,
                            topic,
                            group,
                            result: Err(err.clone()),
                        }),
                        WriteRequest::SetCursor {
                            token: Some(token),
                            topic,
                            group,
                            ..
                        } => failed.push(WriteOutcome::CursorFailed {
                            token,
                            topic,
                            group,
                            error: err.clone(),
                        }),
                        WriteRequest::DeadLetter {
                            topic,
                            group,
                            sequence,
                            ..
                        } => failed.push(WriteOutcome::DeadLettered {
                            topic,
                            group,
                            sequence,
                            advanced: false,
                            result: Err(err.clone()),
                        }),
                        carried => self.carry_over(carried),
                    }
                }
                failed
            }
        }
    }

    /// Refuses `payload` more bytes of appends when the database and its WAL
    /// would pass `--max-db-bytes` (deletes and cursor writes still pass, so
    /// an operator can make room).
    fn check_cap(&self, payload: u64) -> Result<(), StorageError> {
        let (Some(cap), true) = (self.config.max_store_bytes, payload > 0) else {
            return Ok(());
        };
        let Some(db) = self.conn.path().map(std::path::PathBuf::from) else {
            return Ok(());
        };
        let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let used = size(&db) + size(std::path::Path::new(&wal));
        if used + payload > cap {
            return Err(StorageError {
                disk_full: true,
                corrupt: false,
                unavailable: false,
                too_large: false,
                message: format!(
                    "the --max-db-bytes cap of {cap} bytes is reached (database and WAL hold {used} bytes); \
                     delete topics or set retention to make room"
                ),
            });
        }
        Ok(())
    }

    /// Commits what a failed batch left behind (in its own transaction, so
    /// a write that keeps failing never takes new batches down with it),
    /// then `batch`.
    fn commit_with_carry(&mut self, batch: &mut Vec<WriteRequest>) -> Vec<WriteOutcome> {
        let mut out = Vec::new();
        if !self.carry.is_empty() {
            let mut carried = std::mem::take(&mut self.carry);
            out = self.commit(&mut carried);
            if !self.carry.is_empty() {
                crate::log_limited!(
                    log::Level::Error,
                    "writer: {} carried topic creations or cursor writes failed again",
                    self.carry.len()
                );
            }
        }
        if !batch.is_empty() {
            out.extend(self.commit(batch));
        }
        out
    }

    /// Keeps a caller-less write of a failed batch for the next one: the
    /// latest cursor per group, one creation per topic.
    fn carry_over(&mut self, req: WriteRequest) {
        let same = |old: &WriteRequest| match (old, &req) {
            (
                WriteRequest::SetCursor {
                    topic: t1,
                    group: g1,
                    ..
                },
                WriteRequest::SetCursor {
                    topic: t2,
                    group: g2,
                    ..
                },
            ) => t1 == t2 && g1 == g2,
            (
                WriteRequest::CreateTopic { topic: t1, .. },
                WriteRequest::CreateTopic { topic: t2, .. },
            ) => t1 == t2,
            (
                WriteRequest::SetDeliveries {
                    topic: t1,
                    group: g1,
                    ..
                },
                WriteRequest::SetDeliveries {
                    topic: t2,
                    group: g2,
                    ..
                },
            )
            | (
                WriteRequest::SetPolicy {
                    topic: t1,
                    group: g1,
                    ..
                },
                WriteRequest::SetPolicy {
                    topic: t2,
                    group: g2,
                    ..
                },
            ) => t1 == t2 && g1 == g2,
            _ => false,
        };
        if let Some(i) = self.carry.iter().position(same) {
            if !matches!(req, WriteRequest::CreateTopic { .. }) {
                self.carry[i] = req;
            }
        } else {
            self.carry.push(req);
        }
    }

    fn apply(
        &mut self,
        batch: &[WriteRequest],
        ts: i64,
        out: &mut Vec<WriteOutcome>,
    ) -> rusqlite::Result<u64> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        if self.config.retention.is_enabled() && Instant::now() >= self.next_retention {
            Self::run_retention(
                &tx,
                &self.config.retention,
                &mut self.topics,
                self.next_seq - 1,
                &mut self.next_retention,
                out,
            )?;
        }
        if self.keys_stale {
            self.keys = KeyWindow::load(&tx, ts, self.config.dedup_max_keys)?;
            self.keys_stale = false;
        }
        let mut appended = 0u64;
        for req in batch {
            match req {
                WriteRequest::Append {
                    token,
                    topic,
                    messages,
                } => {
                    let row_id = topic_row(&tx, &mut self.topics, topic, ts)?.id;
                    // Message i of the call gets sequence base + i; a
                    // duplicate leaves its sequence unused.
                    let base = self.next_seq;
                    let mut duplicates = Vec::new();
                    if messages.iter().any(|m| m.idempotency_key.is_some()) {
                        let cutoff = ts.saturating_sub(self.config.dedup_window.as_millis() as i64);
                        duplicates =
                            self.keys
                                .claim(&tx, (row_id, topic), messages, base, (ts, cutoff))?;
                    }
                    let mut d = duplicates.iter().map(|d| d.index).peekable();
                    let fresh: Vec<(u64, &NewMessage)> = messages
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| d.next_if_eq(i).is_none())
                        .map(|(i, m)| (base + i as u64, m))
                        .collect();
                    let (created_at_ms, stored) =
                        insert_messages(&tx, &mut self.topics, topic, ts, &fresh)?;
                    // Trailing duplicates give their sequences back.
                    self.next_seq = fresh.last().map_or(base, |(seq, _)| seq + 1);
                    appended += stored.len() as u64;
                    out.push(WriteOutcome::Appended {
                        token: *token,
                        topic: topic.clone(),
                        result: Ok(Appended {
                            topic: topic.clone(),
                            created_at_ms,
                            timestamp_ms: ts,
                            messages: stored,
                            duplicates,
                            announced: false,
                        }),
                    });
                }
                WriteRequest::DeadLetter {
                    topic,
                    group,
                    sequence,
                    ordinal,
                    advance_cursor,
                    dead_letter_topic,
                    message,
                } => {
                    let seq = self.next_seq;
                    let (created_at_ms, stored) = insert_messages(
                        &tx,
                        &mut self.topics,
                        dead_letter_topic,
                        ts,
                        &[(seq, message)],
                    )?;
                    self.next_seq += 1;
                    appended += stored.len() as u64;
                    let mut advanced = false;
                    if let Some(row) = self.topics.get(topic) {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO dead_letters (topic_id, grp, seq, ordinal) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![row.id, group.as_ref(), *sequence as i64, *ordinal as i64])?;
                        if *advance_cursor {
                            advanced = tx
                                .prepare_cached(
                                    "UPDATE cursors SET seq = ?3, ordinal = ?4 WHERE topic_id = ?1 AND grp = ?2 AND seq < ?3",
                                )?
                                .execute(params![row.id, group.as_ref(), *sequence as i64, *ordinal as i64])?
                                > 0;
                            if advanced {
                                forget_below_cursor(&tx, row.id, group, *sequence)?;
                            }
                        }
                    }
                    out.push(WriteOutcome::DeadLettered {
                        topic: topic.clone(),
                        group: group.clone(),
                        sequence: *sequence,
                        advanced,
                        result: Ok(Appended {
                            topic: dead_letter_topic.clone(),
                            created_at_ms,
                            timestamp_ms: ts,
                            messages: stored,
                            duplicates: Vec::new(),
                            announced: false,
                        }),
                    });
                }
                WriteRequest::SetDeliveries {
                    topic,
                    group,
                    delivered_max,
                    counts,
                } => {
                    let Some(row) = self.topics.get(topic) else {
                        continue;
                    };
                    // Only for a group that exists (a delete may have passed).
                    let found = tx
                        .prepare_cached(
                            "UPDATE cursors SET delivered_max = max(delivered_max, ?3) WHERE topic_id = ?1 AND grp = ?2",
                        )?
                        .execute(params![row.id, group.as_ref(), *delivered_max as i64])?;
                    if found > 0 {
                        let mut upsert = tx.prepare_cached(
                            "INSERT INTO delivery_counts (topic_id, grp, seq, count) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (topic_id, grp, seq) DO UPDATE SET count = max(count, excluded.count)",
                        )?;
                        for (seq, count) in counts {
                            upsert.execute(params![row.id, group.as_ref(), *seq as i64, *count])?;
                        }
                    }
                }
                WriteRequest::SetPolicy {
                    topic,
                    group,
                    max_deliveries,
                    dead_letter_topic,
                } => {
                    if let Some(row) = self.topics.get(topic) {
                        tx.prepare_cached(
                            "UPDATE cursors SET max_deliveries = ?3, dead_letter_topic = ?4 WHERE topic_id = ?1 AND grp = ?2",
                        )?
                        .execute(params![
                            row.id,
                            group.as_ref(),
                            *max_deliveries,
                            dead_letter_topic.as_deref()
                        ])?;
                    }
                }
                WriteRequest::CreateTopic {
                    topic,
                    created_at_ms,
                } => {
                    topic_row(&tx, &mut self.topics, topic, *created_at_ms)?;
                }
                // Only this process uses the database: a claim is granted
                // as it stands (the reactor does not ask: claims_groups).
                WriteRequest::ClaimGroup {
                    token,
                    topic,
                    group,
                } => out.push(WriteOutcome::GroupClaimed {
                    token: *token,
                    topic: topic.clone(),
                    group: group.clone(),
                    result: Ok(None),
                    deliveries: None,
                }),
                WriteRequest::ReleaseGroup { .. } => {}
                WriteRequest::SetCursor {
                    topic,
                    group,
                    sequence,
                    acked_at_ms,
                    token,
                } => {
                    // A cursor never re-creates a topic deleted meanwhile.
                    let Some(&row) = self.topics.get(topic) else {
                        if let Some(token) = token {
                            out.push(WriteOutcome::CursorSaved {
                                token: Some(*token),
                                topic: topic.clone(),
                                group: group.clone(),
                                sequence: *sequence,
                                ordinal: 0,
                            });
                        }
                        continue;
                    };
                    let ordinal: u64 = tx
                        .prepare_cached(
                            "SELECT ordinal FROM messages WHERE topic_id = ?1 AND seq <= ?2 ORDER BY seq DESC LIMIT 1",
                        )?
                        .query_row(params![row.id, *sequence as i64], |r| r.get::<_, i64>(0))
                        .optional()?
                        .map_or(0, |o| o as u64);
                    tx.prepare_cached(
                        "INSERT INTO cursors (topic_id, grp, seq, ordinal, acked_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (topic_id, grp) DO UPDATE SET seq = ?3, ordinal = ?4, acked_at = ?5",
                    )?
                    .execute(params![
                        row.id,
                        group.as_ref(),
                        *sequence as i64,
                        ordinal as i64,
                        *acked_at_ms
                    ])?;
                    forget_below_cursor(&tx, row.id, group, *sequence)?;
                    if token.is_some() {
                        // A reset starts the group's delivery counts afresh.
                        tx.prepare_cached(
                            "DELETE FROM delivery_counts WHERE topic_id = ?1 AND grp = ?2",
                        )?
                        .execute(params![row.id, group.as_ref()])?;
                        tx.prepare_cached(
                            "UPDATE cursors SET delivered_max = 0 WHERE topic_id = ?1 AND grp = ?2",
                        )?
                        .execute(params![row.id, group.as_ref()])?;
                    }
                    out.push(WriteOutcome::CursorSaved {
                        token: *token,
                        topic: topic.clone(),
                        group: group.clone(),
                        sequence: *sequence,
                        ordinal,
                    });
                }
                WriteRequest::DeleteTopic { token, topic } => {
                    let existed = match self.topics.remove(topic) {
                        Some(row) => {
                            tx.prepare_cached("DELETE FROM topics WHERE id = ?1")?
                                .execute([row.id])?;
                            tx.prepare_cached("DELETE FROM cursors WHERE topic_id = ?1")?
                                .execute([row.id])?;
                            tx.prepare_cached("DELETE FROM delivery_counts WHERE topic_id = ?1")?
                                .execute([row.id])?;
                            // Its id may be given to a new topic once purged.
                            self.keys.forget_topic(&tx, row.id)?;
                            tx.prepare_cached("DELETE FROM dead_letters WHERE topic_id = ?1")?
                                .execute([row.id])?;
                            tx.prepare_cached(
                                "INSERT OR IGNORE INTO doomed_topics (id) VALUES (?1)",
                            )?
                            .execute([row.id])?;
                            // Sequences of the purged messages are never reused.
                            tx.prepare_cached(
                                "UPDATE meta SET value = max(value, ?1) WHERE key = 'seq_floor'",
                            )?
                            .execute([(self.next_seq - 1) as i64])?;
                            self.doomed.push_back(row.id);
                            true
                        }
                        None => false,
                    };
                    out.push(WriteOutcome::TopicDeleted {
                        token: *token,
                        topic: topic.clone(),
                        result: Ok(existed),
                    });
                }
                WriteRequest::DeleteGroup {
                    token,
                    topic,
                    group,
                } => {
                    let existed = match self.topics.get(topic) {
                        Some(row) => {
                            for table in ["delivery_counts", "dead_letters"] {
                                tx.prepare_cached(&format!(
                                    "DELETE FROM {table} WHERE topic_id = ?1 AND grp = ?2"
                                ))?
                                .execute(params![row.id, group.as_ref()])?;
                            }
                            tx.prepare_cached(
                                "DELETE FROM cursors WHERE topic_id = ?1 AND grp = ?2",
                            )?
                            .execute(params![row.id, group.as_ref()])?
                                > 0
                        }
                        None => false,
                    };
                    out.push(WriteOutcome::GroupDeleted {
                        token: *token,
                        topic: topic.clone(),
                        group: group.clone(),
                        result: Ok(existed),
                    });
                }
            }
        }
        self.keys.expire(
            &tx,
            ts,
            self.config.dedup_window,
            self.config.dedup_max_keys,
        )?;
        let committing = Instant::now();
        tx.commit()?;
        self.commit_wait = committing.elapsed();
        Ok(appended)
    }
}

/// Inserts `messages` (each with its sequence, ascending) as the newest of
/// `topic` (creating it); returns the topic's creation time and what was
/// stored.
fn insert_messages(
    tx: &Connection,
    topics: &mut HashMap<Arc<str>, TopicRow>,
    topic: &Arc<str>,
    ts: i64,
    messages: &[(u64, &NewMessage)],
) -> rusqlite::Result<(i64, Vec<Arc<StoredMessage>>)> {
    let row = topic_row(tx, topics, topic, ts)?;
    let mut stored = Vec::with_capacity(messages.len());
    // Rows go in 16 at a time: one statement step for many rows is
    // markedly cheaper than one per row.
    for chunk in messages.chunks(ROWS_PER_INSERT) {
        let whole = chunk.len() == ROWS_PER_INSERT;
        let sql = if whole {
            multi_row_insert()
        } else {
            SINGLE_ROW_INSERT
        };
        let mut insert = tx.prepare_cached(sql)?;
        for (k, &(seq, m)) in chunk.iter().enumerate() {
            let ordinal = row.last_ordinal + 1;
            let base = if whole { k * 6 } else { 0 };
            insert.raw_bind_parameter(base + 1, seq as i64)?;
            insert.raw_bind_parameter(base + 2, row.id)?;
            insert.raw_bind_parameter(base + 3, ordinal as i64)?;
            insert.raw_bind_parameter(base + 4, ts)?;
            insert.raw_bind_parameter(base + 5, m.payload.as_ref())?;
            insert.raw_bind_parameter(base + 6, encode_attributes(&m.attributes))?;
            if !whole {
                insert.raw_execute()?;
            }
            row.last_ordinal = ordinal;
            row.bytes += m.payload.len() as u64;
            stored.push(Arc::new(StoredMessage {
                sequence: seq,
                ordinal,
                id: MessageId::new(ts, seq, topic),
                timestamp_ms: ts,
                // Its own allocation: a slice would pin the whole request
                // buffer while cached.
                payload: Bytes::copy_from_slice(&m.payload),
                attributes: m.attributes.clone(),
            }));
        }
        if whole {
            insert.raw_execute()?;
        }
    }
    Ok((row.created_at_ms, stored))
}

/// Forgets a group's delivery counts and dead-lettered messages at or
/// below its cursor.
fn forget_below_cursor(
    tx: &Connection,
    topic_id: i64,
    group: &str,
    cursor: u64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "DELETE FROM delivery_counts WHERE topic_id = ?1 AND grp = ?2 AND seq <= ?3",
    )?
    .execute(params![topic_id, group, cursor as i64])?;
    tx.prepare_cached("DELETE FROM dead_letters WHERE topic_id = ?1 AND grp = ?2 AND seq <= ?3")?
        .execute(params![topic_id, group, cursor as i64])?;
    Ok(())
}

/// The row of `topic`, inserting it (created at `created_at_ms`) if new.
fn topic_row<'a>(
    tx: &Connection,
    topics: &'a mut HashMap<Arc<str>, TopicRow>,
    topic: &Arc<str>,
    created_at_ms: i64,
) -> rusqlite::Result<&'a mut TopicRow> {
    if !topics.contains_key(topic) {
        // Never reuse the id of a deleted topic whose messages are still
        // being purged (a plain rowid could be handed out again).
        tx.prepare_cached(
            "INSERT INTO topics (id, name, created_at, last_ordinal) VALUES (
                1 + max(coalesce((SELECT max(id) FROM topics), 0), coalesce((SELECT max(id) FROM doomed_topics), 0)),
                ?1, ?2, 0)",
        )?
        .execute(params![topic.as_ref(), created_at_ms])?;
        let id = tx.last_insert_rowid();
        topics.insert(
            topic.clone(),
            TopicRow {
                id,
                created_at_ms,
                last_ordinal: 0,
                first_ordinal: 1,
                bytes: 0,
            },
        );
    }
    topics
        .get_mut(topic)
        .ok_or(rusqlite::Error::QueryReturnedNoRows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::NewMessage;

    fn writer_in(dir: &std::path::Path, cap: Option<u64>) -> GroupCommit {
        let conn = super::super::schema::open_writer(dir, None).unwrap();
        let (hwm, _) = HighWaterMark::open(dir).unwrap();
        GroupCommit::new(
            conn,
            GroupCommitConfig {
                max_store_bytes: cap,
                ..GroupCommitConfig::default()
            },
            Arc::new(Telemetry::disabled()),
            super::super::checkpointer::WalLink::new().0,
            hwm,
        )
        .unwrap()
    }

    fn append(token: u64, topic: &str, bytes: usize) -> WriteRequest {
        WriteRequest::Append {
            token,
            topic: topic.into(),
            messages: vec![NewMessage {
                payload: vec![1u8; bytes].into(),
                attributes: HashMap::new(),
                idempotency_key: None,
            }],
        }
    }

    /// An acked cursor of group `g` on topic `t` (no caller waits for it).
    fn acked_cursor(sequence: u64, acked_at_ms: i64) -> WriteRequest {
        WriteRequest::SetCursor {
            topic: "t".into(),
            group: "g".into(),
            sequence,
            acked_at_ms,
            token: None,
        }
    }

    #[test]
    fn a_failed_batch_carries_topic_creations_and_cursor_writes_to_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let mut gc = writer_in(tmp.path(), None);
        let out = gc.commit(&mut vec![append(1, "t", 10)]);
        assert!(matches!(
            &out[..],
            [WriteOutcome::Appended { result: Ok(_), .. }]
        ));
        // The database refuses writes: the batch fails as a whole.
        gc.conn.pragma_update(None, "query_only", true).unwrap();
        let mut batch = vec![
            append(2, "t", 10),
            acked_cursor(1, 5),
            acked_cursor(1, 6),
            WriteRequest::CreateTopic {
                topic: "u".into(),
                created_at_ms: 7,
            },
        ];
        let out = gc.commit(&mut batch);
        assert!(matches!(
            &out[..],
            [WriteOutcome::Appended { result: Err(_), .. }]
        ));
        // One cursor per group (the latest) and the creation wait for the next batch.
        assert_eq!(gc.carry.len(), 2);
        gc.conn.pragma_update(None, "query_only", false).unwrap();
        let mut next = std::mem::take(&mut gc.carry);
        let out = gc.commit(&mut next);
        assert!(out
            .iter()
            .any(|o| matches!(o, WriteOutcome::CursorSaved { sequence: 1, .. })));
        let cursor: i64 = gc
            .conn
            .query_row(
                "SELECT c.acked_at FROM cursors c JOIN topics t ON t.id = c.topic_id WHERE t.name = 't' AND c.grp = 'g'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cursor, 6);
        assert!(gc.topics.contains_key("u"));
    }

    #[test]
    fn a_carried_write_that_keeps_failing_does_not_fail_new_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let mut gc = writer_in(tmp.path(), None);
        gc.commit(&mut vec![append(1, "t", 10)]);
        // Any cursor write for group "poison" fails, every time.
        gc.conn
            .execute_batch(
                "CREATE TEMP TRIGGER poison BEFORE INSERT ON main.cursors WHEN NEW.grp = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
            .unwrap();
        let poison = WriteRequest::SetCursor {
            topic: "t".into(),
            group: "poison".into(),
            sequence: 1,
            acked_at_ms: 1,
            token: None,
        };
        let out = gc.commit(&mut vec![append(2, "t", 10), poison]);
        assert!(matches!(
            &out[..],
            [WriteOutcome::Appended { result: Err(_), .. }]
        ));
        assert_eq!(gc.carry.len(), 1);
        // The next batches commit; the poisoned write stays carried.
        for token in 3..6 {
            let out = gc.commit_with_carry(&mut vec![append(token, "t", 10), acked_cursor(1, 9)]);
            assert!(
                out.iter()
                    .any(|o| matches!(o, WriteOutcome::Appended { result: Ok(_), .. })),
                "{out:?}"
            );
            assert!(out
                .iter()
                .any(|o| matches!(o, WriteOutcome::CursorSaved { sequence: 1, .. })));
            assert_eq!(gc.carry.len(), 1);
        }
    }

    #[test]
    fn the_size_cap_refuses_only_the_appends_of_a_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let mut gc = writer_in(tmp.path(), None);
        gc.commit(&mut vec![append(1, "t", 10)]);
        gc.config.max_store_bytes = Some(1);
        let out = gc.commit(&mut vec![
            append(2, "t", 10),
            acked_cursor(1, 5),
            WriteRequest::DeleteTopic {
                token: 3,
                topic: "t".into(),
            },
        ]);
        assert!(out.iter().any(|o| matches!(o, WriteOutcome::Appended { result: Err(e), .. } if e.message.contains("--max-db-bytes"))));
        assert!(out
            .iter()
            .any(|o| matches!(o, WriteOutcome::CursorSaved { .. })));
        assert!(out.iter().any(|o| matches!(
            o,
            WriteOutcome::TopicDeleted {
                result: Ok(true),
                ..
            }
        )));
        assert!(gc.carry.is_empty());
    }

    #[test]
    fn sequences_continue_after_the_high_water_mark() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut gc = writer_in(tmp.path(), None);
            gc.hwm = std::mem::replace(&mut gc.hwm, HighWaterMark::open(tmp.path()).unwrap().0)
                .with_block(100);
            gc.commit(&mut vec![append(1, "t", 1), append(2, "t", 1)]);
            assert_eq!(gc.hwm.ceiling(), 102);
            // Dropped without a clean stop, as by SIGKILL.
        }
        let mut gc = writer_in(tmp.path(), None);
        let out = gc.commit(&mut vec![append(3, "t", 1)]);
        let [WriteOutcome::Appended { result: Ok(a), .. }] = &out[..] else {
            panic!("{out:?}");
        };
        assert_eq!(a.messages[0].sequence, 103);
    }
}
