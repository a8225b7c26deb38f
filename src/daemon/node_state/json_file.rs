//! A small JSON document of the node's state (`wished.json`, `kernel-devices.json`),
//! read whole and written whole, crash-safely.

use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use lazyblk_cache::durable;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One JSON document of type `T` at a fixed path.
pub struct JsonFile<T> {
    path: PathBuf,
    _of: PhantomData<fn() -> T>,
}

impl<T> JsonFile<T> {
    pub(super) fn new(path: PathBuf) -> JsonFile<T> {
        JsonFile {
            path,
            _of: PhantomData,
        }
    }

    /// Where the document is kept (for log lines).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl<T: DeserializeOwned> JsonFile<T> {
    /// The document; `None` when it was never written.
    pub fn load(&self) -> io::Result<Option<T>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl<T: DeserializeOwned + Default> JsonFile<T> {
    /// The document, or the empty one when it was never written or does not read (said
    /// in the log).
    pub fn load_or_default(&self) -> T {
        match self.load() {
            Ok(doc) => doc.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "unreadable; starting from an empty one");
                T::default()
            }
        }
    }
}

impl<T: Serialize> JsonFile<T> {
    /// Replaces the document crash-safely ([`durable::write_file`]).
    pub fn save(&self, doc: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(doc).map_err(io::Error::other)?;
        durable::write_file(&self.path, &bytes)
    }
}
