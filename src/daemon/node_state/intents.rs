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
use std::path::PathBuf;

use lazyblk_cache::durable;

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
    /// The intents in `dir` (made by [`super::NodeState::open`]).
    pub(super) fn open(dir: PathBuf) -> OriginIntents {
        OriginIntents { dir }
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

    /// The templates with a recorded intent (temporary files a crash left are not
    /// intents: their record was never acknowledged).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let intents = OriginIntents::open(dir.path().to_path_buf());
        intents.record("t1").unwrap();
        intents.record("t2").unwrap();
        intents.clear("t1");
        let again = OriginIntents::open(dir.path().to_path_buf());
        assert_eq!(again.list(), vec!["t2".to_string()]);
    }
}
