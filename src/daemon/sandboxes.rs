//! Sandboxes on this node: each a private copy-on-write overlay over a template,
//! served read-write over NBD (export name = sandbox id) and as
//! `<fuse>/sandboxes/<sb>`. Overlays live under `<cache>/overlays/<sb>/` and are
//! reopened at start with their block maps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use lazyblk_cache::overlay::{Overlay, OverlayError, OverlayMeta};
use lazyblk_cache::validate_id;
use serde::Serialize;

use crate::daemon::registry::Registry;
use crate::daemon::replica::Replica;
pub use crate::daemon::replica::Sandbox;
use crate::daemon::templates::{TemplateError, Templates};

/// Why a sandbox operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox id: {0}")]
    InvalidId(String),
    /// The sandbox exists already.
    #[error("sandbox {0:?} already exists on this node")]
    Exists(String),
    /// Export names are shared by templates and sandboxes.
    #[error("{0:?} is a template id; sandbox ids and template ids must differ")]
    NameTaken(String),
    #[error("unknown sandbox {0:?} on this node")]
    Unknown(String),
    #[error("sandbox {sandbox:?} is in use by {}; use --force to override", .users.join(", "))]
    InUse { sandbox: String, users: Vec<String> },
    /// A commit of the sandbox is under way: it reads the overlay until it returns.
    #[error("sandbox {sandbox:?} is being committed as template {template:?}; wait for that commit to finish")]
    Committing { sandbox: String, template: String },
    /// The id is the new template of a commit under way.
    #[error("{0:?} is being committed as a template; sandbox ids and template ids must differ")]
    Reserved(String),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

/// A sandbox as the API shows it.
#[derive(Serialize, serde::Deserialize)]
pub struct SandboxStatus {
    pub sandbox: String,
    pub template: String,
    pub size: u64,
    pub written_bytes: u64,
    pub zeroed_bytes: u64,
    pub bytes_on_disk: u64,
    pub users: Vec<String>,
    pub created_at: String,
    /// The template a commit of this sandbox under way is making.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committing: Option<String>,
}

impl Sandbox {
    pub fn status(&self, committing: Option<String>) -> SandboxStatus {
        let stats = self.overlay.stats();
        let block = lazyblk_cache::manifest::BLOCK_SIZE;
        SandboxStatus {
            sandbox: self.id().to_string(),
            template: self.template().id().to_string(),
            size: self.overlay.size(),
            written_bytes: stats.blocks_data * block,
            zeroed_bytes: stats.blocks_zero * block,
            bytes_on_disk: stats.bytes_on_disk,
            users: self.users.names(),
            created_at: self.overlay.meta().created_at.clone(),
            committing,
        }
    }
}

/// The sandboxes on this node.
pub struct Sandboxes {
    templates: Arc<Templates>,
    registry: Registry<Sandbox>,
    /// Where sandbox overlays live, one directory each.
    dir: PathBuf,
    /// Serializes the steps that create or consume an id (create, delete, the start of
    /// a commit): the id checks and the step are one. Never held across a round trip to
    /// the store: every sandbox create on the node would wait for it.
    exclusive: tokio::sync::Mutex<()>,
    /// Commits under way, which hold no lock while they wait on the store.
    commits: Mutex<CommitsUnderWay>,
}

/// What the commits under way hold: their sandboxes (not deleted or committed again
/// meanwhile) and their new template ids (not taken by a sandbox or another commit
/// until the commit publishes or gives up).
#[derive(Default)]
struct CommitsUnderWay {
    /// Sandbox id -> the template its commit makes.
    sandboxes: BTreeMap<String, String>,
    /// Template ids reserved by commits.
    ids: BTreeSet<String>,
}

/// A commit's hold on its sandbox, released when dropped.
pub struct CommitHold {
    sandboxes: Arc<Sandboxes>,
    sandbox: String,
}

impl Drop for CommitHold {
    fn drop(&mut self) {
        self.sandboxes.under_way().sandboxes.remove(&self.sandbox);
    }
}

/// A commit's reservation of its new template id, released when dropped (after the
/// commit made the id a known template, or gave up).
pub struct IdReservation {
    sandboxes: Arc<Sandboxes>,
    id: String,
}

impl Drop for IdReservation {
    fn drop(&mut self) {
        self.sandboxes.under_way().ids.remove(&self.id);
    }
}

impl Sandboxes {
    /// The sandboxes kept in `dir`, the node state's overlays (none reopened yet: see
    /// [`Sandboxes::restore`]).
    pub fn open(templates: Arc<Templates>, dir: &Path) -> std::io::Result<Sandboxes> {
        let dir = dir.to_path_buf();
        Ok(Sandboxes {
            templates,
            registry: Registry::default(),
            dir,
            exclusive: tokio::sync::Mutex::new(()),
            commits: Mutex::default(),
        })
    }

    fn under_way(&self) -> MutexGuard<'_, CommitsUnderWay> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The template a commit of `sandbox` under way is making.
    pub fn committing(&self, sandbox: &str) -> Option<String> {
        self.under_way().sandboxes.get(sandbox).cloned()
    }

    /// Whether `id` is the new template of a commit under way.
    pub fn is_reserved(&self, id: &str) -> bool {
        self.under_way().ids.contains(id)
    }

    /// Holds `sandbox` and reserves `template` for a commit, refusing a sandbox that is
    /// being committed already. Called under [`Sandboxes::exclusive`], after the id
    /// checks; the lock may be released once this returns.
    pub(crate) fn hold_for_commit(
        self: &Arc<Self>,
        sandbox: &str,
        template: &str,
    ) -> Result<(CommitHold, IdReservation), SandboxError> {
        let mut under_way = self.under_way();
        if let Some(t) = under_way.sandboxes.get(sandbox) {
            return Err(SandboxError::Committing {
                sandbox: sandbox.to_string(),
                template: t.clone(),
            });
        }
        if !under_way.ids.insert(template.to_string()) {
            return Err(SandboxError::Reserved(template.to_string()));
        }
        under_way
            .sandboxes
            .insert(sandbox.to_string(), template.to_string());
        let hold = CommitHold {
            sandboxes: self.clone(),
            sandbox: sandbox.to_string(),
        };
        let reservation = IdReservation {
            sandboxes: self.clone(),
            id: template.to_string(),
        };
        Ok((hold, reservation))
    }

    /// The sandbox as the API shows it.
    pub fn status(&self, sandbox: &Sandbox) -> SandboxStatus {
        sandbox.status(self.committing(sandbox.id()))
    }

    fn overlay_dir(&self, sandbox: &str) -> PathBuf {
        self.dir.join(sandbox)
    }

    /// The sandbox `id`, if it exists on this node.
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.registry.get(id)
    }

    /// Every sandbox, by id.
    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        self.registry.all()
    }

    /// Held across a step that checks ids and then creates or consumes a sandbox, so
    /// that no create, delete or commit runs in the middle of another.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.exclusive.lock().await
    }

    /// Lists `overlay` as a sandbox of `replica`.
    pub(crate) fn register(&self, replica: &Arc<Replica>, overlay: Overlay) -> Arc<Sandbox> {
        let id = overlay.sandbox().to_string();
        let sandbox = Arc::new(Sandbox {
            template: replica.lease(format!("overlay {id}")),
            overlay: Arc::new(overlay),
            users: Arc::default(),
        });
        self.registry.insert_new(id, sandbox)
    }

    /// Stops listing sandbox `id` (its files are the caller's).
    pub(crate) fn unregister(&self, id: &str) {
        self.registry.remove(id);
    }

    /// Creates sandbox `id`'s overlay over `template`.
    ///
    /// The store is asked (is `id` a template there; the template's manifest) before
    /// the node-wide lock is taken, so creates never queue behind a store round trip;
    /// under the lock the ids are checked again against what this node knows, which
    /// covers a commit that published or reserved `id` meanwhile.
    pub async fn create(&self, template: &str, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        validate_id(id).map_err(|e| SandboxError::InvalidId(e.to_string()))?;
        if self.get(id).is_some() {
            return Err(SandboxError::Exists(id.to_string()));
        }
        if self.templates.exists(id).await {
            return Err(SandboxError::NameTaken(id.to_string()));
        }
        let replica = self.templates.replica(template).await?;
        let _one_at_a_time = self.exclusive().await;
        if self.get(id).is_some() {
            return Err(SandboxError::Exists(id.to_string()));
        }
        if self.templates.known(id).is_some() {
            return Err(SandboxError::NameTaken(id.to_string()));
        }
        if self.is_reserved(id) {
            return Err(SandboxError::Reserved(id.to_string()));
        }
        let overlay = Overlay::create(self.overlay_dir(id), id, replica.image.clone()).await?;
        tracing::info!(sandbox = id, template, "overlay created");
        Ok(self.register(&replica, overlay))
    }

    /// Deletes sandbox `id` and its overlay's files. Refused while in use, unless
    /// `force` (users then keep their open files until they close them), and refused
    /// while a commit of it is under way, even with `force`.
    pub async fn delete(&self, id: &str, force: bool) -> Result<(), SandboxError> {
        // A delete never runs in the middle of a create of the same id, or of the
        // start of a commit.
        let _one_at_a_time = self.exclusive().await;
        let sandbox = self
            .get(id)
            .ok_or_else(|| SandboxError::Unknown(id.to_string()))?;
        if let Some(template) = self.committing(id) {
            return Err(SandboxError::Committing {
                sandbox: id.to_string(),
                template,
            });
        }
        let users = sandbox.users.names();
        if !users.is_empty() && !force {
            return Err(SandboxError::InUse {
                sandbox: id.to_string(),
                users,
            });
        }
        self.unregister(id);
        Overlay::remove_dir(self.overlay_dir(id)).await?;
        tracing::info!(sandbox = id, "overlay deleted");
        Ok(())
    }

    /// Reopens the overlays found under the overlays directory.
    pub async fn restore(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut restored = 0;
        for entry in entries.flatten() {
            let dir = entry.path();
            let meta = match OverlayMeta::load(&dir) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping overlay directory");
                    continue;
                }
            };
            let replica = match self.templates.replica(&meta.template).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(sandbox = %meta.sandbox, error = %e, "cannot reopen overlay: its template is unavailable");
                    continue;
                }
            };
            match Overlay::open(&dir, replica.image.clone()).await {
                Ok(overlay) => {
                    self.register(&replica, overlay);
                    restored += 1;
                }
                Err(e) => {
                    tracing::error!(sandbox = %meta.sandbox, error = %e, "cannot reopen overlay")
                }
            }
        }
        restored
    }
}
