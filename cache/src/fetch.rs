//! The node's chunk cache: local chunks, and one verified fetch per missing chunk.
//!
//! Concurrent readers of one missing chunk share one fetch: the first starts it in a
//! task of its own (so a reader that goes away does not cancel it for the others) and
//! every reader waits for its outcome. Sources are tried in order, each within the
//! deadline; bytes whose sha256 is not the chunk's digest are discarded, counted, logged
//! with template, chunk index and source, and the next source is tried. Only verified
//! bytes are written, and only written chunks are read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use crate::chunk_store::{ChunkFile, ChunkStore, ChunkStoreError};
use crate::digest::Digest;
use crate::source::{Source, SourceError};

/// The default time one source gets to deliver one chunk. Well under the kernel NBD
/// client's 30 s request timeout, so that a stalled source is passed over and the read
/// can still be answered from the next one.
pub const DEFAULT_SOURCE_DEADLINE: Duration = Duration::from_secs(8);
/// Passes over the source list for one demand fetch: a second pass rides out a source
/// that restarts or drops one connection.
const FETCH_PASSES: usize = 2;
/// Chunks fetched at once on the node, over all readers and fills. Each holds its chunk
/// in memory until it is written, so this bounds that memory (32 MiB at the default
/// chunk size) and keeps a deep client queue from opening hundreds of connections.
pub const MAX_FETCHES_IN_FLIGHT: usize = 32;
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
    /// A chunk arrived from `source` and was verified.
    fn fetched(&self, _chunk: &ChunkRef, _source: &str, _elapsed: Duration) {}
    /// A source failed to give a chunk.
    fn source_failed(&self, _chunk: &ChunkRef, _source: &str, _error: &SourceError) {}
    /// A source gave bytes that do not match the digest.
    fn corrupt(&self, _chunk: &ChunkRef, _source: &str) {}
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
/// while the file is being written (a reader never waits for the cache's fsync).
#[derive(Clone, Debug)]
pub enum Chunk {
    File(ChunkFile),
    Verified { digest: Digest, bytes: Bytes },
}

impl Chunk {
    /// Reads `buf.len()` bytes at `offset` within the chunk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChunkStoreError> {
        match self {
            Chunk::File(f) => f.read_at(offset, buf),
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

/// Who a fetch is for: a reader waiting now, or a background fill (whose hashing and
/// writing run on low-priority threads, see [`crate::background`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Demand,
    Background,
}

impl Priority {
    /// Runs blocking work (hashing, writing) at this priority.
    async fn run<T, F>(self, f: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self {
            Priority::Demand => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| e.to_string()),
            Priority::Background => crate::background::run(f).await,
        }
    }
}

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

/// The node's chunks, local and in flight.
pub struct ChunkCache {
    store: ChunkStore,
    /// Fetches under way, by digest; a reader that finds one here waits for it.
    inflight: Mutex<HashMap<Digest, watch::Receiver<Outcome>>>,
    observer: Arc<dyn FetchObserver>,
    /// How long one source gets for one chunk.
    deadline: Duration,
    /// Demand reads waiting for a fetch now; background fills yield while it is above 0.
    demand_waiting: AtomicUsize,
    /// When the last demand read arrived, in µs since `epoch`: fills slow down while
    /// readers are active, even when every read hits the cache.
    last_demand_us: AtomicU64,
    epoch: Instant,
    /// Bounds the fetches under way (see [`MAX_FETCHES_IN_FLIGHT`]).
    fetch_slots: Arc<tokio::sync::Semaphore>,
    /// Whether fetched chunks can be kept on disk.
    health: CacheHealth,
}

impl ChunkCache {
    pub fn new(store: ChunkStore, observer: Arc<dyn FetchObserver>, deadline: Duration) -> Self {
        ChunkCache {
            store,
            inflight: Mutex::new(HashMap::new()),
            observer,
            deadline,
            demand_waiting: AtomicUsize::new(0),
            last_demand_us: AtomicU64::new(0),
            epoch: Instant::now(),
            fetch_slots: Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES_IN_FLIGHT)),
            health: CacheHealth::default(),
        }
    }

    /// Whether the cache keeps what it fetches (see [`CacheHealth`]).
    pub fn health(&self) -> &CacheHealth {
        &self.health
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
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
        self.last_demand_us
            .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Some(file) = self.local(chunk)? {
            self.observer.hit(&chunk.template);
            return Ok(Chunk::File(file));
        }
        self.observer.miss(&chunk.template);
        self.demand_waiting.fetch_add(1, Ordering::Relaxed);
        // Decrements even when the reader goes away mid-fetch.
        let _waiting = DemandGuard(&self.demand_waiting);
        self.wait(chunk, sources, false, Priority::Demand).await
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
        let mut outcome = self.join_or_start(chunk, sources, priority)?;
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
        if let Some(rx) = inflight.get(&chunk.digest) {
            return Ok(rx.clone());
        }
        // The chunk may have landed between our miss and taking the lock.
        if let Some(file) = self.local(chunk)? {
            let (_tx, rx) = watch::channel(Progress::Stored(file));
            return Ok(rx);
        }
        let (tx, rx) = watch::channel(Progress::Fetching);
        inflight.insert(chunk.digest, rx.clone());
        drop(inflight);
        let cache = self.clone();
        let chunk = chunk.clone();
        let sources = sources.clone();
        tokio::spawn(async move {
            // Unregisters the fetch however the task ends (a panic included), so that
            // the next reader starts a fresh fetch instead of waiting on a dead one.
            let _registered = Registered {
                cache: &cache,
                digest: chunk.digest,
            };
            // The semaphore is never closed, so acquiring only waits.
            let _slot = cache.fetch_slots.clone().acquire_owned().await.ok();
            // Readers see the verified bytes at once; the fetch stays registered until
            // the file is written, so a later reader joins it instead of fetching again.
            let progress = match cache.fetch_verified(&chunk, &sources, priority).await {
                Ok(bytes) => {
                    let _ = tx.send(Progress::Verified(bytes.clone()));
                    match cache.write(&chunk, bytes.clone(), priority).await {
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
        });
        Ok(rx)
    }

    async fn fetch_verified(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &[Source],
        priority: Priority,
    ) -> Result<Bytes, FetchError> {
        let mut errors = Vec::new();
        for pass in 0..FETCH_PASSES {
            if pass > 0 {
                tokio::time::sleep(PASS_BACKOFF).await;
            }
            for source in sources {
                match self.fetch_from(chunk, source, priority).await {
                    Ok(Some(bytes)) => return Ok(bytes),
                    Ok(None) => errors.push(format!("{}: digest mismatch", source.name())),
                    Err(e) => {
                        self.observer.source_failed(chunk, source.name(), &e);
                        tracing::warn!(template = %chunk.template, chunk = chunk.index,
                            source = source.name(), error = %e, "chunk fetch failed");
                        let transient = e.is_transient();
                        errors.push(e.to_string());
                        if !transient && sources.len() == 1 {
                            break;
                        }
                    }
                }
            }
        }
        if sources.is_empty() {
            errors.push("no sources configured".into());
        }
        Err(FetchError::Exhausted {
            template: chunk.template.clone(),
            index: chunk.index,
            digest: chunk.digest,
            errors,
        })
    }

    /// Verified bytes from one source, `None` if they do not match the digest.
    async fn fetch_from(
        &self,
        chunk: &ChunkRef,
        source: &Source,
        priority: Priority,
    ) -> Result<Option<Bytes>, SourceError> {
        let started = Instant::now();
        let bytes = source
            .fetch(&chunk.digest, chunk.len, self.deadline)
            .await?;
        let digest = chunk.digest;
        let (bytes, actual) = priority
            .run(move || {
                let actual = Digest::of(&bytes);
                (bytes, actual)
            })
            .await
            .map_err(|e| SourceError::Unreachable {
                source_name: source.name().to_string(),
                detail: format!("hashing task failed: {e}"),
            })?;
        if actual != digest {
            self.observer.corrupt(chunk, source.name());
            tracing::error!(template = %chunk.template, chunk = chunk.index,
                source = source.name(), expected = %digest, actual = %actual,
                "chunk bytes do not match their digest; discarded");
            return Ok(None);
        }
        self.observer
            .fetched(chunk, source.name(), started.elapsed());
        Ok(Some(bytes))
    }

    async fn write(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        bytes: Bytes,
        priority: Priority,
    ) -> Result<ChunkFile, FetchError> {
        let digest = chunk.digest;
        let cache = self.clone();
        // The write fsyncs; keep it off the runtime threads.
        let written = priority
            .run(move || cache.store.insert(&digest, &bytes))
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

/// Removes a fetch from the in-flight table when dropped.
struct Registered<'a> {
    cache: &'a ChunkCache,
    digest: Digest,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.cache
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.digest);
    }
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
    fn write_failed(&self, error: &FetchError) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::error!(%error, "chunk cache DEGRADED: fetched chunks cannot be kept on disk; reads are answered from memory and fetched again");
        }
    }

    fn write_ok(&self) {
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
