//! The node's chunk cache: local chunks, and one verified fetch per missing chunk.
//!
//! Concurrent readers of one missing chunk share one fetch: the first starts it in a
//! task of its own (so a reader that goes away does not cancel it for the others) and
//! every reader waits for its outcome. The fetch follows the plan of [`crate::planner`]:
//! it waits for a slot of its class (demand, prefetch, fill; a demand reader that joins
//! promotes it), then tries the sources healthy first, each attempt within the source
//! deadline and, for a demand read, all of them within the read's budget
//! ([`DEFAULT_READ_BUDGET`]), after which the read fails with EIO rather than outliving
//! the kernel client's timeout. A read whose attempt at another node (peer, origin) has
//! not answered within the hedge delay starts the next source beside it and takes the
//! first verified answer ([`crate::planner::Hedging`]). Bytes whose sha256 is not the chunk's digest are
//! discarded, counted, logged with template, chunk index and source, and the next
//! source is tried. Only verified bytes are served or written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use crate::chunk_store::{ChunkFile, ChunkStore, ChunkStoreError};
use crate::digest::Digest;
pub use crate::health::{CacheHealth, CacheUsage};
pub use crate::planner::Priority;
use crate::planner::{FetchSlots, Hedging, Promotion, SourceHealth};
use crate::source::{Source, SourceError};

mod passes;

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

/// Which chunk of which template a fetch is for (the context of every log line).
#[derive(Clone, Debug)]
pub struct ChunkRef {
    pub template: Arc<str>,
    pub index: usize,
    pub digest: Digest,
    pub len: u64,
}

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

struct DemandGuard<'a>(&'a AtomicUsize);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A chunk a reader can read: its file in the cache, or its verified bytes in memory
/// while the file is being written (a reader never waits for the cache's disk).
#[derive(Clone, Debug)]
pub enum Chunk {
    File(ChunkFile),
    Verified { digest: Digest, bytes: Bytes },
}

impl Chunk {
    /// Reads `buf.len()` bytes at `offset` within the chunk.
    /// A file read tries the page cache first and blocks (off the runtime's hands)
    /// only when it must (see [`crate::blocking`]).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChunkStoreError> {
        match self {
            Chunk::File(f) => {
                if f.read_at_nowait(offset, buf)? {
                    return Ok(());
                }
                crate::blocking::blocking(|| f.read_at(offset, buf))
            }
            Chunk::Verified { digest, bytes } => {
                let start = offset as usize;
                let piece =
                    bytes
                        .get(start..start + buf.len())
                        .ok_or_else(|| ChunkStoreError::Read {
                            digest: *digest,
                            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        })?;
                buf.copy_from_slice(piece);
                Ok(())
            }
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Chunk::File(f) => f.len,
            Chunk::Verified { bytes, .. } => bytes.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs blocking work (hashing, writing) at `priority`: fills on the low-priority
/// threads, the rest on tokio's blocking pool.
async fn run_at<T, F>(priority: Priority, readers_active: bool, f: F) -> Result<T, String>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match priority {
        Priority::Demand | Priority::Prefetch => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| e.to_string()),
        Priority::Fill => crate::background::run(readers_active, f).await,
    }
}

/// Reads within this long make a fill's blocking work yield the CPU (SCHED_IDLE).
const READERS_ACTIVE: Duration = Duration::from_millis(50);

/// The state of one fetch, as its readers see it.
#[derive(Clone)]
enum Progress {
    Fetching,
    /// Verified bytes, being written to the cache.
    Verified(Bytes),
    /// The chunk is in the cache.
    Stored(ChunkFile),
    /// Verified bytes that could not be written to the cache (disk full, I/O error):
    /// readers are answered from the bytes; fills, which need the file, get the error.
    Unstored(Bytes, Arc<FetchError>),
    Failed(Arc<FetchError>),
}

type Outcome = Progress;

/// A fetch under way: its progress, the flag a demand reader sets when it joins, and
/// whether it runs on the background runtime (which a demand read does not wait on).
type InFlight = (watch::Receiver<Outcome>, Arc<Promotion>, bool);

/// The node's chunks, local and in flight.
pub struct ChunkCache {
    store: ChunkStore,
    /// Fetches under way, by digest; a reader that finds one here waits for it (and a
    /// demand reader promotes it).
    inflight: Mutex<HashMap<Digest, InFlight>>,
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

/// A chunk's verified bytes, with the stored form they came as when it is to be kept
/// ([`crate::stored_forms`]).
pub(crate) struct Verified {
    pub(crate) raw: Bytes,
    pub(crate) stored: Option<(crate::encoding::Encoding, Bytes)>,
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

    /// How long one source gets for one request.
    pub(crate) fn source_deadline(&self) -> Duration {
        self.deadline
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

    /// Whether a fetch of `digest` is under way.
    pub fn is_fetching(&self, digest: &Digest) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(digest)
    }

    /// The chunk for a demand read: local, or fetched from `sources` (answered as soon
    /// as its bytes are verified, while they are still being written to the cache).
    pub async fn get(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
    ) -> Result<Chunk, Arc<FetchError>> {
        self.note_demand();
        if let Some(file) = self.local(chunk)? {
            self.observer.hit(&chunk.template);
            return Ok(Chunk::File(file));
        }
        self.demand_waiting.fetch_add(1, Ordering::Relaxed);
        // Decrements even when the reader goes away mid-fetch.
        let _waiting = DemandGuard(&self.demand_waiting);
        let waited = tokio::time::timeout(
            self.read_budget,
            self.wait(chunk, sources, false, Priority::Demand),
        )
        .await;
        // Counted when the wait ends, not when it starts: a frontend may drop a read
        // that would wait and ask again from a task of its own (see lazyblk-nbd).
        self.observer.miss(&chunk.template);
        waited.unwrap_or_else(|_| {
            Err(Arc::new(FetchError::Deadline {
                template: chunk.template.clone(),
                index: chunk.index,
                digest: chunk.digest,
                budget: self.read_budget,
            }))
        })
    }

    /// The local chunk for a demand read, counted as a hit; `None` (nothing counted)
    /// when it is missing, for a reader that then fetches it some way of its own.
    pub fn local_read(&self, chunk: &ChunkRef) -> Result<Option<ChunkFile>, Arc<FetchError>> {
        self.note_demand();
        let file = self.local(chunk)?;
        if file.is_some() {
            self.observer.hit(&chunk.template);
        }
        Ok(file)
    }

    /// Whether a demand read arrived within `window`.
    pub fn demand_within(&self, window: Duration) -> bool {
        let last = self.last_demand_us.load(Ordering::Relaxed);
        last > 0
            && (self.epoch.elapsed().as_micros() as u64).saturating_sub(last)
                < window.as_micros() as u64
    }

    /// Demand reads waiting for a fetch now (background work yields to them).
    pub fn demand_waiting(&self) -> usize {
        self.demand_waiting.load(Ordering::Relaxed)
    }

    /// The local chunk, when bytes `offset..offset + len` of it are in the page cache now
    /// (a read of them would not wait for the disk); nothing is counted.
    /// Touches no disk: a chunk whose file is not open yet (or not verified since a
    /// restart) is `None`, and is read the usual way.
    pub fn resident(&self, chunk: &ChunkRef, offset: u64, len: u64) -> Option<ChunkFile> {
        let file = self.store.get_open(&chunk.digest)?;
        file.resident(offset, len).then_some(file)
    }

    /// Counts a read of `chunks` chunks of `template` answered from resident chunk files
    /// ([`ChunkCache::resident`]) as hits: the same as reads through
    /// [`ChunkCache::get`] for metrics and for the fill, which yields to readers.
    pub fn resident_read(&self, template: &str, chunks: usize) {
        self.note_demand();
        for _ in 0..chunks {
            self.observer.hit(template);
        }
    }

    /// The local chunk without counting a hit or miss; `None` if absent.
    pub fn local(&self, chunk: &ChunkRef) -> Result<Option<ChunkFile>, Arc<FetchError>> {
        self.store.get(&chunk.digest).map_err(|source| {
            Arc::new(FetchError::Local {
                template: chunk.template.clone(),
                index: chunk.index,
                source,
            })
        })
    }

    /// Makes the chunk local (joining a fetch under way) and returns its file, without
    /// counting a read: for fills and prefetches, which need the chunk on disk.
    pub async fn fetch(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
        priority: Priority,
    ) -> Result<ChunkFile, Arc<FetchError>> {
        match self.wait(chunk, sources, true, priority).await? {
            Chunk::File(f) => Ok(f),
            Chunk::Verified { .. } => unreachable_verified(chunk),
        }
    }

    /// Joins or starts the chunk's fetch and waits until it is readable (or, with
    /// `stored`, until it is in the cache).
    async fn wait(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
        stored: bool,
        priority: Priority,
    ) -> Result<Chunk, Arc<FetchError>> {
        let outcome = self.join_or_start(chunk, sources, priority)?;
        self.follow(chunk, outcome, stored).await
    }

    /// Waits on a fetch's progress until the chunk is readable (or, with `stored`, in
    /// the cache).
    async fn follow(
        &self,
        chunk: &ChunkRef,
        mut outcome: watch::Receiver<Outcome>,
        stored: bool,
    ) -> Result<Chunk, Arc<FetchError>> {
        loop {
            match &*outcome.borrow_and_update() {
                Progress::Fetching => {}
                Progress::Verified(bytes) if !stored => {
                    return Ok(Chunk::Verified {
                        digest: chunk.digest,
                        bytes: bytes.clone(),
                    })
                }
                Progress::Verified(_) => {}
                Progress::Stored(file) => return Ok(Chunk::File(file.clone())),
                Progress::Unstored(bytes, _) if !stored => {
                    return Ok(Chunk::Verified {
                        digest: chunk.digest,
                        bytes: bytes.clone(),
                    })
                }
                Progress::Unstored(_, e) | Progress::Failed(e) => return Err(e.clone()),
            }
            if outcome.changed().await.is_err() {
                // The fetching task ended without an outcome (the runtime shut down).
                return Err(Arc::new(FetchError::Exhausted {
                    template: chunk.template.clone(),
                    index: chunk.index,
                    digest: chunk.digest,
                    errors: vec!["fetch abandoned".into()],
                }));
            }
        }
    }

    fn join_or_start(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
        priority: Priority,
    ) -> Result<watch::Receiver<Outcome>, Arc<FetchError>> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((rx, promotion, background)) = inflight.get(&chunk.digest) {
            if priority != Priority::Demand || !background {
                if priority == Priority::Demand {
                    promotion.promote();
                }
                return Ok(rx.clone());
            }
            // A fill's fetch on the low-priority runtime: a demand read does not wait
            // behind it (it may be starved by the very readers it yields to). It fetches
            // the chunk itself, and later readers join that fetch; the fill's goes on
            // and its waiters keep theirs. At most one chunk is fetched twice.
        }
        // The chunk may have landed between our miss and taking the lock.
        if let Some(file) = self.local(chunk)? {
            let (_tx, rx) = watch::channel(Progress::Stored(file));
            return Ok(rx);
        }
        let (tx, rx) = watch::channel(Progress::Fetching);
        let promotion = Arc::new(Promotion::default());
        if priority == Priority::Demand {
            promotion.promote();
        }
        // A fill's fetch moves its bytes on the background runtime (it yields to active
        // readers); anything else, and a fetch from a source whose connections cannot be
        // kept apart (an object store's client), on the caller's.
        let in_background =
            priority == Priority::Fill && sources.iter().all(Source::has_own_connections);
        inflight.insert(chunk.digest, (rx.clone(), promotion.clone(), in_background));
        drop(inflight);
        let cache = self.clone();
        let chunk = chunk.clone();
        let sources = sources.clone();
        let yielding = {
            let cache = cache.clone();
            move || cache.demand_within(READERS_ACTIVE)
        };
        let fetch = async move {
            // Unregisters the fetch however the task ends (a panic included), so that
            // the next reader starts a fresh fetch instead of waiting on a dead one.
            let _registered = Registered {
                cache: &cache,
                digest: chunk.digest,
                promotion: promotion.clone(),
            };
            let _slot = cache.slots.acquire(priority, &promotion).await;
            // A fetch a demand reader joined is demand work from now on.
            let priority = if promotion.is_promoted() {
                Priority::Demand
            } else {
                priority
            };
            // Readers see the verified bytes at once; the fetch stays registered until
            // the file is written, so a later reader joins it instead of fetching again.
            let progress = match cache.fetch_verified(&chunk, &sources, priority).await {
                Ok(Verified { raw: bytes, stored }) => {
                    let _ = tx.send(Progress::Verified(bytes.clone()));
                    match cache.write(&chunk, bytes.clone(), stored, priority).await {
                        Ok(file) => {
                            cache.health.write_ok();
                            Progress::Stored(file)
                        }
                        Err(e) => {
                            cache.health.write_failed(&e);
                            Progress::Unstored(bytes, Arc::new(e))
                        }
                    }
                }
                Err(e) => Progress::Failed(Arc::new(e)),
            };
            drop(_registered);
            let _ = tx.send(progress);
        };
        if in_background {
            crate::background::spawn(yielding, fetch);
        } else {
            tokio::spawn(fetch);
        }
        Ok(rx)
    }

    /// Verified raw bytes from one source (decoded here, whatever the transport: see
    /// [`crate::encoding`]), `None` if they are not the chunk.
    async fn fetch_from(
        &self,
        chunk: &ChunkRef,
        source: &Source,
        priority: Priority,
        deadline: Duration,
    ) -> Result<Option<Verified>, SourceError> {
        let started = Instant::now();
        let stored = source.fetch(chunk, deadline).await?;
        let stored_len = stored.len() as u64;
        let keep = self.keeps_stored_form_from(source).then(|| stored.clone());
        let digest = chunk.digest;
        let len = chunk.len as usize;
        let decoded = run_at(priority, self.demand_within(READERS_ACTIVE), move || {
            crate::encoding::decode(stored, len, &digest)
        })
        .await
        .map_err(|e| SourceError::Unreachable {
            source_name: source.name().to_string(),
            detail: format!("decoding task failed: {e}"),
        })?;
        match decoded {
            Ok((encoding, bytes)) => {
                self.observer
                    .fetched(chunk, source.name(), stored_len, started.elapsed());
                Ok(Some(Verified {
                    raw: bytes,
                    stored: keep.map(|stored| (encoding, stored)),
                }))
            }
            // Raw bytes of the wrong length were cut short or padded on the way (a
            // transport failure, never hashed), not a chunk that lies.
            Err(crate::encoding::DecodeError::Length { stored, len }) => Err(SourceError::Length {
                source_name: source.name().to_string(),
                got: stored as u64,
                expected: len as u64,
            }),
            Err(crate::encoding::DecodeError::Truncated { stored, expected }) => {
                Err(SourceError::Length {
                    source_name: source.name().to_string(),
                    got: stored as u64,
                    expected,
                })
            }
            Err(e) => {
                self.observer.corrupt(chunk, source.name());
                tracing::error!(template = %chunk.template, chunk = chunk.index,
                    source = source.name(), expected = %digest, error = %e,
                    "chunk bytes are not the chunk; discarded");
                Ok(None)
            }
        }
    }

    async fn write(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        bytes: Bytes,
        stored: Option<(crate::encoding::Encoding, Bytes)>,
        priority: Priority,
    ) -> Result<ChunkFile, FetchError> {
        let digest = chunk.digest;
        let cache = self.clone();
        // The write copies a chunk into the page cache; keep it off the runtime threads.
        let readers_active = self.demand_within(READERS_ACTIVE);
        let written = run_at(priority, readers_active, move || {
            cache.insert_keeping(&digest, &bytes, stored)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ChunkStoreError::Write {
                digest,
                path: self.store.root().to_path_buf(),
                source: std::io::Error::other(e),
            })
        });
        written.map_err(|source| FetchError::Local {
            template: chunk.template.clone(),
            index: chunk.index,
            source,
        })
    }
}

/// Removes a fetch from the in-flight table when dropped, unless a demand read's fetch
/// of the same chunk has taken its place (its promotion tells them apart).
struct Registered<'a> {
    cache: &'a ChunkCache,
    digest: Digest,
    promotion: Arc<Promotion>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if inflight
            .get(&self.digest)
            .is_some_and(|(_, p, _)| Arc::ptr_eq(p, &self.promotion))
        {
            inflight.remove(&self.digest);
        }
    }
}

/// `wait(.., stored: true)` only returns files; reaching a verified-only chunk there is a
/// bug in this module, reported as an error rather than a panic.
fn unreachable_verified(chunk: &ChunkRef) -> Result<ChunkFile, Arc<FetchError>> {
    Err(Arc::new(FetchError::Exhausted {
        template: chunk.template.clone(),
        index: chunk.index,
        digest: chunk.digest,
        errors: vec!["internal: fetch returned before the chunk was stored".into()],
    }))
}
