//! `Checkpointer`: copies the WAL back into the database file on its own
//! thread and connection while publishing never pauses (the writer runs
//! with `wal_autocheckpoint=0` and checkpoints by itself only when it has
//! nothing queued). Passive checkpoints never block the writer. Once the WAL
//! has grown past `WAL_WRAP_PAGES` it catches up (passes back to back until
//! one is short), then asks the writer to finish a checkpoint itself between
//! batches (it then completes, and the next commit starts the WAL from its
//! beginning again, reusing the file in place). Only past `restart_pages`
//! does it force a RESTART checkpoint, which blocks the writer while it
//! runs: a last resort against unbounded disk use.
//! After each pass it lets `CacheRelease` hand older database pages' cache
//! back to the kernel.
//! Owns its own connection; shares only the `wal_wrap` flag with the writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::Connection;

use super::cache_release::CacheRelease;

/// WAL size, in pages, past which the writer is asked to finish a checkpoint.
pub const WAL_WRAP_PAGES: i64 = 4096;

pub struct Checkpointer {
    /// Dropping this stops the thread (after one last checkpoint).
    pub stop: Sender<()>,
    pub thread: JoinHandle<()>,
}

pub fn spawn(
    conn: Connection,
    every: Duration,
    restart_pages: i64,
    wrap_wanted: Arc<AtomicBool>,
    release: Option<CacheRelease>,
) -> std::io::Result<Checkpointer> {
    let (stop, rx) = crossbeam_channel::bounded::<()>(1);
    let thread = std::thread::Builder::new()
        .name("sluice-checkpoint".into())
        .spawn(move || run(conn, rx, every, restart_pages, wrap_wanted, release))?;
    Ok(Checkpointer { stop, thread })
}

/// Runs `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames
/// copied). The writer calls it too, on its own connection.
pub(super) fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

/// A pass this short means little was left to copy.
const SHORT_PASS: Duration = Duration::from_millis(5);
/// At most this many passes in a row (the writer may outpace them).
const CATCH_UP_PASSES: usize = 20;

/// Copies again right away while passes are long (frames arrive while a
/// pass runs), so that the checkpoint the writer then finishes itself, during
/// which it commits nothing, copies only the last few milliseconds of frames
/// instead of a whole interval's.
fn catch_up(conn: &Connection, stop: &Receiver<()>) {
    for _ in 0..CATCH_UP_PASSES {
        if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
            return;
        }
        let started = Instant::now();
        if let Err(e) = checkpoint(conn, "PASSIVE") {
            crate::log_limited!(log::Level::Warn, "checkpoint failed: {e}");
            return;
        }
        if started.elapsed() < SHORT_PASS {
            return;
        }
    }
}

fn run(
    conn: Connection,
    stop: Receiver<()>,
    every: Duration,
    restart_pages: i64,
    wrap_wanted: Arc<AtomicBool>,
    mut release: Option<CacheRelease>,
) {
    loop {
        let stopping = !matches!(stop.recv_timeout(every), Err(RecvTimeoutError::Timeout));
        match checkpoint(&conn, "PASSIVE") {
            Ok((_, log, _)) if log > restart_pages => {
                if let Err(e) = checkpoint(&conn, "RESTART") {
                    crate::log_limited!(log::Level::Warn, "checkpoint: restart failed: {e}");
                }
            }
            Ok((_, log, _)) if log > WAL_WRAP_PAGES => {
                catch_up(&conn, &stop);
                wrap_wanted.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => crate::log_limited!(log::Level::Warn, "checkpoint failed: {e}"),
        }
        if let Some(release) = release.as_mut() {
            release.after_checkpoint();
        }
        if stopping {
            return;
        }
    }
}
