//! `overlay.json`: which sandbox an overlay belongs to and which template it covers.
//!
//! Written once, last, when an overlay is created (temporary file, fsync, rename, fsync
//! of the directory): a directory with this file holds a complete overlay, one without
//! it is the debris of an interrupted create or delete.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::OverlayError;
use crate::manifest::BLOCK_SIZE;

/// The meta file's name inside an overlay's directory.
pub const META_FILE: &str = "overlay.json";
/// The overlay format this code reads and writes (the map's byte values, the layout).
pub const OVERLAY_FORMAT: u32 = 1;

/// The contents of `overlay.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayMeta {
    pub format: u32,
    /// The sandbox id (the NBD export name of the overlay).
    pub sandbox: String,
    /// The template the overlay is a layer over.
    pub template: String,
    /// Bytes; the template's size.
    pub size: u64,
    /// The overlay's granularity; always [`BLOCK_SIZE`] in format 1.
    pub block_size: u64,
    /// RFC 3339, UTC.
    pub created_at: String,
}

impl OverlayMeta {
    /// Reads `<dir>/overlay.json`. Blocking (one small file): call it at start-up or
    /// from `spawn_blocking`. The daemon uses it to learn which template to open an
    /// overlay's base from before calling [`super::Overlay::open`].
    pub fn load(dir: &Path) -> Result<OverlayMeta, OverlayError> {
        let path = dir.join(META_FILE);
        let bytes = fs::read(&path).map_err(|source| OverlayError::Io {
            sandbox: sandbox_of_dir(dir),
            op: "read meta",
            offset: 0,
            path: path.clone(),
            source,
        })?;
        let meta: OverlayMeta =
            serde_json::from_slice(&bytes).map_err(|e| OverlayError::Corrupt {
                path: path.clone(),
                reason: format!("malformed meta file: {e}"),
            })?;
        if meta.format != OVERLAY_FORMAT || meta.block_size != BLOCK_SIZE {
            return Err(OverlayError::Corrupt {
                path,
                reason: format!(
                    "format {} with {}-byte blocks is not supported (this build reads format \
                     {OVERLAY_FORMAT} with {BLOCK_SIZE}-byte blocks)",
                    meta.format, meta.block_size
                ),
            });
        }
        Ok(meta)
    }

    /// Writes `<dir>/overlay.json` crash-safely. Blocking.
    pub(super) fn store(&self, dir: &Path) -> Result<(), OverlayError> {
        let path = dir.join(META_FILE);
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        json.push(b'\n');
        let io_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            let sandbox: Arc<str> = self.sandbox.as_str().into();
            move |source| OverlayError::Io {
                sandbox,
                op,
                offset: 0,
                path,
                source,
            }
        };
        crate::durable::write_file(&path, &json).map_err(io_err("write meta", &path))
    }
}

/// The name errors use for an overlay whose meta has not been read: its directory's
/// name, which the daemon makes the sandbox id.
pub(super) fn sandbox_of_dir(dir: &Path) -> Arc<str> {
    dir.file_name()
        .map(|n| n.to_string_lossy().as_ref().into())
        .unwrap_or_else(|| dir.to_string_lossy().as_ref().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OverlayMeta {
        OverlayMeta {
            format: OVERLAY_FORMAT,
            sandbox: "sb1".into(),
            template: "py311".into(),
            size: 1 << 20,
            block_size: BLOCK_SIZE,
            created_at: "2026-11-22T10:00:00Z".into(),
        }
    }

    #[test]
    fn stores_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        sample().store(dir.path()).unwrap();
        assert_eq!(OverlayMeta::load(dir.path()).unwrap(), sample());
        assert!(!dir.path().join(format!("{META_FILE}.tmp")).exists());
    }

    #[test]
    fn refuses_unknown_formats_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let err = OverlayMeta::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("overlay.json"), "{err}");
        let mut meta = sample();
        meta.format = 2;
        meta.store(dir.path()).unwrap();
        let err = OverlayMeta::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("format 2"), "{err}");
        fs::write(dir.path().join(META_FILE), b"{").unwrap();
        assert!(matches!(
            OverlayMeta::load(dir.path()),
            Err(OverlayError::Corrupt { .. })
        ));
    }
}
