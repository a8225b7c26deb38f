//! The node's chunk cache: local chunks, and one verified fetch per missing chunk.
//!
//! Concurrent readers of one missing chunk share one fetch ([`inflight`]): the first
//! starts it in a task of its own (so a reader that goes away does not cancel it for
//! the others) and every reader waits for its outcome. The fetch waits for a slot of
//! its class (demand, prefetch, fill; a demand reader that joins promotes it) and is
//! run by the one runner of every attempt ([`runner`]), in the order the planner gives
//! ([`crate::planner`]): whole chunks here ([`whole`]), the table and blocks of a chunk
//! stored in blocks for a small read ([`crate::partial`]). Each attempt has the source
//! deadline; every attempt of one demand read, whole chunks and ranges, its block
//! index page included, fits in one budget ([`ReadBudget`], `--read-deadline`), after
//! which the read fails with EIO rather than outliving the kernel client's timeout. A
//! read whose attempt at another node (peer, origin) has not answered within the hedge
//! delay starts the next source beside it and takes the first verified answer
//! ([`crate::planner::Hedging`]). Bytes are decoded and verified on the blocking pool
//! (a fill's on the low-priority threads); bytes that are not the chunk are discarded,
//! counted, logged with template, chunk index, source and node, held against the source
//! (or the one peer) that sent them, and the next source is tried. Only verified bytes
//! are served or written; a fleet member writes the stored form they came as beside
//! them when it is to serve peers that form ([`crate::stored_forms`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::chunk_ref::ChunkRef;
use crate::chunk_store::{ChunkFile, ChunkStore, ChunkStoreError};
use crate::digest::Digest;
pub use crate::health::{CacheHealth, CacheUsage};
pub use crate::planner::Priority;
use crate::planner::{FetchSlots, Hedging, SourceHealth};
use crate::source::SourceError;

mod budget;
mod chunk;
pub(crate) mod flight;
mod inflight;
pub(crate) mod ranges;
pub(crate) mod runner;
mod whole;
mod work;

pub use budget::ReadBudget;
pub use chunk::Chunk;
pub(crate) use flight::FetchKey;
use flight::Flight;

/// The default time one source gets to deliver one chunk. Well under the kernel NBD
/// client's 30 s request timeout, so that a stalled source is passed over and the read
/// can still be answered from the next one.
pub const DEFAULT_SOURCE_DEADLINE: Duration = Duration::from_secs(8);
/// Passes over the source list for one demand fetch: a second pass rides out a source
/// that restarts or drops one connection.
const FETCH_PASSES: usize = 2;
/// Chunks fetched at once on the node, over all readers and fills: the slots of the
/// three classes ([`crate::planner`]). Each holds its chunk in memory until it is
/// written, so this bounds that memory (32 MiB at the default chunk size) and keeps a
/// deep client queue from opening hundreds of connections.
pub const MAX_FETCHES_IN_FLIGHT: usize =
    crate::planner::DEMAND_SLOTS + crate::planner::PREFETCH_SLOTS + crate::planner::FILL_SLOTS;
/// The default budget of one demand read for all its attempts: well under the kernel
/// NBD client's 30 s timeout, so a guest gets EIO from us rather than a dead device.
pub const DEFAULT_READ_BUDGET: Duration = Duration::from_secs(20);
/// Pause between passes.
const PASS_BACKOFF: Duration = Duration::from_millis(200);

/// Why a chunk could not be made local.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No source could give verified bytes.
    #[error("template {template} chunk {index} ({digest}): no source delivered it: {}", .errors.join("; "))]
    Exhausted {
        template: Arc<str>,
        index: usize,
        digest: Digest,
        errors: Vec<String>,
    },
    /// A demand read's budget ran out before any source delivered.
    #[error("template {template} chunk {index} ({digest}): no source delivered it within the read's budget of {budget:?} (--read-deadline)")]
    Deadline {
        template: Arc<str>,
        index: usize,
        digest: Digest,
        budget: Duration,
    },
    /// The chunk arrived but could not be written locally (disk full, I/O error).
    #[error("template {template} chunk {index}: {source}")]
    Local {
        template: Arc<str>,
        index: usize,
        source: ChunkStoreError,
    },
}

/// What the cache reports, for metrics and replica progress. Every method has an empty
/// default, so an observer implements only what it counts.
pub trait FetchObserver: Send + Sync + 'static {
    /// A read found its chunk local.
    fn hit(&self, _template: &str) {}
    /// A read needed a fetch (counted once per reader).
    fn miss(&self, _template: &str) {}
    /// A chunk arrived from `source` as `stored` bytes (a zstd frame or the raw chunk:
    /// what the source sent) and was verified.
    fn fetched(&self, _chunk: &ChunkRef, _source: &str, _stored: u64, _elapsed: Duration) {}
    /// A source failed to give a chunk.
    fn source_failed(&self, _chunk: &ChunkRef, _source: &str, _error: &SourceError) {}
    /// A source gave bytes that do not match the digest.
    fn corrupt(&self, _chunk: &ChunkRef, _source: &str) {}
    /// A demand read's budget (`--read-deadline`) ran out before any source delivered
    /// what it reads: the read fails with EIO.
    fn read_budget_spent(&self, _template: &str) {}
    /// A missed read was served from its own blocks of a whole chunk's stored form, as
    /// soon as it came and before the chunk was verified whole
    /// ([`ChunkCache::get_or_read_arrived`]).
    fn served_before_verified(&self, _template: &str) {}
    /// Blocks of a chunk (`raw` bytes of it) arrived from `source` as `stored` bytes
    /// and were verified against the block index ([`crate::partial`]).
    fn fetched_blocks(
        &self,
        _chunk: &ChunkRef,
        _source: &str,
        _raw: u64,
        _stored: u64,
        _elapsed: Duration,
    ) {
    }
}

/// An observer that counts nothing.
pub struct NoObserver;
impl FetchObserver for NoObserver {}

/// The node's chunks, local and in flight.
pub struct ChunkCache {
    store: ChunkStore,
    /// Fetches under way, whole chunks and the byte ranges of small reads alike; a
    /// reader that finds its fetch here waits for it (and a demand reader promotes a
    /// whole chunk's).
    inflight: Mutex<HashMap<FetchKey, Flight>>,
    pub(crate) observer: Arc<dyn FetchObserver>,
    /// How long one source gets for one chunk.
    deadline: Duration,
    /// How long a demand read waits for all attempts together.
    read_budget: Duration,
    /// Demand reads waiting for a fetch now; background fills yield while it is above 0.
    demand_waiting: AtomicUsize,
    /// When the last demand read arrived, in µs since `epoch`: fills slow down while
    /// readers are active, even when every read hits the cache.
    last_demand_us: AtomicU64,
    epoch: Instant,
    /// Slots per class of fetch (see [`MAX_FETCHES_IN_FLIGHT`]).
    slots: FetchSlots,
    /// Which sources keep failing, so plans try them last.
    health_of_sources: SourceHealth,
    /// When a read hedges a slow node (see [`crate::planner`]).
    hedging: Hedging,
    /// Whether fetched chunks can be kept on disk.
    health: CacheHealth,
    /// Blocks of chunks read in part ([`crate::partial`]).
    pub(crate) partial: crate::block_memory::Partial,
    /// Whether chunks fetched from the store or an origin keep their stored form
    /// beside them, to serve peers ([`crate::stored_forms`]).
    pub(crate) keep_stored_forms: bool,
}

impl ChunkCache {
    pub fn new(store: ChunkStore, observer: Arc<dyn FetchObserver>, deadline: Duration) -> Self {
        ChunkCache {
            store,
            inflight: Mutex::new(HashMap::new()),
            observer,
            deadline,
            read_budget: DEFAULT_READ_BUDGET,
            demand_waiting: AtomicUsize::new(0),
            last_demand_us: AtomicU64::new(0),
            epoch: Instant::now(),
            slots: FetchSlots::default(),
            health_of_sources: SourceHealth::default(),
            hedging: Hedging::default(),
            health: CacheHealth::default(),
            partial: crate::block_memory::Partial::default(),
            keep_stored_forms: false,
        }
    }

    /// Records that a demand read arrived now (fills slow down while readers are active).
    pub(crate) fn note_demand(&self) {
        self.last_demand_us
            .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn slots(&self) -> &FetchSlots {
        &self.slots
    }

    /// Sets the budget of one demand read for all its attempts.
    pub fn with_read_budget(mut self, budget: Duration) -> Self {
        self.read_budget = budget;
        self
    }

    /// The health of the sources, as the planner sees it.
    pub fn sources_health(&self) -> &SourceHealth {
        &self.health_of_sources
    }

    /// Whether the cache keeps what it fetches (see [`CacheHealth`]).
    pub fn health(&self) -> &CacheHealth {
        &self.health
    }

    /// Bytes free on the cache's file system (see [`crate::health::free_bytes`]).
    pub fn free_bytes(&self) -> Option<u64> {
        crate::health::free_bytes(self.store.root())
    }

    /// Whether a chunk of `len` bytes could be written to the cache now: writes and
    /// removes that many bytes, fetches nothing (see [`crate::health::probe_write`]).
    /// Blocking.
    pub fn probe_write(&self, len: u64) -> std::io::Result<()> {
        crate::health::probe_write(self.store.root(), len)
    }

    pub(crate) fn store(&self) -> &ChunkStore {
        &self.store
    }

    /// A local chunk, verified (a file this daemon did not write is hashed on its first
    /// open), to serve to a peer or upload; `None` if it is not here.
    pub fn open_local(&self, digest: &Digest) -> Result<Option<ChunkFile>, ChunkStoreError> {
        self.store.get(digest)
    }

    // What the daemon asks of the cache, by intent (the index stays the cache's own).

    /// Claims `digests` for the named `owner` (a READY replica, a pending upload): kept
    /// until the owner lets go, however often a digest repeats. Returns how many are not
    /// local (claimed all the same, for when they arrive).
    pub fn pin(&self, owner: &str, digests: impl IntoIterator<Item = Digest>) -> usize {
        self.store.pin(owner, digests)
    }

    /// Drops `owner`'s claim on one chunk (a chunk the store now has).
    pub fn unpin(&self, owner: &str, digest: &Digest) {
        self.store.unpin(owner, digest)
    }

    /// Drops every claim of `owner`; returns how many there were.
    pub fn release(&self, owner: &str) -> usize {
        self.store.release(owner)
    }

    /// Keeps bytes this node made (a commit's rebuilt chunk) in the cache, claimed for
    /// `owner` before the write when given (the node's only copy).
    pub fn keep(
        &self,
        owner: Option<&str>,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<ChunkFile, ChunkStoreError> {
        match owner {
            Some(owner) => self.store.insert_pinned(owner, digest, bytes),
            None => self.store.insert(digest, bytes),
        }
    }

    /// Deletes the local chunks among `digests` that no owner claims and no reader has
    /// open; returns how many went.
    pub fn evict<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> usize {
        digests.into_iter().filter(|d| self.store.remove(d)).count()
    }

    /// Whether a chunk is in the cache (its bytes unchecked until opened).
    pub fn is_local(&self, digest: &Digest) -> bool {
        self.store.contains(digest)
    }

    /// How many of `digests` are local, and their bytes.
    pub fn count_local(&self, digests: impl IntoIterator<Item = Digest>) -> (usize, u64) {
        self.store.count_local(digests)
    }

    /// The distinct local digests among `digests`, sorted (a template's chunks to claim
    /// for an upload).
    pub fn local_of(&self, digests: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        self.store.local_of(digests)
    }

    /// Moves at every insert and delete (see [`ChunkStore::generation`]).
    pub fn generation(&self) -> u64 {
        self.store.generation()
    }

    /// Makes `digests` durable, bytes and names (a fill, its chunks claimed, before
    /// READY): fetched chunks are not fsynced one at a time. Returns how many chunk files
    /// did not match their digests and were dropped (see [`ChunkStore::make_durable`]).
    /// Blocking.
    pub fn make_durable(
        &self,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Result<usize, ChunkStoreError> {
        self.store.make_durable(digests)
    }

    /// Bytes of claimed chunks (walks the index: for checks, not per request).
    pub fn pinned_bytes(&self) -> u64 {
        self.store.pinned_bytes()
    }

    /// The cache's size and counters.
    pub fn usage(&self) -> CacheUsage {
        CacheUsage {
            used_bytes: self.store.used_bytes(),
            budget_bytes: self.store.budget(),
            chunks: self.store.chunk_count(),
            evictions: self.store.evictions(),
            corrupt_files: self.store.corrupt_files(),
        }
    }

    /// Hashes every cached chunk and drops the bad ones (see [`ChunkStore::scrub`]).
    pub fn scrub(&self, progress: impl FnMut(u64, u64)) -> crate::ScrubReport {
        self.store.scrub(progress)
    }
}
