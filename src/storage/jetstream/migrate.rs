//! `sluice migrate`: copies an embedded (SQLite) store into a JetStream
//! cluster so a gateway on the same `--nats-prefix` serves the same data:
//! every message at its own sequence with its timestamp, ordinal and
//! attributes (so the same message id), the topic registry and the cursors.
//!
//! Owns the copy and its checks. SQLite's sequence gaps become filler
//! messages on `<prefix>.gap`, purged at the end; each publish carries
//! `Nats-Expected-Last-Sequence` (it can only land at its own sequence) and
//! `Nats-Msg-Id` = its message id (a retry is stored once). A stream holding
//! a prefix of the store is resumed, anything else refused; topics are
//! registered create-only and cursors only move forward, so re-runs are safe.
//! Calls `storage::sqlite` read-only (lock, schema, high-water mark,
//! attributes), `jetstream::{connect, prepare}`, `layout` and `nats`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::layout::{self, CursorValue, Layout, TopicValue};
use super::JetStreamStoreConfig;
use crate::broker::MessageId;
use crate::nats::headers::Headers;
use crate::nats::jetstream::{JetStream, JetStreamError};
use crate::nats::kv_bucket::{KvBucket, ERR_WRONG_LAST_SEQUENCE};
use crate::nats::publish_window::{OutgoingMessage, PubAckTicket};
use crate::nats::stored_message::{MessageSelector, StoredMessage};
use crate::storage::sqlite::dir_lock::{DataDirLock, LOCK_FILE};
use crate::storage::sqlite::high_water::HighWaterMark;
use crate::storage::sqlite::schema::{self, DB_FILE};
use crate::storage::LoadedState;

/// Makes a publish fail unless the stream's last sequence is this one.
const EXPECTED_LAST_SEQ_HEADER: &str = "Nats-Expected-Last-Sequence";
/// Publishes in flight at once.
const WINDOW: usize = 256;
/// Rows read from SQLite per page, and the most payload bytes a page holds
/// (a page stops early past it): memory stays bounded whatever the store.
const PAGE_ROWS: usize = 1000;
const PAGE_BYTES: usize = 16 << 20;
/// Progress is reported every this many stored messages (fillers included).
const PROGRESS_EVERY: u64 = 10_000;
/// How long transient failures (lost connection, leader election) are
/// retried without any progress before giving up.
const RETRY_FOR: Duration = Duration::from_secs(30);
/// How long one JetStream API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// What `run` is given.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    pub data_dir: PathBuf,
    /// The cluster, token, replicas and prefix a gateway will be started
    /// with (retention is left unset: nothing copied is removed mid-copy).
    pub store: JetStreamStoreConfig,
}

/// Where a run is, for progress lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Messages copied by this run.
    pub copied: u64,
    /// Filler messages published by this run (purged at the end).
    pub fillers: u64,
    /// The stream's last acknowledged sequence.
    pub sequence: u64,
    /// The sequence the copy ends at.
    pub last_sequence: u64,
    pub elapsed: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages copied by this run.
    pub copied: u64,
    /// Messages the stream held already (an earlier run's).
    pub already_copied: u64,
    /// Filler messages published by this run.
    pub fillers: u64,
    /// Filler messages purged at the end (this run's and any left over).
    pub fillers_purged: u64,
    pub topics: usize,
    /// Topics this run registered (the others were registered already).
    pub topics_registered: usize,
    pub cursors: usize,
    /// Cursors this run wrote (the others were already at or past theirs).
    pub cursors_written: usize,
    /// The stream's last sequence: new messages continue after it.
    pub last_sequence: u64,
    pub elapsed: Duration,
}

/// Copies the store in `cfg.data_dir` into the cluster; `progress` is
/// called every `PROGRESS_EVERY` messages. Holds the data dir's lock
/// throughout, so a daemon and a migration never share it.
pub fn run(cfg: &MigrateConfig, progress: &mut dyn FnMut(&Progress)) -> Result<Summary, String> {
    let started = Instant::now();
    let source = Source::open(&cfg.data_dir)?;
    let layout = Layout::new(&cfg.store.prefix);
    let client = super::connect(
        &cfg.store.cluster,
        cfg.store.token.as_deref(),
        "sluice migrate",
    )?;
    let js = JetStream::new(client.clone(), API_TIMEOUT);
    let result = migrate(&source, &js, &layout, cfg, started, progress);
    client.close();
    result
}

fn migrate(
    source: &Source,
    js: &JetStream,
    layout: &Layout,
    cfg: &MigrateConfig,
    started: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary, String> {
    let (topics_kv, cursors_kv) = super::prepare(js, &cfg.store, layout)?;
    let resume_after = check_target(js, layout, source)?;
    let mut summary = Summary {
        topics: source.state.topics.len(),
        cursors: source.state.groups.len(),
        already_copied: source
            .count_up_to(resume_after)
            .map_err(|e| source.sql_error(&e))?,
        ..Summary::default()
    };
    summary.topics_registered = register_topics(&topics_kv, source)?;

    let mut copier = Copier {
        js,
        layout,
        source,
        next: resume_after + 1,
        acked: resume_after,
        window: VecDeque::with_capacity(WINDOW),
        copied: 0,
        fillers: 0,
        reported: 0,
        started,
    };
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let before = copier.acked;
        let failure = match copier.copy(progress) {
            Ok(()) => break,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Transient(e)) => e,
        };
        copier.abandon_window();
        if copier.acked > before {
            failing_since = None;
            backoff = Duration::from_millis(100);
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RETRY_FOR {
            return Err(format!(
                "giving up after {}s without progress: {failure}",
                RETRY_FOR.as_secs()
            ));
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(2));
        copier.resume(since + RETRY_FOR)?;
    }
    summary.copied = copier.copied;
    summary.fillers = copier.fillers;

    summary.fillers_purged = retrying_to("purge the filler messages", || {
        js.purge_subject(layout.stream(), &layout.gap_subject())
    })?;
    summary.last_sequence = verify(js, layout, source)?;
    summary.cursors_written = write_cursors(&cursors_kv, source)?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The SQLite store, read-only, with the data dir locked.
struct Source {
    dir: PathBuf,
    conn: Connection,
    state: LoadedState,
    /// topic id -> name; deleted topics are absent.
    topics: HashMap<i64, String>,
    /// name -> topic id.
    ids: HashMap<String, i64>,
    /// The sequence the copy ends at: nothing above it was ever handed out.
    end_seq: u64,
    _lock: DataDirLock,
}

/// One message row.
struct Row {
    seq: u64,
    topic_id: i64,
    ordinal: u64,
    ts: i64,
    payload: Vec<u8>,
    attributes: Option<Vec<u8>>,
}

impl Source {
    fn open(dir: &Path) -> Result<Source, String> {
        let db = dir.join(DB_FILE);
        if !db.is_file() {
            return Err(format!("no database at {}", db.display()));
        }
        let lock = DataDirLock::acquire(dir).map_err(|e| {
            format!(
                "{e} (lock file {}); stop the daemon before migrating",
                dir.join(LOCK_FILE).display()
            )
        })?;
        let dir = lock.dir().to_path_buf();
        let db = dir.join(DB_FILE);
        let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| format!("cannot read {}: {e}", db.display()))?;
        if version == 0 {
            return Err(format!("{} is not a Sluice database", db.display()));
        }
        let state =
            schema::load_state(&conn).map_err(|e| format!("cannot read {}: {e}", db.display()))?;
        let (_, recorded) = HighWaterMark::open(&dir)?;
        let cursor_max = state.groups.iter().map(|(_, g)| g.cursor).max();
        let end_seq = state
            .last_seq
            .max(recorded.ceiling)
            .max(cursor_max.unwrap_or(0));

        let rows = conn
            .prepare("SELECT id, name FROM topics")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(|e| format!("cannot read {}: {e}", db.display()))?;
        let (mut topics, mut ids) = (HashMap::new(), HashMap::new());
        for (id, name) in rows {
            // Checked once here, so later subjects and keys always exist.
            if layout::topic_key(&name).is_none() {
                return Err(format!(
                    "topic {name:?} has no JetStream subject (not a valid topic name)"
                ));
            }
            ids.insert(name.clone(), id);
            topics.insert(id, name);
        }
        for (topic, g) in &state.groups {
            if layout::cursor_key(topic, &g.name).is_none() {
                return Err(format!(
                    "the cursor of group {:?} on topic {topic:?} cannot be named in JetStream",
                    g.name
                ));
            }
        }
        Ok(Source {
            dir,
            conn,
            state,
            topics,
            ids,
            end_seq,
            _lock: lock,
        })
    }

    fn sql_error(&self, e: &rusqlite::Error) -> String {
        format!("cannot read {}: {e}", self.dir.join(DB_FILE).display())
    }

    /// Messages of live topics at sequences up to `seq`.
    fn count_up_to(&self, seq: u64) -> rusqlite::Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM messages m JOIN topics t ON t.id = m.topic_id WHERE m.seq <= ?1",
            [seq as i64],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Messages of one topic at sequences up to `seq`.
    fn topic_count_up_to(&self, topic_id: i64, seq: u64) -> rusqlite::Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM messages WHERE topic_id = ?1 AND seq <= ?2",
            [topic_id, seq as i64],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// (topic id, ordinal, timestamp) of the message at `seq`, if any.
    fn at(&self, seq: u64) -> rusqlite::Result<Option<(i64, u64, i64)>> {
        self.conn
            .query_row(
                "SELECT topic_id, ordinal, ts FROM messages WHERE seq = ?1",
                [seq as i64],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?)),
            )
            .optional()
    }

    /// Rows from sequence `from` on, in order: at most `PAGE_ROWS`, and
    /// no more once `PAGE_BYTES` of payload were read.
    fn page(&self, from: u64) -> rusqlite::Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, topic_id, ordinal, ts, payload, attributes FROM messages
             WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query([from as i64, PAGE_ROWS as i64])?;
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        while let Some(r) = rows.next()? {
            let row = Row {
                seq: r.get::<_, i64>(0)? as u64,
                topic_id: r.get(1)?,
                ordinal: r.get::<_, i64>(2)? as u64,
                ts: r.get(3)?,
                payload: r.get(4)?,
                attributes: r.get(5)?,
            };
            bytes += row.payload.len();
            out.push(row);
            if bytes >= PAGE_BYTES {
                break;
            }
        }
        Ok(out)
    }
}

/// Checks that the stream holds nothing but a prefix of this store (what an
/// earlier run copied) and returns its last sequence, after which the copy
/// resumes (0: an empty, new stream).
fn check_target(js: &JetStream, layout: &Layout, source: &Source) -> Result<u64, String> {
    let stream = layout.stream();
    let counts = retrying_to("read the stream", || {
        js.subject_counts(stream, &layout.all_topics(), usize::MAX)
    })?;
    let last = counts.stream.last_seq;
    if last == 0 {
        return Ok(0);
    }
    let refuse = |why: String| {
        format!(
            "stream {stream} holds data that is not a copy of {}: {why}. Pick another \
             --nats-prefix, or delete stream {stream} and buckets {} and {} to start over",
            source.dir.display(),
            layout.topics_bucket(),
            layout.cursors_bucket()
        )
    };
    if last > source.end_seq {
        return Err(refuse(format!(
            "its last sequence is {last}, past this store's last sequence {}",
            source.end_seq
        )));
    }
    let sql = |e: rusqlite::Error| source.sql_error(&e);
    for (subject, &n) in &counts.subjects {
        let known = layout
            .topic_of(subject)
            .is_some_and(|t| source.ids.contains_key(&t));
        if !known {
            return Err(refuse(format!(
                "it holds {n} messages on {subject}, a topic the store does not have"
            )));
        }
    }
    for (&id, topic) in &source.topics {
        let subject = layout.subject(topic).unwrap_or_default();
        let n = counts.subjects.get(&subject).copied().unwrap_or(0);
        let have = source.topic_count_up_to(id, last).map_err(sql)?;
        if have != n {
            return Err(refuse(format!(
                "it holds {n} messages of topic {topic:?} where the store has {have} up to \
                 sequence {last}"
            )));
        }
        if n == 0 {
            continue;
        }
        let newest = retrying_to("read a message", || {
            js.get_message(stream, MessageSelector::LastBySubject(&subject))
        })?;
        if let Some(m) = newest {
            same_message(source, topic, &m).map_err(refuse)?;
        }
    }
    let at_last = retrying_to("read a message", || {
        js.get_message(stream, MessageSelector::Seq(last))
    })?;
    if let Some(m) = at_last {
        if m.subject == layout.gap_subject() {
            let live = source
                .at(last)
                .map_err(sql)?
                .is_some_and(|(id, _, _)| source.topics.contains_key(&id));
            if live {
                return Err(refuse(format!(
                    "sequence {last} is a filler where the store has a message"
                )));
            }
        } else {
            let topic = layout.topic_of(&m.subject).unwrap_or_default();
            same_message(source, &topic, &m).map_err(refuse)?;
        }
    }
    Ok(last)
}

/// Whether the stored `m` is the store's message at its sequence.
fn same_message(source: &Source, topic: &str, m: &StoredMessage) -> Result<(), String> {
    let meta = layout::message_meta(m.headers.as_ref())
        .map_err(|e| format!("message {} was not written by Sluice ({e})", m.seq))?;
    let ours = source.at(m.seq).map_err(|e| source.sql_error(&e))?;
    let matches = ours.is_some_and(|(id, ordinal, ts)| {
        source.topics.get(&id).is_some_and(|n| n == topic)
            && ordinal == meta.ordinal
            && ts == meta.timestamp_ms
    });
    if matches {
        Ok(())
    } else {
        Err(format!(
            "message {} (topic {topic:?}, ordinal {}, time {}) is not the store's message at \
             that sequence",
            m.seq, meta.ordinal, meta.timestamp_ms
        ))
    }
}

/// Registers every topic with its creation time; one registered already
/// keeps its entry. Returns how many this call registered.
fn register_topics(kv: &KvBucket, source: &Source) -> Result<usize, String> {
    let mut registered = 0;
    for t in &source.state.topics {
        let key =
            layout::topic_key(&t.name).ok_or_else(|| format!("invalid topic name {:?}", t.name))?;
        let value = serde_json::to_vec(&TopicValue {
            created_at_ms: t.created_at_ms,
        })
        .map_err(|e| e.to_string())?;
        match retrying(|| kv.put_if_revision(&key, &value, 0)) {
            Ok(_) => registered += 1,
            // Registered already (an earlier run, or a gateway): kept.
            Err(JetStreamError::Api(e)) if e.err_code == ERR_WRONG_LAST_SEQUENCE => {}
            Err(e) => return Err(format!("cannot register topic {:?}: {e}", t.name)),
        }
    }
    Ok(registered)
}

/// Writes every group's cursor unless the bucket holds it at or past the
/// store's (a gateway's consumers moved on): cursors never move back.
/// Returns how many were written.
fn write_cursors(kv: &KvBucket, source: &Source) -> Result<usize, String> {
    let mut written = 0;
    for (topic, g) in &source.state.groups {
        let key = layout::cursor_key(topic, &g.name)
            .ok_or_else(|| format!("cannot name the cursor of {topic}/{}", g.name))?;
        let value = serde_json::to_vec(&CursorValue {
            seq: g.cursor,
            acked_at_ms: g.last_ack_ms,
            gateway: String::new(),
        })
        .map_err(|e| e.to_string())?;
        let what = format!("store the cursor of group {:?} on {topic:?}", g.name);
        let current = retrying_to(&what, || kv.get(&key))?;
        let revision = match current {
            None => 0,
            Some(entry) => match serde_json::from_slice::<CursorValue>(&entry.value) {
                Ok(v) if v.seq >= g.cursor => continue,
                _ => entry.revision,
            },
        };
        retrying_to(&what, || kv.put_if_revision(&key, &value, revision))?;
        written += 1;
    }
    Ok(written)
}

/// After the copy: the stream's last sequence is the store's and every
/// topic holds as many messages as in the store. Returns the last sequence.
fn verify(js: &JetStream, layout: &Layout, source: &Source) -> Result<u64, String> {
    let counts = retrying_to("read the stream", || {
        js.subject_counts(layout.stream(), &layout.all_topics(), usize::MAX)
    })?;
    if counts.stream.last_seq != source.end_seq {
        return Err(format!(
            "after the copy, stream {} ends at sequence {} instead of {}",
            layout.stream(),
            counts.stream.last_seq,
            source.end_seq
        ));
    }
    for (&id, name) in &source.topics {
        let want = source
            .topic_count_up_to(id, i64::MAX as u64)
            .map_err(|e| source.sql_error(&e))?;
        let subject = layout.subject(name).unwrap_or_default();
        let have = counts.subjects.get(&subject).copied().unwrap_or(0);
        if have != want {
            return Err(format!(
                "after the copy, stream {} holds {have} messages of topic {name:?} instead of {want}",
                layout.stream()
            ));
        }
    }
    Ok(counts.stream.last_seq)
}

/// Calls `f` until it succeeds, fails for good, or transient failures
/// (lost connection, leader election) lasted `RETRY_FOR`.
fn retrying<T>(mut f: impl FnMut() -> Result<T, JetStreamError>) -> Result<T, JetStreamError> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut backoff = Duration::from_millis(100);
    loop {
        match f() {
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// `retrying`, with a failure saying what could not be done.
fn retrying_to<T>(what: &str, f: impl FnMut() -> Result<T, JetStreamError>) -> Result<T, String> {
    retrying(f).map_err(|e| format!("cannot {what}: {e}"))
}

/// Why a copy stopped.
enum Failure {
    /// May succeed if resumed from the stream's last sequence.
    Transient(String),
    Fatal(String),
}

/// One publish in flight.
struct InFlight {
    seq: u64,
    filler: bool,
    ticket: PubAckTicket,
}

/// The pipelined copy: publishes in sequence order, at most `WINDOW` acks
/// outstanding, each ack checked against the sequence it must have.
struct Copier<'a> {
    js: &'a JetStream,
    layout: &'a Layout,
    source: &'a Source,
    /// The sequence the next publish must get.
    next: u64,
    /// The highest sequence acknowledged (every one below it is stored).
    acked: u64,
    window: VecDeque<InFlight>,
    copied: u64,
    fillers: u64,
    reported: u64,
    started: Instant,
}

impl Copier<'_> {
    /// Copies from `next` to the store's end, then waits for every ack.
    fn copy(&mut self, progress: &mut dyn FnMut(&Progress)) -> Result<(), Failure> {
        loop {
            let page = self
                .source
                .page(self.next)
                .map_err(|e| Failure::Fatal(self.source.sql_error(&e)))?;
            if page.is_empty() {
                break;
            }
            for row in page {
                while self.next < row.seq {
                    self.send_filler(progress)?;
                }
                match self.source.topics.get(&row.topic_id) {
                    Some(topic) => self.send_row(topic, &row, progress)?,
                    // A deleted topic's rows not yet purged: a gap.
                    None => self.send_filler(progress)?,
                }
            }
        }
        while self.next <= self.source.end_seq {
            self.send_filler(progress)?;
        }
        while !self.window.is_empty() {
            self.collect_one(progress)?;
        }
        Ok(())
    }

    fn send_row(
        &mut self,
        topic: &str,
        row: &Row,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), Failure> {
        let attributes = crate::storage::sqlite::decode_attributes(row.attributes.as_deref());
        let headers = layout::message_headers(row.ts, row.ordinal, &attributes);
        let subject = self.layout.subject(topic).unwrap_or_default();
        let msg_id = MessageId::new(row.ts, row.seq, topic).to_string();
        self.send(&subject, &msg_id, headers, &row.payload, false, progress)
            .map_err(|f| match f {
                Failure::Fatal(e) => Failure::Fatal(format!(
                    "{e} (message {} of topic {topic:?}, {} bytes)",
                    row.seq,
                    row.payload.len()
                )),
                other => other,
            })
    }

    fn send_filler(&mut self, progress: &mut dyn FnMut(&Progress)) -> Result<(), Failure> {
        let subject = self.layout.gap_subject();
        let msg_id = format!("sluice-gap-{}", self.next);
        self.send(&subject, &msg_id, Headers::new(), b"", true, progress)
    }

    fn send(
        &mut self,
        subject: &str,
        msg_id: &str,
        mut headers: Headers,
        payload: &[u8],
        filler: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), Failure> {
        if self.window.len() >= WINDOW {
            self.collect_one(progress)?;
        }
        let seq = self.next;
        headers.insert(EXPECTED_LAST_SEQ_HEADER, (seq - 1).to_string());
        let ticket = self
            .js
            .publish_start(&OutgoingMessage {
                subject,
                msg_id: Some(msg_id),
                headers: Some(&headers),
                payload,
            })
            .map_err(|e| self.failure(seq, &e))?;
        self.window.push_back(InFlight {
            seq,
            filler,
            ticket,
        });
        self.next += 1;
        Ok(())
    }

    /// Waits for the oldest publish in flight and checks where it landed.
    fn collect_one(&mut self, progress: &mut dyn FnMut(&Progress)) -> Result<(), Failure> {
        let Some(f) = self.window.pop_front() else {
            return Ok(());
        };
        let ack = f.ticket.wait().map_err(|e| self.failure(f.seq, &e))?;
        if ack.seq != f.seq || ack.stream != self.layout.stream() {
            return Err(Failure::Fatal(format!(
                "sequence {} was stored as {} in stream {}: something else writes to stream {}",
                f.seq,
                ack.seq,
                ack.stream,
                self.layout.stream()
            )));
        }
        self.acked = f.seq;
        if f.filler {
            self.fillers += 1;
        } else {
            self.copied += 1;
        }
        let done = self.copied + self.fillers;
        if done / PROGRESS_EVERY > self.reported {
            self.reported = done / PROGRESS_EVERY;
            progress(&Progress {
                copied: self.copied,
                fillers: self.fillers,
                sequence: self.acked,
                last_sequence: self.source.end_seq,
                elapsed: self.started.elapsed(),
            });
        }
        Ok(())
    }

    fn failure(&self, seq: u64, e: &JetStreamError) -> Failure {
        match e {
            JetStreamError::Api(a) if a.err_code == ERR_WRONG_LAST_SEQUENCE => {
                Failure::Fatal(format!(
                    "stream {} did not end at sequence {} when sequence {seq} was published \
                     ({}): something else writes to it (a gateway on the same --nats-prefix?); \
                     stop it and run the migration again",
                    self.layout.stream(),
                    seq - 1,
                    a.description
                ))
            }
            e if e.is_transient() => {
                Failure::Transient(format!("publishing sequence {seq} failed: {e}"))
            }
            e => Failure::Fatal(format!("cannot publish sequence {seq}: {e}")),
        }
    }

    /// After a failure: waits out what is still in flight, counting what
    /// was stored after all.
    fn abandon_window(&mut self) {
        for f in std::mem::take(&mut self.window) {
            if let Ok(ack) = f.ticket.wait() {
                if ack.seq == f.seq && f.seq == self.acked + 1 {
                    self.acked = f.seq;
                    if f.filler {
                        self.fillers += 1;
                    } else {
                        self.copied += 1;
                    }
                }
            }
        }
    }

    /// Continues after the stream's last sequence, which must lie between
    /// what was acknowledged and what was sent.
    fn resume(&mut self, deadline: Instant) -> Result<(), String> {
        let mut backoff = Duration::from_millis(100);
        let last = loop {
            match self.js.stream_info(self.layout.stream()) {
                Ok(info) => break info.state.last_seq,
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(format!("cannot read stream {}: {e}", self.layout.stream())),
            }
        };
        if last < self.acked || last >= self.next {
            return Err(format!(
                "stream {} ends at sequence {last} where this run had stored up to {} and sent \
                 up to {}: something else writes to it",
                self.layout.stream(),
                self.acked,
                self.next - 1
            ));
        }
        if last > self.acked {
            // Stored, though their acks were lost: count them from the store.
            let copied = self
                .source
                .count_up_to(last)
                .and_then(|b| Ok(b - self.source.count_up_to(self.acked)?))
                .map_err(|e| self.source.sql_error(&e))?;
            self.copied += copied;
            self.fillers += (last - self.acked) - copied;
            self.acked = last;
        }
        self.next = last + 1;
        Ok(())
    }
}
