//! `DataDirLock`: the exclusive, advisory lock one daemon holds on its data
//! dir for as long as it runs, taken before the database is opened.
//!
//! The lock is an `flock` on `sluice.lock` inside the dir, resolved through
//! symlinks (so two paths to one dir meet at one lock); the file holds the
//! holder's pid so a refused start can say who holds it. The kernel drops the
//! lock when the process dies, so a crash never leaves a stale lock behind.
//! Calls only `std::fs`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "sluice.lock";

/// Held for the life of the process; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Locks `dir` (created if missing) or says why not: another holder (with
    /// its pid when the file names one) or an IO error.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("cannot resolve data dir {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!(" (pid {pid})"),
                    Err(_) => String::new(),
                };
                return Err(format!(
                    "data dir {} is in use by another sluice process{holder}; \
                     two daemons must never share one data dir",
                    dir.display()
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(format!("cannot lock data dir {}: {e}", dir.display()))
            }
        }
        // Ours now: record who holds it.
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"));
        if let Err(e) = written {
            log::warn!("cannot write pid to {}: {e}", path.display());
        }
        Ok(DataDirLock { _file: file, dir })
    }

    /// The data dir with symlinks resolved.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_and_names_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(tmp.path()).unwrap();
        let link = tmp.path().with_extension("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        let err = DataDirLock::acquire(&link).unwrap_err();
        let _ = std::fs::remove_file(&link);
        assert!(err.contains("in use"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&first.dir().display().to_string()), "{err}");
        drop(first);
        DataDirLock::acquire(tmp.path()).expect("free again once dropped");
    }
}
