//! The FUSE filesystem: the state behind a mount, the kernel connection settings,
//! and the [`fuser::Filesystem`] callbacks, which hand each request to `namespace`
//! (names, attributes, listings), `file_io` (open, read, write, fsync) or `sparse`
//! (fallocate, lseek).
//!
//! Every callback answers from memory or from the image set, whose `list_local` and
//! `open_local` are answered from the daemon's local state; nothing here waits on the
//! network.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileHandle, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::attrs::{AttrChange, BLOCK_SIZE, NAME_MAX};
use lazyblk_image::{BufferPool, Images};

use crate::handles::Handles;
use crate::inodes::Inodes;
use crate::record::{Recovered, SessionRecord};

/// How long the kernel may trust a name or an attribute before asking again. Files
/// come and go as the daemon adds and removes templates and overlays; one second
/// bounds how long a removed one stays visible while sparing a lookup per `open`.
const TTL: Duration = Duration::from_secs(1);

/// The largest read or write the kernel sends in one request: the kernel's default
/// cap (`fuse.max_pages_limit`, 256 pages) and the default chunk size, so a
/// sequential reader asks for about one chunk at a time.
const MAX_IO_BYTES: u32 = 1024 * 1024;

/// Idle I/O buffers kept for reuse. Enough for the requests usually in flight; a
/// burst above it allocates and frees rather than pinning its peak.
const RETAINED_BUFFERS: usize = 16;

/// Kernel features asked for when the kernel offers them.
/// - `FUSE_ASYNC_READ`: readahead and concurrent reads of one file are sent without
///   waiting for each other, so several reads are in flight at once.
/// - `FUSE_ASYNC_DIO`: a large `O_DIRECT` read or write (Firecracker, a loop device
///   with `--direct-io`) is split into requests sent together, not one after another.
/// - `FUSE_PARALLEL_DIROPS`: lookups in one folder do not serialise on its lock.
const WANTED_CAPABILITIES: InitFlags = InitFlags::FUSE_ASYNC_READ
    .union(InitFlags::FUSE_ASYNC_DIO)
    .union(InitFlags::FUSE_PARALLEL_DIROPS);

/// The filesystem a [`crate::Mount`] serves.
pub(crate) struct LazyFs<F: Images> {
    /// The backend that lists and opens the files.
    pub(crate) files: Arc<F>,
    /// Where reads, writes and flushes run, so that callbacks return at once and
    /// the session thread goes on to the next request.
    pub(crate) runtime: Handle,
    /// Inode numbers of the files seen so far.
    pub(crate) inodes: Inodes,
    /// Open files and directory listings.
    pub(crate) handles: Handles<F::Image>,
    /// Buffers for the bytes of reads and writes.
    pub(crate) buffers: Arc<BufferPool>,
    /// The kernel's limit on background requests (readahead, async direct I/O).
    max_background: u16,
    /// Owner of every node: the user who mounted (the daemon).
    pub(crate) uid: u32,
    /// Group of every node.
    pub(crate) gid: u32,
    /// The time shown for every node; the contents carry no times of their own.
    pub(crate) mounted_at: SystemTime,
}

impl<F: Images> LazyFs<F> {
    pub(crate) fn new(files: Arc<F>, runtime: Handle, max_background: u16) -> LazyFs<F> {
        LazyFs {
            files,
            runtime,
            inodes: Inodes::default(),
            handles: Handles::default(),
            buffers: BufferPool::with_retained(MAX_IO_BYTES as usize * RETAINED_BUFFERS),
            max_background,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mounted_at: SystemTime::now(),
        }
    }

    /// Numbers inodes and handles so that a later process can go on serving the
    /// mount: inode numbers written to `record` (starting from those of `earlier`),
    /// handles of `generation`.
    pub(crate) fn recorded(
        mut self,
        record: Arc<SessionRecord>,
        earlier: &Recovered,
        generation: u64,
    ) -> LazyFs<F> {
        self.inodes = Inodes::recorded(record, earlier);
        self.handles = Handles::of_generation(generation);
        self
    }
}

/// Applies one kernel setting at `value`, or at the nearest value the kernel takes.
fn configure<T: Copy + std::fmt::Debug>(
    what: &str,
    config: &mut KernelConfig,
    value: T,
    set: fn(&mut KernelConfig, T) -> Result<T, T>,
) {
    if let Err(nearest) = set(config, value) {
        debug!(
            what,
            ?value,
            ?nearest,
            "kernel limit; using the nearest value"
        );
        if set(config, nearest).is_err() {
            warn!(what, ?nearest, "kernel refused its own nearest value");
        }
    }
}

impl<F: Images> Filesystem for LazyFs<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        configure(
            "max_write",
            config,
            MAX_IO_BYTES,
            KernelConfig::set_max_write,
        );
        configure(
            "max_background",
            config,
            self.max_background,
            KernelConfig::set_max_background,
        );
        let capabilities = WANTED_CAPABILITIES & config.capabilities();
        if let Err(unsupported) = config.add_capabilities(capabilities) {
            warn!(?unsupported, "kernel refused FUSE capabilities it offered");
        }
        debug!(?capabilities, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.current_attr(ino.0, fh.map(|fh| fh.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
        };
        let result = self
            .current_attr(ino.0, fh.map(|fh| fh.0))
            .and_then(|attr| Self::check_setattr(&attr, &change).map(|()| attr));
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino.0, flags) {
            Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_file(ino.0, fh.0, offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.write_file(ino.0, fh.0, offset, data, reply);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): every write already reached the backend before it returned;
        // durability is fsync's job.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.release_file(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_file(ino.0, fh.0, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.fallocate_file(fh.0, offset, length, mode, reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.lseek_file(fh.0, offset, whence, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.listing(ino.0) {
            Ok(entries) => {
                let fh = self.handles.open_dir(entries);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.handles.dir(fh.0) {
            Some(entries) => entries,
            // Opened by an earlier process of a mount kept across restarts: list again.
            None if self.handles.is_earlier(fh.0) => match self.listing(ino.0) {
                Ok(entries) => self.handles.adopt_dir(fh.0, entries),
                Err(errno) => {
                    reply.error(errno);
                    return;
                }
            },
            None => {
                reply.error(Errno::EBADF);
                return;
            }
        };
        // The offset of an entry is its position plus one: where the next call resumes.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (position, entry) in entries.iter().enumerate().skip(skip) {
            let next = position as u64 + 1;
            if reply.add(INodeNo(entry.ino), next, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.release_dir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Folders have no state of their own to make durable.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // No space to report: files are made by the daemon, never by writes here.
        reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, NAME_MAX, BLOCK_SIZE);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.check_access(ino.0, mask) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    // Files appear and disappear only as the daemon adds and removes templates and
    // overlays; nothing is created, removed or renamed through the mount.

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }
}
