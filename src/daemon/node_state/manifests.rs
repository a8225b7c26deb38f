//! The manifests this node saved (`manifests/<id>.json`, and `<id>.sig` beside a signed
//! one): the bytes exactly as the store had them (or as this node published them), so
//! a restart serves its templates without the store and checks their signatures again.
//! What they mean is [`crate::daemon::templates`]'s; this file only keeps the bytes.

use std::io;
use std::path::PathBuf;

use lazyblk_cache::durable;

/// The saved manifests' directory.
pub struct SavedManifests {
    dir: PathBuf,
}

/// A saved manifest's bytes, and its signature's when asked for and present.
pub struct SavedBytes {
    pub manifest: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

impl SavedManifests {
    /// The manifests in `dir` (made by [`super::NodeState::open`]).
    pub(super) fn open(dir: PathBuf) -> SavedManifests {
        SavedManifests { dir }
    }

    /// The ids of the saved manifests. Temporary files a crash left are removed (the
    /// save they belonged to was never acknowledged, or is made again); a file that
    /// names no valid id is skipped, said in the log.
    pub fn list(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sig") {
                // A saved manifest's signature, read with it.
                continue;
            }
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match path.file_stem().and_then(|s| s.to_str()) {
                Some(id) if lazyblk_cache::validate_id(id).is_ok() => ids.push(id.to_string()),
                _ => {
                    tracing::warn!(path = %path.display(), "skipping a file that is not a saved manifest")
                }
            }
        }
        ids.sort();
        ids
    }

    /// The saved bytes of `id` (blocking: two small file reads); its signature too
    /// with `with_signature` (none when it has none).
    pub fn read(&self, id: &str, with_signature: bool) -> io::Result<SavedBytes> {
        let signature = match with_signature.then(|| std::fs::read(self.signature_path(id))) {
            None => None,
            Some(Ok(doc)) => Some(doc),
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => None,
            Some(Err(e)) => return Err(e),
        };
        let manifest = std::fs::read(self.path(id))?;
        Ok(SavedBytes {
            manifest,
            signature,
        })
    }

    /// Saves `id`'s manifest crash-safely (blocking), its signature first (or the
    /// removal of an old one), so a manifest on disk never pairs with another's
    /// signature.
    pub fn write(&self, id: &str, manifest: &[u8], signature: Option<&[u8]>) -> io::Result<()> {
        let sig_path = self.signature_path(id);
        match signature {
            Some(doc) => durable::write_file(&sig_path, doc)?,
            None => {
                durable::remove_file(&sig_path)?;
            }
        }
        durable::write_file(&self.path(id), manifest)
    }

    /// Removes `id`'s manifest and signature, durably (blocking); what is already gone
    /// is not an error.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let removed = durable::remove_file(&self.path(id));
        durable::remove_file(&self.signature_path(id))?;
        removed.map(|_| ())
    }

    /// Where `id`'s manifest is kept (for log lines and errors).
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn signature_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.sig"))
    }
}
