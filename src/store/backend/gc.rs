//! Garbage collection of the directory engine: chunks that no manifest references,
//! older than a grace period (publish uploads chunks before its manifest, so a young
//! unreferenced chunk may belong to a publish in progress).

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use lazyblk_cache::{Digest, Manifest};

use super::dir::DirBackend;
use super::dir_files::{blocking, chunks_lock, io_err, sync_dir, template_ids};
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

/// The gc sweep: the referenced set from every manifest, then every chunk file; the
/// chunks found unreferenced and old are checked again and deleted under the
/// exclusive [`chunks_lock`], so none that another process confirmed (touched) since
/// is lost.
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
    let cutoff = disk_now(root)?
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let old = |path: &Path| -> Result<Option<u64>, BackendError> {
        match fs::metadata(path) {
            Ok(meta) => Ok(meta
                .modified()
                .is_ok_and(|m| m <= cutoff)
                .then_some(meta.len())),
            // Deleted meanwhile (by another process's gc).
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading metadata of", path)(e)),
        }
    };
    let mut report = GcReport::default();
    let mut candidates = Vec::new();
    let chunks = root.join("chunks");
    for shard in fs::read_dir(&chunks).map_err(io_err("listing", &chunks))? {
        let shard = shard.map_err(io_err("listing", &chunks))?.path();
        if !shard.is_dir() {
            continue;
        }
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
            } else if old(&path)?.is_some() {
                candidates.push(path);
            } else {
                report.chunks_recent += 1;
            }
        }
    }
    let _exclusive = chunks_lock(root, true)?;
    let mut shards = BTreeSet::new();
    for path in candidates {
        let Some(len) = old(&path)? else {
            report.chunks_recent += 1;
            continue;
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
        report.chunks_deleted += 1;
        report.bytes_freed += len;
        if let Some(shard) = path.parent() {
            shards.insert(shard.to_path_buf());
        }
    }
    for shard in shards {
        sync_dir(&shard)?;
    }
    Ok(report)
}

/// The file system's time now (the mtime of a new file): chunk mtimes are its times, so
/// gc's cutoff is too, whatever this process's clock says.
fn disk_now(root: &Path) -> Result<SystemTime, BackendError> {
    let tmp = root.join("tmp");
    let file = tempfile::NamedTempFile::new_in(&tmp)
        .map_err(io_err("creating a temporary file in", &tmp))?;
    file.as_file()
        .metadata()
        .and_then(|m| m.modified())
        .map_err(io_err("reading metadata of", file.path()))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::store::backend::dir_files::touch;

    /// Another process's confirmation, made while this one's gc had already chosen the
    /// chunk: the gc waits for the lock, sees the fresh touch and keeps it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_touched_while_gc_waits_for_the_lock_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let b = std::sync::Arc::new(DirBackend::open(tmp.path()).await.unwrap());
        let mut paths = Vec::new();
        for body in [&b"confirmed"[..], &b"abandoned"[..]] {
            let piece = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(body))]);
            b.put_chunk(Digest::of(body), piece).await.unwrap();
            let path = tmp
                .path()
                .join("chunks")
                .join(Digest::of(body).shard_path());
            let hour_ago = SystemTime::now() - Duration::from_secs(3600);
            fs::File::open(&path)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
            paths.push(path);
        }
        // A confirmer in another process holds the lock: it found the chunk.
        let confirmer = chunks_lock(tmp.path(), false).unwrap();
        let gc = {
            let b = b.clone();
            tokio::spawn(async move { b.gc(Duration::from_secs(60), HashSet::new()).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            paths[0].exists(),
            "gc deletes nothing while a confirmer holds the lock"
        );
        touch(&paths[0]);
        drop(confirmer);
        let report = gc.await.unwrap().unwrap();
        assert!(paths[0].exists(), "the confirmed chunk is kept");
        assert!(!paths[1].exists(), "the other old one is swept");
        assert_eq!((report.chunks_deleted, report.chunks_recent), (1, 1));
    }
}
