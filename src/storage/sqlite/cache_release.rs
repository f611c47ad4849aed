//! `CacheRelease`: hands the page cache of the database file's older,
//! checkpointed pages back to the kernel as the file grows, keeping only its
//! newest `KEEP` bytes cached. A message log is written once and read near
//! its tail; letting the kernel cache every checkpointed page makes the
//! broker's footprint grow by the size of its store (charged to its cgroup,
//! pushing out other files) and, on virtual machines whose free memory is
//! handed back to the host, makes every newly cached page cost a host fault:
//! measured here at about 2.6 s of CPU per GB written, against 0.3 s when the
//! cache is recycled (`bench/RESULTS.md`, session 7).
//! Owns a read-only handle on the database file; called by the checkpointer
//! after its passes. Pages still dirty are only queued for writeback by the
//! kernel and released by a later call.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The newest part of the file that stays cached (a few seconds of writes
/// at full speed: what live consumers read back).
pub const KEEP: u64 = 256 << 20;
/// Growth of the file between two releases.
pub const STEP: u64 = 64 << 20;

pub struct CacheRelease {
    file: File,
    /// File size at the last release.
    released_at: u64,
    keep: u64,
    step: u64,
}

impl CacheRelease {
    pub fn open(db: &Path) -> std::io::Result<CacheRelease> {
        CacheRelease::with_limits(db, KEEP, STEP)
    }

    /// Keeps the newest `keep` bytes cached, releasing every `step` bytes
    /// of growth.
    pub fn with_limits(db: &Path, keep: u64, step: u64) -> std::io::Result<CacheRelease> {
        let file = File::open(db)?;
        let released_at = file.metadata()?.len();
        Ok(CacheRelease {
            file,
            released_at,
            keep,
            step,
        })
    }

    /// Releases the cache below the file's newest `KEEP` bytes once it has
    /// grown by `STEP` since the last release. A file that does not grow
    /// (retention reusing its free pages) is left alone: its cache stays as
    /// large as the file, and its hot pages may sit anywhere in it.
    pub fn after_checkpoint(&mut self) {
        let size = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return,
        };
        if size < self.released_at {
            // Shrunk (vacuum): start counting again from here.
            self.released_at = size;
            return;
        }
        if size - self.released_at < self.step || size <= self.keep {
            return;
        }
        self.released_at = size;
        let len = (size - self.keep) as libc::off_t;
        // SAFETY: posix_fadvise only reads its arguments; the descriptor is
        // owned by `self.file` and open for the whole call.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), 0, len, libc::POSIX_FADV_DONTNEED)
        };
        if rc != 0 {
            crate::log_limited!(
                log::Level::Debug,
                "releasing the database's page cache failed: errno {rc}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    /// Pages of `path` in the page cache, counted with `mincore`.
    fn cached_pages(path: &Path) -> usize {
        let file = File::open(path).expect("open");
        let len = file.metadata().expect("metadata").len() as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of a file we keep open; it is
        // unmapped before returning and never dereferenced.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    fn grow(path: &Path, by: u64) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open for append");
        f.write_all(&vec![7u8; by as usize]).expect("write");
        f.sync_all().expect("fsync");
    }

    #[test]
    fn releases_all_but_the_newest_pages_once_the_file_has_grown_a_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        std::fs::write(&path, b"").expect("create");
        let mut release = CacheRelease::with_limits(&path, 2 * MIB, 4 * MIB).expect("open");

        grow(&path, 3 * MIB);
        release.after_checkpoint();
        // Less than a step of growth: nothing released.
        assert_eq!(cached_pages(&path), 768);

        grow(&path, 5 * MIB);
        release.after_checkpoint();
        // 8 MiB written, the newest 2 MiB kept (512 pages of 4 KiB).
        assert_eq!(cached_pages(&path), 512);

        grow(&path, MIB);
        release.after_checkpoint();
        // 1 MiB since the release: below a step, kept.
        assert_eq!(cached_pages(&path), 768);
    }

    #[test]
    fn a_file_that_does_not_grow_keeps_its_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        std::fs::write(&path, vec![1u8; (8 * MIB) as usize]).expect("create");
        File::open(&path).expect("open").sync_all().expect("fsync");
        let before = cached_pages(&path);
        let mut release = CacheRelease::with_limits(&path, 2 * MIB, 4 * MIB).expect("open");
        release.after_checkpoint();
        assert_eq!(cached_pages(&path), before);
    }
}
