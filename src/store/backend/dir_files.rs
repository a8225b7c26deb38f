//! The directory engine's file work, shared by its parts (the engine, gc, scrub, the
//! documents): crash-safe writes and removes, the chunks lock and touch that keep a
//! confirmed chunk from a concurrent gc, and the blocking pool that all disk work runs on.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use lazyblk_cache::encoding::StoredVerifier;
use lazyblk_cache::Digest;

use super::{BackendError, MAX_CHUNK_BODY};

/// The lock file of the chunks (see [`chunks_lock`]), beside `chunks/`.
const CHUNKS_LOCK: &str = "chunks.lock";

pub(super) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> BackendError + 'a {
    move |source| BackendError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Ids of the manifests in `dir`, sorted.
pub(super) fn template_ids(dir: &Path) -> Result<Vec<String>, BackendError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if lazyblk_cache::validate_id(id).is_ok() {
            ids.push(id.to_string());
        }
    }
    ids.sort();
    Ok(ids)
}

/// Reads a whole file; `None` when it does not exist.
pub(super) async fn read_optional(path: PathBuf) -> Result<Option<Vec<u8>>, BackendError> {
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// Writes `bytes` to `dest` crash-safely: a temporary file in `tmp`, fsync, rename,
/// fsync of `dest`'s directory.
pub(super) fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8]) -> Result<(), BackendError> {
    lazyblk_cache::durable::write_file_via(tmp, dest, bytes).map_err(io_err("writing", dest))
}

/// Writes `bytes` to `dir/name` crash-safely, the temporary file in `dir` itself
/// (created if missing).
pub(super) fn write_atomic_in(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BackendError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    write_atomic(dir, &dir.join(name), bytes)
}

/// Removes `path` if it exists, durably ([`lazyblk_cache::durable::remove_file`]).
pub(super) fn remove_if_there(path: &Path) -> Result<(), BackendError> {
    lazyblk_cache::durable::remove_file(path)
        .map(|_| ())
        .map_err(io_err("removing", path))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    lazyblk_cache::durable::sync_dir(dir).map_err(io_err("syncing directory", dir))
}

pub(super) fn sync_parent(path: &Path) -> Result<(), BackendError> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// The sha256 of a stored file's bytes.
pub(super) fn file_is_chunk(path: &Path, digest: &Digest) -> io::Result<bool> {
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut verifier = StoredVerifier::new(MAX_CHUNK_BODY);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return match verifier.finish(digest) {
                Ok(_) => Ok(true),
                // Nothing is known of the bytes: not a reason to delete them.
                Err(lazyblk_cache::encoding::DecodeError::Unavailable(e)) => {
                    Err(io::Error::other(e))
                }
                Err(_) => Ok(false),
            };
        }
        verifier.update(&buf[..n]);
    }
}

/// Removes everything in `dir` (leftover temporary files of a crashed write).
pub(super) fn clear_dir(dir: &Path) -> Result<(), BackendError> {
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let path = entry.map_err(io_err("listing", dir))?.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err("removing", &path))?;
    }
    Ok(())
}

/// Runs disk work on the blocking pool.
pub(super) async fn blocking<T, F>(f: F) -> Result<T, BackendError>
where
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Task(e.to_string()))?
}

/// Sets a chunk's mtime to now, the file system's time rather than this process's
/// clock (which may be off): gc keeps chunks touched within its grace period and takes
/// its own "now" from the file system too. A truncate to the file's own length sets
/// the time as a write does, without changing a byte; where the file cannot be opened
/// for writing, the time is set explicitly. A failure only weakens the protection, so
/// it is logged, not returned.
pub(super) fn touch(path: &Path) {
    use nix::sys::time::TimeSpec;
    let by_truncate = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.metadata().and_then(|m| f.set_len(m.len())));
    if by_truncate.is_ok() {
        return;
    }
    let touched = fs::File::open(path).and_then(|f| {
        nix::sys::stat::futimens(&f, &TimeSpec::UTIME_OMIT, &TimeSpec::UTIME_NOW)
            .map_err(io::Error::from)
    });
    if let Err(e) = touched {
        tracing::debug!("touching {}: {e}", path.display());
    }
}

/// The lock every process serving this directory takes around "is the chunk there?
/// touch it" (shared) and gc around "is it still old? delete it" (exclusive), so no
/// chunk confirmed to a publisher by one process is deleted by another's gc. The
/// kernel releases it when its holder dies.
pub(super) fn chunks_lock(
    root: &Path,
    exclusive: bool,
) -> Result<nix::fcntl::Flock<fs::File>, BackendError> {
    let path = root.join(CHUNKS_LOCK);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    let how = if exclusive {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockShared
    };
    nix::fcntl::Flock::lock(file, how).map_err(|(_, e)| io_err("locking", &path)(e.into()))
}
