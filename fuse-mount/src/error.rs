//! The crate's error type: what went wrong with a mount, and at which directory.

use std::io;
use std::path::PathBuf;

/// Why mounting, unmounting or clearing a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mount point could not be created.
    #[error("cannot create mount point {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    /// The mount point is a dead FUSE mount left by a killed process.
    #[error(
        "{} is a stale mount left by a killed process (transport endpoint is not \
         connected); call clear_stale_mount first",
        dir.display()
    )]
    StaleMount { dir: PathBuf },
    /// The kernel refused the mount or the FUSE handshake failed.
    #[error("cannot mount the FUSE filesystem at {}: {source}", dir.display())]
    Mount { dir: PathBuf, source: io::Error },
    /// A mount kept by an earlier process could not be taken over.
    #[error("cannot take over the FUSE mount at {} from the previous daemon: {source}", dir.display())]
    Adopt { dir: PathBuf, source: io::Error },
    /// The thread that serves the kernel's requests could not be started.
    #[error("cannot start the FUSE session thread for {}: {source}", dir.display())]
    SpawnSession { dir: PathBuf, source: io::Error },
    /// The kernel refused the unmount for a reason other than the mount being busy.
    #[error("cannot unmount {}: {source}", dir.display())]
    Unmount { dir: PathBuf, source: io::Error },
    /// The mount was in use (an open file or a loop device), so it was detached
    /// lazily: the path is free now, and the kernel ends the mount when its last
    /// user closes it.
    #[error(
        "{} was busy (open files or loop devices); detached lazily, the mount ends \
         when its last user closes it",
        dir.display()
    )]
    DetachedBusy { dir: PathBuf },
    /// The session thread ended with an error or panicked.
    #[error("the FUSE session at {} ended with an error: {source}", dir.display())]
    Session { dir: PathBuf, source: io::Error },
    /// The directory could not be examined.
    #[error("cannot inspect {}: {source}", dir.display())]
    Inspect { dir: PathBuf, source: io::Error },
    /// The mount table could not be read.
    #[error("cannot read the mount table {path}: {source}")]
    MountTable {
        path: &'static str,
        source: io::Error,
    },
    /// Something is mounted and alive at the directory, so it is not stale.
    #[error(
        "{} is already a live mount ({fstype} from {mount_source}); is another daemon \
         serving it?",
        dir.display()
    )]
    AlreadyMounted {
        dir: PathBuf,
        fstype: String,
        mount_source: String,
    },
    /// Detaching a stale mount failed.
    #[error("cannot detach the stale mount at {}: {source}", dir.display())]
    Detach { dir: PathBuf, source: io::Error },
}
