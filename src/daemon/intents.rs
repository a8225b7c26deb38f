//! What this node owes after a crash: the templates it committed (or is committing)
//! whose new chunks only it holds.
//!
//! A commit records its intent here, durably, before anyone is told the template exists
//! (before the manifest goes to the store): `originated/<template>` beside the saved
//! manifest. The record goes when the upload makes the template DURABLE, or when the
//! daemon learns the manifest was never published. At start every record is settled
//! against the store, so an upload cut off by a crash resumes whatever address the
//! node comes back at: nothing here is keyed by the node's URL.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use lazyblk_cache::durable;

/// The directory of commit intents under the node's state directory.
const INTENTS_DIR: &str = "originated";
/// The file an older lazyblk kept a random node id in.
const OLD_NODE_ID_FILE: &str = "node-id";

/// A failure to keep an intent durable.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct IntentError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

/// The commit intents of this node.
pub struct OriginIntents {
    dir: PathBuf,
}

impl OriginIntents {
    /// Opens (creating) the intents directory under `state_dir`.
    pub fn open(state_dir: &Path) -> io::Result<OriginIntents> {
        let dir = state_dir.join(INTENTS_DIR);
        fs::create_dir_all(&dir)?;
        Ok(OriginIntents { dir })
    }

    /// Records, durably, that this node owes the upload of `template`.
    pub fn record(&self, template: &str) -> Result<(), IntentError> {
        let path = self.dir.join(template);
        let err = |what| {
            let path = path.clone();
            move |source| IntentError { what, path, source }
        };
        durable::write_file(&path, template.as_bytes()).map_err(err("writing"))
    }

    /// Drops the record of `template` (uploaded, or never published).
    pub fn clear(&self, template: &str) {
        let path = self.dir.join(template);
        if let Err(e) = durable::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "clearing a commit intent");
        }
    }

    /// The templates with a recorded intent.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|id| lazyblk_cache::validate_id(id).is_ok())
            .collect();
        ids.sort();
        ids
    }

    /// Whether `template` has a recorded intent.
    pub fn contains(&self, template: &str) -> bool {
        self.dir.join(template).exists()
    }
}

/// Removes the random id an older lazyblk kept (`node-id`): the id now derives from the
/// node's key ([`crate::identity`]), so the node's chunks move to their new owners once.
pub fn forget_old_node_id(state_dir: &Path, id: &str) {
    let path = state_dir.join(OLD_NODE_ID_FILE);
    if let Ok(old) = fs::read_to_string(&path) {
        tracing::info!(old = %old.trim(), new = %id, "this node's id now derives from its key (node.key)");
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing the old node id");
        }
    }
}

/// What the store says of a commit this node intended to publish.
pub enum Settled {
    /// The store has this node's manifest: the upload is owed.
    Published,
    /// The store does not have it (or has other content): it was never published.
    NotPublished(&'static str),
    /// The store could not be asked.
    Unknown(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let intents = OriginIntents::open(dir.path()).unwrap();
        intents.record("t1").unwrap();
        intents.record("t2").unwrap();
        intents.clear("t1");
        let again = OriginIntents::open(dir.path()).unwrap();
        assert_eq!(again.list(), vec!["t2".to_string()]);
    }
}
