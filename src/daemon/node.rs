//! The node: its chunk cache, the store it learns templates from, and the replicas of
//! the templates it serves.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lazyblk_cache::{ChunkCache, Digest, HttpSource, Manifest, PeerSet, Source, TemplateImage};

use crate::daemon::counters::DaemonMetrics;
use crate::daemon::intents::{node_id, sync_dir, OriginIntents, Settled};
use crate::daemon::registry::Registry;
pub use crate::daemon::replica::{FillState, Lease, Replica, Sandbox};
use crate::daemon::trace::{TraceRecorder, TraceTiming};
use crate::daemon::upload::{upload_owner, Uploads};
use crate::store::client::StoreClient;

/// Why a template could not be served.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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

/// Everything the daemon's frontends and API share.
pub struct Node {
    pub cache: Arc<ChunkCache>,
    pub store: StoreClient,
    pub metrics: Arc<DaemonMetrics>,
    /// Uploads of committed templates' new chunks to the store.
    pub uploads: Arc<Uploads>,
    /// The URL peers reach this daemon at; never used as a source of its own.
    pub advertise: String,
    /// The node's id, kept in its state directory: stable across address changes.
    pub node_id: String,
    /// Commits this node owes an upload for (settled at start, whatever the address).
    pub intents: OriginIntents,
    /// Bearer token sent with chunk reads to origins (other daemons).
    peer_token: Option<String>,
    /// The fleet's live nodes, when this node is a member (`--advertise` or
    /// `--peers`): chunk owners to ask, and the origins it may contact.
    pub peers: Option<Arc<PeerSet>>,
    /// The store alone: what an owner fetches a peer's request from (never a peer).
    store_sources: Arc<[Source]>,
    /// The cache directory, where the node keeps its state.
    state_dir: PathBuf,
    /// Manifests of the templates this node has served, so a restart serves them
    /// without the store.
    manifests_dir: PathBuf,
    replicas: Registry<Replica>,
    trace_timing: TraceTiming,
    /// Where sandbox overlays live, one directory each.
    pub(crate) overlays_dir: PathBuf,
    /// Scratch overlays of resizes under way; emptied at start (an interrupted resize
    /// publishes nothing and is simply abandoned).
    pub(crate) resizing_dir: PathBuf,
    /// The daemon's FUSE mount, if any.
    pub fuse_dir: Option<PathBuf>,
    pub(crate) sandboxes: Registry<Sandbox>,
    /// Serializes sandbox creation (the id checks and the create are one step).
    pub(crate) creating: tokio::sync::Mutex<()>,
    /// One load of a template from the store at a time, per template.
    loading: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The store's template names and when they were asked (see [`LISTING_TTL`]).
    listing: tokio::sync::Mutex<Option<(std::time::Instant, Vec<String>)>>,
}

/// The settings a node is built with.
pub struct NodeConfig {
    /// The URL peers reach this daemon at.
    pub advertise: String,
    /// Bearer token sent with chunk reads to the store.
    pub read_token: Option<String>,
    /// Bearer token sent with chunk reads to origins and peers.
    pub peer_token: Option<String>,
    /// Whether this node is a member of a fleet (asks and serves peers).
    pub membership: bool,
    /// Where manifests and overlays are kept (the cache directory).
    pub state_dir: PathBuf,
    pub trace_timing: TraceTiming,
    /// How long a commit's upload waits before it starts.
    pub upload_delay: std::time::Duration,
    /// The daemon's FUSE mount, if any (resize runs e2fsprogs on its files).
    pub fuse_dir: Option<PathBuf>,
}

impl Node {
    pub fn new(
        cache: Arc<ChunkCache>,
        store: StoreClient,
        metrics: Arc<DaemonMetrics>,
        config: NodeConfig,
    ) -> std::io::Result<Node> {
        let manifests_dir = config.state_dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir)?;
        let overlays_dir = config.state_dir.join("overlays");
        std::fs::create_dir_all(&overlays_dir)?;
        let resizing_dir = config.state_dir.join("resizing");
        if resizing_dir.exists() {
            std::fs::remove_dir_all(&resizing_dir)?;
        }
        std::fs::create_dir_all(&resizing_dir)?;
        let node_id = node_id(&config.state_dir)?;
        let intents = OriginIntents::open(&config.state_dir)?;
        let peers = config.membership.then(|| {
            Arc::new(PeerSet::new(
                &node_id,
                store.http().clone(),
                config.peer_token.clone(),
            ))
        });
        let store_source = match store.direct().and_then(|d| d.chunk_source()) {
            Some(object) => Source::Object(object),
            None => Source::Http(HttpSource::new(
                store.http().clone(),
                store.url(),
                config.read_token.clone(),
            )),
        };
        let store_sources: Arc<[Source]> = vec![store_source].into();
        Ok(Node {
            uploads: Uploads::new(
                store.clone(),
                cache.clone(),
                OriginIntents::open(&config.state_dir)?,
                config.upload_delay,
            ),
            cache,
            store,
            metrics,
            advertise: config.advertise,
            node_id,
            intents,
            peer_token: config.peer_token,
            peers,
            store_sources,
            state_dir: config.state_dir.clone(),
            manifests_dir,
            replicas: Registry::default(),
            trace_timing: config.trace_timing,
            overlays_dir,
            resizing_dir,
            fuse_dir: config.fuse_dir,
            sandboxes: Registry::default(),
            creating: tokio::sync::Mutex::new(()),
            loading: Mutex::new(std::collections::HashMap::new()),
            listing: tokio::sync::Mutex::new(None),
        })
    }

    /// Loads the manifests saved by earlier runs.
    pub fn restore(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.manifests_dir) else {
            return 0;
        };
        let mut restored = 0;
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // A save cut off by a crash: the manifest it held is saved again (or
                // was never acknowledged).
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            match std::fs::read(&path).map(|b| Manifest::parse(&b, Some(&id))) {
                Ok(Ok(manifest)) => {
                    self.insert(manifest);
                    restored += 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping saved manifest")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read saved manifest")
                }
            }
        }
        restored
    }

    /// The replica of `id` if this node already knows it.
    pub fn known(&self, id: &str) -> Option<Arc<Replica>> {
        self.replicas.get(id)
    }

    /// Every replica this node knows, by id.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.all()
    }

    /// The replica of `id`, learning the template from the store if needed.
    pub async fn replica(&self, id: &str) -> Result<Arc<Replica>, NodeError> {
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

    async fn load(&self, id: &str) -> Result<Arc<Replica>, NodeError> {
        if let Some(r) = self.known(id) {
            return Ok(r);
        }
        let manifest = match self.store.manifest(id).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(NodeError::UnknownTemplate(
                    id.to_string(),
                    self.store.url().to_string(),
                ))
            }
            Err(e) => {
                return Err(NodeError::StoreUnavailable {
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
        let replica = self.new_replica(manifest);
        self.replicas.insert_new(id, replica)
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
    pub fn save_manifest(&self, manifest: &Manifest) -> Result<(), NodeError> {
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
        written.map_err(|source| NodeError::SaveManifest {
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
    pub fn forget_manifest(&self, template: &str) {
        let path = self.manifest_path(template);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "removing a saved manifest");
            }
        }
        let _ = sync_dir(&self.manifests_dir);
        self.replicas.remove(template);
    }

    /// A template's sources: its origins (other than this node; with a membership,
    /// only while they are live members), then the chunk's owner among the peers, then
    /// the store. The store's read token goes to the store alone; origins and peers get
    /// the peer token.
    fn sources(&self, manifest: &Manifest) -> Vec<Source> {
        let http = self.store.http().clone();
        let own = self.advertise.trim_end_matches('/');
        let mut sources: Vec<Source> = manifest
            .origins
            .iter()
            .filter(|o| o.trim_end_matches('/') != own)
            .map(|base| Source::Origin {
                http: HttpSource::new(http.clone(), base, self.peer_token.clone()),
                members: self.peers.clone(),
            })
            .collect();
        if let Some(peers) = &self.peers {
            sources.push(Source::Peers(peers.clone()));
        }
        sources.extend(self.store_sources.iter().cloned());
        sources
    }

    /// The node's state directory (its cache directory).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// The store alone, for fetches made on a peer's behalf.
    pub fn store_sources(&self) -> &Arc<[Source]> {
        &self.store_sources
    }

    /// Learns every template the store lists (their manifests are small), so that the
    /// FUSE mount shows them and status lists them. Returns how many were new.
    pub async fn learn_store_templates(&self) -> usize {
        let Ok(ids) = self.store.template_ids().await else {
            return 0;
        };
        let mut learned = 0;
        for id in ids {
            if self.known(&id).is_none() && self.replica(&id).await.is_ok() {
                learned += 1;
            }
        }
        learned
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
    pub async fn resume_uploads(self: &Arc<Self>) {
        let mut pending = Vec::new();
        for id in self.intents.list() {
            let Some(replica) = self.known(&id) else {
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
                    self.abandon_commit(&id);
                }
                Settled::Unknown(error) => {
                    tracing::warn!(template = %id, %error, "store unreachable; keeping the commit's chunks until it can be asked");
                    let pinned = self.pin_local(replica.manifest());
                    tokio::spawn(
                        self.clone()
                            .settle_later(Manifest::clone(replica.manifest()), pinned),
                    );
                }
            }
        }
        for replica in self.replicas() {
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
        let mut local: Vec<Digest> = manifest.stored_chunks().map(|(_, d)| d).collect();
        local.sort();
        local.dedup();
        local.retain(|d| self.cache.is_local(d));
        self.cache
            .pin(&upload_owner(&manifest.template), local.iter().copied());
        local
    }

    /// Names of the templates offered: those the store lists, and those known here.
    /// The store's listing is asked at most once per [`LISTING_TTL`], so a client that
    /// sends many NBD_OPT_LIST costs the store one request a second at most.
    pub async fn template_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.replicas().iter().map(|r| r.id().to_string()).collect();
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
                *cached = Some((std::time::Instant::now(), names.clone()));
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
