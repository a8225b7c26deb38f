//! The templates this node knows: their manifests (saved under `<cache>/manifests/`,
//! learned from the store on first look) and the node's replica of each, built over the
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

use lazyblk_cache::{
    ChunkCache, HttpClients, HttpSource, Manifest, PeerSet, Source, TemplateImage,
};

use crate::daemon::intents::sync_dir;
use crate::daemon::registry::Registry;
use crate::daemon::replica::{FillState, Replica};
use crate::daemon::trace::{TraceRecorder, TraceTiming};
use crate::store::client::StoreClient;

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
    /// The template is in use and the operation needs `--force`.
    #[error("template {template:?} is in use by {}; use --force to override", .users.join(", "))]
    InUse {
        template: String,
        users: Vec<String>,
    },
}

/// Where a template's chunks come from, other than this node's cache.
pub struct SourcePlan {
    /// The URL peers reach this daemon at; never used as a source of its own.
    pub advertise: String,
    /// Bearer token sent with chunk reads to origins (other daemons).
    pub peer_token: Option<String>,
    /// The fleet's live nodes, when this node is a member: chunk owners to ask, and the
    /// origins it may contact.
    pub peers: Option<Arc<PeerSet>>,
    /// The store alone: what an owner fetches a peer's request from (never a peer:
    /// the asking node tries the peers' caches itself when the store fails).
    pub store: Arc<[Source]>,
    /// The clients origins are reached with.
    pub clients: HttpClients,
}

/// The templates this node knows, and its replica of each.
pub struct Templates {
    cache: Arc<ChunkCache>,
    store: StoreClient,
    sources: SourcePlan,
    /// Manifests of the templates this node has served, so a restart serves them
    /// without the store.
    manifests_dir: PathBuf,
    replicas: Registry<Replica>,
    trace_timing: TraceTiming,
    /// One load of a template from the store at a time, per template.
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The store's template names and when they were asked (see [`LISTING_TTL`]).
    listing: tokio::sync::Mutex<Option<(Instant, Vec<String>)>>,
    /// Every template whose manifest this node has a copy of, in memory or not.
    saved: Mutex<BTreeSet<String>>,
}

/// Replicas kept in memory beyond the busy ones (see the module header): about 40 KiB
/// each for a 1 GiB template of 1 MiB chunks.
pub const IDLE_IN_MEMORY: usize = 256;

impl Templates {
    /// The templates saved under `state_dir` (none loaded yet: see [`Templates::restore`]).
    pub fn open(
        cache: Arc<ChunkCache>,
        store: StoreClient,
        sources: SourcePlan,
        state_dir: &std::path::Path,
        trace_timing: TraceTiming,
    ) -> std::io::Result<Templates> {
        let manifests_dir = state_dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir)?;
        Ok(Templates {
            cache,
            store,
            sources,
            manifests_dir,
            replicas: Registry::default(),
            trace_timing,
            loading: Mutex::new(HashMap::new()),
            listing: tokio::sync::Mutex::new(None),
            saved: Mutex::new(BTreeSet::new()),
        })
    }

    /// Knows again the templates whose manifests earlier runs saved. Nothing is read
    /// yet: a manifest is read (and checked) when its template is first asked for, so a
    /// node that knows thousands starts as fast as one that knows a few.
    pub fn restore(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.manifests_dir) else {
            return 0;
        };
        let mut saved = self.saved();
        let before = saved.len();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A save cut off by a crash: the manifest it held is saved again (or
                // was never acknowledged).
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let id = path.file_stem().and_then(|s| s.to_str());
            match id {
                Some(id) if lazyblk_cache::validate_id(id).is_ok() => {
                    saved.insert(id.to_string());
                }
                _ => {
                    tracing::warn!(path = %path.display(), "skipping a file that is not a saved manifest")
                }
            }
        }
        saved.len() - before
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
        let path = self.manifest_path(id);
        let bytes = lazyblk_cache::blocking::blocking(|| std::fs::read(&path)).ok()?;
        Manifest::parse(&bytes, Some(id))
            .map_err(
                |e| tracing::warn!(path = %path.display(), error = %e, "skipping saved manifest"),
            )
            .ok()
    }

    /// Whether `id` names a template, here or in the store (an id a new template or
    /// sandbox may not take). A store that cannot be asked counts as "no".
    pub async fn exists(&self, id: &str) -> bool {
        self.known(id).is_some() || matches!(self.store.manifest(id).await, Ok(Some(_)))
    }

    /// The replica of `id`, learning the template from the store if needed.
    pub async fn replica(&self, id: &str) -> Result<Arc<Replica>, TemplateError> {
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
        let manifest = match self.store.manifest(id).await {
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
        // The copy only spares a restart a trip to the store, and a lost one is simply
        // fetched again: written off the runtime, without an fsync, and a full disk does
        // not make the template unreadable.
        let path = self.manifest_path(id);
        let json = manifest.to_json();
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("json.tmp");
            let written = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "serving without a local copy of the manifest");
            }
        });
        Ok(self.insert(manifest))
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
        Arc::new(Replica {
            image,
            users: Arc::default(),
            trace: TraceRecorder::new(chunk_count, self.trace_timing),
            fill: Mutex::new(FillState::default()),
            local: Mutex::new(None),
        })
    }

    /// Writes a manifest to the node's disk (temporary file, fsync, rename, fsync of
    /// the directory: the rename is durable when this returns).
    pub fn save_manifest(&self, manifest: &Manifest) -> Result<(), TemplateError> {
        let path = self.manifest_path(&manifest.template);
        let tmp = path.with_extension("json.tmp");
        let written = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&manifest.to_json())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.manifests_dir)
        })();
        written.map_err(|source| TemplateError::SaveManifest {
            template: manifest.template.clone(),
            path,
            source,
        })
    }

    fn manifest_path(&self, template: &str) -> PathBuf {
        self.manifests_dir.join(format!("{template}.json"))
    }

    /// Forgets a template this node saved but that was never published: its saved
    /// manifest and its replica.
    pub fn forget(&self, template: &str) {
        let path = self.manifest_path(template);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "removing a saved manifest");
            }
        }
        let _ = sync_dir(&self.manifests_dir);
        self.saved().remove(template);
        self.replicas.remove(template);
    }

    /// A template's sources: its origins (other than this node; with a membership,
    /// only while they are live members), then the chunk's owner among the peers, then
    /// the store, then (a store outage) the caches of the next peers in rendezvous
    /// order, which answer only from their caches, so an owner can read the chunks it
    /// owns from a peer that holds them. The store's read token goes to the store
    /// alone; origins and peers get the peer token.
    fn sources(&self, manifest: &Manifest) -> Vec<Source> {
        let plan = &self.sources;
        let own = plan.advertise.trim_end_matches('/');
        let mut sources: Vec<Source> = manifest
            .origins
            .iter()
            .filter(|o| o.trim_end_matches('/') != own)
            .map(|base| Source::Origin {
                http: HttpSource::new(plan.clients.clone(), base, plan.peer_token.clone()),
                members: plan.peers.clone(),
            })
            .collect();
        if let Some(peers) = &plan.peers {
            sources.push(Source::Peers(peers.clone()));
        }
        sources.extend(plan.store.iter().cloned());
        if let Some(peers) = &plan.peers {
            sources.push(Source::PeerCaches(peers.clone()));
        }
        sources
    }

    /// The store alone, for fetches made on a peer's behalf.
    pub fn store_sources(&self) -> &Arc<[Source]> {
        &self.sources.store
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

/// How long the store's template listing is reused for NBD_OPT_LIST.
const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(1);
