//! One open, verified chunk file: reads from it, with and without waiting for the disk,
//! and whether its bytes are in the page cache (for splicing them).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::digest::Digest;

use super::ChunkStoreError;

/// `cachestat(2)` (Linux 6.5): 451 on every architecture of the unified system call
/// table (x86_64, aarch64, riscv64 and the rest; not alpha); not yet in libc.
const SYS_CACHESTAT: libc::c_long = 451;

/// The page size `cachestat` counts in.
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// An open, verified chunk. While a `ChunkFile` is alive its chunk is never evicted.
#[derive(Clone, Debug)]
pub struct ChunkFile {
    pub digest: Digest,
    pub(super) file: Arc<File>,
    pub len: u64,
}

impl ChunkFile {
    /// Reads `buf.len()` bytes at `offset` within the chunk (one `pread`, retried if short).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChunkStoreError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| ChunkStoreError::Read {
                digest: self.digest,
                source,
            })
    }

    /// Reads `buf.len()` bytes at `offset` from the page cache only: `Ok(false)` (and
    /// `buf` in an unspecified state) when that would wait for the disk.
    pub fn read_at_nowait(&self, offset: u64, buf: &mut [u8]) -> Result<bool, ChunkStoreError> {
        use std::os::fd::AsRawFd;
        let mut done = 0usize;
        while done < buf.len() {
            let iov = libc::iovec {
                iov_base: buf[done..].as_mut_ptr().cast(),
                iov_len: buf.len() - done,
            };
            // SAFETY: one iovec over the unread tail of `buf`, which outlives the call.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Ok(false),
                _ => {
                    let err = io::Error::last_os_error();
                    return match err.raw_os_error() {
                        // Not resident, or a kernel or file system without RWF_NOWAIT.
                        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                            Ok(false)
                        }
                        Some(libc::EINTR) => continue,
                        _ => Err(ChunkStoreError::Read {
                            digest: self.digest,
                            source: err,
                        }),
                    };
                }
            }
        }
        Ok(true)
    }

    /// Whether bytes `offset..offset + len` are all in the page cache now
    /// ([`file_resident`]).
    pub fn resident(&self, offset: u64, len: u64) -> bool {
        file_resident(&self.file, offset, len)
    }

    /// The open file, for sending pieces of it with `splice`. While a clone of it is
    /// held (a queued reply's piece), the chunk counts as in use and is not evicted,
    /// like while this `ChunkFile` lives.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// A file handle of its own on the chunk (a `dup`), for streaming it out; the chunk
    /// stays protected from eviction only while this `ChunkFile` lives.
    pub fn try_clone_file(&self) -> Result<File, ChunkStoreError> {
        self.file
            .try_clone()
            .map_err(|source| ChunkStoreError::Read {
                digest: self.digest,
                source,
            })
    }

    /// The whole chunk.
    pub fn read_all(&self) -> Result<Vec<u8>, ChunkStoreError> {
        let mut buf = vec![0u8; self.len as usize];
        self.read_at(0, &mut buf)?;
        Ok(buf)
    }
}

/// Whether bytes `offset..offset + len` of `file` are all in the page cache now, asked
/// with `cachestat(2)`: reading or splicing them will not wait for the disk, unless the
/// pages leave (reclaim) or are still being read in (readahead) at that moment. `false`
/// where the kernel cannot tell (before Linux 6.5, or filtered), remembered so that
/// such a system asks only once.
pub fn file_resident(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    static CACHESTAT_WORKS: AtomicBool = AtomicBool::new(true);
    if len == 0 {
        return true;
    }
    if !CACHESTAT_WORKS.load(Ordering::Relaxed) {
        return false;
    }
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if rc != 0 {
        let errno = io::Error::last_os_error().raw_os_error();
        if matches!(errno, Some(libc::ENOSYS) | Some(libc::EPERM)) {
            CACHESTAT_WORKS.store(false, Ordering::Relaxed);
        }
        return false;
    }
    let page = page_size();
    let pages = (offset + len).div_ceil(page) - offset / page;
    stat.nr_cache >= pages
}
