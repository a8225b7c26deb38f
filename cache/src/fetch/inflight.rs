//! The in-flight table: one fetch per missing chunk, joined by every reader of it,
//! its progress (verified bytes, then the file) published to them, and a demand
//! reader's wait bounded by its [`ReadBudget`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::flight::{FetchKey, Flight, Outcome, Progress};
use super::whole::Verified;
use super::work::{run_at, READERS_ACTIVE};
use super::{Chunk, ChunkCache, ChunkRef, FetchError, ReadBudget};
use crate::chunk_store::{ChunkFile, ChunkStoreError};
use crate::digest::Digest;
use crate::encoding::Encoding;
use crate::planner::{Priority, Promotion};
use crate::source::Source;

struct DemandGuard<'a>(&'a AtomicUsize);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ChunkCache {
    /// Whether a fetch of `digest` is under way.
    pub fn is_fetching(&self, digest: &Digest) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&FetchKey::Chunk(*digest))
    }

    /// The chunk for a demand read: local, or fetched from `sources` (answered as soon
    /// as its bytes are verified, while they are still being written to the cache),
    /// within a budget of its own.
    pub async fn get(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
    ) -> Result<Chunk, Arc<FetchError>> {
        self.get_within(chunk, sources, &self.read_budget()).await
    }

    /// [`ChunkCache::get`] for a read whose `budget` earlier attempts (its block index
    /// page, its blocks) may have spent in part: the wait ends with the budget.
    pub async fn get_within(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
        budget: &ReadBudget,
    ) -> Result<Chunk, Arc<FetchError>> {
        self.note_demand();
        if let Some(file) = self.local(chunk)? {
            self.observer.hit(&chunk.template);
            return Ok(Chunk::File(file));
        }
        self.demand_waiting.fetch_add(1, Ordering::Relaxed);
        // Decrements even when the reader goes away mid-fetch.
        let _waiting = DemandGuard(&self.demand_waiting);
        let waited = budget
            .bound(self.wait(chunk, sources, false, Priority::Demand))
            .await;
        // Counted when the wait ends, not when it starts: a frontend may drop a read
        // that would wait and ask again from a task of its own (see lazyblk-nbd).
        self.observer.miss(&chunk.template);
        waited.unwrap_or_else(|| Err(Arc::new(self.budget_spent(chunk, budget))))
    }

    /// [`ChunkCache::get_within`] for a small read of `offset..offset + buf.len()` of
    /// a chunk stored in blocks of `block_size`: once its whole fetch has brought the
    /// stored form and `hashes` (the chunk's entry in the block index, which may still
    /// be on its way) are known, the read's own blocks are decoded, verified against
    /// their sha256 and copied into `buf` (`Ok(None)`) while the chunk is still being
    /// decoded and verified whole, so a miss waits for its request and a few blocks, not
    /// for a whole chunk's decoding and hashing. Otherwise (hashes unknown, the stored
    /// form not in blocks, a block that does not match) the chunk once verified, as
    /// `get_within` returns it.
    #[allow(clippy::too_many_arguments)]
    pub async fn get_or_read_arrived(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
        budget: &ReadBudget,
        block_size: u32,
        hashes: impl std::future::Future<Output = Option<Vec<u8>>>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<Chunk>, Arc<FetchError>> {
        self.note_demand();
        if let Some(file) = self.local(chunk)? {
            self.observer.hit(&chunk.template);
            return Ok(Some(Chunk::File(file)));
        }
        self.demand_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = DemandGuard(&self.demand_waiting);
        let waited = budget
            .bound(async {
                let outcome = self.join_or_start(chunk, sources, Priority::Demand)?;
                self.follow_arrived(chunk, outcome, block_size, hashes, offset, buf)
                    .await
            })
            .await;
        self.observer.miss(&chunk.template);
        waited.unwrap_or_else(|| Err(Arc::new(self.budget_spent(chunk, budget))))
    }

    /// Waits on a fetch's progress until the chunk is readable, or until its arrived
    /// stored form served the read ([`ChunkCache::get_or_read_arrived`]).
    async fn follow_arrived(
        &self,
        chunk: &ChunkRef,
        mut outcome: watch::Receiver<Outcome>,
        block_size: u32,
        hashes: impl std::future::Future<Output = Option<Vec<u8>>>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<Chunk>, Arc<FetchError>> {
        let mut hashes = std::pin::pin!(hashes);
        // `None` while the hashes are on their way; `Some(None)` when there are none.
        let mut known: Option<Option<Vec<u8>>> = None;
        // The stored form tried last: each attempt's is tried once.
        let mut tried: Option<Bytes> = None;
        loop {
            let arrived = match &*outcome.borrow_and_update() {
                Progress::Fetching => None,
                Progress::Arrived(stored) => Some(stored.clone()),
                Progress::Verified(bytes) | Progress::Unstored(bytes, _) => {
                    return Ok(Some(Chunk::Verified {
                        digest: chunk.digest,
                        bytes: bytes.clone(),
                    }))
                }
                Progress::Stored(file) => return Ok(Some(Chunk::File(file.clone()))),
                Progress::Failed(e) => return Err(e.clone()),
            };
            if let (Some(stored), Some(Some(entry))) = (arrived, &known) {
                if tried.as_ref().is_none_or(|t| t.as_ptr() != stored.as_ptr()) {
                    tried = Some(stored.clone());
                    if self
                        .read_arrived_blocks(chunk, block_size, entry, stored, offset, buf)
                        .await
                    {
                        self.observer.served_before_verified(&chunk.template);
                        return Ok(None);
                    }
                }
            }
            tokio::select! {
                entry = &mut hashes, if known.is_none() => known = Some(entry),
                changed = outcome.changed() => {
                    if changed.is_err() {
                        return Err(abandoned(chunk));
                    }
                }
            }
        }
    }

    /// Makes the chunk local for a demand read that needs its file (a block index
    /// page) within the read's `budget`, without counting a read.
    pub async fn fetch_within(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
        budget: &ReadBudget,
    ) -> Result<ChunkFile, Arc<FetchError>> {
        let fetched = budget
            .bound(self.wait(chunk, sources, true, Priority::Demand))
            .await;
        match fetched {
            Some(Ok(Chunk::File(f))) => Ok(f),
            Some(Ok(Chunk::Verified { .. })) => unreachable_verified(chunk),
            Some(Err(e)) => Err(e),
            None => Err(Arc::new(self.budget_spent(chunk, budget))),
        }
    }

    /// The error of a read whose budget ran out waiting for `chunk`; logged, with the
    /// time the read took, so that a read past its budget shows in the log.
    fn budget_spent(&self, chunk: &ChunkRef, budget: &ReadBudget) -> FetchError {
        self.observer.read_budget_spent(&chunk.template);
        tracing::warn!(template = %chunk.template, chunk = chunk.index,
            budget = ?budget.total(), took = ?budget.elapsed(),
            "a read's budget ran out before any source delivered; the read fails with EIO");
        FetchError::Deadline {
            template: chunk.template.clone(),
            index: chunk.index,
            digest: chunk.digest,
            budget: budget.total(),
        }
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
                Progress::Fetching | Progress::Arrived(_) => {}
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
                return Err(abandoned(chunk));
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
        if let Some(Flight::Chunk((rx, promotion, background))) =
            inflight.get(&FetchKey::Chunk(chunk.digest))
        {
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
        inflight.insert(
            FetchKey::Chunk(chunk.digest),
            Flight::Chunk((rx.clone(), promotion.clone(), in_background)),
        );
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
            let progress = match cache
                .fetch_verified(&chunk, &sources, priority, Some(&tx))
                .await
            {
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

    /// Writes a fetched chunk's verified bytes to the cache, and the stored form they
    /// came as beside them when it is to be kept ([`ChunkCache::insert_keeping`]).
    async fn write(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        bytes: Bytes,
        stored: Option<(Encoding, Bytes)>,
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
        let key = FetchKey::Chunk(self.digest);
        if matches!(inflight.get(&key), Some(Flight::Chunk((_, p, _))) if Arc::ptr_eq(p, &self.promotion))
        {
            inflight.remove(&key);
        }
    }
}

/// The error of a reader whose fetch's task ended without an outcome (the runtime shut
/// down).
fn abandoned(chunk: &ChunkRef) -> Arc<FetchError> {
    Arc::new(FetchError::Exhausted {
        template: chunk.template.clone(),
        index: chunk.index,
        digest: chunk.digest,
        errors: vec!["fetch abandoned".into()],
    })
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
