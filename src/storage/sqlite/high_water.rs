//! `HighWaterMark`: a durable record of the sequences handed out, kept
//! outside the database (`sluice.hwm`), so a database that lost its tail
//! (a damaged WAL) never makes the writer reuse a sequence a client was
//! already given, or one a consumer group's cursor has passed.
//!
//! Sequences are reserved in blocks: before the writer uses a sequence above
//! the reserved ceiling it writes a new ceiling (and the last sequence known
//! committed at that moment) and fsyncs it. A restart continues after the
//! ceiling. A clean shutdown records the exact last sequence, so a clean
//! restart wastes none. Owned by the writer thread; calls only `std::fs`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file's name inside the data dir.
pub const HWM_FILE: &str = "sluice.hwm";

/// Sequences reserved per fsync of the mark: at 600k messages/s about ten
/// extra small fsyncs a second; a crash skips at most this many.
pub const BLOCK: u64 = 65_536;

/// What the file said at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recorded {
    /// No sequence above this was ever handed out.
    pub ceiling: u64,
    /// Every sequence up to this was committed (and may have been acked).
    pub committed: u64,
}

/// The mark as the writer keeps it.
#[derive(Debug)]
pub struct HighWaterMark {
    path: PathBuf,
    dir: PathBuf,
    ceiling: u64,
    block: u64,
}

impl HighWaterMark {
    /// Reads the mark in `dir` (none yet: zeros). A damaged file is an error:
    /// guessing low could reuse sequences.
    pub fn open(dir: &Path) -> Result<(HighWaterMark, Recorded), String> {
        let path = dir.join(HWM_FILE);
        let recorded = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).ok_or_else(|| {
                format!(
                    "{} is damaged ({text:?}); it must hold \"<ceiling> <committed>\". \
                     If the database is intact, delete the file to start after the database's last sequence",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Recorded::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok((
            HighWaterMark {
                path,
                dir: dir.to_path_buf(),
                ceiling: recorded.ceiling,
                block: BLOCK,
            },
            recorded,
        ))
    }

    /// A smaller block, for tests that cross many blocks.
    pub fn with_block(mut self, block: u64) -> Self {
        self.block = block.max(1);
        self
    }

    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// Makes sure sequences up to `last_needed` are reserved; `committed` is
    /// the last sequence already committed. Writes and fsyncs a new ceiling
    /// only when `last_needed` is above the current one.
    pub fn reserve(&mut self, last_needed: u64, committed: u64) -> std::io::Result<()> {
        if last_needed <= self.ceiling {
            return Ok(());
        }
        let ceiling = last_needed.saturating_add(self.block);
        self.write(ceiling, committed)?;
        self.ceiling = ceiling;
        Ok(())
    }

    /// At a clean shutdown: nothing above `ceiling` was handed out, and
    /// everything up to `committed` was committed.
    pub fn close(&mut self, ceiling: u64, committed: u64) -> std::io::Result<()> {
        self.write(ceiling, committed.min(ceiling))?;
        self.ceiling = ceiling;
        Ok(())
    }

    /// Replaces the file atomically: a temporary file, fsync, rename, fsync
    /// of the directory.
    fn write(&self, ceiling: u64, committed: u64) -> std::io::Result<()> {
        let tmp = self.path.with_extension("hwm.tmp");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            writeln!(f, "{ceiling} {committed}")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        File::open(&self.dir)?.sync_all()
    }
}

fn parse(text: &str) -> Option<Recorded> {
    let mut parts = text.split_whitespace();
    let ceiling = parts.next()?.parse().ok()?;
    let committed = parts.next()?.parse().ok()?;
    if parts.next().is_some() || committed > ceiling {
        return None;
    }
    Some(Recorded { ceiling, committed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_in_blocks_and_survives_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut hwm, rec) = HighWaterMark::open(tmp.path()).unwrap();
        assert_eq!(rec, Recorded::default());
        let mut hwm_small = HighWaterMark::open(tmp.path()).unwrap().0.with_block(10);
        hwm_small.reserve(5, 0).unwrap();
        assert_eq!(hwm_small.ceiling(), 15);
        hwm_small.reserve(15, 3).unwrap(); // within the block: no write
        assert_eq!(HighWaterMark::open(tmp.path()).unwrap().1.ceiling, 15);
        hwm_small.reserve(16, 15).unwrap();
        let rec = HighWaterMark::open(tmp.path()).unwrap().1;
        assert_eq!(
            rec,
            Recorded {
                ceiling: 26,
                committed: 15
            }
        );
        hwm.close(20, 20).unwrap();
        let rec = HighWaterMark::open(tmp.path()).unwrap().1;
        assert_eq!(
            rec,
            Recorded {
                ceiling: 20,
                committed: 20
            }
        );
    }

    #[test]
    fn a_damaged_mark_is_refused_not_guessed() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "12", "x 1", "5 9", "1 2 3"] {
            std::fs::write(tmp.path().join(HWM_FILE), bad).unwrap();
            let err = HighWaterMark::open(tmp.path()).unwrap_err();
            assert!(err.contains("damaged"), "{bad:?}: {err}");
        }
    }
}
