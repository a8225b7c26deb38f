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
//!
//! A commit takes the node-wide sandbox lock only to check ids and reserve its new one
//! ([`Sandboxes::hold_for_commit`]); its store round trips run without it, so a slow
//! store delays that commit alone, not the node's sandbox creates and deletes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lazyblk_cache::{validate_id, ChunkCache, Digest, Manifest, Priority};
use serde::Serialize;

use crate::daemon::node_state::intents::OriginIntents;
use crate::daemon::node_state::phases::now_rfc3339;
use crate::daemon::replica::Replica;
use crate::daemon::sandboxes::{IdReservation, Sandbox, SandboxError, Sandboxes};
use crate::daemon::templates::{TemplateError, Templates};
use crate::daemon::upload::{upload_owner, Uploads};
use crate::store::client::{StoreClient, StoreError};
use crate::store::Durability;

/// Why a commit was refused or failed. Nothing is published unless it succeeds, except
/// where [`CommitError::PublishUncertain`] says the store's answer was lost.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("invalid template id: {0}")]
    InvalidId(String),
    /// A label that breaks the label grammar (`lazyblk_cache::labels`): the store would
    /// refuse the manifest.
    #[error("invalid label: {0}")]
    InvalidLabel(String),
    /// The new id is taken by a template or a sandbox.
    #[error("template {0:?} already exists; commit under a new id")]
    Exists(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Publishing the manifest failed and the store does not have it: nothing was
    /// published; the sandbox is unchanged and the commit can be retried.
    #[error("commit of {template:?} not published (nothing changed; retry): {source}")]
    Publish {
        template: String,
        source: StoreError,
    },
    /// The store did not answer the publish and could not be asked afterwards: the
    /// template may or may not be published. This node keeps its new chunks and its
    /// intent, and settles it in the background: it finishes the upload if the store
    /// has the manifest, and drops the intent if not.
    #[error("commit of {template:?}: the store did not confirm the publish ({detail}); it may be published: this node keeps the new chunks and will upload them if the store has it")]
    PublishUncertain { template: String, detail: String },
    /// A new chunk could not be kept locally.
    #[error("commit of {template:?} not published: keeping chunk {index} locally: {detail}")]
    Local {
        template: String,
        index: usize,
        detail: String,
    },
    /// The intent to publish could not be made durable on this node's disk.
    #[error("commit of {template:?} not published: recording it on this node: {detail}")]
    Intent { template: String, detail: String },
}

/// What a commit did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
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
    pub durability: Durability,
    pub seconds: f64,
}

/// Commits sandboxes into templates, and settles at start what earlier commits owe.
pub struct Commits {
    pub(crate) cache: Arc<ChunkCache>,
    pub(crate) store: StoreClient,
    pub(crate) templates: Arc<Templates>,
    pub(crate) sandboxes: Arc<Sandboxes>,
    pub(crate) uploads: Arc<Uploads>,
    /// Commits this node owes an upload for (settled at start, whatever the address).
    pub(crate) intents: Arc<OriginIntents>,
    /// The URL peers reach this daemon at: a commit's first origin.
    pub(crate) advertise: String,
}

impl Commits {
    /// Whether `template` was committed here and its new chunks are not all in the
    /// store yet.
    pub fn owes(&self, template: &str) -> bool {
        self.intents.contains(template)
    }

    /// Commits sandbox `sandbox` as template `new_id`.
    ///
    /// The order makes the commit durable before anyone learns of it: the new id is
    /// reserved (in memory, under the node-wide lock, which is then released), the new
    /// chunks are written and pinned, then the manifest and the intent to upload are
    /// kept on this node's disk, and only then is the manifest published; the id
    /// becomes a known template and its reservation goes; the upload follows. A crash
    /// anywhere leaves either nothing visible (the reservation dies with the process;
    /// an intent whose manifest the store lacks is dropped at the restart), or a
    /// published template whose new chunks are pinned here and uploaded after the
    /// restart.
    pub async fn commit(
        self: &Arc<Self>,
        sandbox: &str,
        new_id: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<CommitOutcome, CommitError> {
        let started = Instant::now();
        validate_id(new_id).map_err(|e| CommitError::InvalidId(e.to_string()))?;
        lazyblk_cache::labels::validate_labels(labels.iter()).map_err(CommitError::InvalidLabel)?;
        // The node-wide lock covers the id checks and the reservation only: the store
        // round trips below run without it, so sandbox creates and deletes on the node
        // (and commits of other sandboxes) go on meanwhile. The hold keeps this sandbox
        // from being deleted or committed again, the reservation keeps `new_id` from
        // being taken, until this commit returns (or, unsettled, until it is settled).
        let (sb, _hold, reservation) = {
            let _one_at_a_time = self.sandboxes.exclusive().await;
            let sb = self
                .sandboxes
                .get(sandbox)
                .ok_or_else(|| SandboxError::Unknown(sandbox.to_string()))?;
            if self.templates.known(new_id).is_some() || self.sandboxes.get(new_id).is_some() {
                return Err(CommitError::Exists(new_id.to_string()));
            }
            let (hold, reservation) = self.sandboxes.hold_for_commit(sandbox, new_id)?;
            (sb, hold, reservation)
        };
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
        // A parent this node no longer trusts (its key removed from --trusted-keys since
        // the sandbox was made) passes on nothing.
        self.templates
            .trusted(parent.id())
            .map_err(|e| CommitError::Template(e.into()))?;
        let built = self.build_chunks(&sb, new_id).await?;
        let mut manifest = built.manifest;
        manifest.template = new_id.to_string();
        // Its new chunks are uploaded compressed where they shrink.
        manifest.format = lazyblk_cache::manifest::MANIFEST_FORMAT;
        manifest.parent = Some(parent.id().to_string());
        manifest.created_at = now_rfc3339();
        // The parent's labels, with the commit's own over them.
        manifest
            .labels
            .extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
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
        let new_chunks = built.new_chunks;

        // The durable intent, before the store (and so anyone) sees the template.
        // Two fsyncs of files and directories: off the runtime's hands (the blocking
        // policy of `lazyblk_cache::blocking`).
        let kept = lazyblk_cache::blocking::blocking(|| {
            self.templates
                .save_manifest(&manifest)
                .map_err(|e| e.to_string())
                .and_then(|()| self.intents.record(new_id).map_err(|e| e.to_string()))
        });
        if let Err(detail) = kept {
            self.abandon(new_id);
            return Err(CommitError::Intent {
                template: new_id.to_string(),
                detail,
            });
        }
        if let Err(source) = self.store.put_manifest(&manifest).await {
            // The answer may have been lost after the store kept it: ask.
            match self.settle(&manifest).await {
                Settled::Published => {}
                Settled::NotPublished(_) => {
                    self.abandon(new_id);
                    return Err(CommitError::Publish {
                        template: new_id.to_string(),
                        source,
                    });
                }
                Settled::Unknown(detail) => {
                    tokio::spawn(self.clone().settle_later(
                        manifest,
                        new_chunks,
                        Some(reservation),
                    ));
                    return Err(CommitError::PublishUncertain {
                        template: new_id.to_string(),
                        detail: format!("{source}; then {detail}"),
                    });
                }
            }
        }
        let shared = manifest
            .chunks
            .iter()
            .zip(&parent.manifest().chunks)
            .filter(|(a, b)| a == b && a.is_some())
            .count();
        // Published: the id is a known template before its reservation goes.
        let replica = self.templates.insert(manifest);
        drop(reservation);
        self.uploads.start(replica.clone(), new_chunks.clone());
        let outcome = CommitOutcome {
            template: new_id.to_string(),
            parent: parent.id().to_string(),
            sandbox: sandbox.to_string(),
            dirty_chunks: built.dirty,
            new_chunks: new_chunks.len(),
            shared_chunks: shared,
            bytes_hashed: built.bytes_hashed,
            durability: Durability::after_commit(new_chunks.len()),
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

    /// Freezes the sandbox's overlay at a flush point and builds the new template's
    /// chunks: each chunk with a dirty block is rebuilt, hashed and kept in the cache,
    /// pinned (once per distinct new digest) until the store has it.
    async fn build_chunks(&self, sb: &Sandbox, new_id: &str) -> Result<Built, CommitError> {
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
        let mut new_chunks: Vec<Digest> = Vec::new();
        let mut bytes_hashed = 0;
        for &index in &dirty {
            let bytes = overlay
                .materialize_chunk(index)
                .await
                .map_err(overlay_error)?;
            bytes_hashed += bytes.len() as u64;
            let is_new =
                |d: &Digest| parent.manifest().chunks[index] != Some(*d) && !new_chunks.contains(d);
            match self.keep_chunk(new_id, index, bytes, is_new).await {
                Ok((digest, pinned)) => {
                    manifest.chunks[index] = digest;
                    if parent.manifest().chunks[index] != digest {
                        // The new chunk has no entry in the block index: read it whole.
                        if let Some(blocks) = &mut manifest.blocks {
                            blocks.forget(index);
                        }
                    }
                    if let (Some(d), true) = (digest, pinned) {
                        new_chunks.push(d);
                    }
                }
                Err(e) => {
                    drop(frozen);
                    self.abandon(new_id);
                    return Err(e);
                }
            }
        }
        drop(frozen);
        Ok(Built {
            manifest,
            new_chunks,
            dirty: dirty.len(),
            bytes_hashed,
        })
    }

    /// Hashes a rebuilt chunk and keeps it in the cache, pinned in the same step when
    /// `is_new` says this node holds its only copy; `None` for an all-zero chunk.
    async fn keep_chunk(
        &self,
        template: &str,
        index: usize,
        bytes: Vec<u8>,
        is_new: impl Fn(&Digest) -> bool,
    ) -> Result<(Option<Digest>, bool), CommitError> {
        let local = |detail: String| CommitError::Local {
            template: template.to_string(),
            index,
            detail,
        };
        let hashed = tokio::task::spawn_blocking(move || {
            let zero = bytes.iter().all(|&b| b == 0);
            let digest = (!zero).then(|| Digest::of(&bytes));
            (digest, bytes)
        })
        .await
        .map_err(|e| local(e.to_string()))?;
        let (Some(digest), bytes) = hashed else {
            return Ok((None, false));
        };
        let pin = is_new(&digest);
        let cache = self.cache.clone();
        let owner = pin.then(|| upload_owner(template));
        tokio::task::spawn_blocking(move || {
            cache.keep(owner.as_deref(), &digest, &bytes).map(drop)
        })
        .await
        .map_err(|e| local(e.to_string()))?
        .map_err(|e| local(e.to_string()))?;
        Ok((Some(digest), pin))
    }

    /// Undoes a commit that was never published: its saved manifest, its intent, and
    /// the claims on its new chunks (which stay cached, evictable). The manifest goes
    /// first: a crash in between leaves an intent without a manifest, which the restart
    /// drops, where the other order would leave a manifest that looks committed here.
    pub fn abandon(&self, template: &str) {
        lazyblk_cache::blocking::blocking(|| {
            self.templates.forget(template);
            self.intents.clear(template);
        });
        self.cache.release(&upload_owner(template));
    }

    /// At start, settles every commit this node recorded an intent for (whatever
    /// address it had then): a published one has its new chunks pinned and uploaded, one
    /// that never reached the store is dropped, and one the store cannot be asked about
    /// keeps its chunks pinned until it can. Templates from before intents were kept
    /// (first origin equal to this address) resume as they did.
    ///
    /// The local chunks of every intent are claimed here, before the daemon serves
    /// anything (so no evict can come first); asking the store happens in the
    /// background, so that a store that does not answer does not hold the daemon's
    /// start (and its readiness) for a minute per pending commit.
    ///
    /// `intents`: the templates with a recorded intent, as the node's state lists them.
    pub fn resume(self: &Arc<Self>, intents: Vec<String>) {
        let mut pending = Vec::new();
        for id in intents {
            let Some(replica) = self.templates.known(&id) else {
                tracing::warn!(template = %id, "commit intent without a saved manifest; dropping it");
                self.intents.clear(&id);
                continue;
            };
            self.pin_local(replica.manifest());
            pending.push(replica);
        }
        tokio::spawn(self.clone().settle_intents(pending));
    }

    async fn settle_intents(self: Arc<Self>, pending: Vec<Arc<Replica>>) {
        for replica in pending {
            let id = replica.id().to_string();
            match self.settle(replica.manifest()).await {
                Settled::Published => self.uploads.resume(replica).await,
                Settled::NotPublished(why) => {
                    tracing::warn!(template = %id, why, "a commit cut off before it was published; dropping it");
                    self.abandon(&id);
                }
                Settled::Unknown(error) => {
                    tracing::warn!(template = %id, %error, "store unreachable; keeping the commit's chunks until it can be asked");
                    let pinned = self.pin_local(replica.manifest());
                    tokio::spawn(self.clone().settle_later(
                        Manifest::clone(replica.manifest()),
                        pinned,
                        None,
                    ));
                }
            }
        }
        // Every known template, also those only on disk (read for this and not kept).
        for replica in self.templates.snapshot() {
            if replica.manifest().origins.first() == Some(&self.advertise)
                && !self.intents.contains(replica.id())
            {
                self.uploads.resume(replica).await;
            }
        }
    }

    /// Claims the local chunks of `manifest` for its upload and returns them (each
    /// distinct digest once).
    fn pin_local(&self, manifest: &Manifest) -> Vec<Digest> {
        let local = self
            .cache
            .local_of(manifest.stored_chunks().map(|(_, d)| d));
        self.cache
            .pin(&upload_owner(&manifest.template), local.iter().copied());
        local
    }

    /// Whether the store has published `manifest` (this node's version of it).
    async fn settle(&self, manifest: &Manifest) -> Settled {
        match self.store.manifest(&manifest.template).await {
            Ok(Some(stored)) if stored.same_content(manifest) => Settled::Published,
            Ok(Some(_)) => Settled::NotPublished("the store holds other content under this id"),
            Ok(None) => Settled::NotPublished("the store does not have it"),
            Err(e) => Settled::Unknown(e.to_string()),
        }
    }

    /// Settles a commit whose publish went unanswered: asks the store until it knows,
    /// then uploads (published) or drops the intent (not published). The commit's id
    /// reservation, if it still has one, is kept until then.
    async fn settle_later(
        self: Arc<Self>,
        manifest: Manifest,
        pinned: Vec<Digest>,
        _reservation: Option<IdReservation>,
    ) {
        let id = manifest.template.clone();
        loop {
            tokio::time::sleep(SETTLE_RETRY).await;
            match self.settle(&manifest).await {
                Settled::Published => {
                    tracing::info!(template = %id, "commit found published in the store; uploading its chunks");
                    let replica = match self.templates.known(&id) {
                        Some(r) => r,
                        None => self.templates.insert(manifest),
                    };
                    self.uploads.start(replica, pinned);
                    return;
                }
                Settled::NotPublished(why) => {
                    tracing::warn!(template = %id, why, "commit was never published; dropping it");
                    self.abandon(&id);
                    return;
                }
                Settled::Unknown(e) => {
                    tracing::debug!(template = %id, error = %e, "store still unreachable; commit unsettled")
                }
            }
        }
    }
}

/// How often an unsettled commit asks the store again.
const SETTLE_RETRY: Duration = Duration::from_secs(2);

/// The chunks of a commit, built from the frozen overlay.
struct Built {
    manifest: Manifest,
    /// Distinct new digests, pinned once each.
    new_chunks: Vec<Digest>,
    dirty: usize,
    bytes_hashed: u64,
}

/// What the store says of a commit this node intended to publish.
enum Settled {
    /// The store has this node's manifest: the upload is owed.
    Published,
    /// The store does not have it (or has other content): it was never published.
    NotPublished(&'static str),
    /// The store could not be asked.
    Unknown(String),
}
