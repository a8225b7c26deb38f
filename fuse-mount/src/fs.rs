//! The FUSE filesystem: the [`fuser::Filesystem`] callbacks, the kernel connection
//! settings, and the namespace (the root, the two folders, their files). Reads,
//! writes and flushes live in `file_io`.
//!
//! Every callback answers from memory or from [`Files`], whose `list` and `open` are
//! answered from the daemon's local state; nothing here waits on the network.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::buffers::BufferPool;
use crate::files::{File, Files, Folder};
use crate::handles::{DirEntry, Handles};
use crate::inodes::{folder_ino, Inodes, Node, ROOT_INO};

/// How long the kernel may trust a name or an attribute before asking again. Files
/// come and go as the daemon adds and removes templates and overlays; one second
/// bounds how long a removed one stays visible while sparing a lookup per `open`.
const TTL: Duration = Duration::from_secs(1);

/// The largest read or write the kernel sends in one request: the kernel's default
/// cap (`fuse.max_pages_limit`, 256 pages) and the default chunk size, so a
/// sequential reader asks for about one chunk at a time.
pub(crate) const MAX_IO_BYTES: u32 = 1024 * 1024;

/// Idle I/O buffers kept for reuse. Enough for the requests usually in flight; a
/// burst above it allocates and frees rather than pinning its peak.
const RETAINED_BUFFERS: usize = 16;

/// The block size shown by `stat` and `statfs`: the page size and the block size of
/// the ext4 templates, so tools that size their I/O by it stay aligned.
const BLOCK_SIZE: u32 = 4096;

/// The longest file name the folders show (the kernel's `NAME_MAX`).
const NAME_MAX: u32 = 255;

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
pub(crate) struct LazyFs<F: Files> {
    /// The backend that lists and opens the files.
    pub(crate) files: Arc<F>,
    /// Where reads, writes and flushes run, so that callbacks return at once and
    /// the session thread goes on to the next request.
    pub(crate) runtime: Handle,
    /// Inode numbers of the files seen so far.
    pub(crate) inodes: Inodes,
    /// Open files and directory listings.
    pub(crate) handles: Handles<F::File>,
    /// Buffers for the bytes of reads and writes.
    pub(crate) buffers: Arc<BufferPool>,
    /// The kernel's limit on background requests (readahead, async direct I/O).
    max_background: u16,
    /// Owner of every node: the user who mounted (the daemon).
    uid: u32,
    /// Group of every node.
    gid: u32,
    /// The time shown for every node; the contents carry no times of their own.
    mounted_at: SystemTime,
}

impl<F: Files> LazyFs<F> {
    pub(crate) fn new(files: Arc<F>, runtime: Handle, max_background: u16) -> LazyFs<F> {
        LazyFs {
            files,
            runtime,
            inodes: Inodes::default(),
            handles: Handles::default(),
            buffers: BufferPool::new(MAX_IO_BYTES as usize, RETAINED_BUFFERS),
            max_background,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mounted_at: SystemTime::now(),
        }
    }

    /// The attributes of the root or a folder.
    fn dir_attr(&self, ino: u64) -> FileAttr {
        // A folder links to itself and its parent; the root also to the two folders.
        let nlink = if ino == ROOT_INO { 4 } else { 2 };
        self.attr(ino, FileType::Directory, 0, 0o555, nlink)
    }

    /// The attributes of a file.
    pub(crate) fn file_attr(&self, ino: u64, size: u64, writable: bool) -> FileAttr {
        let perm = if writable { 0o644 } else { 0o444 };
        self.attr(ino, FileType::RegularFile, size, perm, 1)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    /// What `ino` stands for. A retired number answers ESTALE, as does a file inode
    /// whose backend file is gone: on ESTALE the kernel looks the path up again
    /// (once) instead of failing on its cached entry, so a name removed and added
    /// back within the entry TTL resolves to the new file at once.
    pub(crate) fn node(&self, ino: u64) -> Result<Node, Errno> {
        self.inodes.node(ino).ok_or(Errno::ESTALE)
    }

    /// The backend's file `name`, retiring the name's inode if it is gone.
    pub(crate) fn backend_file(&self, folder: Folder, name: &str) -> Option<Arc<F::File>> {
        let file = self.files.open(folder, name);
        if file.is_none() {
            self.inodes.retire(folder, name);
        }
        file
    }

    /// The attributes of `ino`, from the open file `fh` when the kernel names one.
    fn current_attr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        if let Some(open) = fh.and_then(|fh| self.handles.file(fh)) {
            return Ok(self.file_attr(ino, open.file.size(), open.writable));
        }
        match self.node(ino)? {
            Node::Root | Node::Folder(_) => Ok(self.dir_attr(ino)),
            Node::File { folder, name } => {
                let file = self.backend_file(folder, &name).ok_or(Errno::ESTALE)?;
                Ok(self.file_attr(ino, file.size(), is_writable(folder, &*file)))
            }
        }
    }

    fn lookup_name(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        match self.node(parent)? {
            Node::Root => {
                let folder = Folder::from_dir_name(name).ok_or(Errno::ENOENT)?;
                Ok(self.dir_attr(folder_ino(folder)))
            }
            Node::Folder(folder) => {
                let file = self.backend_file(folder, name).ok_or(Errno::ENOENT)?;
                let ino = self.inodes.file_ino(folder, name);
                Ok(self.file_attr(ino, file.size(), is_writable(folder, &*file)))
            }
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    /// A setattr: sizes are fixed and owners and modes are the mount's, so only
    /// no-op changes (and times, which are not kept) are accepted.
    fn check_setattr(attr: &FileAttr, change: &AttrChange) -> Result<(), Errno> {
        if let Some(size) = change.size {
            if attr.kind == FileType::Directory {
                return Err(Errno::EISDIR);
            }
            if size != attr.size {
                return Err(Errno::EPERM);
            }
        }
        let mode_changes = change
            .mode
            .is_some_and(|m| m & 0o7777 != u32::from(attr.perm));
        let uid_changes = change.uid.is_some_and(|u| u != attr.uid);
        let gid_changes = change.gid.is_some_and(|g| g != attr.gid);
        if mode_changes || uid_changes || gid_changes {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    /// The entries of a directory, taken now.
    fn listing(&self, ino: u64) -> Result<Vec<DirEntry>, Errno> {
        let folder = match self.node(ino)? {
            Node::Root => None,
            Node::Folder(folder) => Some(folder),
            Node::File { .. } => return Err(Errno::ENOTDIR),
        };
        // The root's parent is outside the mount; the kernel answers `..` there itself.
        let mut entries = vec![
            dir_entry(ino, FileType::Directory, "."),
            dir_entry(ROOT_INO, FileType::Directory, ".."),
        ];
        match folder {
            Some(folder) => entries.extend(self.folder_entries(folder)),
            None => entries.extend(
                Folder::ALL.map(|f| dir_entry(folder_ino(f), FileType::Directory, f.dir_name())),
            ),
        }
        Ok(entries)
    }

    /// The files of a folder, as the backend lists them now, sorted.
    fn folder_entries(&self, folder: Folder) -> Vec<DirEntry> {
        let mut names = self.files.list(folder);
        names.retain(|name| {
            let valid = is_valid_name(name);
            if !valid {
                warn!(
                    ?folder,
                    name, "backend listed a name that cannot be a file name"
                );
            }
            valid
        });
        names.sort_unstable();
        names.dedup();
        self.inodes.retain_listed(folder, &names);
        names
            .into_iter()
            .map(|name| DirEntry {
                ino: self.inodes.file_ino(folder, &name),
                kind: FileType::RegularFile,
                name,
            })
            .collect()
    }

    fn check_access(&self, ino: u64, mask: AccessFlags) -> Result<(), Errno> {
        let wants_write = mask.contains(AccessFlags::W_OK);
        let wants_exec = mask.contains(AccessFlags::X_OK);
        match self.node(ino)? {
            // Folders are listed and searched, never changed by their users.
            Node::Root | Node::Folder(_) if wants_write => Err(Errno::EACCES),
            Node::Root | Node::Folder(_) => Ok(()),
            Node::File { folder, name } => {
                let file = self.backend_file(folder, &name).ok_or(Errno::ESTALE)?;
                if wants_write && folder == Folder::Templates {
                    Err(Errno::EROFS)
                } else if (wants_write && !file.writable()) || wants_exec {
                    Err(Errno::EACCES)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Whether a file of `folder` takes writes: only sandboxes, and only while their
/// backend allows it.
pub(crate) fn is_writable(folder: Folder, file: &impl File) -> bool {
    folder == Folder::Sandboxes && file.writable()
}

/// Whether a name from the backend can be shown as a file name.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= NAME_MAX as usize
        && !name.contains(['/', '\0'])
}

fn dir_entry(ino: u64, kind: FileType, name: &str) -> DirEntry {
    DirEntry {
        ino,
        kind,
        name: name.to_owned(),
    }
}

/// The owner and size fields of a setattr request.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
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

impl<F: Files> Filesystem for LazyFs<F> {
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_file(fh.0, offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.write_file(fh.0, offset, data, reply);
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
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_file(fh.0, reply);
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.handles.dir(fh.0) else {
            reply.error(Errno::EBADF);
            return;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_files_are_rejected() {
        assert!(is_valid_name("py311"));
        assert!(is_valid_name("a.b-c_d"));
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(!is_valid_name(&"x".repeat(256)));
    }

    fn attr(kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(9),
            size,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn change(size: Option<u64>, mode: Option<u32>, uid: Option<u32>) -> AttrChange {
        AttrChange {
            mode,
            uid,
            gid: None,
            size,
        }
    }

    #[test]
    fn setattr_accepts_only_no_op_changes() {
        type Fs = LazyFs<NoFiles>;
        let file = attr(FileType::RegularFile, 4096, 0o644);
        assert_eq!(Fs::check_setattr(&file, &change(None, None, None)), Ok(()));
        assert_eq!(
            Fs::check_setattr(&file, &change(Some(4096), None, None)),
            Ok(())
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(Some(0), None, None)),
            Err(Errno::EPERM)
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(Some(8192), None, None)),
            Err(Errno::EPERM)
        );
        // chmod carries the file type bits; only the permission bits count.
        assert_eq!(
            Fs::check_setattr(&file, &change(None, Some(0o100644), None)),
            Ok(())
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(None, Some(0o100600), None)),
            Err(Errno::EPERM)
        );
        assert_eq!(
            Fs::check_setattr(&file, &change(None, None, Some(1000))),
            Err(Errno::EPERM)
        );
        let dir = attr(FileType::Directory, 0, 0o555);
        assert_eq!(
            Fs::check_setattr(&dir, &change(Some(0), None, None)),
            Err(Errno::EISDIR)
        );
    }

    /// A backend with nothing in it, for tests of the pure helpers.
    struct NoFiles;

    struct NoFile;

    impl File for NoFile {
        fn size(&self) -> u64 {
            0
        }
        fn writable(&self) -> bool {
            false
        }
        async fn read(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        async fn write(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
            Ok(())
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Files for NoFiles {
        type File = NoFile;
        fn list(&self, _folder: Folder) -> Vec<String> {
            Vec::new()
        }
        fn open(&self, _folder: Folder, _name: &str) -> Option<Arc<NoFile>> {
            None
        }
    }
}
