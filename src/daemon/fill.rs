//! The background fill: brings a node's replica of a template to READY (every non-zero
//! chunk local and pinned) while the template is served lazily.
//!
//! Chunks are fetched in the order of the template's published trace (the boot working
//! set), then in index order; with bounded concurrency and an optional bandwidth cap;
//! demand reads go first (a fill waits while a reader waits for a fetch). A chunk that
//! cannot be fetched is retried with backoff; after [`run::MAX_CHUNK_ATTEMPTS`] the replica
//! is FAILED with the error shown, and a supervisor resumes it when the store answers
//! again (or `warm --redo` does).
//!
//! A chunk that arrived but cannot be written (a full disk, a read-only or unwritable
//! cache) fails the fill at once, without retries: fetching it again would not help.
//! Such a fill stays FAILED and does not download anything until the disk can take a
//! chunk (see [`disk`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazyblk_cache::ChunkCache;
use tokio::sync::watch;

use crate::daemon::commit::Commits;
use crate::daemon::node::Node;
use crate::daemon::node_state::phases::{Phase, ReplicaRecord, StateDb};
use crate::daemon::replay::StopReason;
use crate::daemon::replica::{FillStart, FillStatus, Replica};
use crate::daemon::templates::{TemplateError, Templates};
use crate::store::client::StoreClient;

mod disk;
mod run;
use disk::{DiskWaits, DISK_FAULT_NOTE};

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
