//! What the cache tells about itself: its size and counters ([`CacheUsage`]) and
//! whether it can keep what it fetches ([`CacheHealth`], DEGRADED on a full disk), and
//! the two looks at its disk that a fill stopped by it waits on without downloading
//! anything: the room left on the file system ([`free_bytes`]) and a probe write of a
//! chunk's size ([`probe_write`]).

use std::io::Write;
use std::path::Path;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The cache's size and counters ([`crate::ChunkCache::usage`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheUsage {
    pub used_bytes: u64,
    /// 0: no limit.
    pub budget_bytes: u64,
    pub chunks: usize,
    /// Chunks deleted to stay within the budget or by request, since start.
    pub evictions: u64,
    /// Chunk files found corrupt (and dropped) since start.
    pub corrupt_files: u64,
}

/// Whether the cache can keep what it fetches. A failed write (a full disk, say) does
/// not fail the read that fetched the bytes; the cache is then DEGRADED: it serves
/// from memory what it cannot keep, says so once in the log, in status and in metrics,
/// and recovers by itself at the next write that succeeds.
#[derive(Default)]
pub struct CacheHealth {
    degraded: std::sync::atomic::AtomicBool,
    write_failures: AtomicU64,
    /// Chunk writes that succeeded since start: a fill stopped by the disk resumes
    /// when this moves (something could be written again).
    writes: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl CacheHealth {
    pub(crate) fn write_failed(&self, error: &dyn std::fmt::Display) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::error!(%error, "chunk cache DEGRADED: fetched chunks cannot be kept on disk; reads are answered from memory and fetched again");
        }
    }

    pub(crate) fn write_ok(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::warn!("chunk cache recovered: fetched chunks are kept on disk again");
        }
    }

    /// Whether the last write to the cache failed.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Chunk writes to the cache that succeeded since start.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Cache writes that failed since start.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// The last write error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Where a probe is written: the chunk store's `tmp/` directory (emptied at open, so a
/// probe a crash left there goes then), and renamed into `chunks/` as a chunk is.
const PROBE_FILE: &str = "tmp/write-probe";
/// Where a probe is placed, as a chunk would be, before it is removed. Not a chunk's
/// name (the store's scan passes over it); one left by a crash is removed at the next
/// probe.
const PROBE_PLACED: &str = "chunks/write-probe";

/// Bytes an unprivileged writer may still put on the file system holding `dir`; `None`
/// if it cannot be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a valid C string and `stats` is writable memory of the size
    // statvfs fills; it is read only when the call succeeded.
    let stats = unsafe {
        if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    Some((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// Writes `len` bytes under the chunk store `root` the way a chunk is written (into
/// `tmp/`, then renamed into `chunks/`) and removes them: whether a chunk of that size
/// could be kept now (a full disk, a read-only or unwritable cache say no). Blocking;
/// nothing is fetched.
pub fn probe_write(root: &Path, len: u64) -> std::io::Result<()> {
    /// Written a piece at a time, so a probe of a large chunk holds little memory.
    const PIECE: usize = 64 << 10;
    let (path, placed) = (root.join(PROBE_FILE), root.join(PROBE_PLACED));
    let _ = std::fs::remove_file(&placed);
    let written = (|| {
        let mut file = std::fs::File::create(&path)?;
        let zeros = vec![0u8; PIECE];
        let mut left = len;
        while left > 0 {
            let n = left.min(PIECE as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        std::fs::rename(&path, &placed)?;
        std::fs::remove_file(&placed)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&placed);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_writes_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["tmp", "chunks"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        probe_write(dir.path(), 200_000).unwrap();
        for sub in ["tmp", "chunks"] {
            assert_eq!(std::fs::read_dir(dir.path().join(sub)).unwrap().count(), 0);
        }
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
        // A store whose tmp directory is gone cannot be written.
        assert!(probe_write(&dir.path().join("missing"), 10).is_err());
    }
}
