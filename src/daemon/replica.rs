//! A node's replica of one template (its bytes over the cache, its users, its trace,
//! its fill state and its claim on its chunks) and a sandbox (an overlay and the hold it
//! keeps on its template): the values the daemon's owners keep and share.
//!
//! A replica owns its phase and its claim: their state is private, and every change is
//! one method that checks and changes under one lock (a fill that starts, claims,
//! finishes or fails; an evict or unpin that stops it). The fill scheduler
//! ([`crate::daemon::fill`]) is the replica's worker: it decides when to call them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lazyblk_cache::{Manifest, Overlay, TemplateImage};

use crate::daemon::node_state::phases::{now_rfc3339, Phase};
use crate::daemon::replay::slot::ReplaySlot;
use crate::daemon::trace::TraceRecorder;
use crate::daemon::users::{UserLease, Users};

/// The node's replica of one template: its bytes over the cache, who uses it, and what
/// its first readers touched.
pub struct Replica {
    pub image: Arc<TemplateImage>,
    /// Connections, open files and overlays using this template: named in the error
    /// that refuses an eviction.
    pub users: Arc<Users>,
    /// The order of the first reads of each chunk on this node.
    pub trace: TraceRecorder,
    /// The replay of the template's boot trace on this node, if one ran.
    pub replay: ReplaySlot,
    /// Phase, last error and claim of the background fill: changed only through the
    /// methods below.
    fill: Mutex<FillState>,
    /// What was local at a cache generation: (generation, chunks, bytes). Counting walks
    /// every chunk, so a count is reused until the cache changes.
    local: Mutex<Option<(u64, usize, u64)>>,
    /// [`Manifest::content_id`], worked out on first use (it hashes every digest).
    content_id: std::sync::OnceLock<u64>,
}

/// The cache owner of a READY replica's claims on its chunks.
pub fn replica_owner(template: &str) -> String {
    format!("replica:{template}")
}

/// A replica's fill state.
#[derive(Default)]
struct FillState {
    /// `None` until a fill or a restore set it: PENDING.
    phase: Option<Phase>,
    last_error: Option<String>,
    last_error_at: Option<String>,
    /// Set to stop the running fill (evict, unpin, shutdown).
    cancel: Option<Arc<AtomicBool>>,
    /// The replica's chunks are claimed for it (READY): released on evict, unpin or a
    /// failed fill.
    pinned: bool,
}

/// What the API and the fleet are shown of a replica's fill.
#[derive(Clone, Debug)]
pub struct FillStatus {
    pub phase: Phase,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

/// What [`Replica::start_fill`] did.
pub enum FillStart {
    /// A fill is to run; the handle stops it when set.
    Started(Arc<AtomicBool>),
    /// Nothing to start: the replica stays in this phase.
    Unchanged(Phase),
}

impl Replica {
    /// A replica of a template over `image`, PENDING.
    pub fn new(image: Arc<TemplateImage>, trace: TraceRecorder) -> Replica {
        Replica {
            image,
            users: Arc::default(),
            trace,
            replay: ReplaySlot::default(),
            fill: Mutex::default(),
            local: Mutex::new(None),
            content_id: std::sync::OnceLock::new(),
        }
    }

    /// The identity of the bytes this replica serves ([`Manifest::content_id`]).
    pub fn content_id(&self) -> u64 {
        *self
            .content_id
            .get_or_init(|| self.image.manifest().content_id())
    }

    /// A client read `len` bytes at `offset` (of the template, or of a sandbox over it):
    /// recorded in the boot trace, and told to the replay (which stops when the reads
    /// leave its trace).
    pub fn note_read(&self, offset: u64, len: u64) {
        let image = &self.image;
        self.trace.record_read(
            offset,
            len,
            image.size(),
            image.manifest().chunk_size as u64,
        );
        self.replay.note_read(offset, len);
    }

    pub fn id(&self) -> &str {
        self.image.id()
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        self.image.manifest()
    }

    /// Who is using the template now.
    pub fn users(&self) -> Vec<String> {
        self.users.names()
    }

    /// Registers a user until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>, user: String) -> Lease {
        Lease {
            _lease: self.users.lease(user),
            replica: self.clone(),
        }
    }

    fn state(&self) -> MutexGuard<'_, FillState> {
        self.fill.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.state().phase.unwrap_or(Phase::Pending)
    }

    /// The phase and the last error of the fill.
    pub fn fill_status(&self) -> FillStatus {
        let state = self.state();
        FillStatus {
            phase: state.phase.unwrap_or(Phase::Pending),
            last_error: state.last_error.clone(),
            last_error_at: state.last_error_at.clone(),
        }
    }

    /// Whether the node holds nothing of this replica but its manifest: no fill ran or
    /// runs, nothing is claimed, no read was recorded. Such a replica can be dropped
    /// from memory and read again from the manifest's copy on disk.
    pub fn is_idle(&self) -> bool {
        let state = self.state();
        state.phase.is_none() && !state.pinned && state.cancel.is_none() && !self.trace.is_started()
    }

    /// Whether nothing keeps the replica on this node beyond its manifest: no fill runs
    /// and its chunks are not pinned (users are counted apart, see [`Replica::users`]).
    pub fn is_unkept(&self) -> bool {
        let state = self.state();
        !state.pinned && state.cancel.is_none()
    }

    /// Starts a fill unless one runs or the replica is READY (or being evicted), or
    /// FAILED without `redo`; `admit` (the budget) may refuse it. On a start the phase
    /// is DISTRIBUTING and the last error is cleared.
    pub fn start_fill<E>(
        &self,
        redo: bool,
        admit: impl FnOnce() -> Result<(), E>,
    ) -> Result<FillStart, E> {
        let mut state = self.state();
        let phase = state.phase.unwrap_or(Phase::Pending);
        match phase {
            Phase::Ready | Phase::Distributing | Phase::Cleaning => {
                return Ok(FillStart::Unchanged(phase))
            }
            Phase::Failed if !redo => return Ok(FillStart::Unchanged(phase)),
            Phase::Pending | Phase::Failed => {}
        }
        admit()?;
        let cancel = Arc::new(AtomicBool::new(false));
        state.cancel = Some(cancel.clone());
        state.phase = Some(Phase::Distributing);
        state.last_error = None;
        Ok(FillStart::Started(cancel))
    }

    /// Claims the replica's chunks for it (once): `Ok(false)` if an evict or unpin
    /// stopped the fill first, `Err` if some are not local (evicted under the fill).
    pub fn claim(&self, cancel: &AtomicBool) -> Result<bool, String> {
        let mut state = self.state();
        // An evict or unpin since the last check (it sets `cancel` under this lock):
        // the replica is theirs now; claiming it here would undo them.
        if cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        if !state.pinned {
            // Claim first, then count what is not local: no eviction can come between
            // the count and the claim.
            let cache = self.image.cache();
            let owner = replica_owner(self.id());
            let missing = cache.pin(&owner, self.manifest().stored_chunks().map(|(_, d)| d));
            if missing > 0 {
                cache.release(&owner);
                return Err(format!(
                    "{missing} chunks were evicted before the fill finished"
                ));
            }
            state.pinned = true;
        }
        Ok(true)
    }

    /// The fill is done: READY. `false` (nothing changed) if it was stopped first.
    pub fn finish_fill(&self, cancel: &AtomicBool) -> bool {
        let mut state = self.state();
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        state.phase = Some(Phase::Ready);
        state.cancel = None;
        true
    }

    /// The fill failed: FAILED with the error `error` makes, and the claim let go (a
    /// resumed fill claims again and counts what is missing). `false` (nothing changed,
    /// `error` not called) if it was stopped first: the replica is the stopper's.
    pub fn fail_fill(&self, cancel: &AtomicBool, error: impl FnOnce() -> String) -> bool {
        let mut state = self.state();
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        state.phase = Some(Phase::Failed);
        state.last_error = Some(error());
        state.last_error_at = Some(now_rfc3339());
        state.cancel = None;
        let was_pinned = std::mem::take(&mut state.pinned);
        drop(state);
        if was_pinned {
            self.image.cache().release(&replica_owner(self.id()));
        }
        true
    }

    /// Stops the running fill, if any, sets `phase` (CLEANING for an evict, PENDING for
    /// an unpin) and lets go of the claim; the chunks stay cached.
    pub fn stop_fill(&self, phase: Phase) {
        let mut state = self.state();
        if let Some(cancel) = state.cancel.take() {
            cancel.store(true, Ordering::Relaxed);
        }
        state.phase = Some(phase);
        let was_pinned = std::mem::take(&mut state.pinned);
        drop(state);
        if was_pinned {
            self.image.cache().release(&replica_owner(self.id()));
        }
    }

    /// An evict is done: PENDING, with no error.
    pub fn evicted(&self) {
        let mut state = self.state();
        state.phase = Some(Phase::Pending);
        state.last_error = None;
    }

    /// Takes back what the state database kept: a READY or DISTRIBUTING replica comes
    /// back PENDING (its fill, resumed, makes it READY again), a CLEANING one PENDING.
    pub fn restore_fill(&self, saved: FillStatus) {
        let mut state = self.state();
        state.last_error = saved.last_error;
        state.last_error_at = saved.last_error_at;
        state.phase = Some(match saved.phase {
            Phase::Ready | Phase::Distributing | Phase::Cleaning => Phase::Pending,
            other => other,
        });
    }

    /// Stops the running fill, if any (shutdown); the phase stays as saved.
    pub fn cancel_fill(&self) {
        if let Some(cancel) = &self.state().cancel {
            cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Bytes of the non-zero chunks that are local.
    pub fn local_bytes(&self) -> u64 {
        self.count_local().1
    }

    /// Number of non-zero chunks that are local.
    pub fn local_chunks(&self) -> usize {
        self.count_local().0
    }

    /// (chunks, bytes) local, counted again only when the cache changed since the last
    /// count. A digest repeated in the manifest counts at each place.
    fn count_local(&self) -> (usize, u64) {
        let cache = self.image.cache();
        let generation = cache.generation();
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, chunks, bytes)) = *local {
            if at == generation {
                return (chunks, bytes);
            }
        }
        let (chunks, bytes) = cache.count_local(self.manifest().stored_chunks().map(|(_, d)| d));
        *local = Some((generation, chunks, bytes));
        (chunks, bytes)
    }
}

/// A use of a replica; dropping it ends the use.
pub struct Lease {
    replica: Arc<Replica>,
    _lease: UserLease,
}

impl Lease {
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

/// One sandbox: its overlay, and the hold it keeps on its template.
pub struct Sandbox {
    pub overlay: Arc<Overlay>,
    /// Marks the template in use ("overlay SB") for as long as the overlay exists.
    pub(crate) template: Lease,
    /// NBD connections and open FUSE files using the overlay.
    pub users: Arc<Users>,
}

impl Sandbox {
    pub fn id(&self) -> &str {
        self.overlay.sandbox()
    }

    pub fn template(&self) -> &Arc<Replica> {
        self.template.replica()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lazyblk_cache::{ChunkCache, ChunkStore, Digest};

    use super::*;
    use crate::daemon::counters::DaemonMetrics;
    use crate::daemon::trace::TraceTiming;

    const CHUNK: usize = 1 << 20;

    /// A replica of a two-chunk template over a fresh cache, and the chunks' bytes.
    fn replica(dir: &std::path::Path) -> (Replica, Vec<(Digest, Vec<u8>)>) {
        let store = ChunkStore::open(dir, 0).unwrap();
        let cache = Arc::new(ChunkCache::new(
            store,
            Arc::new(DaemonMetrics::new()),
            Duration::from_secs(1),
        ));
        let mut manifest = Manifest::new("t", 2 * CHUNK as u64, CHUNK as u32);
        let chunks: Vec<(Digest, Vec<u8>)> = (1..=2u8)
            .map(|n| {
                let bytes = vec![n; CHUNK];
                (Digest::of(&bytes), bytes)
            })
            .collect();
        for (i, (digest, _)) in chunks.iter().enumerate() {
            manifest.chunks[i] = Some(*digest);
        }
        let image = Arc::new(TemplateImage::new(Arc::new(manifest), cache, Vec::new()));
        let timing = TraceTiming {
            window: Duration::from_secs(60),
            quiet: Duration::from_secs(10),
        };
        (Replica::new(image, TraceRecorder::new(2, timing)), chunks)
    }

    fn started(start: Result<FillStart, ()>) -> Arc<AtomicBool> {
        match start {
            Ok(FillStart::Started(cancel)) => cancel,
            Ok(FillStart::Unchanged(phase)) => panic!("not started: {phase}"),
            Err(()) => panic!("refused"),
        }
    }

    #[test]
    fn a_fill_goes_pending_distributing_ready_and_an_evict_lets_go_of_its_claim() {
        let dir = tempfile::tempdir().unwrap();
        let (r, chunks) = replica(dir.path());
        assert_eq!(r.phase(), Phase::Pending);
        assert!(r.is_idle());
        // The budget refuses: nothing changes.
        assert!(r.start_fill(false, || Err::<(), _>("over budget")).is_err());
        assert_eq!(r.phase(), Phase::Pending);

        let cancel = started(r.start_fill(false, || Ok(())));
        assert_eq!(r.phase(), Phase::Distributing);
        assert!(matches!(
            r.start_fill(true, || Ok::<(), ()>(())),
            Ok(FillStart::Unchanged(Phase::Distributing))
        ));
        // Not every chunk is local: no claim, not READY.
        let err = r.claim(&cancel).unwrap_err();
        assert!(err.contains("evicted"), "{err}");
        assert_eq!(r.image.cache().pinned_bytes(), 0);
        for (digest, bytes) in &chunks {
            r.image.cache().keep(None, digest, bytes).unwrap();
        }
        assert_eq!(r.claim(&cancel), Ok(true));
        assert!(r.finish_fill(&cancel));
        assert_eq!(r.phase(), Phase::Ready);
        assert_eq!(r.image.cache().pinned_bytes(), 2 * CHUNK as u64);
        assert!(!r.is_idle());

        r.stop_fill(Phase::Cleaning);
        assert_eq!(r.phase(), Phase::Cleaning);
        assert_eq!(r.image.cache().pinned_bytes(), 0, "the claim went");
        r.evicted();
        assert_eq!(r.fill_status().phase, Phase::Pending);
    }

    #[test]
    fn a_stopped_fill_changes_nothing_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (r, chunks) = replica(dir.path());
        for (digest, bytes) in &chunks {
            r.image.cache().keep(None, digest, bytes).unwrap();
        }
        let cancel = started(r.start_fill(false, || Ok(())));
        r.stop_fill(Phase::Pending);
        assert!(cancel.load(Ordering::Relaxed), "the fill was told to stop");
        assert_eq!(r.claim(&cancel), Ok(false));
        assert!(!r.finish_fill(&cancel));
        assert!(!r.fail_fill(&cancel, || unreachable!("no error is made")));
        assert_eq!(r.phase(), Phase::Pending);
        assert_eq!(r.image.cache().pinned_bytes(), 0);
    }

    #[test]
    fn a_failed_fill_shows_its_error_and_restarts_only_with_redo() {
        let dir = tempfile::tempdir().unwrap();
        let (r, chunks) = replica(dir.path());
        for (digest, bytes) in &chunks {
            r.image.cache().keep(None, digest, bytes).unwrap();
        }
        let cancel = started(r.start_fill(false, || Ok(())));
        assert_eq!(r.claim(&cancel), Ok(true));
        assert!(r.fail_fill(&cancel, || "store down".to_string()));
        let status = r.fill_status();
        assert_eq!(status.phase, Phase::Failed);
        assert_eq!(status.last_error.as_deref(), Some("store down"));
        assert!(status.last_error_at.is_some());
        assert_eq!(r.image.cache().pinned_bytes(), 0, "a failed fill lets go");
        assert!(matches!(
            r.start_fill(false, || Ok::<(), ()>(())),
            Ok(FillStart::Unchanged(Phase::Failed))
        ));
        started(r.start_fill(true, || Ok(())));
        assert_eq!(r.fill_status().last_error, None);

        // A restart brings a READY replica back PENDING (its fill makes it READY again).
        r.restore_fill(FillStatus {
            phase: Phase::Ready,
            last_error: None,
            last_error_at: None,
        });
        assert_eq!(r.phase(), Phase::Pending);
    }
}
