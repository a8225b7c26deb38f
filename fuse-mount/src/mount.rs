//! Mounting and unmounting: [`mount`] starts a FUSE session at a directory and
//! returns the [`Mount`] that ends it; [`adopt`] goes on serving a mount an earlier
//! process made and kept ([`KeptSession`]).

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::adopt::session_on_live_fd;
use crate::error::FuseError;
use crate::fs::LazyFs;
use crate::record::{Recovered, SessionRecord};
use crate::stale::{detach_lazily, probe, DirState};
use lazyblk_image::Images;

/// The source name the mount table shows for the mount.
const FS_NAME: &str = "lazyblk";

/// Threads reading requests from the kernel, each on its own cloned `/dev/fuse`
/// descriptor. Dispatch is cheap (reads and writes are handed to the runtime), but a
/// thread copies each write's payload before handing it on; a few threads keep one
/// 1 MiB copy from delaying the reads queued behind it.
const SESSION_THREADS: usize = 4;

/// Background requests (readahead, async direct I/O) the kernel keeps in flight by
/// default: enough to keep many chunk fetches going at once for a cold sequential
/// read, where the kernel's own default (12) leaves the network idle between them.
const DEFAULT_MAX_BACKGROUND: u16 = 64;

/// The readahead window set on the mount, in KiB. The kernel's default of 128 KiB
/// cuts a sequential read (a boot, a loop device, `dd`) into 128 KiB requests; at
/// 1 MiB each readahead request is one whole default-sized chunk.
const READ_AHEAD_KB: u32 = 1024;

/// How long an unmount waits for the session threads to see the kernel end the
/// session. Longer means the superblock lives on in another mount namespace (a copy
/// made by a container runtime), which no wait here can end.
const SESSION_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an unmount checks whether the session threads have finished.
const SESSION_EXIT_POLL: Duration = Duration::from_millis(10);

/// How a mount is set up.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let users other than the one who mounted (say a jailed Firecracker) use the
    /// files: the kernel's `allow_other`. With `default_permissions` off there are
    /// no further permission checks, so every local user can then read templates and
    /// write sandboxes.
    pub allow_other: bool,
    /// How many background requests (readahead, async direct I/O) the kernel keeps
    /// in flight at once.
    pub max_background: u16,
    /// Serve the mount so that another process can take it over after this one dies
    /// ([`Mount::kept`], [`adopt`]): every session thread reads the one `/dev/fuse`
    /// descriptor that is kept (a cloned descriptor dies with its process, and the
    /// kernel fails the requests read through it), and inode numbers are recorded.
    pub keep_across_restarts: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            max_background: DEFAULT_MAX_BACKGROUND,
            keep_across_restarts: false,
        }
    }
}

/// What a later process needs to go on serving a mount: the `/dev/fuse` connection
/// and the session record (inode numbers, generation). Both stay valid after the
/// process that made them dies, for as long as someone (systemd's file descriptor
/// store) holds them.
#[derive(Debug)]
pub struct KeptSession {
    /// The `/dev/fuse` descriptor of the mount.
    pub fuse: OwnedFd,
    /// The session record, a memory file; None if it was lost (the later process
    /// then cannot reopen files opened before it started).
    pub record: Option<OwnedFd>,
}

impl KeptSession {
    /// Duplicates of both descriptors (the mount keeps its own).
    pub fn try_clone(&self) -> io::Result<KeptSession> {
        Ok(KeptSession {
            fuse: self.fuse.try_clone()?,
            record: self.record.as_ref().map(OwnedFd::try_clone).transpose()?,
        })
    }
}

/// Mounts the filesystem of `files` at `dir` (created if missing) and serves it on
/// background threads, running reads, writes and flushes on `runtime`.
pub fn mount<F: Images>(
    dir: &Path,
    files: Arc<F>,
    runtime: Handle,
    options: MountOptions,
) -> Result<Mount, FuseError> {
    prepare_dir(dir)?;
    let mount_error = |source| FuseError::Mount {
        dir: dir.to_path_buf(),
        source,
    };
    let mut filesystem = LazyFs::new(files, runtime, options.max_background);
    let mut record = None;
    if options.keep_across_restarts {
        let made = Arc::new(SessionRecord::create().map_err(mount_error)?);
        made.generation(0).map_err(mount_error)?;
        filesystem = filesystem.recorded(made.clone(), &Recovered::default(), 0);
        record = Some(made);
    }
    let mut session =
        Session::new(filesystem, dir, &session_config(&options)).map_err(mount_error)?;
    let kept = match &record {
        Some(record) => Some(KeptSession {
            fuse: session.as_fd().try_clone_to_owned().map_err(mount_error)?,
            record: Some(record.descriptor().map_err(mount_error)?),
        }),
        None => None,
    };
    let unmounter = Unmounter::Session(session.unmount_callable());
    // If the thread cannot start, the session is dropped with the closure, and
    // dropping it unmounts.
    let session = thread::Builder::new()
        .name("lazyblk-fuse".into())
        .spawn(move || session.run())
        .map_err(|source| FuseError::SpawnSession {
            dir: dir.to_path_buf(),
            source,
        })?;
    tune_read_ahead(dir);
    info!(dir = %dir.display(), "FUSE filesystem mounted");
    Ok(Mount {
        dir: dir.to_path_buf(),
        unmounter: Some(unmounter),
        session: Some(session),
        kept,
    })
}

/// Goes on serving the mount at `dir` that an earlier process made with
/// `keep_across_restarts` and kept as `kept`: the same connection, the same inode
/// numbers, and the handles the kernel holds still name the same files. Requests the
/// earlier process read but did not answer are asked for again (Linux 6.9 and later).
pub fn adopt<F: Images>(
    dir: &Path,
    kept: KeptSession,
    files: Arc<F>,
    runtime: Handle,
    options: MountOptions,
) -> Result<Mount, FuseError> {
    let adopt_error = |source| FuseError::Adopt {
        dir: dir.to_path_buf(),
        source,
    };
    let earlier = match kept.record {
        Some(fd) => SessionRecord::read_back(fd).map_err(adopt_error)?,
        None => {
            warn!(dir = %dir.display(), "no FUSE session record: files opened before the restart cannot be reopened");
            Recovered::default()
        }
    };
    let generation = earlier.generation.saturating_add(1);
    let record = Arc::new(fresh_record(&earlier, generation).map_err(adopt_error)?);
    let filesystem = LazyFs::new(files, runtime, options.max_background).recorded(
        record.clone(),
        &earlier,
        generation,
    );
    let options = MountOptions {
        keep_across_restarts: true,
        ..options
    };
    let session = session_on_live_fd(filesystem, kept.fuse, &session_config(&options))
        .map_err(adopt_error)?;
    let kept = KeptSession {
        fuse: session.as_fd().try_clone_to_owned().map_err(adopt_error)?,
        record: Some(record.descriptor().map_err(adopt_error)?),
    };
    let session = thread::Builder::new()
        .name("lazyblk-fuse".into())
        .spawn(move || session.run())
        .map_err(|source| FuseError::SpawnSession {
            dir: dir.to_path_buf(),
            source,
        })?;
    info!(dir = %dir.display(), generation, files = earlier.inodes.len(), "FUSE mount taken over from the previous daemon");
    Ok(Mount {
        dir: dir.to_path_buf(),
        unmounter: Some(Unmounter::Path),
        session: Some(session),
        kept: Some(kept),
    })
}

/// A new record holding only what `earlier` says is live, so that records do not
/// grow across restarts.
fn fresh_record(earlier: &Recovered, generation: u64) -> io::Result<SessionRecord> {
    let record = SessionRecord::create()?;
    record.generation(generation)?;
    record.next_ino(earlier.next_ino)?;
    let mut live: Vec<_> = earlier.inodes.iter().collect();
    live.sort_by_key(|(ino, _)| **ino);
    for (ino, (folder, name)) in live {
        record.issued(*ino, *folder, name)?;
    }
    Ok(record)
}

/// How a mount is ended.
#[derive(Debug)]
enum Unmounter {
    /// By the session that mounted it.
    Session(SessionUnmounter),
    /// By path: a mount taken over from an earlier process.
    Path,
}

impl Unmounter {
    fn unmount(&mut self, dir: &Path) -> io::Result<()> {
        match self {
            Unmounter::Session(unmounter) => unmounter.unmount(),
            Unmounter::Path => nix::mount::umount(dir).map_err(io::Error::from),
        }
    }
}

/// A mounted filesystem; unmounts on drop.
#[derive(Debug)]
pub struct Mount {
    /// Where the filesystem is mounted; named in errors and logs.
    dir: PathBuf,
    /// Ends the kernel mount; taken at unmount so that it happens once.
    unmounter: Option<Unmounter>,
    /// The session's main thread (it runs the request threads); joined after a
    /// clean unmount so that no callback runs once `unmount` has returned.
    session: Option<JoinHandle<io::Result<()>>>,
    /// What a later process needs to take the mount over, when it is kept across
    /// restarts.
    kept: Option<KeptSession>,
}

impl Mount {
    /// Where the filesystem is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What a later process needs to take this mount over ([`adopt`]), if it was
    /// made with `keep_across_restarts`.
    pub fn kept(&self) -> Option<&KeptSession> {
        self.kept.as_ref()
    }

    /// Leaves the mount in place for a later process: nothing is unmounted, and the
    /// session goes on until this process exits. Requests read and not answered by
    /// then are answered by the process that adopts the mount.
    pub fn leave_for_restart(mut self) {
        self.unmounter = None;
        self.session = None;
        info!(dir = %self.dir.display(), "FUSE mount left in place for the next daemon");
    }

    /// Unmounts and waits for the session to end. A mount still in use (an open
    /// file, a loop device) is detached lazily instead, reported as
    /// [`FuseError::DetachedBusy`]: its users keep working while this process lives.
    ///
    /// Blocks the calling thread until the session threads have stopped (at most a
    /// few seconds); from async code, call it inside `spawn_blocking`.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), FuseError> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        match unmounter.unmount(&self.dir) {
            Ok(()) => self.join_session(),
            Err(err) => {
                // The mount is still there; at least free the path. The session keeps
                // serving whoever holds it open, and ends on its own after them.
                detach_lazily(&self.dir)?;
                self.session = None;
                let dir = self.dir.clone();
                if err.raw_os_error() == Some(libc::EBUSY) {
                    Err(FuseError::DetachedBusy { dir })
                } else {
                    Err(FuseError::Unmount { dir, source: err })
                }
            }
        }
    }

    fn join_session(&mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + SESSION_EXIT_TIMEOUT;
        while !session.is_finished() {
            if Instant::now() >= deadline {
                warn!(
                    dir = %self.dir.display(),
                    "unmounted, but the FUSE session goes on (mounted in another namespace?)"
                );
                return Ok(());
            }
            thread::sleep(SESSION_EXIT_POLL);
        }
        let session_error = |source| FuseError::Session {
            dir: self.dir.clone(),
            source,
        };
        match session.join() {
            Ok(result) => result.map_err(session_error),
            Err(_panic) => Err(session_error(io::Error::other("session thread panicked"))),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(err) = self.end() {
            warn!(%err, "unmount on drop");
        }
    }
}

/// Makes sure `dir` is a directory that can be mounted on.
fn prepare_dir(dir: &Path) -> Result<(), FuseError> {
    let create_error = |source| FuseError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    };
    let inspect_error = |source| FuseError::Inspect {
        dir: dir.to_path_buf(),
        source,
    };
    match probe(dir).map_err(inspect_error)? {
        DirState::Missing => fs::create_dir_all(dir).map_err(create_error),
        DirState::Disconnected => Err(FuseError::StaleMount {
            dir: dir.to_path_buf(),
        }),
        DirState::Present => {
            if fs::metadata(dir).map_err(inspect_error)?.is_dir() {
                Ok(())
            } else {
                Err(create_error(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "not a directory",
                )))
            }
        }
    }
}

fn session_config(options: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName(FS_NAME.into())];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(SESSION_THREADS);
    config.clone_fd = !options.keep_across_restarts;
    config
}

/// Raises the mount's readahead window (its backing device info, named after the
/// mount's device number) to [`READ_AHEAD_KB`]. The kernel offers no way to raise it
/// at init. Best effort: without it, reads still work in smaller requests.
fn tune_read_ahead(dir: &Path) {
    let dev = match fs::metadata(dir) {
        Ok(meta) => meta.dev(),
        Err(err) => {
            debug!(dir = %dir.display(), %err, "cannot stat the mount to tune readahead");
            return;
        }
    };
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    if let Err(err) = fs::write(&knob, READ_AHEAD_KB.to_string()) {
        debug!(knob, %err, "cannot raise readahead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_map_to_the_session_config() {
        let config = session_config(&MountOptions::default());
        assert_eq!(config.acl, SessionACL::Owner);
        assert!(config
            .mount_options
            .contains(&MountOption::FSName("lazyblk".into())));
        assert_eq!(config.n_threads, Some(SESSION_THREADS));
        let shared = session_config(&MountOptions {
            allow_other: true,
            ..MountOptions::default()
        });
        assert_eq!(shared.acl, SessionACL::All);
    }

    #[test]
    fn a_missing_mount_point_is_created_and_a_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        prepare_dir(&dir).unwrap();
        assert!(dir.is_dir());
        let file = root.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_dir(&file),
            Err(FuseError::CreateDir { .. })
        ));
    }
}
