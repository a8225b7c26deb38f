//! Dead mounts: a FUSE mount whose daemon was killed stays in the mount table, and
//! every access to it fails with ENOTCONN ("Transport endpoint is not connected")
//! until it is detached. [`clear_stale_mount`] detaches it so the next daemon can
//! mount there again.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use nix::mount::MntFlags;
use tracing::warn;

use crate::error::FuseError;

/// This process's view of the mount table.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The setuid helper that detaches a FUSE mount for a user who may not umount.
const FUSERMOUNT: &str = "fusermount3";

/// How many dead mounts stacked on one directory are detached before giving up: a
/// daemon killed in a restart loop can leave a few; more means something keeps
/// mounting there.
const MAX_STACKED_MOUNTS: usize = 8;

/// A stale mount at `dir` left by a killed process ("Transport endpoint is not
/// connected"): detach it (lazy unmount); no-op when dir is not a mount.
///
/// A live mount at `dir` (another daemon still serving it, or anything else mounted
/// there) is left alone and reported as [`FuseError::AlreadyMounted`], since mounting
/// on top of it would hide it.
pub fn clear_stale_mount(dir: &Path) -> Result<(), FuseError> {
    for _ in 0..MAX_STACKED_MOUNTS {
        let state = probe(dir).map_err(|source| FuseError::Inspect {
            dir: dir.to_path_buf(),
            source,
        })?;
        match state {
            DirState::Missing => return Ok(()),
            DirState::Present => return refuse_live_mount(dir),
            DirState::Disconnected => {
                detach_lazily(dir)?;
                warn!(dir = %dir.display(), "detached a stale FUSE mount left by a killed process");
            }
        }
    }
    Err(FuseError::Detach {
        dir: dir.to_path_buf(),
        source: io::Error::other(format!(
            "still not connected after detaching {MAX_STACKED_MOUNTS} mounts"
        )),
    })
}

/// What a path holds, as far as mounting there is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DirState {
    /// Nothing by that name.
    Missing,
    /// A FUSE mount whose daemon is gone.
    Disconnected,
    /// Something that answers: a directory, a file, a live mount.
    Present,
}

/// Looks at `dir` with statfs(2), which FUSE always sends to the daemon. A stat
/// would not do: the kernel answers it from cached attributes for up to their TTL
/// after the daemon died.
pub(crate) fn probe(dir: &Path) -> io::Result<DirState> {
    match nix::sys::statfs::statfs(dir) {
        Ok(_) => Ok(DirState::Present),
        Err(nix::errno::Errno::ENOENT) => Ok(DirState::Missing),
        Err(nix::errno::Errno::ENOTCONN) => Ok(DirState::Disconnected),
        Err(errno) => Err(errno.into()),
    }
}

/// Detaches the mount at `dir` now; the kernel ends it when its last user closes it.
pub(crate) fn detach_lazily(dir: &Path) -> Result<(), FuseError> {
    match nix::mount::umount2(dir, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        // Not root: the setuid helper may still detach a FUSE mount of ours.
        Err(nix::errno::Errno::EPERM) => detach_with_fusermount(dir),
        Err(errno) => Err(FuseError::Detach {
            dir: dir.to_path_buf(),
            source: errno.into(),
        }),
    }
}

fn detach_with_fusermount(dir: &Path) -> Result<(), FuseError> {
    let detach_error = |source| FuseError::Detach {
        dir: dir.to_path_buf(),
        source,
    };
    let output = Command::new(FUSERMOUNT)
        .args(["-u", "-z", "--"])
        .arg(dir)
        .output()
        .map_err(detach_error)?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(detach_error(io::Error::other(format!(
        "{FUSERMOUNT} -uz: {}",
        stderr.trim()
    ))))
}

/// Ok when nothing is mounted at `dir`; the top mount there otherwise.
fn refuse_live_mount(dir: &Path) -> Result<(), FuseError> {
    let path = dir.canonicalize().map_err(|source| FuseError::Inspect {
        dir: dir.to_path_buf(),
        source,
    })?;
    let table = fs::read_to_string(MOUNTINFO).map_err(|source| FuseError::MountTable {
        path: MOUNTINFO,
        source,
    })?;
    match crate::mountinfo::top_mount_at(&table, &path) {
        None => Ok(()),
        Some(entry) => Err(FuseError::AlreadyMounted {
            dir: dir.to_path_buf(),
            fstype: entry.fstype,
            mount_source: entry.source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_not_a_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert!(clear_stale_mount(&dir.path().join("absent")).is_ok());
        assert!(clear_stale_mount(dir.path()).is_ok());
    }
}
