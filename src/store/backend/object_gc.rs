//! Garbage collection of the object storage engine: chunks under `PREFIX/chunks/` that
//! no manifest references, older than the grace period and not confirmed to an
//! uploader within it (publish uploads chunks before its manifest, and reuses chunks
//! the bucket already holds).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use lazyblk_cache::Digest;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::object::{object_err, ObjectBackend, HEAD_CONCURRENCY};
use super::BackendError;
use crate::store::GcReport;

impl ObjectBackend {
    /// Deletes unreferenced chunks that were not written or confirmed within `grace`.
    /// Refuses to delete anything while a manifest is unreadable.
    pub async fn gc(
        &self,
        grace: Duration,
        keep: HashSet<Digest>,
    ) -> Result<GcReport, BackendError> {
        let _guard = self.manifests_lock.lock().await;
        let mut referenced = self.referenced().await?;
        referenced.extend(keep);
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let chunks_dir = self.prefix.clone().join("chunks");
        let objects: Vec<ObjectMeta> = self
            .store
            .list(Some(&chunks_dir))
            .try_collect()
            .await
            .map_err(object_err("listing", &chunks_dir))?;
        let confirmed = self.confirmed.lock().map(|c| c.clone()).unwrap_or_default();
        let mut report = GcReport::default();
        let mut doomed = Vec::new();
        for object in objects {
            let Some(digest) = object
                .location
                .filename()
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue;
            };
            if referenced.contains(&digest) {
                report.chunks_referenced += 1;
            } else if SystemTime::from(object.last_modified) > cutoff
                || confirmed.get(&digest).is_some_and(|at| *at > cutoff)
            {
                report.chunks_recent += 1;
            } else {
                doomed.push(object);
            }
        }
        self.delete_chunks(doomed, &mut report).await?;
        if let Ok(mut confirmed) = self.confirmed.lock() {
            confirmed.retain(|d, at| *at > cutoff && !referenced.contains(d));
        }
        Ok(report)
    }

    /// Every chunk some manifest references.
    async fn referenced(&self) -> Result<HashSet<Digest>, BackendError> {
        let dir = self.manifests_dir();
        let manifests: Vec<ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(object_err("listing", &dir))?;
        let mut referenced = HashSet::new();
        for object in manifests {
            let Some(id) = object
                .location
                .filename()
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|id| lazyblk_cache::validate_id(id).is_ok())
            else {
                continue;
            };
            // A manifest deleted since the listing references nothing.
            if let Some(manifest) = self.manifest(id).await? {
                referenced.extend(manifest.referenced());
            }
        }
        Ok(referenced)
    }

    /// Deletes `doomed` (a chunk already gone counts as deleted), adding to `report`.
    async fn delete_chunks(
        &self,
        doomed: Vec<ObjectMeta>,
        report: &mut GcReport,
    ) -> Result<(), BackendError> {
        let mut deletes = futures::stream::iter(doomed)
            .map(|object| async move {
                match self.store.delete(&object.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(object.size),
                    Err(e) => Err(object_err("deleting", &object.location)(e)),
                }
            })
            .buffer_unordered(HEAD_CONCURRENCY);
        while let Some(size) = deletes.next().await {
            let size = size?;
            report.chunks_deleted += 1;
            report.bytes_freed += size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use lazyblk_cache::Manifest;
    use object_store::memory::InMemory;

    use super::*;

    #[tokio::test]
    async fn gc_sweeps_only_old_unreferenced_chunks() {
        let b = ObjectBackend::new(Arc::new(InMemory::new()), "p");
        let (kept, swept): (&[u8], &[u8]) = (b"kept", b"swept");
        for c in [kept, swept] {
            let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(c))]);
            b.put_chunk(Digest::of(c), body).await.unwrap();
        }
        let mut m = Manifest::new("t", 65536, 65536);
        m.chunks[0] = Some(Digest::of(kept));
        b.put_manifest("t", &m.to_json(), None).await.unwrap();

        let young = b
            .gc(Duration::from_secs(600), HashSet::new())
            .await
            .unwrap();
        assert_eq!((young.chunks_recent, young.chunks_deleted), (1, 0));
        let report = b.gc(Duration::ZERO, HashSet::new()).await.unwrap();
        assert_eq!(
            (
                report.chunks_referenced,
                report.chunks_deleted,
                report.bytes_freed
            ),
            (1, 1, swept.len() as u64)
        );
        assert_eq!(b.chunk_len(&Digest::of(swept)).await.unwrap(), None);
        assert!(b.chunk_len(&Digest::of(kept)).await.unwrap().is_some());
    }
}
