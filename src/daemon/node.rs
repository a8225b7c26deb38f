//! The node: the owners the daemon is made of, built once at start and shared by its
//! frontends (NBD, FUSE, the HTTP API) and its background tasks.
//!
//! - [`Templates`]: the templates this node knows and its replica of each;
//! - [`Sandboxes`]: the overlays over them;
//! - [`Uploads`]: committed chunks still to send to the store;
//! - [`Commits`] and [`Resizes`]: services over those.
//!
//! Each replica owns its phase and its claim on its chunks (private state, changed by
//! its methods); the fill scheduler ([`crate::daemon::fill`]) is their worker, and
//! the node's state ([`NodeState`]) their memory. The owners are built over the
//! stores of that state and read nothing at build: what earlier runs left is brought
//! back by `crate::daemon::startup`, in its order.

use std::path::PathBuf;
use std::sync::Arc;

use lazyblk_cache::{ChunkCache, HttpClients, HttpSource, PeerSet, Source};

use crate::daemon::commit::Commits;
use crate::daemon::counters::DaemonMetrics;
use crate::daemon::node_state::NodeState;
use crate::daemon::replay::{ReplayConfig, ReplayMetrics, Replays};
use crate::daemon::replica::Replica;
use crate::daemon::resize::Resizes;
use crate::daemon::sandboxes::Sandboxes;
use crate::daemon::templates::{SourcePlan, Templates};
use crate::daemon::trace::TraceTiming;
use crate::daemon::upload::Uploads;
use crate::identity::NodeKey;
use crate::store::client::StoreClient;

/// Everything the daemon's frontends and API share.
pub struct Node {
    pub cache: Arc<ChunkCache>,
    pub store: StoreClient,
    pub metrics: Arc<DaemonMetrics>,
    pub templates: Arc<Templates>,
    pub sandboxes: Arc<Sandboxes>,
    /// Uploads of committed templates' new chunks to the store.
    pub uploads: Arc<Uploads>,
    pub commits: Arc<Commits>,
    pub resizes: Resizes,
    /// The URL peers reach this daemon at.
    pub advertise: String,
    /// The node's id, derived from its key: stable across address changes.
    pub node_id: String,
    /// The node's key pair (`node.key` in its state): leases prove it.
    pub key: Arc<NodeKey>,
    /// The node's durable state: every file of its state directory.
    pub state: Arc<NodeState>,
    /// The fleet's live nodes, when this node is a member (`--advertise` or
    /// `--peers`): chunk owners to ask, and the origins it may contact.
    pub peers: Option<Arc<PeerSet>>,
    /// Replays of boot traces, started when a template is opened.
    pub replays: Replays,
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
    pub trace_timing: TraceTiming,
    /// How boot traces are replayed (`--replay-*`).
    pub replay: ReplayConfig,
    /// How long a commit's upload waits before it starts.
    pub upload_delay: std::time::Duration,
    /// The daemon's FUSE mount, if any (resize runs e2fsprogs on its files).
    pub fuse_dir: Option<PathBuf>,
    /// The keys templates must be signed by to be served (`--trusted-keys`).
    pub trusted_keys: Option<Arc<crate::trust::TrustedKeys>>,
}

impl Node {
    pub fn new(
        cache: Arc<ChunkCache>,
        store: StoreClient,
        metrics: Arc<DaemonMetrics>,
        state: Arc<NodeState>,
        config: NodeConfig,
    ) -> std::io::Result<Node> {
        let node_id = state.node_id().to_string();
        let key = state.key().clone();
        // What this node commits and resizes is signed with its key.
        let store = store.with_signer(key.clone());
        // Chunk fetches get clients of their own, a pair (see `HttpClients`).
        let clients = HttpClients::new(crate::http_client::http_client);
        let peers = config.membership.then(|| {
            Arc::new(PeerSet::new(
                &node_id,
                clients.clone(),
                config.peer_token.clone(),
            ))
        });
        // Several store servers (`--store URL,URL`) are several sources, tried in order.
        let store_sources: Vec<Source> = match store.direct().and_then(|d| d.chunk_source()) {
            Some(object) => vec![Source::Object(object)],
            None => store
                .urls()
                .iter()
                .map(|url| {
                    Source::Http(HttpSource::new(
                        clients.clone(),
                        url,
                        config.read_token.clone(),
                    ))
                })
                .collect(),
        };
        let plan = SourcePlan {
            advertise: config.advertise.clone(),
            peer_token: config.peer_token,
            peers: peers.clone(),
            store: store_sources.into(),
            clients,
        };
        let templates = Arc::new(Templates::new(
            cache.clone(),
            store.clone(),
            plan,
            state.manifests().clone(),
            config.trace_timing,
            config.trusted_keys,
        ));
        let sandboxes = Arc::new(Sandboxes::open(templates.clone(), state.overlays_dir())?);
        let uploads = Uploads::new(
            store.clone(),
            cache.clone(),
            state.intents().clone(),
            config.upload_delay,
        );
        let commits = Arc::new(Commits {
            cache: cache.clone(),
            store: store.clone(),
            templates: templates.clone(),
            sandboxes: sandboxes.clone(),
            uploads: uploads.clone(),
            intents: state.intents().clone(),
            advertise: config.advertise.clone(),
        });
        let resizes = Resizes::open(commits.clone(), state.resizing_dir(), config.fuse_dir)?;
        let replay_metrics = Arc::new(ReplayMetrics::default());
        replay_metrics.register(&mut metrics.registry.lock().unwrap_or_else(|e| e.into_inner()));
        let replays = Replays::new(config.replay, store.clone(), replay_metrics);
        Ok(Node {
            cache,
            store,
            metrics,
            templates,
            sandboxes,
            uploads,
            commits,
            resizes,
            advertise: config.advertise,
            node_id,
            key,
            state,
            peers,
            replays,
        })
    }

    /// The replica of template `id` for a new opener (an NBD client, a FUSE open).
    ///
    /// A replica that nothing uses or keeps here (no users, no fill, no pinned chunks,
    /// no upload owed) is first checked against the store: a template deleted from the
    /// store meanwhile is refused, and one deleted and published again under its id is
    /// served as published now, never from the deleted one's manifest. Replicas in use
    /// or kept are served as known: their users keep what they opened.
    pub async fn template_to_open(
        &self,
        id: &str,
    ) -> Result<Arc<Replica>, crate::daemon::templates::TemplateError> {
        if let Some(known) = self.templates.known(id) {
            if known.users().is_empty() && known.is_unkept() && !self.commits.owes(id) {
                self.templates.forget_if_gone_from_store(&known).await;
            }
        }
        self.templates.replica(id).await
    }
}
