//! Fills stopped by the local disk (a chunk arrived but could not be written or made
//! durable): what each waits for before it is tried again. Nothing is downloaded to
//! find out: the disk is probed ([`ChunkCache::probe_write`], one chunk's bytes written
//! and removed) when room appears on the file system, when another chunk write
//! succeeded, or otherwise after a backoff that doubles from [`DISK_FIRST_BACKOFF`] to
//! [`DISK_MAX_BACKOFF`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyblk_cache::ChunkCache;

/// How long a fill stopped by its disk waits, without a sign of room, before the disk
/// is probed again: a probe writes one chunk's bytes and fetches nothing, so this only
/// spares the disk; doubled per failed probe up to [`DISK_MAX_BACKOFF`].
const DISK_FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// The longest a fill stopped by its disk waits between probes without a sign of room:
/// an operator who fixes a read-only or unwritable cache sees the fill resume within
/// ten minutes (at once with `warm --redo`, or when a read's chunk is written).
const DISK_MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Ends the error of a fill stopped by its disk, in status and in the state database:
/// a restarted daemon knows from it to wait for room too, not to download again.
pub(super) const DISK_FAULT_NOTE: &str =
    "(the cache's disk: the fill resumes when a chunk can be written)";

/// What a fill stopped by its disk waits for before it is tried again.
#[derive(Clone, Copy, Debug)]
struct DiskWait {
    /// Probe the disk at this time even without a sign of room.
    next_probe: Instant,
    /// The wait before the next probe after this one fails.
    backoff: Duration,
    /// Bytes free on the cache's file system when the fill stopped or was last probed.
    free: Option<u64>,
    /// The cache's successful chunk writes then.
    writes: u64,
}

/// The fills stopped by the disk, by template.
pub(super) struct DiskWaits {
    cache: Arc<ChunkCache>,
    waits: Mutex<HashMap<String, DiskWait>>,
}

impl DiskWaits {
    pub(super) fn new(cache: Arc<ChunkCache>) -> DiskWaits {
        DiskWaits {
            cache,
            waits: Mutex::new(HashMap::new()),
        }
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, HashMap<String, DiskWait>> {
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the fill of `template` stopped on the disk; returns how long until
    /// its next probe without a sign of room (doubled if it stopped so before).
    pub(super) fn record(&self, template: &str) -> Duration {
        let free = self.cache.free_bytes();
        let writes = self.cache.health().writes();
        let mut waits = self.waits();
        let backoff = match waits.get(template) {
            Some(w) => (w.backoff * 2).min(DISK_MAX_BACKOFF),
            None => DISK_FIRST_BACKOFF,
        };
        waits.insert(
            template.to_string(),
            DiskWait {
                next_probe: Instant::now() + backoff,
                backoff,
                free,
                writes,
            },
        );
        backoff
    }

    /// Whether the fill of `template` stopped on the disk (and not since on its sources,
    /// nor reached READY, nor was evicted or unpinned).
    pub(super) fn is_waiting(&self, template: &str) -> bool {
        self.waits().contains_key(template)
    }

    pub(super) fn forget(&self, template: &str) {
        self.waits().remove(template);
    }

    /// Whether the disk can take a chunk of `chunk_size` bytes for `template` now:
    /// probed (nothing fetched) when room appeared since the fill stopped, when a chunk
    /// write succeeded since, or when its backoff ran out. A failed probe waits again;
    /// after a backoff that ran out, twice as long.
    pub(super) async fn has_room(&self, template: &str, chunk_size: u64) -> bool {
        let Some(wait) = self.waits().get(template).copied() else {
            return true;
        };
        let free = self.cache.free_bytes();
        let writes = self.cache.health().writes();
        let room = match (free, wait.free) {
            (Some(now), Some(then)) => now >= then.saturating_add(chunk_size),
            _ => false,
        };
        let wrote = writes > wait.writes;
        let due = Instant::now() >= wait.next_probe;
        if !(room || wrote || due) {
            return false;
        }
        let cache = self.cache.clone();
        let probe = tokio::task::spawn_blocking(move || cache.probe_write(chunk_size))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = probe {
            let backoff = if due {
                (wait.backoff * 2).min(DISK_MAX_BACKOFF)
            } else {
                wait.backoff
            };
            tracing::debug!(template, error = %e, ?backoff, "the cache's disk still cannot take a chunk");
            if let Some(w) = self.waits().get_mut(template) {
                w.free = free;
                w.writes = writes;
                if due {
                    w.backoff = backoff;
                    w.next_probe = Instant::now() + backoff;
                }
            }
            return false;
        }
        tracing::info!(
            template,
            room,
            wrote,
            "the cache's disk takes a chunk again; resuming fill"
        );
        true
    }
}
