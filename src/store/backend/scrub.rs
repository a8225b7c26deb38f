//! Scrub of the store: every stored chunk decoded where it is a zstd frame and hashed, and the ones whose bytes do not match
//! their names deleted, so that `missing` reports them and the next publish or upload of
//! that content repairs the store (a PUT also replaces a bad copy it finds).

use std::fs;
use std::path::Path;

use futures::TryStreamExt;
use lazyblk_cache::{Digest, ScrubReport};
use object_store::{ObjectMeta, ObjectStoreExt};

use super::chunk::is_chunk;
use super::dir::DirBackend;
use super::dir_files::{blocking, file_is_chunk, io_err};
use super::error::BackendError;
use super::object::{object_err, ObjectBackend};

impl DirBackend {
    /// Hashes every chunk file; deletes the bad ones.
    pub async fn scrub(&self) -> Result<ScrubReport, BackendError> {
        let chunks = self.root.join("chunks");
        let report = blocking(move || scrub_dir(&chunks)).await?;
        if !report.dropped.is_empty() {
            self.durable.clear();
        }
        Ok(report)
    }
}

fn scrub_dir(chunks: &Path) -> Result<ScrubReport, BackendError> {
    let mut report = ScrubReport::default();
    for shard in fs::read_dir(chunks).map_err(io_err("listing", chunks))? {
        let shard = shard.map_err(io_err("listing", chunks))?.path();
        let Ok(files) = fs::read_dir(&shard) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            let Some(digest) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue;
            };
            report.checked += 1;
            report.bytes += file.metadata().map(|m| m.len()).unwrap_or(0);
            match file_is_chunk(&path, &digest) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(chunk = %digest, path = %path.display(), "scrub: stored chunk does not match its digest; deleted");
                    fs::remove_file(&path).map_err(io_err("removing", &path))?;
                    report.dropped.push(digest.to_hex());
                }
                Err(e) => {
                    tracing::error!(chunk = %digest, error = %e, "scrub: cannot read stored chunk");
                    report.unreadable.push(digest.to_hex());
                }
            }
        }
    }
    Ok(report)
}

impl ObjectBackend {
    /// Reads and hashes every chunk object; deletes the bad ones.
    pub async fn scrub(&self) -> Result<ScrubReport, BackendError> {
        let chunks_dir = self.prefix.clone().join("chunks");
        let objects: Vec<ObjectMeta> = self
            .store
            .list(Some(&chunks_dir))
            .try_collect()
            .await
            .map_err(object_err("listing", &chunks_dir))?;
        let mut report = ScrubReport::default();
        for object in objects {
            let Some(digest) = object
                .location
                .filename()
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue;
            };
            report.checked += 1;
            report.bytes += object.size;
            let body = match self.store.get(&object.location).await {
                Ok(got) => got.bytes().await,
                Err(e) => Err(e),
            };
            match body {
                Ok(bytes) if is_chunk(&bytes, &digest) => {}
                Ok(_) => {
                    tracing::error!(chunk = %digest, "scrub: stored chunk does not match its digest; deleted");
                    self.store
                        .delete(&object.location)
                        .await
                        .map_err(object_err("deleting", &object.location))?;
                    report.dropped.push(digest.to_hex());
                }
                Err(e) => {
                    tracing::error!(chunk = %digest, error = %e, "scrub: cannot read stored chunk");
                    report.unreadable.push(digest.to_hex());
                }
            }
        }
        if !report.dropped.is_empty() {
            self.durable.clear();
        }
        Ok(report)
    }
}
