//! One fill's run: its order (the trace's chunks first), its pace beside demand reads
//! and under the bandwidth cap, a chunk's retries, and how it ends: READY (its chunks
//! claimed and made durable), FAILED (by the disk or by the sources), or stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyblk_cache::{FetchError, Priority, ReadError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::disk::DISK_FAULT_NOTE;
use super::FillScheduler;
use crate::daemon::replica::Replica;

/// Tries per chunk before the fill gives up and the replica is FAILED. With the
/// backoff below that is about 8 s of a source being down (plus each try's own
/// deadline): long enough to ride out a restart, short enough to tell an operator.
pub const MAX_CHUNK_ATTEMPTS: u32 = 5;
/// First pause between tries of one chunk; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long a fill waits for demand reads before it fetches anyway (so a steady stream
/// of demand misses slows a fill down but never stops it).
const DEMAND_YIELD_LIMIT: Duration = Duration::from_millis(200);
/// Reads within this long count as active readers: the fill then fetches one chunk at
/// a time.
const DEMAND_ACTIVE: Duration = Duration::from_millis(50);
/// While readers are active a fill pauses after each chunk as long as the chunk took,
/// up to this: a fast fill (the CPU-heavy kind: bytes per second cost CPU on this node
/// and its source) runs at half duty, a slow network-bound one loses little. Paired
/// runs of B5: the p99 of cached reads during a fill went from 2.1-2.4x of idle to
/// 1.3-1.9x, the fill under that load from 6 s to 10-11 s; alone it is unchanged.
const MAX_READER_PAUSE: Duration = Duration::from_millis(10);
/// How often a running fill checkpoints its progress to the state database. Phase
/// changes are saved at once; progress only matters to an operator reading the
/// database (a restart resumes the fill and counts what is local again), so a fill
/// costs one SQLite write and one count of its chunks per half minute, not per second.
const PROGRESS_SAVE_INTERVAL: Duration = Duration::from_secs(30);
/// Why a fill stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The local disk: a chunk arrived but could not be written or made durable.
    Disk,
    /// The sources: no source delivered a chunk (or the chunks on disk went bad).
    Source,
}

/// Why a fill stopped, with the error an operator sees.
type Failure = (Fault, String);

impl FillScheduler {
    /// Runs the fill of `replica` to READY, FAILED, or its cancel.
    pub(super) async fn run_fill(self: Arc<Self>, replica: Arc<Replica>, cancel: Arc<AtomicBool>) {
        let started = Instant::now();
        let order = self.fill_order(&replica).await;
        let semaphore = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let failed: Arc<Mutex<Option<Failure>>> = Arc::default();
        let mut tasks = JoinSet::new();
        let mut last_save = Instant::now();
        let mut last_spawn: Option<Instant> = None;
        for index in order {
            if cancel.load(Ordering::Relaxed)
                || failed.lock().unwrap_or_else(|e| e.into_inner()).is_some()
            {
                break;
            }
            if replica.image.is_local(index) {
                continue;
            }
            if self.cache.demand_within(DEMAND_ACTIVE) {
                // Readers are active: one fill fetch at a time, then a pause (see
                // MAX_READER_PAUSE), so their reads keep the CPU and the disk (the fill
                // still makes progress).
                while tasks.join_next().await.is_some() {}
                if let Some(at) = last_spawn.take() {
                    tokio::time::sleep(at.elapsed().min(MAX_READER_PAUSE)).await;
                }
            }
            let Ok(permit) = semaphore.clone().acquire_owned().await else {
                break;
            };
            self.yield_to_demand().await;
            self.throttle(replica.manifest().chunk_len(index)).await;
            let task_replica = replica.clone();
            let failed = failed.clone();
            last_spawn = Some(Instant::now());
            tasks.spawn(async move {
                if let Err(e) = fetch_with_retries(&task_replica, index).await {
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                }
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
            if last_save.elapsed() > PROGRESS_SAVE_INTERVAL {
                self.save(&replica);
                last_save = Instant::now();
            }
        }
        while tasks.join_next().await.is_some() {}
        let error = failed.lock().unwrap_or_else(|e| e.into_inner()).take();
        if cancel.load(Ordering::Relaxed) {
            tracing::info!(template = replica.id(), "fill stopped");
            return;
        }
        if let Some((fault, e)) = error {
            return self.fail(&replica, fault, e, &cancel);
        }
        // The chunks are claimed first, so none is evicted (and fetched again, not yet
        // on disk) while they are made durable.
        match self.claim(&replica, &cancel) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return self.fail(&replica, Fault::Source, e, &cancel),
        }
        // READY promises the chunks survive a crash: their bytes and names are made
        // durable once here, not one fsync per fetched chunk.
        let cache = self.cache.clone();
        let digests: Vec<_> = replica.manifest().stored_chunks().map(|(_, d)| d).collect();
        // On a low-priority thread: after a restart this hashes the replica's files.
        let durable =
            match lazyblk_cache::background::run(true, move || cache.make_durable(digests)).await {
                Ok(Ok(0)) => Ok(()),
                // Files a crash left short of their bytes: fetched again when the fill
                // resumes (the supervisor resumes FAILED fills).
                Ok(Ok(dropped)) => Err((
                    Fault::Source,
                    format!(
                        "{dropped} chunk files on disk were gone or did not match their \
                         digests (a crash before they were written back?); to be fetched again"
                    ),
                )),
                Ok(Err(e)) => Err((Fault::Disk, format!("making the chunks durable: {e}"))),
                Err(e) => Err((Fault::Disk, format!("making the chunks durable: {e}"))),
            };
        match durable {
            Ok(()) => self.finish(&replica, started, &cancel),
            Err((fault, e)) => self.fail(&replica, fault, e, &cancel),
        }
    }

    /// The trace's chunks first, in trace order, then every other chunk in order.
    async fn fill_order(&self, replica: &Replica) -> Vec<usize> {
        let count = replica.manifest().chunk_count();
        let trace = match self.store.trace(replica.id()).await {
            Ok(t) => t.map(|t| t.chunks).unwrap_or_default(),
            Err(e) => {
                tracing::debug!(template = replica.id(), error = %e, "no trace; filling in order");
                Vec::new()
            }
        };
        let mut seen = vec![false; count];
        let mut order = Vec::with_capacity(count);
        for index in trace.into_iter().chain(0..count) {
            if index < count && !std::mem::replace(&mut seen[index], true) {
                order.push(index);
            }
        }
        order
    }

    async fn yield_to_demand(&self) {
        let started = Instant::now();
        while self.cache.demand_waiting() > 0 && started.elapsed() < DEMAND_YIELD_LIMIT {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until the bandwidth cap allows `bytes` more.
    async fn throttle(&self, bytes: u64) {
        if self.config.rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.config.rate as f64);
            start - now
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Claims the replica's chunks for it (once): `Ok(false)` if an evict or unpin came
    /// first, `Err` if some are not local (evicted under the fill: a budget smaller
    /// than the working set; not READY).
    fn claim(&self, replica: &Arc<Replica>, cancel: &AtomicBool) -> Result<bool, String> {
        let claimed = replica.claim(cancel)?;
        if !claimed {
            tracing::info!(template = replica.id(), "fill stopped");
        }
        Ok(claimed)
    }

    fn finish(&self, replica: &Arc<Replica>, started: Instant, cancel: &AtomicBool) {
        if !replica.finish_fill(cancel) {
            tracing::info!(template = replica.id(), "fill stopped");
            return;
        }
        self.disk.forget(replica.id());
        self.save(replica);
        tracing::info!(
            template = replica.id(),
            seconds = started.elapsed().as_secs_f64(),
            "replica READY"
        );
    }

    /// Marks the fill FAILED and lets go of its claim, if it made one: a resumed fill
    /// claims again and counts what is missing (and its own claims do not count against
    /// its budget). Nothing, if an evict or unpin came first: the replica is theirs.
    fn fail(&self, replica: &Arc<Replica>, fault: Fault, error: String, cancel: &AtomicBool) {
        let stopped_error = error.clone();
        let failed = replica.fail_fill(cancel, || match fault {
            Fault::Disk => {
                let wait = self.disk.record(replica.id());
                tracing::warn!(template = replica.id(), %error, next_probe = ?wait,
                    "fill FAILED on the cache's disk; it resumes when a chunk can be written \
                     (probed when room appears); the template is still served lazily");
                format!("{error} {DISK_FAULT_NOTE}")
            }
            Fault::Source => {
                self.disk.forget(replica.id());
                tracing::warn!(template = replica.id(), %error, "fill FAILED; the template is still served lazily");
                error
            }
        });
        if !failed {
            tracing::info!(template = replica.id(), error = %stopped_error, "fill stopped");
            return;
        }
        self.save(replica);
    }
}

/// Fetches one chunk, retrying with backoff; the error of the last try otherwise. A
/// chunk that arrived but could not be written is not fetched again: the disk fails
/// the fill at once.
async fn fetch_with_retries(replica: &Replica, index: usize) -> Result<(), Failure> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match replica.image.fetch_chunk(index, Priority::Fill).await {
            Ok(_) => return Ok(()),
            Err(e) if fault_of(&e) == Fault::Disk => return Err((Fault::Disk, e.to_string())),
            Err(e) if attempt >= MAX_CHUNK_ATTEMPTS => {
                return Err((Fault::Source, format!("after {attempt} tries: {e}")));
            }
            Err(e) => {
                tracing::debug!(template = replica.id(), chunk = index, attempt, error = %e, "fill fetch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}

/// Whether a fill's read failed on the local disk or at its sources.
fn fault_of(error: &ReadError) -> Fault {
    match error {
        ReadError::Local { .. } => Fault::Disk,
        ReadError::Fetch(e) if matches!(**e, FetchError::Local { .. }) => Fault::Disk,
        _ => Fault::Source,
    }
}
