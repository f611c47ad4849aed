//! `BacklogReader`: threads with read-only connections that serve pages of a
//! topic's stored messages to the reactor, never more than asked for (the
//! subscriber's credit) and never more than a byte budget.
//! May call SQLite and `broker` types; speaks `storage::interface` types.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use rusqlite::{params, Connection};

use super::decode_attributes;
use crate::broker::{MessageId, StoredMessage};
use crate::storage::{Page, PageRequest, StorageError, Wake, WakeOnExit};

/// The wait after a failed read, doubling up to the maximum while reads fail.
const READ_BACKOFF_MIN: Duration = Duration::from_millis(10);
const READ_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Largest page, in payload bytes (a page stops early past this).
const PAGE_MAX_BYTES: usize = 4 << 20;

pub struct BacklogReader {
    pub requests: Sender<PageRequest>,
    pub threads: Vec<JoinHandle<()>>,
}

/// Starts `count` reader threads on connections made by `open`.
pub fn spawn(
    count: usize,
    open: impl Fn() -> rusqlite::Result<Connection>,
    capacity: usize,
    pages: Sender<Page>,
    wake: Wake,
) -> Result<BacklogReader, StorageError> {
    let (tx, rx) = crossbeam_channel::bounded::<PageRequest>(capacity.max(1));
    let mut threads = Vec::new();
    for i in 0..count.max(1) {
        let conn = open().map_err(|e| StorageError::from_sqlite(&e))?;
        let (rx, pages, wake) = (rx.clone(), pages.clone(), wake.clone());
        let t = std::thread::Builder::new()
            .name(format!("sluice-reader-{i}"))
            .spawn(move || {
                let _exit = WakeOnExit(wake.clone());
                serve(conn, rx, pages, wake)
            })
            .map_err(|e| StorageError::new(e.to_string()))?;
        threads.push(t);
    }
    Ok(BacklogReader {
        requests: tx,
        threads,
    })
}

fn serve(conn: Connection, rx: Receiver<PageRequest>, pages: Sender<Page>, wake: Wake) {
    // After a failed read the next one waits a little, doubling while reads
    // keep failing: a damaged database must not turn into a busy loop of
    // reads and errors.
    let mut backoff = Duration::ZERO;
    while let Ok(req) = rx.recv() {
        if crate::failpoint::hit("reader-panic") {
            panic!("failpoint reader-panic");
        }
        if !backoff.is_zero() {
            std::thread::sleep(backoff);
        }
        let page = match read_page(&conn, &req) {
            Ok(p) => {
                backoff = Duration::ZERO;
                p
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(READ_BACKOFF_MIN, READ_BACKOFF_MAX);
                crate::log_limited!(
                    log::Level::Error,
                    "reader: page of {} from sequence {} failed: {e}",
                    req.topic,
                    req.from
                );
                // The subscriber's stream ends with this error: no retry loop.
                Page {
                    sub: req.sub,
                    fetch: req.fetch,
                    messages: Vec::new(),
                    end: None,
                    error: Some(StorageError::from_sqlite(&e)),
                }
            }
        };
        if pages.send(page).is_err() {
            return;
        }
        wake();
    }
}

/// Reads one page in a single read transaction (one consistent snapshot).
pub fn read_page(conn: &Connection, req: &PageRequest) -> rusqlite::Result<Page> {
    let tx = conn.unchecked_transaction()?;
    let mut stmt = tx.prepare_cached(
        "SELECT m.seq, m.ordinal, m.ts, m.payload, m.attributes
         FROM messages m JOIN topics t ON m.topic_id = t.id
         WHERE t.name = ?1 AND m.seq >= ?2 ORDER BY m.seq LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![
        req.topic.as_ref(),
        req.from as i64,
        i64::from(req.limit)
    ])?;
    let mut messages = Vec::new();
    let mut bytes = 0;
    let mut cut = false;
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as u64;
        let ts: i64 = r.get(2)?;
        let payload: Vec<u8> = r.get(3)?;
        let attrs: Option<Vec<u8>> = r.get(4)?;
        bytes += payload.len();
        messages.push(Arc::new(StoredMessage {
            sequence: seq,
            ordinal: r.get::<_, i64>(1)? as u64,
            id: MessageId::new(ts, seq, &req.topic),
            timestamp_ms: ts,
            payload: payload.into(),
            attributes: decode_attributes(attrs.as_deref()),
        }));
        if bytes >= PAGE_MAX_BYTES {
            cut = true;
            break;
        }
    }
    drop(rows);
    drop(stmt);
    let end = if !cut && messages.len() < req.limit as usize {
        let last: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM messages", [], |r| {
            r.get(0)
        })?;
        Some(last as u64)
    } else {
        None
    };
    tx.commit()?;
    Ok(Page {
        sub: req.sub,
        fetch: req.fetch,
        messages,
        end,
        error: None,
    })
}
