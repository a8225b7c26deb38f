//! The templates this node knows: their manifests (saved in the node's state,
//! [`SavedManifests`], learned from the store on first look) and the node's replica of each, built over the
//! cache with the sources its chunks come from.
//!
//! A node may know thousands of templates it never serves. Replicas that hold nothing
//! but their manifest (no fill, no claims, no reads, no users) are kept in memory up to
//! [`IDLE_IN_MEMORY`]; beyond that they are dropped, and read again from the manifest's
//! copy on disk when next asked for, so memory grows with the templates served, not
//! with the templates known.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use lazyblk_cache::SourcePlan;
use lazyblk_cache::{ChunkCache, Manifest, Source, TemplateImage};

use crate::daemon::node_state::manifests::SavedManifests;
use crate::daemon::registry::Registry;
use crate::daemon::replica::Replica;
use crate::daemon::trace::{TraceRecorder, TraceTiming};
use crate::store::client::StoreClient;
use crate::trust::{ManifestSignature, TrustError, TrustedKeys};

/// Why a template could not be served.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Neither this node nor the store knows the template.
    #[error("unknown template {0:?}: not in the store at {1}")]
    UnknownTemplate(String, String),
    /// The store could not be asked and the template is not known locally.
    #[error("template {template:?} is not known on this node and the store could not be asked: {detail}")]
    StoreUnavailable { template: String, detail: String },
    /// The manifest on this node's disk could not be kept.
    #[error("saving the manifest of {template:?} to {path}: {source}")]
    SaveManifest {
        template: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `--trusted-keys` is given and the manifest is not signed by one of them.
    #[error("{0}")]
    Untrusted(#[from] TrustError),
    /// The template is in use and the operation needs `--force`.
    #[error("template {template:?} is in use by {}; use --force to override", .users.join(", "))]
    InUse {
        template: String,
        users: Vec<String>,
    },
}

/// The templates this node knows, and its replica of each.
pub struct Templates {
    cache: Arc<ChunkCache>,
    store: StoreClient,
    sources: SourcePlan,
    /// Manifests of the templates this node has served, so a restart serves them
    /// without the store.
    saved_manifests: Arc<SavedManifests>,
    replicas: Registry<Replica>,
    trace_timing: TraceTiming,
    /// One load of a template from the store at a time, per template.
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The store's template names and when they were asked (see [`LISTING_TTL`]).
    listing: tokio::sync::Mutex<Option<(Instant, Vec<String>)>>,
    /// Every template whose manifest this node has a copy of, in memory or not.
    saved: Mutex<BTreeSet<String>>,
    /// The keys a template's manifest must be signed by to be served
    /// (`--trusted-keys`); every template is served when unset.
    trust: Option<Arc<TrustedKeys>>,
    /// Who signed each known template's manifest, as checked when it was read (the
    /// trust itself is asked at every use, so a key removed on SIGHUP stops serving).
    signers: Mutex<HashMap<String, Signer>>,
}

/// Who signed a manifest this node read, its signature checked against its bytes.
#[derive(Clone, Debug)]
enum Signer {
    Unsigned,
    Key(String),
    /// A signature that is malformed or not of these bytes.
    Invalid(TrustError),
}

impl Signer {
    fn of(
        template: &str,
        bytes: &[u8],
        signature: Result<Option<&ManifestSignature>, TrustError>,
    ) -> Signer {
        match signature {
            Ok(None) => Signer::Unsigned,
            Ok(Some(sig)) => match sig.verify(template, bytes) {
                Ok(()) => Signer::Key(sig.key.clone()),
                Err(e) => Signer::Invalid(e),
            },
            Err(e) => Signer::Invalid(e),
        }
    }
}

/// Replicas kept in memory beyond the busy ones (see the module header): about 40 KiB
/// each for a 1 GiB template of 1 MiB chunks.
pub const IDLE_IN_MEMORY: usize = 256;

impl Templates {
    /// The templates whose manifests are saved in `saved_manifests` (none known yet:
    /// see [`Templates::restore`]).
    pub fn new(
        cache: Arc<ChunkCache>,
        store: StoreClient,
        sources: SourcePlan,
        saved_manifests: Arc<SavedManifests>,
        trace_timing: TraceTiming,
        trust: Option<Arc<TrustedKeys>>,
    ) -> Templates {
        Templates {
            cache,
            store,
            sources,
            saved_manifests,
            replicas: Registry::default(),
            trace_timing,
            loading: Mutex::new(HashMap::new()),
            listing: tokio::sync::Mutex::new(None),
            saved: Mutex::new(BTreeSet::new()),
            trust,
            signers: Mutex::new(HashMap::new()),
        }
    }

    /// Knows again the templates whose manifests earlier runs saved (`saved`, their
    /// ids as the node's state lists them). Nothing is read yet: a manifest is read
    /// (and checked) when its template is first asked for, so a node that knows
    /// thousands starts as fast as one that knows a few. Returns how many are new.
    pub fn restore(&self, saved: Vec<String>) -> usize {
        let mut known = self.saved();
        let before = known.len();
        known.extend(saved);
        known.len() - before
    }

    /// The replica of `id` if this node already knows it (read again from its saved
    /// manifest if it was dropped from memory).
    pub fn known(&self, id: &str) -> Option<Arc<Replica>> {
        if let Some(r) = self.replicas.get(id) {
            return Some(r);
        }
        let saved = self.saved().contains(id);
        if !saved {
            return None;
        }
        match self.read_saved(id) {
            Some(manifest) => Some(self.insert(manifest)),
            None => {
                self.saved().remove(id);
                None
            }
        }
    }

    /// The replicas in memory, by id: every one that is filled, claimed, read or used,
    /// and up to [`IDLE_IN_MEMORY`] others.
    pub fn all(&self) -> Vec<Arc<Replica>> {
        self.replicas.all()
    }

    /// Every template this node has a manifest of, in memory or on disk, by id.
    pub fn known_ids(&self) -> Vec<String> {
        self.saved().iter().cloned().collect()
    }

    /// The known templates this node serves: all of them, or with `--trusted-keys` those
    /// signed by a trusted key (a saved manifest not read yet is read for its signer).
    pub fn servable_ids(&self) -> Vec<String> {
        let mut ids = self.known_ids();
        if self.trust.is_some() {
            ids.retain(|id| {
                let read = self
                    .signers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(id);
                (read || self.read_saved(id).is_some()) && self.trusted(id).is_ok()
            });
        }
        ids
    }

    /// The replica of every known template, in id order; those not in memory are read
    /// from disk for the caller and not kept (an operator's listing).
    pub fn snapshot(&self) -> Vec<Arc<Replica>> {
        self.known_ids()
            .iter()
            .filter_map(|id| {
                self.replicas
                    .get(id)
                    .or_else(|| self.read_saved(id).map(|m| self.new_replica(m)))
            })
            .collect()
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The saved manifest of `id`, if its copy reads and parses (blocking policy: a
    /// small file read, through `lazyblk_cache::blocking`).
    fn read_saved(&self, id: &str) -> Option<Manifest> {
        // The signature matters (and is read and checked) only with --trusted-keys.
        let checks = self.trust.is_some();
        let saved =
            lazyblk_cache::blocking::blocking(|| self.saved_manifests.read(id, checks)).ok()?;
        let (bytes, sig) = (saved.manifest, saved.signature);
        let manifest = Manifest::parse(&bytes, Some(id))
            .map_err(|e| {
                let path = self.saved_manifests.path(id);
                tracing::warn!(path = %path.display(), error = %e, "skipping saved manifest")
            })
            .ok()?;
        if !checks {
            return Some(manifest);
        }
        let signature = sig
            .map(|doc| ManifestSignature::parse(id, &doc))
            .transpose();
        self.record_signer(
            id,
            Signer::of(
                id,
                &bytes,
                signature.as_ref().map(Option::as_ref).map_err(Clone::clone),
            ),
        );
        Some(manifest)
    }

    fn record_signer(&self, id: &str, signer: Signer) {
        self.signers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), signer);
    }

    /// Whether this node may serve `id`: always without `--trusted-keys`; with it, only
    /// when its manifest is signed by one of the keys (as the file reads now).
    pub fn trusted(&self, id: &str) -> Result<(), TrustError> {
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        let signer = self
            .signers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or(Signer::Unsigned);
        match signer {
            Signer::Unsigned => trust.check_signer(id, None),
            Signer::Key(key) => trust.check_signer(id, Some(&key)),
            Signer::Invalid(e) => Err(e),
        }
    }

    /// Whether `id` names a template, here or in the store (an id a new template or
    /// sandbox may not take). A store that cannot be asked counts as "no".
    pub async fn exists(&self, id: &str) -> bool {
        self.known(id).is_some() || matches!(self.store.manifest(id).await, Ok(Some(_)))
    }

    /// The replica of `id`, learning the template from the store if needed.
    /// With `--trusted-keys`, a template whose manifest is not signed by a trusted key
    /// is refused ([`TemplateError::Untrusted`]), though this node keeps knowing it.
    pub async fn replica(&self, id: &str) -> Result<Arc<Replica>, TemplateError> {
        let replica = self.any_replica(id).await?;
        self.trusted(id).map_err(|e| {
            tracing::warn!(template = %id, error = %e, "template refused");
            e
        })?;
        Ok(replica)
    }

    async fn any_replica(&self, id: &str) -> Result<Arc<Replica>, TemplateError> {
        if let Some(r) = self.known(id) {
            return Ok(r);
        }
        // One load per template at a time (not one for the whole node): first looks at
        // different templates go on side by side.
        let gate = {
            let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
            loading.entry(id.to_string()).or_default().clone()
        };
        let _one_load = gate.lock().await;
        let loaded = self.load(id).await;
        self.loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        loaded
    }

    async fn load(&self, id: &str) -> Result<Arc<Replica>, TemplateError> {
        if let Some(r) = self.known(id) {
            return Ok(r);
        }
        let signed = match self.store.signed_manifest(id).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(TemplateError::UnknownTemplate(
                    id.to_string(),
                    self.store.url().to_string(),
                ))
            }
            Err(e) => {
                return Err(TemplateError::StoreUnavailable {
                    template: id.to_string(),
                    detail: e.to_string(),
                })
            }
        };
        let signature = signed
            .signature
            .as_ref()
            .map(Option::as_ref)
            .map_err(Clone::clone);
        self.record_signer(id, Signer::of(id, &signed.bytes, signature));
        // The copy only spares a restart a trip to the store, and a lost one is simply
        // fetched again: written off the runtime, crash-safe like every file of the
        // node's state, and a full disk does not make the template unreadable. The bytes are kept exactly as the store had
        // them, with their signature, so a restart checks the signature again.
        let saved = self.saved_manifests.clone();
        let (id_owned, bytes) = (id.to_string(), signed.bytes);
        let sig = signed.signature.ok().flatten().map(|s| s.to_json());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = saved.write(&id_owned, &bytes, sig.as_deref()) {
                let path = saved.path(&id_owned);
                tracing::warn!(path = %path.display(), error = %e, "serving without a local copy of the manifest");
            }
        });
        Ok(self.insert(signed.manifest))
    }

    /// Adds a template this node has a manifest for (published or committed here).
    pub fn insert(&self, manifest: Manifest) -> Arc<Replica> {
        let id = manifest.template.clone();
        self.saved().insert(id.clone());
        let replica = self.new_replica(manifest);
        let replica = self.replicas.insert_new(id, replica);
        if self.replicas.len() > IDLE_IN_MEMORY {
            // Down to three quarters, so the scan does not run at every insert.
            self.replicas
                .drop_idle(IDLE_IN_MEMORY * 3 / 4, Replica::is_idle);
        }
        replica
    }

    /// A replica of `manifest` that the node does not list (a resize's grown base).
    pub fn new_replica(&self, manifest: Manifest) -> Arc<Replica> {
        let chunk_count = manifest.chunk_count();
        let sources = self.sources(&manifest);
        let image = Arc::new(TemplateImage::new(
            Arc::new(manifest),
            self.cache.clone(),
            sources,
        ));
        Arc::new(Replica::new(
            image,
            TraceRecorder::new(chunk_count, self.trace_timing),
        ))
    }

    /// Writes a manifest to the node's disk (temporary file, fsync, rename, fsync of
    /// the directory: the rename is durable when this returns).
    ///
    /// The bytes and signature are those the store client publishes (this node signs
    /// what it commits with its key), so the copy is checked like one from the store.
    pub fn save_manifest(&self, manifest: &Manifest) -> Result<(), TemplateError> {
        let id = &manifest.template;
        let (bytes, signature) = self.store.manifest_to_publish(manifest);
        let doc = signature.as_ref().map(|s| s.to_json());
        let written = self.saved_manifests.write(id, &bytes, doc.as_deref());
        self.record_signer(id, Signer::of(id, &bytes, Ok(signature.as_ref())));
        written.map_err(|source| TemplateError::SaveManifest {
            template: manifest.template.clone(),
            path: self.saved_manifests.path(id),
            source,
        })
    }

    /// Forgets a template this node saved but that was never published: its saved
    /// manifest and its replica.
    pub fn forget(&self, template: &str) {
        if let Err(e) = self.saved_manifests.remove(template) {
            let path = self.saved_manifests.path(template);
            tracing::warn!(path = %path.display(), error = %e, "removing a saved manifest");
        }
        self.signers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(template);
        self.saved().remove(template);
        self.replicas.remove(template);
    }

    /// Forgets `known` if the store no longer holds its manifest: the template was
    /// deleted from the store, or deleted and published again with other content
    /// ([`Manifest::same_content`]: origins and creation time may differ). The
    /// next look learns what the store holds now. The caller makes sure nothing keeps or
    /// uses the replica. A store that does not answer within [`STORE_CHECK_TIMEOUT`]
    /// leaves it known: a node serves what it knows through a store outage.
    pub async fn forget_if_gone_from_store(&self, known: &Replica) {
        let id = known.id();
        let asked = tokio::time::timeout(STORE_CHECK_TIMEOUT, self.store.manifest(id)).await;
        let why = match asked {
            Ok(Ok(None)) => "deleted from the store",
            Ok(Ok(Some(current))) if !current.same_content(known.manifest()) => {
                "published again in the store with other content"
            }
            _ => return,
        };
        tracing::warn!(
            template = id,
            "template {why}: forgetting this node's copy of its manifest"
        );
        self.forget(id);
    }

    /// A template's sources, in the planner's order ([`SourcePlan::sources`]).
    fn sources(&self, manifest: &Manifest) -> Vec<Source> {
        self.sources.sources(manifest)
    }

    /// The store alone, for fetches made on a peer's behalf.
    pub fn store_sources(&self) -> &Arc<[Source]> {
        self.sources.store()
    }

    /// Learns every template the store lists (their manifests are small), so that the
    /// FUSE mount shows them and status lists them. Returns how many were new.
    pub async fn learn_from_store(&self) -> usize {
        let Ok(ids) = self.store.template_ids().await else {
            return 0;
        };
        let mut learned = 0;
        for id in ids {
            let known = self.saved().contains(&id);
            if !known && self.replica(&id).await.is_ok() {
                learned += 1;
            }
        }
        learned
    }

    /// Names of the templates offered: those the store lists, and those known here.
    /// The store's listing is asked at most once per [`LISTING_TTL`], so a client that
    /// sends many NBD_OPT_LIST costs the store one request a second at most.
    pub async fn names(&self) -> Vec<String> {
        let mut names = self.known_ids();
        names.extend(self.store_listing().await);
        names.sort();
        names.dedup();
        names
    }

    async fn store_listing(&self) -> Vec<String> {
        let mut cached = self.listing.lock().await;
        if let Some((at, names)) = &*cached {
            if at.elapsed() < LISTING_TTL {
                return names.clone();
            }
        }
        match self.store.template_ids().await {
            Ok(names) => {
                *cached = Some((Instant::now(), names.clone()));
                names
            }
            Err(e) => {
                tracing::debug!(error = %e, "store unreachable; listing local templates only");
                Vec::new()
            }
        }
    }
}

/// How long a new opener waits for the store to confirm a known template's manifest
/// (see [`Templates::forget_if_gone_from_store`]): long enough for a loaded store, short
/// enough that an open during a store stall is served from what the node knows well
/// inside a client's connect timeout.
const STORE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the store's template listing is reused for NBD_OPT_LIST.
const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(1);
