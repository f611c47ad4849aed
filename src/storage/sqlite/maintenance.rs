//! Offline and online care of a data dir, for operators: `check` (SQLite's
//! integrity check plus Sluice's own invariants) and `backup` (a consistent
//! copy through SQLite's online backup API while the daemon runs). Both open
//! their own connections; neither takes the data dir's lock.
//! Called by `cli::data_dir`; may call `schema` and `high_water`.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::high_water::HighWaterMark;
use super::schema::{self, DB_FILE};

/// Most problems listed from one check.
const MAX_PROBLEMS: usize = 100;

/// What `check` found; empty `problems` means healthy.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub last_sequence: u64,
    pub topics: u64,
    pub messages: u64,
    pub groups: u64,
    pub problems: Vec<String>,
}

fn open_read_only(dir: &Path) -> Result<Connection, String> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(format!("no database at {}", path.display()));
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

/// Counts rows of `sql` (a `SELECT count(*) ...`), naming the problem when
/// the count is not zero.
fn expect_none(conn: &Connection, sql: &str, what: &str, problems: &mut Vec<String>) {
    match conn.query_row(sql, [], |r| r.get::<_, i64>(0)) {
        Ok(0) => {}
        Ok(n) => problems.push(format!("{what}: {n}")),
        Err(e) => problems.push(format!("{what}: cannot check ({e})")),
    }
}

/// Checks the database in `dir`: SQLite's `integrity_check`, then Sluice's
/// invariants (sequences, ordinals, cursors within range, the high-water
/// mark). `Err` only when the check could not run at all.
pub fn check(dir: &Path) -> Result<CheckReport, String> {
    let conn = open_read_only(dir)?;
    let mut report = CheckReport::default();
    let mut problems = Vec::new();
    match conn
        .prepare("PRAGMA integrity_check(100)")
        .and_then(|mut st| {
            st.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        }) {
        Ok(rows) => problems.extend(rows.into_iter().filter(|r| r != "ok")),
        Err(e) => problems.push(format!("integrity check failed: {e}")),
    }
    let counts = conn.query_row(
        "SELECT (SELECT count(*) FROM topics), (SELECT count(*) FROM messages), (SELECT count(*) FROM cursors)",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
    );
    match counts {
        Ok((t, m, g)) => {
            (report.topics, report.messages, report.groups) = (t as u64, m as u64, g as u64)
        }
        Err(e) => problems.push(format!("cannot count rows: {e}")),
    }
    match schema::last_sequence(&conn) {
        Ok(last) => report.last_sequence = last,
        Err(e) => problems.push(format!("cannot read the last sequence: {e}")),
    }
    expect_none(
        &conn,
        "SELECT count(*) FROM messages WHERE seq < 1 OR ordinal < 1",
        "messages with a sequence or ordinal below 1",
        &mut problems,
    );
    expect_none(
        &conn,
        "SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM topics t WHERE t.id = m.topic_id)
           AND NOT EXISTS (SELECT 1 FROM doomed_topics d WHERE d.id = m.topic_id)",
        "messages of no topic",
        &mut problems,
    );
    expect_none(
        &conn,
        "SELECT count(*) FROM (SELECT ordinal, lag(ordinal) OVER (PARTITION BY topic_id ORDER BY seq) AS prev
           FROM messages) WHERE prev IS NOT NULL AND ordinal <= prev",
        "messages whose topic ordinal does not grow with the sequence",
        &mut problems,
    );
    expect_none(
        &conn,
        "SELECT count(*) FROM cursors c WHERE NOT EXISTS (SELECT 1 FROM topics t WHERE t.id = c.topic_id)",
        "consumer-group cursors of no topic",
        &mut problems,
    );
    expect_none(
        &conn,
        &format!(
            "SELECT count(*) FROM cursors WHERE seq < 0 OR seq > {}",
            report.last_sequence
        ),
        "consumer-group cursors past the last sequence (the database lost its tail)",
        &mut problems,
    );
    match HighWaterMark::open(dir) {
        Ok((_, recorded)) if recorded.committed > report.last_sequence => problems.push(format!(
            "the high-water mark says sequences up to {} were committed, but the last stored is {} \
             (the database lost its tail)",
            recorded.committed, report.last_sequence
        )),
        Ok(_) => {}
        Err(e) => problems.push(e),
    }
    problems.truncate(MAX_PROBLEMS);
    report.problems = problems;
    Ok(report)
}

/// What `backup` did.
#[derive(Debug)]
pub struct BackupReport {
    pub pages: i64,
    pub bytes: u64,
    pub took: Duration,
}

/// Copies the database in `dir` to `to` (which must not exist) as one
/// consistent snapshot. In WAL mode the copy's read transaction does not
/// block the daemon's commits. The copy is checked and fsync'd; restoring
/// is copying it as `sluice.db` into an empty data dir.
pub fn backup(dir: &Path, to: &Path) -> Result<BackupReport, String> {
    if to.exists() {
        return Err(format!(
            "{} exists already; refusing to overwrite it",
            to.display()
        ));
    }
    let started = Instant::now();
    let src = open_read_only(dir)?;
    let mut dst =
        Connection::open(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let pages = {
        let b = rusqlite::backup::Backup::new(&src, &mut dst)
            .map_err(|e| format!("cannot start the backup: {e}"))?;
        // All pages in one step: one snapshot, never restarted by commits.
        loop {
            use rusqlite::backup::StepResult;
            match b.step(-1).map_err(|e| format!("backup failed: {e}"))? {
                StepResult::Done => break,
                StepResult::More => {}
                _ => std::thread::sleep(Duration::from_millis(5)), // busy or locked
            }
        }
        b.progress().pagecount as i64
    };
    let ok: String = dst
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("cannot check the copy: {e}"))?;
    if ok != "ok" {
        return Err(format!("the copy failed its check: {ok}"));
    }
    // A plain rollback-journal file: a restore needs no -wal beside it.
    dst.pragma_update(None, "journal_mode", "DELETE")
        .map_err(|e| e.to_string())?;
    drop(dst);
    let file = std::fs::File::open(to).map_err(|e| e.to_string())?;
    file.sync_all()
        .map_err(|e| format!("cannot fsync {}: {e}", to.display()))?;
    let bytes = file.metadata().map_or(0, |m| m.len());
    Ok(BackupReport {
        pages,
        bytes,
        took: started.elapsed(),
    })
}
