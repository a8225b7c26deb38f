//! Commit: a sandbox's overlay becomes a new template that shares every unchanged chunk
//! with its parent and is servable on every node the moment the commit returns.
//!
//! The overlay is flushed and frozen (writes that arrive meanwhile wait, then go on into
//! the sandbox); each chunk with a dirty block is rebuilt (the parent's bytes with the
//! sandbox's blocks over them), hashed and kept in the local cache, pinned until the
//! store has it; every other chunk keeps the parent's digest. The manifest names this
//! node first among its origins (then the parent's, for chunks only they hold) and is
//! published before the new chunks are uploaded in the background
//! ([`crate::daemon::upload`]). The work grows with the bytes written, not with the
//! template's size.

use std::time::Instant;

use lazyblk_cache::{validate_id, Digest, Manifest, Priority};
use serde::Serialize;

use crate::daemon::node::{Node, NodeError};
use crate::daemon::sandboxes::SandboxError;
use crate::daemon::state::now_rfc3339;
use crate::store::client::StoreError;

/// Why a commit was refused or failed. Nothing is published unless it succeeds.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("invalid template id: {0}")]
    InvalidId(String),
    /// The new id is taken by a template or a sandbox.
    #[error("template {0:?} already exists; commit under a new id")]
    Exists(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Publishing the manifest failed.
    #[error("publishing {template:?}: {source}")]
    Publish {
        template: String,
        source: StoreError,
    },
    /// A new chunk could not be kept locally.
    #[error("commit of {template:?}: keeping chunk {index} locally: {detail}")]
    Local {
        template: String,
        index: usize,
        detail: String,
    },
}

/// What a commit did.
#[derive(Clone, Debug, Serialize)]
pub struct CommitOutcome {
    pub template: String,
    pub parent: String,
    pub sandbox: String,
    /// Chunks rebuilt because the sandbox changed them (zero results included).
    pub dirty_chunks: usize,
    /// Of those, chunks with new non-zero content (uploaded to the store).
    pub new_chunks: usize,
    /// Chunks whose digest is the parent's.
    pub shared_chunks: usize,
    /// Bytes read and hashed to build the new chunks: grows with the writes, not the size.
    pub bytes_hashed: u64,
    pub durability: String,
    pub seconds: f64,
}

impl Node {
    /// Commits sandbox `sandbox` as template `new_id`.
    pub async fn commit_sandbox(
        &self,
        sandbox: &str,
        new_id: &str,
    ) -> Result<CommitOutcome, CommitError> {
        let started = Instant::now();
        validate_id(new_id).map_err(|e| CommitError::InvalidId(e.to_string()))?;
        let sb = self
            .sandbox(sandbox)
            .ok_or_else(|| SandboxError::Unknown(sandbox.to_string()))?;
        let _one_at_a_time = self.creating.lock().await;
        if self.known(new_id).is_some() || self.sandbox(new_id).is_some() {
            return Err(CommitError::Exists(new_id.to_string()));
        }
        match self.store.manifest(new_id).await {
            Ok(Some(_)) => return Err(CommitError::Exists(new_id.to_string())),
            Ok(None) => {}
            Err(source) => {
                return Err(CommitError::Publish {
                    template: new_id.to_string(),
                    source,
                })
            }
        }
        let parent = sb.template().clone();
        let overlay = sb.overlay.clone();
        // Bring the parent's bytes of the dirty chunks local before freezing, so the
        // freeze (which holds the sandbox's writes) does no network I/O in the common case.
        for index in overlay.dirty_chunks() {
            let _ = parent.image.fetch_chunk(index, Priority::Demand).await;
        }
        let overlay_error = |e| CommitError::Sandbox(SandboxError::Overlay(e));
        overlay.flush().await.map_err(overlay_error)?;
        let frozen = overlay.freeze().await;
        let dirty = overlay.dirty_chunks();
        let mut manifest = Manifest::clone(parent.manifest());
        let mut new_chunks = Vec::new();
        let mut bytes_hashed = 0;
        for &index in &dirty {
            let bytes = overlay
                .materialize_chunk(index)
                .await
                .map_err(overlay_error)?;
            bytes_hashed += bytes.len() as u64;
            manifest.chunks[index] = self.keep_chunk(new_id, index, bytes).await?;
            if let Some(digest) = manifest.chunks[index] {
                if parent.manifest().chunks[index] != Some(digest) {
                    // Until the store has it, this node holds the only copy.
                    self.cache.store().pin(&digest);
                    new_chunks.push(digest);
                }
            }
        }
        drop(frozen);

        manifest.template = new_id.to_string();
        manifest.parent = Some(parent.id().to_string());
        manifest.created_at = now_rfc3339();
        let mut origins = vec![self.advertise.clone()];
        origins.extend(
            parent
                .manifest()
                .origins
                .iter()
                .filter(|o| **o != self.advertise)
                .cloned(),
        );
        manifest.origins = origins;
        if let Err(source) = self.store.put_manifest(&manifest).await {
            for digest in &new_chunks {
                self.cache.store().unpin(digest);
            }
            return Err(CommitError::Publish {
                template: new_id.to_string(),
                source,
            });
        }
        self.save_manifest(&manifest)?;
        let shared = manifest
            .chunks
            .iter()
            .zip(&parent.manifest().chunks)
            .filter(|(a, b)| a == b && a.is_some())
            .count();
        let replica = self.insert(manifest);
        self.uploads.start(replica.clone(), new_chunks.clone());
        let outcome = CommitOutcome {
            template: new_id.to_string(),
            parent: parent.id().to_string(),
            sandbox: sandbox.to_string(),
            dirty_chunks: dirty.len(),
            new_chunks: new_chunks.len(),
            shared_chunks: shared,
            bytes_hashed,
            durability: if new_chunks.is_empty() {
                "DURABLE"
            } else {
                "ORIGIN_ONLY"
            }
            .to_string(),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            template = new_id,
            parent = parent.id(),
            sandbox,
            new_chunks = outcome.new_chunks,
            shared_chunks = shared,
            "committed"
        );
        Ok(outcome)
    }

    /// Hashes a rebuilt chunk and keeps it in the cache; `None` for an all-zero chunk.
    async fn keep_chunk(
        &self,
        template: &str,
        index: usize,
        bytes: Vec<u8>,
    ) -> Result<Option<Digest>, CommitError> {
        let cache = self.cache.clone();
        let kept = tokio::task::spawn_blocking(move || -> Result<Option<Digest>, String> {
            if bytes.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let digest = Digest::of(&bytes);
            cache
                .store()
                .insert(&digest, &bytes)
                .map_err(|e| e.to_string())?;
            Ok(Some(digest))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        kept.map_err(|detail| CommitError::Local {
            template: template.to_string(),
            index,
            detail,
        })
    }
}
