//! Small documents the store keeps for its control plane (the template center's desired
//! state, tombstones, members, the replicas' lease views): `center/<name>` beside
//! manifests and chunks, each changed by compare-and-swap so any number of store
//! servers can share one bucket (DESIGN section 10).
//!
//! A document has a version: its ETag (and object version) in object storage, the
//! sha256 of its bytes in a directory. [`Backend::put_doc_if`] writes only when the
//! stored version is still the one the caller read (or, for a new document, when there
//! is none), and [`Backend::update_doc`] is the read, change, write-if-unchanged loop
//! every caller uses, retried on conflict with jitter up to [`CAS_ATTEMPTS`] times.
//!
//! How each engine keeps the precondition:
//! - A directory: an exclusive `flock` on `center/.lock` around "compare the version,
//!   write a temporary file, rename it into place"; store servers on one machine (or
//!   one NFS-less shared disk) over one root are serialized by it.
//! - Object storage in shared mode (`--shared`): the bucket's own conditional PUT
//!   (`If-None-Match: *` to create, `If-Match: ETAG` to update), which
//!   [`Backend::probe_conditional_writes`] checks at start.
//! - Object storage otherwise (one store server per bucket): "read the ETag, compare,
//!   write" under a lock of this process, so a bucket that ignores the headers still
//!   works for a single server.

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use sha2::{Digest as _, Sha256};

use super::dir::DirBackend;
use super::dir_files::{io_err, read_optional, write_atomic_in};
use super::object::{object_err, ObjectBackend};
use super::{Backend, BackendError};

/// The folder (or key prefix) of the documents.
const DOCS: &str = "center";
/// The lock file of a directory's documents.
const DIR_LOCK: &str = ".lock";
/// Tries of one read-change-write before it gives up (503): enough for dozens of
/// writers changing one document at once, bounded so a request always ends.
pub const CAS_ATTEMPTS: u32 = 40;
/// The longest wait between two tries; each try waits a random time up to
/// min(2^try ms, this), so colliding writers spread out instead of colliding again.
const CAS_MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Failed requests to the bucket one update survives (each tried again from a fresh
/// read): a bucket under load answers some with 503 after the client's own retries.
const TRANSIENT_RETRIES: u32 = 8;

/// Why one try of an update failed.
enum Failed<E> {
    Backend(BackendError),
    Change(E),
}

/// A stored document's version: what a conditional write compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocVersion {
    e_tag: Option<String>,
    version: Option<String>,
}

/// What [`Backend::update_doc`]'s change function decides.
pub enum DocChange<T> {
    /// Leave the document as it is.
    Keep(T),
    /// Write these bytes (if nobody changed the document since it was read).
    Write(Vec<u8>, T),
}

impl Backend {
    /// The document `name`, if stored.
    pub async fn doc(&self, name: &str) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.doc_versioned(name).await?.map(|(bytes, _)| bytes))
    }

    /// The document `name` and its version, if stored.
    pub async fn doc_versioned(
        &self,
        name: &str,
    ) -> Result<Option<(Vec<u8>, DocVersion)>, BackendError> {
        match self {
            Backend::Dir(d) => d.doc(name).await,
            Backend::Object(o) => o.doc(name).await,
        }
    }

    /// Writes `bytes` as document `name` only if its version is still `expected`
    /// (`None`: only if it does not exist). The new version, or `None` on a conflict.
    pub async fn put_doc_if(
        &self,
        name: &str,
        bytes: Vec<u8>,
        expected: Option<&DocVersion>,
    ) -> Result<Option<DocVersion>, BackendError> {
        match self {
            Backend::Dir(d) => d.put_doc_if(name, bytes, expected).await,
            Backend::Object(o) => o.put_doc_if(name, bytes, expected).await,
        }
    }

    /// Stores (or replaces) a document only this server writes (its lease view).
    pub async fn put_own_doc(&self, name: &str, bytes: Vec<u8>) -> Result<(), BackendError> {
        match self {
            Backend::Dir(d) => {
                let path = d.root.join(DOCS).join(name);
                let (dir, file) = split(&path);
                super::dir_files::blocking(move || write_atomic_in(&dir, &file, &bytes)).await
            }
            Backend::Object(o) => {
                let key = o.doc_key(name);
                o.store
                    .put(&key, PutPayload::from(bytes))
                    .await
                    .map_err(object_err("writing", &key))?;
                Ok(())
            }
        }
    }

    /// Removes document `name` (whether or not it exists).
    pub async fn delete_doc(&self, name: &str) -> Result<(), BackendError> {
        match self {
            Backend::Dir(d) => {
                let path = d.root.join(DOCS).join(name);
                match tokio::fs::remove_file(&path).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(io_err("removing", &path)(e))
                    }
                    _ => Ok(()),
                }
            }
            Backend::Object(o) => {
                let key = o.doc_key(name);
                match o.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(object_err("deleting", &key)(e)),
                }
            }
        }
    }

    /// The documents in folder `dir` (`wishes`): each name (`wishes/x.json`) with a
    /// version when the listing tells it cheaply (an ETag; `None` in a directory).
    pub async fn list_docs(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, Option<DocVersion>)>, BackendError> {
        match self {
            Backend::Dir(d) => d.list_docs(dir).await,
            Backend::Object(o) => o.list_docs(dir).await,
        }
    }

    /// Reads document `name`, lets `change` decide from its bytes, and writes the result
    /// only if nobody changed the document meanwhile; on a conflict, reads again and
    /// retries (up to [`CAS_ATTEMPTS`], with jittered backoff).
    pub async fn update_doc<T, E>(
        &self,
        name: &str,
        mut change: impl FnMut(Option<&[u8]>) -> Result<DocChange<T>, E>,
    ) -> Result<T, E>
    where
        E: From<BackendError>,
    {
        let mut failures = 0;
        for attempt in 0..CAS_ATTEMPTS {
            match self.try_update(name, &mut change).await {
                Ok(Some(out)) => return Ok(out),
                Ok(None) => {
                    tracing::debug!(
                        doc = name,
                        attempt,
                        "document changed meanwhile; reading it again"
                    )
                }
                // The bucket failed a request (503 under load, a 409 it made up): the
                // change is computed again from a fresh read, so trying again is safe.
                Err(Failed::Backend(e @ BackendError::Object { .. }))
                    if failures < TRANSIENT_RETRIES =>
                {
                    failures += 1;
                    tracing::info!(doc = name, error = %e, "updating a document; trying again");
                }
                Err(Failed::Backend(e)) => return Err(e.into()),
                Err(Failed::Change(e)) => return Err(e),
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(BackendError::Contended {
            doc: format!("{DOCS}/{name}"),
            attempts: CAS_ATTEMPTS,
        }
        .into())
    }

    /// One read, change and conditional write: `None` when the document changed
    /// meanwhile.
    async fn try_update<T, E>(
        &self,
        name: &str,
        change: &mut impl FnMut(Option<&[u8]>) -> Result<DocChange<T>, E>,
    ) -> Result<Option<T>, Failed<E>> {
        let current = self.doc_versioned(name).await.map_err(Failed::Backend)?;
        let (bytes, version) = match &current {
            Some((b, v)) => (Some(b.as_slice()), Some(v)),
            None => (None, None),
        };
        match change(bytes).map_err(Failed::Change)? {
            DocChange::Keep(out) => Ok(Some(out)),
            DocChange::Write(new, out) => Ok(self
                .put_doc_if(name, new, version)
                .await
                .map_err(Failed::Backend)?
                .map(|_| out)),
        }
    }

    /// Whether the backend honours conditional writes (shared mode needs them): a
    /// create of an existing object must fail, an update with a stale version must
    /// fail. An error that names what it does not honour when it does not.
    pub async fn probe_conditional_writes(&self) -> Result<(), BackendError> {
        let name = format!("probe/{:016x}.json", random_u64());
        let refuse = |reason: &str| BackendError::Config {
            url: self.describe(),
            reason: format!(
                "it does not honour conditional writes ({reason}); several store servers \
                 (--shared) would lose each other's updates over it. Run one store server \
                 without --shared, or use a backend that does (AWS S3, GCS, Azure Blob, a \
                 directory)"
            ),
        };
        let first = self
            .put_doc_if(&name, b"1".to_vec(), None)
            .await?
            .ok_or_else(|| refuse("creating a new object was refused"))?;
        let outcome = async {
            if self.put_doc_if(&name, b"2".to_vec(), None).await?.is_some() {
                return Err(refuse("a create of an existing object succeeded"));
            }
            let second = self
                .put_doc_if(&name, b"3".to_vec(), Some(&first))
                .await?
                .ok_or_else(|| refuse("an update with the current version was refused"))?;
            if self
                .put_doc_if(&name, b"4".to_vec(), Some(&first))
                .await?
                .is_some()
            {
                return Err(refuse("an update with a stale version succeeded"));
            }
            let _ = second;
            Ok(())
        }
        .await;
        self.delete_doc(&name).await?;
        outcome
    }

    fn describe(&self) -> String {
        match self {
            Backend::Dir(d) => d.root.display().to_string(),
            Backend::Object(o) => format!("object storage under {:?}", o.prefix.as_ref()),
        }
    }
}

/// The wait before try `attempt + 1`: random, up to min(2^attempt ms, [`CAS_MAX_BACKOFF`]).
fn backoff(attempt: u32) -> Duration {
    let cap = (1u64 << attempt.min(16)).min(CAS_MAX_BACKOFF.as_millis() as u64);
    Duration::from_millis(1 + random_u64() % cap.max(1))
}

/// A random number from the standard library's per-process random hasher keys.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// `path`'s directory and file name.
fn split(path: &Path) -> (std::path::PathBuf, String) {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, file)
}

fn content_version(bytes: &[u8]) -> DocVersion {
    DocVersion {
        e_tag: Some(hex::encode(Sha256::digest(bytes))),
        version: None,
    }
}

impl DirBackend {
    async fn doc(&self, name: &str) -> Result<Option<(Vec<u8>, DocVersion)>, BackendError> {
        let bytes = read_optional(self.root.join(DOCS).join(name)).await?;
        Ok(bytes.map(|b| {
            let v = content_version(&b);
            (b, v)
        }))
    }

    async fn put_doc_if(
        &self,
        name: &str,
        bytes: Vec<u8>,
        expected: Option<&DocVersion>,
    ) -> Result<Option<DocVersion>, BackendError> {
        let docs = self.root.join(DOCS);
        let path = docs.join(name);
        let expected = expected.cloned();
        super::dir_files::blocking(move || {
            std::fs::create_dir_all(&docs).map_err(io_err("creating", &docs))?;
            let lock_path = docs.join(DIR_LOCK);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io_err("opening", &lock_path))?;
            // Held until the end of this block: every writer of these documents, in
            // this process or another, compares and writes under it.
            let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| io_err("locking", &lock_path)(e.into()))?;
            let current = match std::fs::read(&path) {
                Ok(b) => Some(content_version(&b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("reading", &path)(e)),
            };
            if current != expected {
                return Ok(None);
            }
            let (dir, file) = split(&path);
            let version = content_version(&bytes);
            write_atomic_in(&dir, &file, &bytes)?;
            Ok(Some(version))
        })
        .await
    }

    async fn list_docs(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, Option<DocVersion>)>, BackendError> {
        let path = self.root.join(DOCS).join(dir);
        let mut entries = match tokio::fs::read_dir(&path).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &path)(e)),
        };
        let mut out = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(io_err("listing", &path))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporary files of a write in progress start with a dot.
            if name.ends_with(".json") && !name.starts_with('.') {
                out.push((format!("{dir}/{name}"), None));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

impl ObjectBackend {
    pub(super) fn doc_key(&self, name: &str) -> ObjectPath {
        let mut key = self.prefix.clone().join(DOCS);
        for part in name.split('/') {
            key = key.join(part);
        }
        key
    }

    pub(super) async fn doc(
        &self,
        name: &str,
    ) -> Result<Option<(Vec<u8>, DocVersion)>, BackendError> {
        let key = self.doc_key(name);
        let result = match self.store.get(&key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(object_err("reading", &key)(e)),
        };
        let version = DocVersion {
            e_tag: result.meta.e_tag.clone(),
            version: result.meta.version.clone(),
        };
        let bytes = result.bytes().await.map_err(object_err("reading", &key))?;
        Ok(Some((bytes.to_vec(), version)))
    }

    pub(super) async fn put_doc_if(
        &self,
        name: &str,
        bytes: Vec<u8>,
        expected: Option<&DocVersion>,
    ) -> Result<Option<DocVersion>, BackendError> {
        let key = self.doc_key(name);
        if !self.conditional() {
            // One server per bucket: compare and write under this process's lock.
            let _guard = self.docs_lock.lock().await;
            let current = self.doc(name).await?.map(|(_, v)| v);
            if current.as_ref() != expected {
                return Ok(None);
            }
            let put = self
                .store
                .put(&key, PutPayload::from(bytes))
                .await
                .map_err(object_err("writing", &key))?;
            return Ok(Some(DocVersion {
                e_tag: put.e_tag,
                version: put.version,
            }));
        }
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion {
                e_tag: v.e_tag.clone(),
                version: v.version.clone(),
            }),
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(bytes), options)
            .await
        {
            Ok(put) => Ok(Some(DocVersion {
                e_tag: put.e_tag,
                version: put.version,
            })),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(None),
            // An update of an object someone deleted meanwhile.
            Err(object_store::Error::NotFound { .. }) if expected.is_some() => Ok(None),
            Err(e) => Err(object_err("writing", &key)(e)),
        }
    }

    async fn list_docs(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, Option<DocVersion>)>, BackendError> {
        use futures::TryStreamExt;
        let prefix = self.doc_key(dir);
        let docs = self.prefix.clone().join(DOCS);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(object_err("listing", &prefix))?;
        let mut out: Vec<(String, Option<DocVersion>)> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.prefix_match(&docs)?;
                let name: Vec<String> = name.map(|p| p.as_ref().to_string()).collect();
                let name = name.join("/");
                name.ends_with(".json").then(|| {
                    let v = DocVersion {
                        e_tag: m.e_tag,
                        version: m.version,
                    };
                    (name, Some(v))
                })
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
