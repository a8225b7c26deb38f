//! The node's durable state, in one room: [`NodeState`] opens the node's state
//! directory (the cache directory, `--cache`) once, owns every path in it and the
//! handles of its stores, and is what the rest of the daemon is handed. No other part
//! of the daemon names a file of this directory.
//!
//! # Layout, and each store's durability rule
//!
//! | path | what | written |
//! |---|---|---|
//! | `node.key` | the node's ed25519 key (PKCS#8 PEM, mode 0600); the node id derives from it ([`crate::identity`]) | once, on the first start, crash-safe; never replaced |
//! | `state.db` | each replica's phase, fill progress and last error ([`phases`]) | SQLite, WAL, `synchronous=NORMAL`: a commit survives a SIGKILL; a power loss may lose the last progress updates, which the next fill re-checks |
//! | `manifests/<id>.json`, `<id>.sig` | saved manifests and their signatures, as the store had them ([`manifests`]) | crash-safe, signature first; removals synced |
//! | `originated/<id>` | commit intents: uploads this node owes ([`intents`]) | crash-safe, before the manifest goes to the store; removed (synced) once DURABLE or never published |
//! | `wished.json` | templates warmed because the center wishes it, with the redo count acted on | crash-safe, on every change |
//! | `kernel-devices.json` | the kernel devices that outlive the daemon ([`crate::daemon::attach`]) | crash-safe, on every attach, detach and restore |
//! | `overlays/<sandbox>/` | sandbox overlays ([`lazyblk_cache::overlay`]: metadata crash-safe, data on flush) | by the overlay |
//! | `resizing/` | scratch overlays of resizes under way | scratch: emptied at every start |
//! | `chunks/`, ... | the chunk cache ([`lazyblk_cache::ChunkStore`]: each chunk verified, fsynced and renamed into place) | by the chunk store |
//!
//! "Crash-safe" is one helper, [`lazyblk_cache::durable`]: a temporary file beside
//! the name (`.<name>.<pid>.<seq>.tmp`), fsync, rename over the name, fsync of the
//! directory. A crash leaves the old file or the new one, never a part; temporary
//! files a crash left are dropped when their store is read at start.
//!
//! The files are those lazyblk wrote before this owner existed, in the same formats
//! (`wished.json` is now written indented, as `kernel-devices.json` was): a node's
//! directory from an older lazyblk is read as it is, and the random `node-id` file of
//! a much older one is retired ([`NodeState::open`]).
//!
//! What is restored at start, and in which order, is `crate::daemon::startup`'s.

pub mod intents;
pub mod json_file;
pub mod manifests;
pub mod phases;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::identity::{IdentityError, NodeKey};
use intents::OriginIntents;
use json_file::JsonFile;
use manifests::SavedManifests;
use phases::{StateDb, StateError};

/// The node's key.
const KEY_FILE: &str = "node.key";
/// The phases' database.
const PHASES_FILE: &str = "state.db";
/// The commit intents' directory.
const INTENTS_DIR: &str = "originated";
/// The saved manifests' directory.
const MANIFESTS_DIR: &str = "manifests";
/// The templates this node keeps warm because of a wish (and the redo count it last
/// acted on), so that a removed wish is unpinned after a restart.
const WISHES_FILE: &str = "wished.json";
/// The node's record of its kernel devices: what a restarted daemon reconnects.
pub const DEVICES_FILE: &str = "kernel-devices.json";
/// The sandboxes' overlays.
const OVERLAYS_DIR: &str = "overlays";
/// The resizes' scratch overlays.
const RESIZING_DIR: &str = "resizing";
/// The file an older lazyblk kept a random node id in.
const OLD_NODE_ID_FILE: &str = "node-id";

/// The templates warmed because the center wishes it, with the redo count acted on
/// (`wished.json`).
pub type Wishes = BTreeMap<String, u64>;

/// A failure to open the node's state.
#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    /// A directory of the layout could not be made.
    #[error("creating {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The node's key could not be read or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The phases' database could not be opened.
    #[error(transparent)]
    Phases(#[from] StateError),
}

/// The node's durable state: the layout above, opened once.
pub struct NodeState {
    /// The state directory (the cache directory).
    dir: PathBuf,
    /// The node's key: leases and committed manifests are signed with it.
    key: Arc<NodeKey>,
    /// Phases and fill progress (`state.db`).
    phases: Arc<StateDb>,
    /// Saved manifests (`manifests/`).
    manifests: Arc<SavedManifests>,
    /// Commit intents (`originated/`): one handle, shared by commits and uploads.
    intents: Arc<OriginIntents>,
    /// The center's wishes acted on (`wished.json`).
    wishes: JsonFile<Wishes>,
    /// The overlays' directory.
    overlays: PathBuf,
    /// The resizes' scratch directory.
    resizing: PathBuf,
}

impl NodeState {
    /// Opens the state under `dir`, making what a first start lacks: the directories,
    /// the node's key (once), the phases' table. Reads nothing else yet: each store is
    /// read by its step of the start-up sequence.
    pub fn open(dir: &Path) -> Result<NodeState, NodeStateError> {
        let made = |path: PathBuf| match std::fs::create_dir_all(&path) {
            Ok(()) => Ok(path),
            Err(source) => Err(NodeStateError::Dir { path, source }),
        };
        let dir = made(dir.to_path_buf())?;
        let key = NodeKey::load_or_create(&dir.join(KEY_FILE))?;
        retire_old_node_id(&dir, key.id());
        let phases = StateDb::open(&dir.join(PHASES_FILE))?;
        let intents = OriginIntents::open(made(dir.join(INTENTS_DIR))?);
        let manifests = SavedManifests::open(made(dir.join(MANIFESTS_DIR))?);
        Ok(NodeState {
            key: Arc::new(key),
            phases: Arc::new(phases),
            manifests: Arc::new(manifests),
            intents: Arc::new(intents),
            wishes: JsonFile::new(dir.join(WISHES_FILE)),
            overlays: made(dir.join(OVERLAYS_DIR))?,
            resizing: dir.join(RESIZING_DIR),
            dir,
        })
    }

    /// The node's key.
    pub fn key(&self) -> &Arc<NodeKey> {
        &self.key
    }

    /// The node's id, derived from its key: stable across address changes.
    pub fn node_id(&self) -> &str {
        self.key.id()
    }

    /// Phases and fill progress.
    pub fn phases(&self) -> &Arc<StateDb> {
        &self.phases
    }

    /// Saved manifests.
    pub fn manifests(&self) -> &Arc<SavedManifests> {
        &self.manifests
    }

    /// Commit intents.
    pub fn intents(&self) -> &Arc<OriginIntents> {
        &self.intents
    }

    /// The center's wishes acted on here (none when never saved or unreadable: a
    /// wish is acted on again at the next heartbeat).
    pub fn wishes(&self) -> Wishes {
        self.wishes.load_or_default()
    }

    /// Saves the wishes acted on.
    pub fn save_wishes(&self, wishes: &Wishes) -> std::io::Result<()> {
        self.wishes.save(wishes)
    }

    /// The kernel devices' record (its rows are the attach module's).
    pub fn devices_file<T>(&self) -> JsonFile<T> {
        JsonFile::new(self.dir.join(DEVICES_FILE))
    }

    /// Where the sandboxes' overlays are kept.
    pub fn overlays_dir(&self) -> &Path {
        &self.overlays
    }

    /// Where resizes keep their scratch overlays (scratch: its owner empties it).
    pub fn resizing_dir(&self) -> &Path {
        &self.resizing
    }
}

/// The key of the node whose state is under `dir` (made there, once, if it has none):
/// for `lazyblk node-key`, which needs nothing else of the state.
pub fn load_key(dir: &Path) -> Result<NodeKey, NodeStateError> {
    std::fs::create_dir_all(dir).map_err(|source| NodeStateError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(NodeKey::load_or_create(&dir.join(KEY_FILE))?)
}

/// Removes the random id an older lazyblk kept (`node-id`): the id now derives from the
/// node's key, so the node's chunks move to their new owners once.
fn retire_old_node_id(dir: &Path, id: &str) {
    let path = dir.join(OLD_NODE_ID_FILE);
    if let Ok(old) = std::fs::read_to_string(&path) {
        tracing::info!(old = %old.trim(), new = %id, "this node's id now derives from its key (node.key)");
        if let Err(e) = lazyblk_cache::durable::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing the old node id");
        }
    }
}

#[cfg(test)]
mod tests;
