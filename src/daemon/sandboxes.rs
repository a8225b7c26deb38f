//! Sandboxes on this node: each a private copy-on-write overlay over a template,
//! served read-write over NBD (export name = sandbox id) and as
//! `<fuse>/sandboxes/<sb>`. Overlays live under `<cache>/overlays/<sb>/` and are
//! reopened at start with their block maps.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

/// A sandbox as the API shows it.
#[derive(Serialize)]
pub struct SandboxStatus {
    pub sandbox: String,
    pub template: String,
    pub size: u64,
    pub written_bytes: u64,
    pub zeroed_bytes: u64,
    pub bytes_on_disk: u64,
    pub users: Vec<String>,
    pub created_at: String,
}

impl Sandbox {
    pub fn status(&self) -> SandboxStatus {
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
        }
    }
}

/// The sandboxes on this node.
pub struct Sandboxes {
    templates: Arc<Templates>,
    registry: Registry<Sandbox>,
    /// Where sandbox overlays live, one directory each.
    dir: PathBuf,
    /// Serializes the steps that create or consume an id (create, delete, commit): the
    /// id checks and the step are one.
    exclusive: tokio::sync::Mutex<()>,
}

impl Sandboxes {
    /// The sandboxes kept under `state_dir` (none reopened yet: see
    /// [`Sandboxes::restore`]).
    pub fn open(templates: Arc<Templates>, state_dir: &Path) -> std::io::Result<Sandboxes> {
        let dir = state_dir.join("overlays");
        std::fs::create_dir_all(&dir)?;
        Ok(Sandboxes {
            templates,
            registry: Registry::default(),
            dir,
            exclusive: tokio::sync::Mutex::new(()),
        })
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
    pub async fn create(&self, template: &str, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        validate_id(id).map_err(|e| SandboxError::InvalidId(e.to_string()))?;
        let _one_at_a_time = self.exclusive().await;
        if self.get(id).is_some() {
            return Err(SandboxError::Exists(id.to_string()));
        }
        if self.templates.exists(id).await {
            return Err(SandboxError::NameTaken(id.to_string()));
        }
        let replica = self.templates.replica(template).await?;
        let overlay = Overlay::create(self.overlay_dir(id), id, replica.image.clone()).await?;
        tracing::info!(sandbox = id, template, "overlay created");
        Ok(self.register(&replica, overlay))
    }

    /// Deletes sandbox `id` and its overlay's files. Refused while in use, unless
    /// `force` (users then keep their open files until they close them).
    pub async fn delete(&self, id: &str, force: bool) -> Result<(), SandboxError> {
        // A delete never runs in the middle of a commit reading the overlay, or a
        // create of the same id.
        let _one_at_a_time = self.exclusive().await;
        let sandbox = self
            .get(id)
            .ok_or_else(|| SandboxError::Unknown(id.to_string()))?;
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
