//! The background fill: brings a node's replica of a template to READY (every non-zero
//! chunk local and pinned) while the template is served lazily.
//!
//! Chunks are fetched in the order of the template's published trace (the boot working
//! set), then in index order; with bounded concurrency and an optional bandwidth cap;
//! demand reads go first (a fill waits while a reader waits for a fetch). A chunk that
//! cannot be fetched is retried with backoff; after [`MAX_CHUNK_ATTEMPTS`] the replica
//! is FAILED with the error shown, and a supervisor resumes it when the store answers
//! again (or `warm --redo` does).
//!
//! A chunk that arrived but cannot be written (a full disk, a read-only or unwritable
//! cache) fails the fill at once, without retries: fetching it again would not help.
//! Such a fill stays FAILED and does not download anything until the disk can take a
//! chunk (see [`disk`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyblk_cache::{ChunkCache, FetchError, Priority, ReadError};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::daemon::commit::Commits;
use crate::daemon::node::Node;
use crate::daemon::node_state::phases::{Phase, ReplicaRecord, StateDb};
use crate::daemon::replay::StopReason;
use crate::daemon::replica::{FillStart, FillStatus, Replica};
use crate::daemon::templates::{TemplateError, Templates};
use crate::store::client::StoreClient;

mod disk;
use disk::{DiskWaits, DISK_FAULT_NOTE};

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
/// How often the supervisor looks for FAILED replicas whose sources answer again (or
/// whose disk has room again).
const SUPERVISE_INTERVAL: Duration = Duration::from_secs(3);
/// Tunables of the background fill.
#[derive(Clone, Debug)]
pub struct FillConfig {
    /// Chunks fetched at once per fill.
    pub concurrency: usize,
    /// Bytes per second over all fills; 0 for no cap.
    pub rate: u64,
}

/// Why a warm or evict was refused.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The template cannot be pinned within the cache budget.
    #[error("template {template:?} needs {needed} bytes pinned but the cache budget is {budget} bytes ({pinned} already pinned); raise --cache-size")]
    OverBudget {
        template: String,
        needed: u64,
        budget: u64,
        pinned: u64,
    },
}

/// Runs and tracks the fills of every replica on the node.
pub struct FillScheduler {
    cache: Arc<ChunkCache>,
    store: StoreClient,
    templates: Arc<Templates>,
    /// What commits owe: a replica with an upload pending is not evicted.
    commits: Arc<Commits>,
    db: Arc<StateDb>,
    config: FillConfig,
    /// The next instant the bandwidth cap lets a fill fetch start.
    next_slot: Mutex<Instant>,
    /// Fills stopped by the local disk: what they wait for (see [`disk`]). The
    /// supervisor resumes the others when the store answers.
    disk: DiskWaits,
}

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
    /// The fill scheduler of `node`'s replicas: it keeps only the owners it works with.
    pub fn new(node: &Node, db: Arc<StateDb>, config: FillConfig) -> FillScheduler {
        FillScheduler {
            cache: node.cache.clone(),
            store: node.store.clone(),
            templates: node.templates.clone(),
            commits: node.commits.clone(),
            db,
            config,
            next_slot: Mutex::new(Instant::now()),
            disk: DiskWaits::new(node.cache.clone()),
        }
    }

    /// Starts (or resumes) the fill of `replica`. A READY replica stays READY; a
    /// running fill goes on; a FAILED one restarts only with `redo`.
    pub fn warm(self: &Arc<Self>, replica: &Arc<Replica>, redo: bool) -> Result<Phase, FillError> {
        let cancel = match replica.start_fill(redo, || self.check_budget(replica))? {
            FillStart::Started(cancel) => cancel,
            FillStart::Unchanged(phase) => return Ok(phase),
        };
        self.save(replica);
        let this = self.clone();
        let replica = replica.clone();
        tokio::spawn(async move { this.run_fill(replica, cancel).await });
        Ok(Phase::Distributing)
    }

    fn check_budget(&self, replica: &Replica) -> Result<(), FillError> {
        let budget = self.cache.usage().budget_bytes;
        if budget == 0 {
            return Ok(());
        }
        let needed = replica.manifest().stored_bytes();
        let pinned = self.cache.pinned_bytes();
        if needed + pinned > budget {
            return Err(FillError::OverBudget {
                template: replica.id().to_string(),
                needed,
                budget,
                pinned,
            });
        }
        Ok(())
    }

    async fn run_fill(self: Arc<Self>, replica: Arc<Replica>, cancel: Arc<AtomicBool>) {
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

    /// Drops the node's replica: stops its fill, unpins and deletes its chunks (those
    /// that no other READY replica pins and nobody reads). Refused while exports use
    /// the template, unless `force`.
    pub fn evict(&self, replica: &Arc<Replica>, force: bool) -> Result<usize, FillError> {
        let mut users = replica.users();
        if self.commits.owes(replica.id()) {
            // Its new chunks are pinned until uploaded and stay even with --force.
            users.push(
                "its upload to the store (ORIGIN_ONLY: only this node has its new chunks)".into(),
            );
        }
        if !users.is_empty() && !force {
            return Err(TemplateError::InUse {
                template: replica.id().to_string(),
                users,
            }
            .into());
        }
        replica.stop_fill(Phase::Cleaning);
        replica.replay.stop(StopReason::Evicted);
        self.save(replica);
        let digests: Vec<_> = replica.manifest().stored_chunks().map(|(_, d)| d).collect();
        let removed = self.cache.evict(&digests);
        self.disk.forget(replica.id());
        replica.evicted();
        self.save(replica);
        tracing::info!(template = replica.id(), removed, "replica evicted");
        Ok(removed)
    }

    /// Stops keeping a replica READY (a wish was removed): its fill stops and its chunks
    /// are unpinned, but stay cached (evictable) and the template is still served.
    pub fn unpin(&self, replica: &Arc<Replica>) {
        replica.stop_fill(Phase::Pending);
        replica.replay.stop(StopReason::Unwarmed);
        self.disk.forget(replica.id());
        self.save(replica);
        tracing::info!(
            template = replica.id(),
            "replica unpinned (no longer wished here)"
        );
    }

    /// Saves a replica's phase and progress.
    pub fn save(&self, replica: &Replica) {
        let fill = replica.fill_status();
        let record = ReplicaRecord {
            template: replica.id().to_string(),
            phase: fill.phase,
            chunks_local: replica.local_chunks() as u64,
            chunks_total: replica.manifest().stored_chunks().count() as u64,
            last_error: fill.last_error,
            last_error_at: fill.last_error_at,
        };
        if let Err(e) = self.db.save(&record) {
            tracing::warn!(error = %e, "saving replica state failed");
        }
    }

    /// Picks up where the previous run stopped: READY replicas are pinned again (or
    /// refilled if chunks went missing), DISTRIBUTING ones resume, FAILED ones wait for
    /// the supervisor (those stopped by the disk for room, as before the restart).
    ///
    /// `records`: the phases the node's state read back (`state.db`).
    pub fn restore(self: &Arc<Self>, records: Vec<ReplicaRecord>) {
        for record in records {
            let Some(replica) = self.templates.known(&record.template) else {
                continue;
            };
            replica.restore_fill(FillStatus {
                phase: record.phase,
                last_error: record.last_error.clone(),
                last_error_at: record.last_error_at.clone(),
            });
            match record.phase {
                Phase::Failed
                    if record
                        .last_error
                        .as_deref()
                        .is_some_and(|e| e.ends_with(DISK_FAULT_NOTE)) =>
                {
                    self.disk.record(replica.id());
                }
                Phase::Ready | Phase::Distributing => {
                    // A READY replica whose chunks are all local becomes READY again
                    // without a fetch: the fill finds nothing to fetch, claims them, and
                    // hashes and fsyncs each chunk file (a crash may have left one
                    // short of its bytes), on a low-priority background thread.
                    if let Err(e) = self.warm(&replica, false) {
                        tracing::warn!(template = replica.id(), error = %e, "cannot resume fill");
                    }
                }
                _ => {}
            }
        }
    }

    /// Resumes FAILED fills: those stopped by their sources once the store answers
    /// again, those stopped by the disk once it can take a chunk (see the module header).
    pub async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SUPERVISE_INTERVAL) => {}
                _ = stop.changed() => return,
            }
            for replica in self.templates.all() {
                if replica.phase() != Phase::Failed {
                    continue;
                }
                let resume = if self.disk.is_waiting(replica.id()) {
                    let chunk_size = u64::from(replica.manifest().chunk_size);
                    self.disk.has_room(replica.id(), chunk_size).await
                } else {
                    let answers = self.store.template_ids().await.is_ok();
                    if answers {
                        tracing::info!(
                            template = replica.id(),
                            "store answers again; resuming fill"
                        );
                    }
                    answers
                };
                if resume {
                    if let Err(e) = self.warm(&replica, true) {
                        tracing::warn!(template = replica.id(), error = %e, "cannot resume fill");
                    }
                }
            }
        }
    }

    /// Stops every running fill (shutdown); progress is already saved.
    pub fn stop_all(&self) {
        for replica in self.templates.all() {
            replica.cancel_fill();
            self.save(&replica);
        }
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
