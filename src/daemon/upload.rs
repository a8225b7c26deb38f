//! Background uploads of committed templates' new chunks to the store, which take a
//! template from ORIGIN_ONLY through UPLOADING to DURABLE. The store's own record is
//! the truth: an upload asks it which chunks it lacks and sends those, so an upload
//! interrupted by a restart simply runs again (every template this node originated is
//! checked at start).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lazyblk_cache::{ChunkCache, Digest};
use serde::Serialize;

use crate::daemon::node_state::intents::OriginIntents;
use crate::daemon::replica::Replica;
use crate::store::client::StoreClient;
use crate::store::Durability;

/// Chunks uploaded at once per template.
const UPLOAD_CONCURRENCY: usize = 4;
/// Pause after a failed upload round before the next; the store may be restarting.
const RETRY_BACKOFF: Duration = Duration::from_secs(2);

/// A template's durability as this node, its origin, sees it.
#[derive(Clone, Debug, Serialize)]
pub struct UploadStatus {
    pub durability: Durability,
    pub pending_chunks: usize,
    pub uploaded_chunks: usize,
    pub last_error: Option<String>,
}

/// The uploads this node runs.
pub struct Uploads {
    store: StoreClient,
    cache: Arc<ChunkCache>,
    /// Commit intents, cleared when a template becomes DURABLE.
    intents: Arc<OriginIntents>,
    /// How long an upload waits before it starts (operators batch commits; tests hold
    /// uploads back to prove that peers read from the origin).
    delay: Duration,
    status: Mutex<BTreeMap<String, UploadStatus>>,
    /// Chunk uploads in flight on the whole node, however many templates upload at
    /// once: each holds a chunk and its compressed copy in memory.
    slots: tokio::sync::Semaphore,
}

impl Uploads {
    pub fn new(
        store: StoreClient,
        cache: Arc<ChunkCache>,
        intents: Arc<OriginIntents>,
        delay: Duration,
    ) -> Arc<Uploads> {
        Arc::new(Uploads {
            store,
            cache,
            intents,
            delay,
            status: Mutex::new(BTreeMap::new()),
            slots: tokio::sync::Semaphore::new(UPLOAD_CONCURRENCY),
        })
    }

    /// The durability of templates this node uploads (or uploaded since start).
    pub fn status(&self, template: &str) -> Option<UploadStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(template)
            .cloned()
    }

    fn set(&self, template: &str, f: impl FnOnce(&mut UploadStatus)) {
        let mut all = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(template.to_string()).or_insert(UploadStatus {
            durability: Durability::OriginOnly,
            pending_chunks: 0,
            uploaded_chunks: 0,
            last_error: None,
        }));
    }

    /// Uploads `chunks` of `replica` (claimed by the caller for [`upload_owner`];
    /// unpinned one by one as the store has them).
    pub fn start(self: &Arc<Self>, replica: Arc<Replica>, chunks: Vec<Digest>) {
        let id = replica.id().to_string();
        let durability = Durability::after_commit(chunks.len());
        self.set(&id, |s| {
            s.durability = durability;
            s.pending_chunks = chunks.len();
        });
        if chunks.is_empty() {
            self.intents.clear(&id);
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.delay).await;
            this.upload(&id, chunks).await;
        });
    }

    /// At start: re-pins and uploads the local chunks of `replica` (originated here)
    /// that the store still lacks.
    pub async fn resume(self: &Arc<Self>, replica: Arc<Replica>) {
        let local = self
            .cache
            .local_of(replica.manifest().stored_chunks().map(|(_, d)| d));
        let missing = match self.store.missing(&local).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(template = replica.id(), error = %e, "cannot check uploads; retrying in the background");
                local
            }
        };
        self.cache
            .pin(&upload_owner(replica.id()), missing.iter().copied());
        if !missing.is_empty() {
            tracing::info!(
                template = replica.id(),
                chunks = missing.len(),
                "resuming upload"
            );
        }
        self.start(replica, missing);
    }

    async fn upload(&self, id: &str, chunks: Vec<Digest>) {
        let mut pending = chunks;
        loop {
            self.set(id, |s| s.durability = Durability::Uploading);
            // Ask the store which are still missing (another node may have sent some).
            let missing = match self.store.missing(&pending).await {
                Ok(m) => m,
                Err(e) => {
                    self.note_error(id, e.to_string()).await;
                    continue;
                }
            };
            let owner = upload_owner(id);
            for digest in pending.iter().filter(|d| !missing.contains(d)) {
                self.cache.unpin(&owner, digest);
            }
            pending = missing;
            self.set(id, |s| s.pending_chunks = pending.len());
            if pending.is_empty() {
                self.cache.release(&owner);
                self.intents.clear(id);
                self.set(id, |s| {
                    s.durability = Durability::Durable;
                    s.last_error = None;
                });
                tracing::info!(template = id, "template DURABLE in the store");
                return;
            }
            let results: Vec<Result<(), String>> = futures::stream::iter(pending.iter().copied())
                .map(|digest| self.upload_one(id, digest))
                .buffer_unordered(UPLOAD_CONCURRENCY)
                .collect()
                .await;
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                self.note_error(id, e).await;
            }
        }
    }

    async fn upload_one(&self, id: &str, digest: Digest) -> Result<(), String> {
        let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
        let file = match self.cache.open_local(&digest) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(format!("chunk {digest} of {id} is no longer on this node")),
            Err(e) => return Err(e.to_string()),
        };
        // Stored zstd-compressed where that makes it smaller (DESIGN.md section 4).
        let stored = tokio::task::spawn_blocking(move || {
            file.read_all()
                .map(|raw| match lazyblk_cache::encoding::encode(&raw) {
                    (_, std::borrow::Cow::Owned(frame)) => frame,
                    (_, std::borrow::Cow::Borrowed(_)) => raw,
                })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.store
            .put_chunk(&digest, stored.into())
            .await
            .map_err(|e| e.to_string())?;
        self.set(id, |s| s.uploaded_chunks += 1);
        Ok(())
    }

    async fn note_error(&self, id: &str, error: String) {
        tracing::warn!(template = id, %error, "upload failed; retrying");
        self.set(id, |s| s.last_error = Some(error));
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// The cache owner of a commit's new chunks until the store has them all.
pub fn upload_owner(template: &str) -> String {
    format!("upload:{template}")
}
