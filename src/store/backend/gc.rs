//! Garbage collection of the directory engine: chunks that no manifest references,
//! older than a grace period (publish uploads chunks before its manifest, so a young
//! unreferenced chunk may belong to a publish in progress).

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use lazyblk_cache::{Digest, Manifest};

use super::dir::{blocking, io_err, sync_dir, template_ids, DirBackend};
use super::BackendError;
use crate::store::GcReport;

impl DirBackend {
    /// Deletes chunks no manifest references and that were not written or confirmed
    /// within `grace`. Refuses to delete anything while a manifest is unreadable.
    pub async fn gc(
        &self,
        grace: Duration,
        keep: HashSet<Digest>,
    ) -> Result<GcReport, BackendError> {
        let _guard = self.manifests_lock.lock().await;
        let root = self.root.clone();
        blocking(move || sweep(&root, grace, keep)).await
    }
}

/// The gc sweep: the referenced set from every manifest, then every chunk file.
fn sweep(root: &Path, grace: Duration, keep: HashSet<Digest>) -> Result<GcReport, BackendError> {
    let manifests = root.join("manifests");
    let mut referenced = keep;
    for id in template_ids(&manifests)? {
        let path = manifests.join(format!("{id}.json"));
        let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
        let manifest = Manifest::parse(&bytes, Some(&id))
            .map_err(|source| BackendError::Corrupt { path, source })?;
        referenced.extend(manifest.referenced());
    }
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = GcReport::default();
    let chunks = root.join("chunks");
    for shard in fs::read_dir(&chunks).map_err(io_err("listing", &chunks))? {
        let shard = shard.map_err(io_err("listing", &chunks))?.path();
        if !shard.is_dir() {
            continue;
        }
        let mut removed = false;
        for entry in fs::read_dir(&shard).map_err(io_err("listing", &shard))? {
            let path = entry.map_err(io_err("listing", &shard))?.path();
            let Some(digest) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue;
            };
            if referenced.contains(&digest) {
                report.chunks_referenced += 1;
                continue;
            }
            let meta = fs::metadata(&path).map_err(io_err("reading metadata of", &path))?;
            if meta.modified().map(|m| m > cutoff).unwrap_or(false) {
                report.chunks_recent += 1;
                continue;
            }
            fs::remove_file(&path).map_err(io_err("removing", &path))?;
            report.chunks_deleted += 1;
            report.bytes_freed += meta.len();
            removed = true;
        }
        if removed {
            sync_dir(&shard)?;
        }
    }
    Ok(report)
}
