//! Chunks fetched for a peer that asked this node, their owner, for them
//! (`/v1/peer/chunks/{digest}?len=N`). The length is the asker's word, not a manifest's:
//! bytes that are not the chunk at that length, or a store without the digest, are the
//! asker's error ([`FetchError::AskedWrong`]), counted against no source (no failure, no
//! corrupt chunk, no backoff). Such a fetch is never one this node's own readers wait
//! on (a wrong length must not fail them); peers asking the same digest and length share
//! one, and one of this node's own fetches under way is joined.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::{Chunk, ChunkCache, ChunkRef, FetchError, Outcome, Priority, Promotion};
use crate::digest::Digest;
use crate::source::{Source, SourceError};

/// A fetch for peers under way: its outcome once it has one.
pub(super) type PeerFetch = watch::Receiver<Option<Result<Chunk, Arc<FetchError>>>>;

impl ChunkCache {
    /// The chunk a peer asked for (see the module header): local, this node's own fetch
    /// of it joined, or fetched from `sources` (the store: an owner never asks a peer).
    pub async fn get_for_peer(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &Arc<[Source]>,
    ) -> Result<Chunk, Arc<FetchError>> {
        if let Some(file) = self.local(chunk)? {
            return Ok(Chunk::File(file));
        }
        // Its length is a manifest's; bytes of another length than asked are refused
        // by the caller.
        if let Some(own) = self.join_own(&chunk.digest) {
            return self.follow(chunk, own, false).await;
        }
        let mut fetch = self.peer_fetch(chunk, sources);
        loop {
            if let Some(outcome) = fetch.borrow_and_update().clone() {
                return outcome;
            }
            if fetch.changed().await.is_err() {
                return Err(Arc::new(FetchError::Exhausted {
                    template: chunk.template.clone(),
                    index: chunk.index,
                    digest: chunk.digest,
                    errors: vec!["fetch abandoned".into()],
                }));
            }
        }
    }

    /// This node's own fetch of `digest`, when one is under way on the caller's runtime
    /// (a fill's on the low-priority one may be starved: not waited on).
    fn join_own(&self, digest: &Digest) -> Option<watch::Receiver<Outcome>> {
        let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let (rx, promotion, background) = inflight.get(digest)?;
        if *background {
            return None;
        }
        promotion.promote();
        Some(rx.clone())
    }

    /// Joins or starts the fetch of `chunk` at its asked length for peers. It runs in a
    /// task of its own, in a demand slot, to its end whoever still waits.
    fn peer_fetch(self: &Arc<Self>, chunk: &ChunkRef, sources: &Arc<[Source]>) -> PeerFetch {
        let key = (chunk.digest, chunk.len);
        let mut fetches = self.peer_fetches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fetch) = fetches.get(&key) {
            return fetch.clone();
        }
        let (tx, rx) = watch::channel(None);
        fetches.insert(key, rx.clone());
        drop(fetches);
        let cache = self.clone();
        let chunk = chunk.clone();
        let sources = sources.clone();
        tokio::spawn(async move {
            let listed = Listed { cache: &cache, key };
            let outcome = {
                let _slot = cache
                    .slots
                    .acquire(Priority::Demand, &Promotion::default())
                    .await;
                cache.fetch_for_peer(&chunk, &sources).await
            };
            drop(listed);
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// One fetch of `chunk` at the asked length from `sources` (see the module header).
    async fn fetch_for_peer(
        self: &Arc<Self>,
        chunk: &ChunkRef,
        sources: &[Source],
    ) -> Result<Chunk, Arc<FetchError>> {
        let asked_wrong = |detail: String| {
            Arc::new(FetchError::AskedWrong {
                digest: chunk.digest,
                len: chunk.len,
                detail,
            })
        };
        let mut errors = Vec::new();
        for source in self.health_of_sources.plan(sources) {
            let started = Instant::now();
            let stored = match source.fetch(&chunk.digest, chunk.len, self.deadline).await {
                Ok(stored) => stored,
                // A body longer than the length asked, or a chunk the source lacks.
                Err(e @ SourceError::Length { .. }) => return Err(asked_wrong(e.to_string())),
                Err(e @ SourceError::Status { status, .. }) if (400..500).contains(&status) => {
                    return Err(asked_wrong(e.to_string()))
                }
                Err(e) if e.is_skip() => continue,
                Err(e) => {
                    self.health_of_sources.failed(source.name());
                    self.observer.source_failed(chunk, source.name(), &e);
                    errors.push(e.to_string());
                    continue;
                }
            };
            let stored_len = stored.len() as u64;
            let (len, digest) = (chunk.len as usize, chunk.digest);
            let decoded =
                tokio::task::spawn_blocking(move || crate::encoding::decode(stored, len, &digest))
                    .await;
            let bytes = match decoded {
                Ok(Ok((_, bytes))) => bytes,
                // Not the chunk at this length: without the manifest this node cannot
                // tell a wrong length from a bad copy, and the asker can (it verifies
                // what the store sends it).
                Ok(Err(e)) => return Err(asked_wrong(e.to_string())),
                Err(e) => {
                    errors.push(format!("decoding task failed: {e}"));
                    continue;
                }
            };
            self.health_of_sources.succeeded(source.name());
            self.observer
                .fetched(chunk, source.name(), stored_len, started.elapsed());
            match self.write(chunk, bytes.clone(), Priority::Demand).await {
                Ok(_) => self.health.write_ok(),
                Err(e) => self.health.write_failed(&e),
            }
            return Ok(Chunk::Verified { digest, bytes });
        }
        if sources.is_empty() {
            errors.push("no sources configured".into());
        }
        Err(Arc::new(FetchError::Exhausted {
            template: chunk.template.clone(),
            index: chunk.index,
            digest: chunk.digest,
            errors,
        }))
    }
}

/// Takes a peer fetch off the list however its task ends (a panic included), so the
/// next asker starts afresh instead of waiting on a dead one.
struct Listed<'a> {
    cache: &'a ChunkCache,
    key: (Digest, u64),
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.cache
            .peer_fetches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}
