//! A node's replica of one template (its bytes over the cache, its users, its trace,
//! its fill state) and a sandbox (an overlay and the hold it keeps on its template):
//! the values the daemon's owners keep and share.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use lazyblk_cache::{Manifest, Overlay, TemplateImage};

use crate::daemon::state::Phase;
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
    /// Phase and progress of the background fill.
    pub fill: Mutex<FillState>,
    /// What was local at a cache generation: (generation, chunks, bytes). Counting walks
    /// every chunk, so a count is reused until the cache changes.
    pub local: Mutex<Option<(u64, usize, u64)>>,
}

/// The cache owner of a READY replica's claims on its chunks.
pub fn replica_owner(template: &str) -> String {
    format!("replica:{template}")
}

impl Replica {
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

    pub fn phase(&self) -> Phase {
        self.fill.lock().unwrap_or_else(|e| e.into_inner()).phase()
    }

    /// Whether the node holds nothing of this replica but its manifest: no fill ran or
    /// runs, nothing is claimed, no read was recorded. Such a replica can be dropped
    /// from memory and read again from the manifest's copy on disk.
    pub fn is_idle(&self) -> bool {
        let fill = self.fill.lock().unwrap_or_else(|e| e.into_inner());
        fill.phase.is_none() && !fill.pinned && fill.cancel.is_none() && !self.trace.is_started()
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

/// A replica's fill state, kept with the replica and saved in the state database.
#[derive(Default)]
pub struct FillState {
    pub phase: Option<Phase>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Set to stop the running fill (evict, shutdown).
    pub(crate) cancel: Option<Arc<AtomicBool>>,
    /// The replica's chunks are pinned (READY): unpinned on evict.
    pub(crate) pinned: bool,
}

impl FillState {
    pub fn phase(&self) -> Phase {
        self.phase.unwrap_or(Phase::Pending)
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
