//! Garbage collection of the object storage engine: chunks under `PREFIX/chunks/` that
//! no manifest references, older than the grace period and not confirmed to an
//! uploader within it (publish uploads chunks before its manifest, and reuses chunks
//! the bucket already holds). Confirmations are documents in the bucket and the gc runs
//! under a marker there (`confirm`), so this holds across any number of store servers.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use lazyblk_cache::Digest;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::confirm::GcRun;
use super::object::{object_err, ObjectBackend, HEAD_CONCURRENCY};
use super::BackendError;
use crate::store::GcReport;

impl ObjectBackend {
    /// Deletes unreferenced chunks that were not written or confirmed within `grace`.
    /// Refuses to delete anything while a manifest is unreadable. Runs under the gc
    /// marker (`confirm`), so confirmations by any process are kept and no two gc runs
    /// over one bucket overlap.
    pub async fn gc(
        &self,
        grace: Duration,
        keep: HashSet<Digest>,
    ) -> Result<GcReport, BackendError> {
        let _guard = self.manifests_lock.lock().await;
        let mut run = GcRun::start(self).await?;
        match self.sweep(&mut run, grace, keep).await {
            Ok((report, cutoff)) => {
                run.finish(cutoff).await?;
                Ok(report)
            }
            Err(e) => {
                run.abandon().await;
                Err(e)
            }
        }
    }

    /// The gc itself, under `run`'s marker; the report and the run's cutoff.
    async fn sweep(
        &self,
        run: &mut GcRun<'_>,
        grace: Duration,
        keep: HashSet<Digest>,
    ) -> Result<(GcReport, SystemTime), BackendError> {
        let mut referenced = self.referenced(run).await?;
        referenced.extend(keep);
        // The bucket's clock, not this server's: chunks and confirmations carry its times.
        let cutoff = run
            .started
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let chunks_dir = self.prefix.clone().join("chunks");
        let mut listing = self.store.list(Some(&chunks_dir));
        let mut report = GcReport::default();
        let mut candidates = Vec::new();
        while let Some(object) = listing
            .try_next()
            .await
            .map_err(object_err("listing", &chunks_dir))?
        {
            run.renew().await?;
            let Some(digest) = object
                .location
                .filename()
                .and_then(|n| n.parse::<Digest>().ok())
            else {
                continue;
            };
            if referenced.contains(&digest) {
                report.chunks_referenced += 1;
            } else if SystemTime::from(object.last_modified) > cutoff {
                report.chunks_recent += 1;
            } else {
                candidates.push((digest, object));
            }
        }
        drop(listing);
        let mut pending = candidates.into_iter().peekable();
        while pending.peek().is_some() {
            let confirmed = run.begin_batch(cutoff).await?;
            let mut batch = Vec::new();
            for (digest, object) in pending.by_ref() {
                if confirmed.contains(&digest) {
                    report.chunks_recent += 1;
                    continue;
                }
                batch.push(object);
                if batch.len() == GcRun::BATCH {
                    break;
                }
            }
            let (tried, deleted) = (batch.len(), report.chunks_deleted);
            let left = self.delete_chunks(run, batch, &mut report).await?;
            run.end_batch().await?;
            if tried > 0 && left.len() == tried && report.chunks_deleted == deleted {
                return Err(BackendError::GcRunning(
                    "reading the confirmations took longer than a batch may run; the bucket \
                     is too slow for gc now, try again"
                        .into(),
                ));
            }
            // Deletes this batch had no time left to start go first in the next one.
            if !left.is_empty() {
                let rest: Vec<_> = left
                    .into_iter()
                    .filter_map(|o| {
                        let d = o.location.filename()?.parse::<Digest>().ok()?;
                        Some((d, o))
                    })
                    .chain(pending)
                    .collect();
                pending = rest.into_iter().peekable();
            }
        }
        Ok((report, cutoff))
    }

    /// Every chunk some manifest references.
    async fn referenced(&self, run: &mut GcRun<'_>) -> Result<HashSet<Digest>, BackendError> {
        let dir = self.manifests_dir();
        let manifests: Vec<ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(object_err("listing", &dir))?;
        let mut referenced = HashSet::new();
        for object in manifests {
            run.renew().await?;
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

    /// Deletes `doomed` (a chunk already gone counts as deleted), adding to `report`,
    /// while `run` may start deletes; the chunks it had no time left for.
    async fn delete_chunks(
        &self,
        run: &GcRun<'_>,
        doomed: Vec<ObjectMeta>,
        report: &mut GcReport,
    ) -> Result<Vec<ObjectMeta>, BackendError> {
        let late = std::sync::Mutex::new(Vec::new());
        let mut deletes = futures::stream::iter(doomed)
            .map(|object| {
                let late = &late;
                async move {
                    if !run.may_delete() {
                        if let Ok(mut late) = late.lock() {
                            late.push(object);
                        }
                        return Ok(None);
                    }
                    match self.store.delete(&object.location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(Some(object.size)),
                        Err(e) => Err(object_err("deleting", &object.location)(e)),
                    }
                }
            })
            .buffer_unordered(HEAD_CONCURRENCY);
        while let Some(size) = deletes.next().await {
            if let Some(size) = size? {
                report.chunks_deleted += 1;
                report.bytes_freed += size;
            }
        }
        drop(deletes);
        Ok(late.into_inner().unwrap_or_default())
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
