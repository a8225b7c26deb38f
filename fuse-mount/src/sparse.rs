//! fallocate and lseek: the sparse side of a file, mapped onto the image's
//! [`SparseImage`] calls. Like reads and writes, each is checked on the session
//! thread and run as a task on the runtime, which replies to the kernel.
//!
//! - `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeroes and may become a
//!   hole ([`SparseImage::write_zeroes`], as NBD's WRITE_ZEROES).
//! - `fallocate(ZERO_RANGE)`: the range reads as zeroes and stays allocated
//!   ([`SparseImage::write_zeroes_allocated`], as NBD's WRITE_ZEROES with NO_HOLE).
//! - Other modes (plain preallocation, collapse, insert) get EOPNOTSUPP: an image's
//!   size is fixed and it takes space as it is written.
//! - `lseek(SEEK_DATA / SEEK_HOLE)`: answered from [`SparseImage::extents`], as NBD's
//!   block status; the end of the file counts as a hole.

use std::io;
use std::time::Instant;

use fuser::{Errno, ReplyEmpty, ReplyLseek};
use lazyblk_image::{Door, Images, Op, ReadImage, SparseImage};
use tracing::debug;

use crate::file_io::errno_of;
use crate::files::Folder;
use crate::fs::LazyFs;

/// The fallocate modes this mount carries out; any other bit is refused.
const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// What a fallocate asks of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    /// PUNCH_HOLE: zeroes, may become a hole.
    Punch,
    /// ZERO_RANGE: zeroes, stays allocated.
    Allocated,
}

/// The zeroing `mode` asks for, or the errno that refuses it.
fn zeroing(mode: i32) -> Result<Zeroing, Errno> {
    match mode {
        m if m == PUNCH_HOLE | KEEP_SIZE => Ok(Zeroing::Punch),
        m if m == ZERO_RANGE || m == ZERO_RANGE | KEEP_SIZE => Ok(Zeroing::Allocated),
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// The part of `[offset, offset + len)` inside a file of `size`, as (offset, len); an
/// error when the range would grow the file (sizes are fixed) and `keep_size` is off.
fn clamp(size: u64, offset: u64, len: u64, keep_size: bool) -> Result<(u64, u64), Errno> {
    let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
    if end > size && !keep_size {
        return Err(Errno::EFBIG);
    }
    let end = end.min(size);
    Ok((offset.min(end), end.saturating_sub(offset)))
}

impl<F: Images> LazyFs<F> {
    /// fallocate(2) on an open file.
    pub(crate) fn fallocate_file(
        &self,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(open) = self.handles.file(fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        let zeroing = match zeroing(mode) {
            Ok(zeroing) => zeroing,
            Err(errno) => {
                reply.error(errno);
                return;
            }
        };
        if !open.writable {
            reply.error(match open.folder {
                Folder::Templates => Errno::EROFS,
                Folder::Sandboxes => Errno::EACCES,
            });
            return;
        }
        let (offset, len) = match clamp(open.file.size(), offset, len, mode & KEEP_SIZE != 0) {
            Ok((_, 0)) => {
                reply.ok();
                return;
            }
            Ok(range) => range,
            Err(errno) => {
                reply.error(errno);
                return;
            }
        };
        let images = self.files.clone();
        self.runtime.spawn(async move {
            let started = Instant::now();
            let result = match zeroing {
                Zeroing::Punch => open.file.write_zeroes(offset, len, false).await,
                Zeroing::Allocated => open.file.write_zeroes_allocated(offset, len, false).await,
            };
            let ok = result.is_ok();
            images.observe(Door::Fuse, Op::WriteZeroes, len, started.elapsed(), ok);
            match result {
                Ok(()) => reply.ok(),
                Err(err) => {
                    debug!(folder = ?open.folder, name = %open.name, offset, len, %err, "fallocate failed");
                    reply.error(errno_of(&err));
                }
            }
        });
    }

    /// lseek(2) with SEEK_DATA or SEEK_HOLE (the kernel answers the other kinds).
    pub(crate) fn lseek_file(&self, fh: u64, offset: i64, whence: i32, reply: ReplyLseek) {
        let Some(open) = self.handles.file(fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        let size = open.file.size();
        let offset = match u64::try_from(offset) {
            Ok(offset) if offset < size => offset,
            _ => {
                reply.error(Errno::ENXIO);
                return;
            }
        };
        let images = self.files.clone();
        self.runtime.spawn(async move {
            let started = Instant::now();
            let result = seek(&*open.file, offset, want_data).await;
            let ok = result.is_ok();
            images.observe(
                Door::Fuse,
                Op::Extents,
                size - offset,
                started.elapsed(),
                ok,
            );
            match result {
                Ok(Some(found)) => match i64::try_from(found) {
                    Ok(found) => reply.offset(found),
                    Err(_) => reply.error(Errno::EOVERFLOW),
                },
                Ok(None) => reply.error(Errno::ENXIO),
                Err(err) => {
                    debug!(folder = ?open.folder, name = %open.name, offset, %err, "lseek failed");
                    reply.error(errno_of(&err));
                }
            }
        });
    }
}

/// The first byte at or after `offset` that holds data (`want_data`) or lies in a hole;
/// `None` when no data follows. The end of the image counts as a hole.
async fn seek(image: &impl SparseImage, offset: u64, want_data: bool) -> io::Result<Option<u64>> {
    let size = image.size();
    let mut pos = offset;
    while pos < size {
        let extents = image.extents(pos, size - pos).await?;
        if extents.is_empty() {
            return Err(io::Error::other("the image reported no extents"));
        }
        for extent in extents {
            if extent.length == 0 {
                return Err(io::Error::other("the image reported an empty extent"));
            }
            if extent.hole != want_data {
                return Ok(Some(pos));
            }
            pos = pos.saturating_add(extent.length).min(size);
            if pos >= size {
                break;
            }
        }
    }
    Ok(if want_data { None } else { Some(size) })
}

#[cfg(test)]
mod tests {
    use lazyblk_image::{MemImage, WriteImage};

    use super::*;

    #[test]
    fn only_zeroing_modes_are_carried_out() {
        assert_eq!(zeroing(PUNCH_HOLE | KEEP_SIZE), Ok(Zeroing::Punch));
        assert_eq!(zeroing(ZERO_RANGE), Ok(Zeroing::Allocated));
        assert_eq!(zeroing(ZERO_RANGE | KEEP_SIZE), Ok(Zeroing::Allocated));
        assert_eq!(zeroing(0), Err(Errno::EOPNOTSUPP));
        assert_eq!(zeroing(KEEP_SIZE), Err(Errno::EOPNOTSUPP));
        assert_eq!(
            zeroing(libc::FALLOC_FL_COLLAPSE_RANGE),
            Err(Errno::EOPNOTSUPP)
        );
    }

    #[test]
    fn ranges_never_grow_the_file() {
        assert_eq!(clamp(100, 10, 20, false), Ok((10, 20)));
        assert_eq!(clamp(100, 90, 20, true), Ok((90, 10)));
        assert_eq!(clamp(100, 90, 20, false), Err(Errno::EFBIG));
        assert_eq!(clamp(100, 200, 20, true), Ok((100, 0)));
        assert_eq!(clamp(100, u64::MAX, 2, true), Err(Errno::EFBIG));
    }

    #[tokio::test]
    async fn seeks_find_data_and_holes_and_the_end_is_a_hole() {
        let image = MemImage::new(vec![0u8; 4 * 4096], true);
        image
            .write_at(4096, &[1; 4096], false)
            .await
            .expect("write");
        assert_eq!(seek(&image, 0, true).await.expect("seek"), Some(4096));
        assert_eq!(seek(&image, 4096, false).await.expect("seek"), Some(8192));
        assert_eq!(seek(&image, 8192, true).await.expect("seek"), None);
        image
            .write_at(3 * 4096, &[1; 4096], false)
            .await
            .expect("write");
        assert_eq!(
            seek(&image, 3 * 4096, false).await.expect("seek"),
            Some(4 * 4096)
        );
    }
}
