//! Crash-safe files: the one way the node's and the store's state reach the disk.
//! A file is written whole to a temporary name, fsynced, renamed over its name and its
//! directory fsynced, so a crash at any moment leaves either the old file or the new
//! one, never a part (and a kept rename). Temporary files end in `.tmp`; readers of a
//! state directory drop those they find at start.
//!
//! Used by every file of the node's state (`lazyblk`'s `daemon::node_state`: saved
//! manifests, commit intents, the node's key, the fleet wishes, the kernel devices'
//! record), overlay metadata, and the store's directory backend (manifests, traces,
//! the membership and lease documents). Two writers keep a path of their own, for
//! chunks only, and sync directories here: the chunk cache (a chunk is hashed as it
//! is written in pieces, and the fsyncs of a fill's chunks are batched) and the
//! store's chunk upload (the body is streamed from the network to disk).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` crash-safely, the temporary file beside it.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_file_mode(path, bytes, 0o644)
}

/// [`write_file`] with the file's permission bits (0600 for a key).
pub fn write_file_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    write_via(&dir, path, bytes, mode)
}

/// Writes `bytes` to `path` crash-safely, the temporary file in `tmp_dir` (on the
/// same file system: a store keeps its temporary files apart from what it lists).
pub fn write_file_via(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via(tmp_dir, path, bytes, 0o644)
}

/// Removes `path` durably; a file already gone is not an error. True when it was there.
pub fn remove_file(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(&parent(path)).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn write_via(tmp_dir: &Path, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temporary_name(tmp_dir, path);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(&parent(path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// A name in `dir` no other writer (thread or process) uses at the same time.
fn temporary_name(dir: &Path, path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two, longer");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
        assert!(remove_file(&path).unwrap());
        assert!(!remove_file(&path).unwrap());
    }

    #[test]
    fn a_key_gets_its_mode_and_a_failed_write_leaves_the_old_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_file_mode(&path, b"secret", 0o600).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A temporary directory that does not exist: the write fails, the file stays.
        let err = write_file_via(&dir.path().join("absent"), &path, b"other");
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }
}
