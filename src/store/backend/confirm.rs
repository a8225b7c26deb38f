//! Confirmations of stored chunks that every store server's gc sees (object storage).
//!
//! A publisher asks which chunks are missing and does not upload the others; those
//! are often unreferenced (left by a deleted template) and old, so a gc must keep them
//! until the publisher's manifest names them. Any number of processes confirm chunks
//! (store servers over one bucket, `lazyblk publish` writing straight to the bucket)
//! and any one of them may run a gc, so a confirmation is a document in the bucket
//! (`center/confirmed/<random>.json`, the confirmed digests of one answer), written
//! before the answer is sent, and a gc runs under one marker document
//! (`center/gc.json`) that it changes by compare-and-swap:
//!
//! - gc: marker `open` (this run holds it), list manifests and chunks; then for each
//!   batch of chunks to delete: marker `sweeping`, read the confirmations, delete the
//!   batch's unconfirmed chunks, marker `open`; at the end marker `idle`.
//! - a confirmation: read the marker, HEAD the chunks, write the confirmation of the
//!   present ones, read the marker again. Was it `sweeping`, wait until that version
//!   is replaced. Then, unless the marker is the very version read before the HEADs,
//!   HEAD the present chunks again: only those still there are confirmed.
//!
//! Why no confirmed chunk is lost (the bucket gives read-after-write consistency): a
//! batch whose `sweeping` write comes after the confirmer's second read of the marker
//! reads the confirmation (written before that read) and keeps its chunks. A batch whose
//! `sweeping` write came before it has finished deleting by the time the confirmer sees
//! a later version, so the HEADs after that see its deletes; when the version is the
//! one read before the first HEADs, no batch ran in between at all (every write of the
//! marker carries a new sequence number, so no two versions look alike).
//!
//! A gc killed mid-batch leaves the marker `sweeping`: whoever waits on it for
//! [`GC_STALE`] without seeing it change (on its own clock) replaces it with `idle`. A
//! gc that is merely slow stops deleting [`GC_HOLD`] after its `sweeping` write, well
//! before that, and a gc whose marker was replaced fails its next write and stops.
//! Times of confirmations and chunks are the bucket's own (`last_modified`), and the
//! gc's cutoff is the bucket's time of its marker minus the grace period, so no
//! server's clock matters.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use lazyblk_cache::Digest;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::docs::{random_u64, DocVersion};
use super::object::{object_err, ObjectBackend};
use super::BackendError;

/// The folder of confirmation documents, under `center/`.
const CONFIRMED: &str = "confirmed";
/// The gc marker document, under `center/`.
const MARKER: &str = "gc.json";
/// How long a gc marker left `open` or `sweeping` may stay unchanged before it is taken
/// for the mark of a dead gc and replaced: longer than [`GC_HOLD`] plus the 30 s the
/// object storage client may retry one delete, and short enough that a publisher's
/// missing-list request (60 s deadline) that meets a dead gc still gets its answer.
pub(super) const GC_STALE: Duration = Duration::from_secs(45);
/// How long after writing `sweeping` a gc may start deletes of that batch; the rest
/// waits for the next batch (a new `sweeping` write and a new read of confirmations).
/// Confirmers wait for a batch, so this bounds their wait behind a live gc.
const GC_HOLD: Duration = Duration::from_secs(8);
/// How often a gc rewrites its `open` marker while it lists manifests and chunks, so a
/// second gc does not take a long listing for a dead run.
const GC_RENEW: Duration = Duration::from_secs(5);
/// Chunks deleted per batch at most (one read of the confirmations each).
const GC_BATCH: usize = 2000;
/// Confirmations younger than this are kept by every gc, whatever its grace: a gc run
/// with a short grace must not drop what a later run with the default grace (10 min)
/// relies on.
const CONFIRMATION_KEEP: Duration = Duration::from_secs(600);
/// How often a confirmer waiting on a `sweeping` marker reads it again.
const MARKER_POLL: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// No gc runs.
    Idle,
    /// A gc runs and will read the confirmations before it deletes anything more.
    Open,
    /// A gc deletes a batch it chose after reading the confirmations.
    Sweeping,
}

/// `center/gc.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Marker {
    /// The run that wrote it (random).
    run: String,
    /// One more on every write: no two versions of the marker have the same bytes.
    seq: u64,
    phase: Phase,
}

/// The marker as read: its content (none before the first gc) and version.
type Seen = Option<(Marker, DocVersion)>;

fn sweeping(seen: &Seen) -> bool {
    matches!(seen, Some((m, _)) if m.phase == Phase::Sweeping)
}

fn version(seen: &Seen) -> Option<&DocVersion> {
    seen.as_ref().map(|(_, v)| v)
}

impl ObjectBackend {
    /// The bucket's time of the marker's last write, from a listing of `center/`
    /// (a HEAD's `Last-Modified` is whole seconds; a listing's is finer).
    async fn marker_time(&self) -> Result<SystemTime, BackendError> {
        let key = self.doc_key(MARKER);
        let dir = self.prefix.clone().join("center");
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(object_err("listing", &dir))?;
        match listed.objects.into_iter().find(|o| o.location == key) {
            Some(meta) => Ok(meta.last_modified.into()),
            None => Err(BackendError::GcRunning(format!(
                "{key} vanished right after this gc wrote it"
            ))),
        }
    }

    async fn read_marker(&self) -> Result<Seen, BackendError> {
        let Some((bytes, version)) = self.doc(MARKER).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<Marker>(&bytes) {
            Ok(m) => Ok(Some((m, version))),
            // Not ours (a hand edit): treated as a dead gc's, replaced once stale.
            Err(e) => {
                tracing::warn!("center/{MARKER} is unreadable ({e}); treating it as a gc's");
                let m = Marker {
                    run: String::new(),
                    seq: 0,
                    phase: Phase::Sweeping,
                };
                Ok(Some((m, version)))
            }
        }
    }

    /// Waits until the marker is no longer the version in `seen` (a batch ended), or
    /// replaces it with `idle` when it stays unchanged for [`GC_STALE`]. The marker as
    /// it is afterwards, and whether this replaced a dead gc's.
    async fn outwait(&self, seen: Seen) -> Result<(Seen, bool), BackendError> {
        let since = Instant::now();
        loop {
            tokio::time::sleep(MARKER_POLL).await;
            let now = self.read_marker().await?;
            if version(&now) != version(&seen) {
                return Ok((now, false));
            }
            if since.elapsed() >= GC_STALE {
                let Some((dead, v)) = seen else {
                    return Ok((now, false));
                };
                tracing::warn!(run = %dead.run, "a gc left its marker unchanged for {} s; taking it for dead", GC_STALE.as_secs());
                let idle = Marker {
                    run: dead.run,
                    seq: dead.seq + 1,
                    phase: Phase::Idle,
                };
                let replaced = self.put_doc_if(MARKER, to_json(&idle), Some(&v)).await?;
                return Ok((self.read_marker().await?, replaced.is_some()));
            }
        }
    }

    /// The version of the marker if it is still `written`: read back rather than taken
    /// from the PUT's answer, which some S3-compatible servers word differently from a
    /// GET's (the compare-and-swap without `--shared` compares what a GET says).
    async fn written_marker(&self, written: &Marker) -> Result<Option<DocVersion>, BackendError> {
        Ok(match self.read_marker().await? {
            Some((m, v)) if m.run == written.run && m.seq == written.seq => Some(v),
            _ => None,
        })
    }

    /// Which of `digests` (repeats dropped, in order) are stored, the stored ones
    /// recorded as confirmed in the bucket before this returns, so no gc through any
    /// process deletes them within its grace period (see the module's comment).
    pub(super) async fn find_confirmed(
        &self,
        digests: Vec<Digest>,
    ) -> Result<Vec<(Digest, bool)>, BackendError> {
        let before = self.read_marker().await?;
        let before = if sweeping(&before) {
            self.outwait(before).await?.0
        } else {
            before
        };
        let mut found = self.find(digests).await?;
        let present: Vec<Digest> = found.iter().filter(|(_, h)| *h).map(|(d, _)| *d).collect();
        if present.is_empty() {
            return Ok(found);
        }
        self.write_confirmation(&present).await?;
        let mut after = self.read_marker().await?;
        if sweeping(&after) {
            after = self.outwait(after).await?.0;
        }
        if version(&after) == version(&before) {
            return Ok(found);
        }
        // A gc ran a batch meanwhile; every later batch reads the confirmation, so what
        // is stored now stays.
        let still: HashSet<Digest> = self
            .find(present)
            .await?
            .into_iter()
            .filter_map(|(d, here)| here.then_some(d))
            .collect();
        for (d, here) in &mut found {
            *here = *here && still.contains(d);
        }
        Ok(found)
    }

    /// Writes one confirmation document naming `digests`.
    async fn write_confirmation(&self, digests: &[Digest]) -> Result<(), BackendError> {
        let name = format!(
            "{CONFIRMED}/{:016x}{:016x}.json",
            random_u64(),
            random_u64()
        );
        let key = self.doc_key(&name);
        let body: Vec<String> = digests.iter().map(Digest::to_string).collect();
        self.store
            .put(&key, PutPayload::from(to_json(&body)))
            .await
            .map_err(object_err("writing", &key))?;
        Ok(())
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A gc run's hold on the marker.
pub(super) struct GcRun<'a> {
    backend: &'a ObjectBackend,
    marker: Marker,
    version: DocVersion,
    /// When the marker was last written (this process's monotonic clock).
    written: Instant,
    /// The bucket's time when the run started.
    pub(super) started: SystemTime,
    /// Confirmation documents read so far: their digests and when they were written.
    read: HashMap<ObjectPath, (SystemTime, Vec<Digest>)>,
}

impl<'a> GcRun<'a> {
    /// Takes the marker for a new run: at once when it is `idle` (or absent); when
    /// another run holds it, only once that one has left it unchanged for
    /// [`GC_STALE`]; while it goes on, an error.
    pub(super) async fn start(backend: &'a ObjectBackend) -> Result<GcRun<'a>, BackendError> {
        let run = format!("{:016x}", random_u64());
        for _ in 0..super::docs::CAS_ATTEMPTS {
            let seen = backend.read_marker().await?;
            let (seq, expected) = match &seen {
                None => (0, None),
                Some((m, v)) if m.phase == Phase::Idle => (m.seq + 1, Some(v.clone())),
                Some((m, _)) => {
                    let held = m.run.clone();
                    let (after, replaced) = backend.outwait(seen.clone()).await?;
                    let finished = matches!(&after, Some((m, _)) if m.phase == Phase::Idle);
                    if replaced || finished {
                        continue;
                    }
                    return Err(BackendError::GcRunning(format!(
                        "a gc (run {held}) is running through another store process"
                    )));
                }
            };
            let marker = Marker {
                run: run.clone(),
                seq,
                phase: Phase::Open,
            };
            if backend
                .put_doc_if(MARKER, to_json(&marker), expected.as_ref())
                .await?
                .is_none()
            {
                continue;
            }
            let Some(version) = backend.written_marker(&marker).await? else {
                continue;
            };
            let started = backend.marker_time().await?;
            return Ok(GcRun {
                backend,
                marker,
                version,
                written: Instant::now(),
                started,
                read: HashMap::new(),
            });
        }
        Err(BackendError::GcRunning(
            "the gc marker kept changing under this gc's start".into(),
        ))
    }

    /// Writes the marker in `phase`; fails when another process replaced it.
    async fn set(&mut self, phase: Phase) -> Result<(), BackendError> {
        let next = Marker {
            run: self.marker.run.clone(),
            seq: self.marker.seq + 1,
            phase,
        };
        let written = self
            .backend
            .put_doc_if(MARKER, to_json(&next), Some(&self.version))
            .await?;
        let version = match written {
            Some(_) => self.backend.written_marker(&next).await?,
            None => None,
        };
        let Some(version) = version else {
            return Err(BackendError::GcRunning(format!(
                "gc run {} lost its marker (taken for dead after {} s without a change); it \
                 stopped, another may run",
                self.marker.run,
                GC_STALE.as_secs()
            )));
        };
        self.marker = next;
        self.version = version;
        self.written = Instant::now();
        Ok(())
    }

    /// Rewrites the `open` marker if it was last written [`GC_RENEW`] ago.
    pub(super) async fn renew(&mut self) -> Result<(), BackendError> {
        if self.written.elapsed() >= GC_RENEW {
            self.set(Phase::Open).await?;
        }
        Ok(())
    }

    /// Begins a batch: the marker `sweeping`, then every confirmation written since
    /// `cutoff`. The digests confirmed since then.
    pub(super) async fn begin_batch(
        &mut self,
        cutoff: SystemTime,
    ) -> Result<HashSet<Digest>, BackendError> {
        self.set(Phase::Sweeping).await?;
        let docs = self.confirmation_docs().await?;
        for meta in docs {
            let at: SystemTime = meta.last_modified.into();
            if at <= cutoff || self.read.contains_key(&meta.location) {
                continue;
            }
            let Some(bytes) = self.backend.get_optional(&meta.location).await? else {
                continue;
            };
            let digests: Vec<String> = serde_json::from_slice(&bytes).unwrap_or_default();
            let digests = digests.iter().filter_map(|d| d.parse().ok()).collect();
            self.read.insert(meta.location, (at, digests));
        }
        Ok(self
            .read
            .values()
            .filter(|(at, _)| *at > cutoff)
            .flat_map(|(_, d)| d.iter().copied())
            .collect())
    }

    /// Whether this batch may still start deletes.
    pub(super) fn may_delete(&self) -> bool {
        self.written.elapsed() < GC_HOLD
    }

    /// Ends a batch: the marker `open` again.
    pub(super) async fn end_batch(&mut self) -> Result<(), BackendError> {
        self.set(Phase::Open).await
    }

    /// Deletes confirmations older than `cutoff` and [`CONFIRMATION_KEEP`] (they
    /// protect nothing any more) and leaves the marker `idle`.
    pub(super) async fn finish(mut self, cutoff: SystemTime) -> Result<(), BackendError> {
        let floor = self
            .started
            .checked_sub(CONFIRMATION_KEEP)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let expired = cutoff.min(floor);
        for meta in self.confirmation_docs().await? {
            if SystemTime::from(meta.last_modified) <= expired {
                match self.backend.store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(object_err("deleting", &meta.location)(e)),
                }
            }
        }
        self.set(Phase::Idle).await
    }

    /// Leaves the marker `idle` after a failed run (best effort: a marker left behind
    /// is replaced once stale).
    pub(super) async fn abandon(mut self) {
        if let Err(e) = self.set(Phase::Idle).await {
            tracing::warn!(error = %e, "releasing the gc marker after a failed run");
        }
    }

    pub(super) const BATCH: usize = GC_BATCH;

    async fn confirmation_docs(&self) -> Result<Vec<ObjectMeta>, BackendError> {
        let dir = self.backend.doc_key(CONFIRMED);
        self.backend
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(object_err("listing", &dir))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use object_store::memory::InMemory;

    use super::*;

    async fn with_chunk(body: &'static [u8]) -> (Arc<ObjectBackend>, Digest) {
        let b = Arc::new(ObjectBackend::new(Arc::new(InMemory::new()), "p"));
        let piece = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(body))]);
        b.put_chunk(Digest::of(body), piece).await.unwrap();
        (b, Digest::of(body))
    }

    #[tokio::test]
    async fn a_confirmation_while_gc_lists_is_read_by_its_next_batch() {
        let (b, x) = with_chunk(b"leftover").await;
        let mut run = GcRun::start(&b).await.unwrap();
        let found = b.find_confirmed(vec![x]).await.unwrap();
        assert_eq!(found, vec![(x, true)]);
        let confirmed = run.begin_batch(SystemTime::UNIX_EPOCH).await.unwrap();
        assert!(confirmed.contains(&x), "the batch sees the confirmation");
        run.end_batch().await.unwrap();
        run.finish(SystemTime::UNIX_EPOCH).await.unwrap();
    }

    #[tokio::test]
    async fn a_confirmation_during_a_sweep_waits_for_it_and_sees_its_deletes() {
        let (b, x) = with_chunk(b"leftover").await;
        let mut run = GcRun::start(&b).await.unwrap();
        let confirmed = run.begin_batch(SystemTime::UNIX_EPOCH).await.unwrap();
        assert!(confirmed.is_empty());
        let asking = {
            let b = b.clone();
            tokio::spawn(async move { b.find_confirmed(vec![x]).await.unwrap() })
        };
        // The batch deletes x while the confirmation waits for it to end.
        tokio::time::sleep(MARKER_POLL * 3).await;
        assert!(!asking.is_finished(), "no answer while a batch sweeps");
        b.store.delete(&b.chunk_key(&x)).await.unwrap();
        run.end_batch().await.unwrap();
        assert_eq!(asking.await.unwrap(), vec![(x, false)], "x is missing");
        run.finish(SystemTime::UNIX_EPOCH).await.unwrap();
    }

    #[tokio::test]
    async fn a_second_gc_is_refused_while_one_runs() {
        let (b, _) = with_chunk(b"leftover").await;
        let mut run = GcRun::start(&b).await.unwrap();
        let second = {
            let b = b.clone();
            tokio::spawn(async move { GcRun::start(&b).await.map(|_| ()) })
        };
        // The running gc's marker changes (a batch), so the second is refused.
        tokio::time::sleep(MARKER_POLL * 2).await;
        run.begin_batch(SystemTime::UNIX_EPOCH).await.unwrap();
        let refused = second.await.unwrap();
        assert!(
            matches!(refused, Err(BackendError::GcRunning(_))),
            "{refused:?}"
        );
        run.end_batch().await.unwrap();
        run.finish(SystemTime::UNIX_EPOCH).await.unwrap();
        // Once it is idle, a new run starts at once.
        GcRun::start(&b)
            .await
            .unwrap()
            .finish(SystemTime::UNIX_EPOCH)
            .await
            .unwrap();
    }
}
