//! What the cache tells about itself: its size and counters ([`CacheUsage`]) and
//! whether it can keep what it fetches ([`CacheHealth`], DEGRADED on a full disk).

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
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::warn!("chunk cache recovered: fetched chunks are kept on disk again");
        }
    }

    /// Whether the last write to the cache failed.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
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
