//! The SQLite store (WAL, `synchronous=FULL`), opened by [`open`].
//!
//! `schema` opens and migrates the database and loads the broker's start-up
//! state; `writer` is the one thread that writes (group commit: one
//! transaction and one fsync per batch); `reader` threads serve backlog pages
//! on read-only connections; `checkpointer` moves WAL checkpoints off the
//! commit path, and `cache_release` keeps only the database file's newest
//! pages in the kernel's page cache as it grows; `retention` trims topics
//! from inside the writer; `key_window` remembers the idempotency keys
//! within the dedup window for the writer, indexed in memory by
//! `key_index`; `high_water` keeps sequences from being reused after a lost WAL tail;
//! `dir_lock` keeps a second daemon out of the data directory;
//! `maintenance` backs `sluice check` and `sluice backup`. Everything here
//! speaks the neutral types of `storage::interface` to the outside and
//! knows nothing of gRPC or sockets: results go back over channels plus a
//! wake-up callback.

pub mod cache_release;
pub mod checkpointer;
pub mod dir_lock;
pub mod high_water;
pub mod key_index;
pub mod key_window;
pub mod maintenance;
pub mod reader;
pub mod retention;
pub mod schema;
pub mod topic_row;
pub mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use prost::Message as _;

use crate::storage::{LoadedState, OpenedStore, StorageError, StoreLinks, StoreThreads, Wake};
use crate::telemetry::Telemetry;
use dir_lock::DataDirLock;
use high_water::{HighWaterMark, Recorded};
use retention::RetentionPolicy;

/// What the SQLite store is opened with (from `--data-dir`, `--max-db-bytes`,
/// `--writer-queue`, `--commit-max-*` and `--retention-*`).
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub data_dir: PathBuf,
    pub max_db_bytes: Option<u64>,
    pub writer_queue: usize,
    pub commit_max_messages: usize,
    pub commit_max_bytes: usize,
    pub retention: RetentionPolicy,
    pub dedup_window: std::time::Duration,
    pub dedup_max_keys: u64,
}

/// Locks the data directory, opens (and migrates) the database, loads the
/// broker's start-up state and starts the writer, a reader and the
/// checkpointer. Replies are followed by `wake`.
pub fn open(
    cfg: &SqliteConfig,
    wake: Wake,
    telemetry: Arc<Telemetry>,
) -> Result<OpenedStore, String> {
    let dir_lock = DataDirLock::acquire(&cfg.data_dir)?;
    let data_dir = dir_lock.dir().to_path_buf();
    let conn = schema::open_writer(&data_dir, cfg.max_db_bytes)
        .map_err(|e| format!("cannot open database in {}: {e}", data_dir.display()))?;
    schema::check_writable(&conn, &data_dir)?;
    let state = schema::load_state(&conn).map_err(|e| format!("cannot load state: {e}"))?;
    log::info!(
        "recovered {} topics, {} consumer groups, last sequence {} from {}",
        state.topics.len(),
        state.groups.len(),
        state.last_seq,
        data_dir.display()
    );
    let (hwm, recorded) = HighWaterMark::open(&data_dir)?;
    report_lost_tail(&state, recorded);

    let (outcome_tx, outcome_rx) = crossbeam_channel::bounded(cfg.writer_queue * 2);
    let (wal, committed) = checkpointer::WalLink::new();
    let group_commit = writer::GroupCommitConfig {
        max_messages: cfg.commit_max_messages,
        max_bytes: cfg.commit_max_bytes,
        retention: cfg.retention,
        max_store_bytes: cfg.max_db_bytes,
        queue: cfg.writer_queue,
        dedup_window: cfg.dedup_window,
        dedup_max_keys: cfg.dedup_max_keys,
    };
    let writer = writer::spawn(
        conn,
        group_commit,
        outcome_tx,
        wake.clone(),
        telemetry,
        wal.clone(),
        hwm,
    )
    .map_err(|e| format!("cannot start writer: {}", e.message))?;
    let (page_tx, page_rx) = crossbeam_channel::bounded(1024);
    let dir = data_dir.clone();
    let readers = reader::spawn(1, move || schema::open_reader(&dir), 1024, page_tx, wake)
        .map_err(|e| format!("cannot start reader: {}", e.message))?;

    let checkpoint_conn = schema::open_checkpointer(&data_dir)
        .map_err(|e| format!("cannot open checkpoint connection: {e}"))?;
    let checkpointer = checkpointer::spawn(
        checkpoint_conn,
        std::time::Duration::from_millis(200),
        262_144, // 1 GiB of WAL: a last resort that blocks the writer
        (wal, committed),
        cache_release::CacheRelease::open(&data_dir.join(schema::DB_FILE)).ok(),
    )
    .map_err(|e| format!("cannot start checkpointer: {e}"))?;

    let links = StoreLinks {
        requests: writer.requests,
        outcomes: outcome_rx,
        pages_in: readers.requests,
        pages_out: page_rx,
        claims_groups: false,
    };
    let (writer_thread, reader_threads) = (writer.thread, readers.threads);
    // Once the reactor dropped its senders, the writer commits what it has
    // queued and exits; then the readers; then the checkpointer is stopped.
    // The data-dir lock is held until the `StoreThreads` is dropped.
    let threads = StoreThreads::new(
        move || {
            if writer_thread.join().is_err() {
                return Err("writer thread panicked".into());
            }
            for t in reader_threads {
                let _ = t.join();
            }
            drop(checkpointer.stop);
            let _ = checkpointer.thread.join();
            Ok(())
        },
        dir_lock,
    );
    Ok(OpenedStore {
        links,
        state,
        threads,
    })
}

/// Says once, loudly, when the database holds less than was committed: the
/// high-water mark or a consumer group's cursor is past its last sequence
/// (a damaged or truncated WAL). New sequences continue after the mark, so
/// none is reused and no cursor skips a new message.
fn report_lost_tail(state: &LoadedState, recorded: Recorded) {
    let cursor_max = state
        .groups
        .iter()
        .map(|(_, g)| g.cursor)
        .max()
        .unwrap_or(0);
    let committed = recorded.committed.max(cursor_max);
    if committed > state.last_seq {
        log::error!(
            "the database lost its tail: sequences up to {committed} were committed (high-water mark {}, \
             highest consumer-group cursor {cursor_max}) but the last one stored is {}; \
             up to {} acknowledged messages are missing. New messages continue after sequence {}",
            recorded.committed,
            state.last_seq,
            committed - state.last_seq,
            recorded.ceiling.max(state.last_seq)
        );
    }
}

impl StorageError {
    fn from_sqlite(e: &rusqlite::Error) -> Self {
        let code = match e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
            _ => None,
        };
        StorageError {
            disk_full: code == Some(rusqlite::ErrorCode::DiskFull),
            corrupt: matches!(
                code,
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
            unavailable: false,
            too_large: false,
            message: e.to_string(),
        }
    }
}

/// Attributes as stored in a message row (a small protobuf of their own, not
/// tied to the wire API).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredAttributes {
    #[prost(map = "string, string", tag = "1")]
    attributes: HashMap<String, String>,
}

fn encode_attributes(attributes: &HashMap<String, String>) -> Option<Vec<u8>> {
    if attributes.is_empty() {
        return None;
    }
    Some(
        StoredAttributes {
            attributes: attributes.clone(),
        }
        .encode_to_vec(),
    )
}

/// The attributes of a message row (none, or undecodable: empty); also
/// read by `jetstream::migrate`.
pub(crate) fn decode_attributes(blob: Option<&[u8]>) -> HashMap<String, String> {
    blob.and_then(|b| StoredAttributes::decode(b).ok())
        .map(|a| a.attributes)
        .unwrap_or_default()
}
