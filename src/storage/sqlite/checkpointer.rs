//! `Checkpointer`: copies the WAL back into the database file on its own
//! thread and connection while publishing never pauses (the writer runs
//! with `wal_autocheckpoint=0` and checkpoints by itself only when it has
//! nothing queued). Passive checkpoints never block the writer. The writer
//! signals every 512 KiB of commits (`WalLink::committed`), and a pass
//! follows at most `PACE` after the previous one began, so under heavy load
//! each pass copies only a few milliseconds of frames; otherwise it looks
//! every `every`. Once the WAL has grown past `WAL_WRAP_PAGES` it catches
//! up (passes back to back until one is short), then asks the writer to
//! finish a checkpoint itself between batches (it then completes, and the
//! next commit starts the WAL from its beginning again, reusing the file in
//! place). Only past `restart_pages` does it force a RESTART checkpoint,
//! which blocks the writer while it runs: a last resort against unbounded
//! disk use. After each pass it lets `CacheRelease` hand the cache of older
//! database pages back to the kernel.
//! Owns its own connection; shares only a `WalLink` with the writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::Connection;

use super::cache_release::CacheRelease;

/// WAL size, in pages, past which the writer is asked to finish a checkpoint.
pub const WAL_WRAP_PAGES: i64 = 4096;

/// Passes start at most this often while commits keep coming. Measured on
/// sustained BatchPublish (`bench/RESULTS.md`, session 7): passes every
/// 200 ms left tens of MB for each pass and for the writer's own
/// checkpoints, which then stalled commits for 20–40 ms several times a
/// second; every 5 ms they stay short.
pub const PACE: Duration = Duration::from_millis(5);

/// What the writer and the checkpointer share: the checkpointer asks the
/// writer to finish a checkpoint (`take_wrap`), and the writer tells the
/// checkpointer that frames are waiting (`committed`; coalesced, never
/// blocks).
#[derive(Clone)]
pub struct WalLink {
    wrap_wanted: Arc<AtomicBool>,
    committed: Sender<()>,
}

impl WalLink {
    /// A link, and the receiving end the checkpointer waits on.
    pub fn new() -> (WalLink, Receiver<()>) {
        let (committed, rx) = crossbeam_channel::bounded(1);
        let link = WalLink {
            wrap_wanted: Arc::new(AtomicBool::new(false)),
            committed,
        };
        (link, rx)
    }

    /// Called by the writer when frames are waiting.
    pub fn committed(&self) {
        let _ = self.committed.try_send(());
    }

    /// True once after the checkpointer asked for a wrap.
    pub fn take_wrap(&self) -> bool {
        self.wrap_wanted.swap(false, Ordering::Relaxed)
    }
}

pub struct Checkpointer {
    /// Dropping this stops the thread (after one last checkpoint).
    pub stop: Sender<()>,
    pub thread: JoinHandle<()>,
}

/// Starts the checkpointer; `link` and `committed` come from one
/// `WalLink::new`, the link's other clone going to the writer.
pub fn spawn(
    conn: Connection,
    every: Duration,
    restart_pages: i64,
    (link, committed): (WalLink, Receiver<()>),
    release: Option<CacheRelease>,
) -> std::io::Result<Checkpointer> {
    let (stop, rx) = crossbeam_channel::bounded::<()>(1);
    let wrap_wanted = link.wrap_wanted;
    let thread = std::thread::Builder::new()
        .name("sluice-checkpoint".into())
        .spawn(move || {
            run(
                conn,
                (rx, committed),
                every,
                restart_pages,
                wrap_wanted,
                release,
            )
        })?;
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

/// Waits for a commit (or `every`), or for the stop; true when stopping.
/// A writer that has gone away stops being waited on.
fn wait(stop: &Receiver<()>, committed: &mut Receiver<()>, every: Duration) -> bool {
    crossbeam_channel::select! {
        recv(stop) -> _ => true,
        recv(committed) -> r => {
            if r.is_err() {
                *committed = crossbeam_channel::never();
            }
            false
        }
        default(every) => false,
    }
}

fn run(
    conn: Connection,
    (stop, mut committed): (Receiver<()>, Receiver<()>),
    every: Duration,
    restart_pages: i64,
    wrap_wanted: Arc<AtomicBool>,
    mut release: Option<CacheRelease>,
) {
    // Set by a stop that arrived while pacing: one last pass, then out.
    let mut stop_seen = false;
    loop {
        let stopping = stop_seen || wait(&stop, &mut committed, every);
        let started = Instant::now();
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
        // Let frames gather for a few milliseconds: a pass per commit would
        // add an fsync of the database to every commit.
        if let Some(rest) = PACE.checked_sub(started.elapsed()) {
            stop_seen = !matches!(stop.recv_timeout(rest), Err(RecvTimeoutError::Timeout));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_size(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join(super::super::schema::DB_FILE))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    #[test]
    fn a_commit_signal_starts_a_pass_without_waiting_for_the_period() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = super::super::schema::open_writer(dir.path(), None).expect("writer");
        let conn = super::super::schema::open_checkpointer(dir.path()).expect("checkpointer");
        let (link, committed) = WalLink::new();
        let checkpointer = spawn(
            conn,
            Duration::from_secs(3600),
            1 << 30,
            (link.clone(), committed),
            None,
        )
        .expect("spawn");
        let before = db_size(dir.path());
        writer
            .execute_batch(
                "CREATE TABLE filler (b BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 256)
                 INSERT INTO filler SELECT zeroblob(4000) FROM n;",
            )
            .expect("fill");
        // Without a signal nothing is copied for an hour.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(db_size(dir.path()), before, "copied before any signal");
        link.committed();
        let deadline = Instant::now() + Duration::from_secs(5);
        while db_size(dir.path()) < before + (1 << 20) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            db_size(dir.path()) >= before + (1 << 20),
            "the signalled pass did not copy the WAL into the database"
        );
        drop(checkpointer.stop);
        checkpointer.thread.join().expect("join");
    }
}
