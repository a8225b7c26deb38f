//! Open, read, write, fsync: the data path. Each read, write or fsync is checked on
//! the session thread, handed to the tokio runtime as a task, and answered from that
//! task, so a read waiting on the network never holds up the next request.
//!
//! Caching: template files open with `FOPEN_KEEP_CACHE`. They are immutable (and a
//! name that comes back gets a new inode, see `inodes`), so the kernel page cache
//! stays valid across opens, and a template read once is served by the kernel. An
//! open whose image has another content id than the inode's previous open (deleted
//! and published again before any look saw the name gone) opens without it: the
//! kernel then drops the old image's pages.
//! Sandbox files open without it, so each open drops pages cached by an earlier one
//! (the overlay may have changed through NBD in between). They are not `direct_io`:
//! FUSE writes without the writeback cache are write-through (every write reaches
//! the backend before write(2) returns), so the page cache never holds data the
//! backend lacks, and it gives readahead and repeated reads for free. `direct_io`
//! would only be needed if one overlay were written through NBD while open here,
//! which no runtime does.
//!
//! A failed request is answered with the backend's errno (EIO when it has none) and
//! logged at debug level only: the backend's own error (which chunk, which source)
//! is the line an operator needs, and an outage fails thousands of requests a second.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use fuser::{Errno, FopenFlags, OpenAccMode, OpenFlags, ReplyData, ReplyEmpty, ReplyWrite};
use tracing::debug;

use lazyblk_image::{Door, Images, Op, ReadImage, WriteImage};

use crate::files::Folder;
use crate::fs::LazyFs;
use crate::handles::OpenFile;
use crate::inodes::Node;
use crate::namespace::is_writable;

impl<F: Images> LazyFs<F> {
    /// Opens file `ino`; returns the handle and the kernel caching flags.
    pub(crate) fn open_file(&self, ino: u64, flags: OpenFlags) -> Result<(u64, FopenFlags), Errno> {
        let (folder, name) = match self.node(ino)? {
            Node::File { folder, name } => (folder, name),
            Node::Root | Node::Folder(_) => return Err(Errno::EISDIR),
        };
        let file = self.backend_file(folder, &name).ok_or(Errno::ESTALE)?;
        let writable = is_writable(folder, &*file);
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !writable {
            return Err(match folder {
                Folder::Templates => Errno::EROFS,
                Folder::Sandboxes => Errno::EACCES,
            });
        }
        let fopen = match folder {
            // Immutable: keep the cache across opens while the name serves the same
            // bytes, and close has nothing to flush.
            Folder::Templates => {
                let same = file
                    .content_id()
                    .is_some_and(|id| self.inodes.same_content(ino, id));
                if same {
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
                } else {
                    FopenFlags::FOPEN_NOFLUSH
                }
            }
            Folder::Sandboxes => FopenFlags::empty(),
        };
        let fh = self.handles.open_file(OpenFile {
            file,
            folder,
            name,
            writable,
        });
        Ok((fh, fopen))
    }

    /// The open file behind `fh`. A handle an earlier process of a mount kept across
    /// restarts handed out is reopened from its inode number, the one the kernel sends
    /// with the request: the same file, writable if its backend allows writes (the
    /// kernel sends writes only on handles opened for writing).
    pub(crate) fn open_handle(&self, ino: u64, fh: u64) -> Option<Arc<OpenFile<F::Image>>> {
        if let Some(open) = self.handles.file(fh) {
            return Some(open);
        }
        if !self.handles.is_earlier(fh) {
            return None;
        }
        let Ok(Node::File { folder, name }) = self.node(ino) else {
            return None;
        };
        let file = self.backend_file(folder, &name)?;
        let writable = is_writable(folder, &*file);
        debug!(fh, ino, ?folder, %name, "reopened a handle of an earlier process");
        Some(self.handles.adopt_file(
            fh,
            OpenFile {
                file,
                folder,
                name,
                writable,
            },
        ))
    }

    /// Reads up to `size` bytes at `offset`; fewer at the end of the file, none past it.
    pub(crate) fn read_file(&self, ino: u64, fh: u64, offset: u64, size: u32, reply: ReplyData) {
        let Some(open) = self.open_handle(ino, fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        let len = read_len(open.file.size(), offset, size);
        if len == 0 {
            reply.data(&[]);
            return;
        }
        let mut buf = self.buffers.take(len);
        let images = self.files.clone();
        self.runtime.spawn(async move {
            let started = Instant::now();
            let result = open.file.read_at(offset, &mut buf).await;
            let ok = result.is_ok();
            images.observe(Door::Fuse, Op::Read, len as u64, started.elapsed(), ok);
            match result {
                Ok(()) => reply.data(&buf),
                Err(err) => {
                    debug!(folder = ?open.folder, name = %open.name, offset, len, %err, "read failed");
                    reply.error(errno_of(&err));
                }
            }
        });
    }

    /// Writes `data` at `offset`. A write that starts at or past the end fails with
    /// ENOSPC and one that runs past it is cut short, as on a block device.
    pub(crate) fn write_file(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        reply: ReplyWrite,
    ) {
        let Some(open) = self.open_handle(ino, fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        if !open.writable {
            reply.error(match open.folder {
                Folder::Templates => Errno::EROFS,
                Folder::Sandboxes => Errno::EACCES,
            });
            return;
        }
        let len = match write_len(open.file.size(), offset, data.len()) {
            Ok(0) => {
                reply.written(0);
                return;
            }
            Ok(len) => len,
            Err(errno) => {
                reply.error(errno);
                return;
            }
        };
        let Ok(written) = u32::try_from(len) else {
            reply.error(Errno::EINVAL);
            return;
        };
        // The request buffer is only lent for this call; the task needs its own copy.
        let mut buf = self.buffers.take(len);
        buf.copy_from_slice(&data[..len]);
        let images = self.files.clone();
        self.runtime.spawn(async move {
            let started = Instant::now();
            let result = open.file.write_at(offset, &buf, false).await;
            let ok = result.is_ok();
            images.observe(Door::Fuse, Op::Write, len as u64, started.elapsed(), ok);
            match result {
                Ok(()) => reply.written(written),
                Err(err) => {
                    debug!(folder = ?open.folder, name = %open.name, offset, len, %err, "write failed");
                    reply.error(errno_of(&err));
                }
            }
        });
    }

    /// Makes every acknowledged write to the file durable.
    pub(crate) fn fsync_file(&self, ino: u64, fh: u64, reply: ReplyEmpty) {
        let Some(open) = self.open_handle(ino, fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        if open.folder == Folder::Templates {
            // Never written, so always durable.
            reply.ok();
            return;
        }
        let images = self.files.clone();
        self.runtime.spawn(async move {
            let started = Instant::now();
            let result = open.file.flush().await;
            images.observe(Door::Fuse, Op::Flush, 0, started.elapsed(), result.is_ok());
            match result {
                Ok(()) => reply.ok(),
                Err(err) => {
                    debug!(folder = ?open.folder, name = %open.name, %err, "flush failed");
                    reply.error(errno_of(&err));
                }
            }
        });
    }
}

/// How many bytes a read of `requested` at `offset` returns from a file of `size`.
pub(crate) fn read_len(size: u64, offset: u64, requested: u32) -> usize {
    let available = size.saturating_sub(offset);
    // Both fit: `requested` is a u32, and the minimum is no larger.
    available.min(u64::from(requested)) as usize
}

/// How many bytes of a `len`-byte write at `offset` fit in a file of `size`.
fn write_len(size: u64, offset: u64, len: usize) -> Result<usize, Errno> {
    if len == 0 {
        return Ok(0);
    }
    if offset >= size {
        return Err(Errno::ENOSPC);
    }
    let room = size - offset;
    Ok(usize::try_from(room).map_or(len, |room| room.min(len)))
}

/// The errno to answer for a backend error: its own when it has one, EIO otherwise.
pub(crate) fn errno_of(err: &io::Error) -> Errno {
    match err.raw_os_error() {
        Some(code) => Errno::from_i32(code),
        None if err.kind() == io::ErrorKind::TimedOut => Errno::ETIMEDOUT,
        None => Errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_end_of_the_file() {
        assert_eq!(read_len(100, 0, 10), 10);
        assert_eq!(read_len(100, 95, 10), 5);
        assert_eq!(read_len(100, 100, 10), 0);
        assert_eq!(read_len(100, u64::MAX, 10), 0);
        assert_eq!(read_len(u64::MAX, 0, u32::MAX), u32::MAX as usize);
    }

    #[test]
    fn writes_past_the_end_fail_and_straddling_writes_are_cut() {
        assert_eq!(write_len(100, 0, 10), Ok(10));
        assert_eq!(write_len(100, 95, 10), Ok(5));
        assert_eq!(write_len(100, 100, 10), Err(Errno::ENOSPC));
        assert_eq!(write_len(100, u64::MAX, 1), Err(Errno::ENOSPC));
        assert_eq!(write_len(100, 200, 0), Ok(0));
    }

    #[test]
    fn backend_errors_keep_their_errno() {
        let os = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(errno_of(&os), Errno::ENOSPC);
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "source deadline");
        assert_eq!(errno_of(&timeout), Errno::ETIMEDOUT);
        assert_eq!(errno_of(&io::Error::other("digest mismatch")), Errno::EIO);
    }
}
