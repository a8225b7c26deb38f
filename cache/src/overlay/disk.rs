//! The overlay's two files, `data` and `map`, and how their blocking calls are run
//! from async code.
//!
//! `data` is a sparse file of the template's size: a written block lives at its own
//! offset, trimmed ranges are punched out. `map` is a sparse file of one byte per block
//! (see `map`). Every call here is one system call on an open descriptor, and every
//! failure names the sandbox, the operation, the file and the offset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::OverlayError;

/// The data file's name inside an overlay's directory.
pub const DATA_FILE: &str = "data";
/// The map file's name inside an overlay's directory.
pub const MAP_FILE: &str = "map";
/// Bytes of map read per call when an overlay is opened: the read buffer's size.
const MAP_READ_PIECE: usize = 1 << 20;
/// `st_blocks` counts 512-byte units whatever the file system's block size.
const STAT_BLOCK: u64 = 512;

pub(super) use crate::blocking::blocking;

/// The open `data` and `map` files of one overlay.
pub(super) struct Disk {
    /// Names every error.
    sandbox: Arc<str>,
    data: File,
    data_path: PathBuf,
    map: File,
    map_path: PathBuf,
}

impl Disk {
    /// Creates both files empty and sparse, of `size` and `blocks` bytes, and syncs them
    /// (their lengths must be durable before the meta file says the overlay exists).
    pub(super) fn create(
        sandbox: Arc<str>,
        dir: &Path,
        size: u64,
        blocks: u64,
    ) -> Result<Disk, OverlayError> {
        let disk = Disk::open_files(sandbox, dir, true)?;
        disk.data
            .set_len(size)
            .and_then(|()| disk.data.sync_all())
            .map_err(|e| disk.data_err("create", size, e))?;
        disk.map
            .set_len(blocks)
            .and_then(|()| disk.map.sync_all())
            .map_err(|e| disk.map_err("create", blocks, e))?;
        Ok(disk)
    }

    /// Opens both files of an existing overlay and checks their lengths.
    pub(super) fn open(
        sandbox: Arc<str>,
        dir: &Path,
        size: u64,
        blocks: u64,
    ) -> Result<Disk, OverlayError> {
        let disk = Disk::open_files(sandbox, dir, false)?;
        for (file, path, expected) in [
            (&disk.data, &disk.data_path, size),
            (&disk.map, &disk.map_path, blocks),
        ] {
            let len = file
                .metadata()
                .map_err(|e| disk.io_err("stat", path, 0, e))?
                .len();
            if len != expected {
                return Err(OverlayError::Corrupt {
                    path: path.clone(),
                    reason: format!("{len} bytes long, expected {expected}"),
                });
            }
        }
        Ok(disk)
    }

    fn open_files(sandbox: Arc<str>, dir: &Path, create: bool) -> Result<Disk, OverlayError> {
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(create)
                .open(&path)
                .map(|f| (f, path.clone()))
                .map_err(|source| OverlayError::Io {
                    sandbox: sandbox.clone(),
                    op: "open",
                    offset: 0,
                    path,
                    source,
                })
        };
        let (data, data_path) = open(DATA_FILE)?;
        let (map, map_path) = open(MAP_FILE)?;
        Ok(Disk {
            sandbox,
            data,
            data_path,
            map,
            map_path,
        })
    }

    /// Reads the whole map file, `blocks` bytes, piece by piece into `out`.
    pub(super) fn read_map(&self, blocks: u64, out: &mut Vec<u8>) -> Result<(), OverlayError> {
        let mut piece = vec![0u8; MAP_READ_PIECE];
        let mut offset = 0;
        while offset < blocks {
            let n = (blocks - offset).min(MAP_READ_PIECE as u64) as usize;
            self.map
                .read_exact_at(&mut piece[..n], offset)
                .map_err(|e| self.map_err("read", offset, e))?;
            out.extend_from_slice(&piece[..n]);
            offset += n as u64;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of overlay data at `offset` (one `pread`; holes read as zeros).
    pub(super) fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<(), OverlayError> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(|e| self.data_err("read", offset, e))
    }

    /// Writes `buf` into the data file at `offset` (one `pwrite` unless the kernel
    /// takes less).
    pub(super) fn write_data(&self, offset: u64, buf: &[u8]) -> Result<(), OverlayError> {
        self.data
            .write_all_at(buf, offset)
            .map_err(|e| self.data_err("write", offset, e))
    }

    /// Frees `[offset, offset+len)` of the data file. A file system that cannot punch
    /// holes keeps the bytes: the map, not the data, says the range is zero.
    pub(super) fn punch_data(&self, offset: u64, len: u64) -> Result<(), OverlayError> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            let e = io::Error::from(io::ErrorKind::InvalidInput);
            return Err(self.data_err("punch hole", offset, e));
        };
        // SAFETY: fallocate on a descriptor this struct owns; no memory is passed.
        let rc = unsafe { libc::fallocate(self.data.as_raw_fd(), mode, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                tracing::debug!(sandbox = %self.sandbox, path = %self.data_path.display(),
                    "file system cannot punch holes; trimmed space stays allocated");
                Ok(())
            }
            _ => Err(self.data_err("punch hole", offset, e)),
        }
    }

    /// `fdatasync` of the data file.
    pub(super) fn sync_data(&self) -> Result<(), OverlayError> {
        self.data
            .sync_data()
            .map_err(|e| self.data_err("sync", 0, e))
    }

    /// Writes `bytes` into the map file at `offset`.
    pub(super) fn write_map(&self, offset: u64, bytes: &[u8]) -> Result<(), OverlayError> {
        self.map
            .write_all_at(bytes, offset)
            .map_err(|e| self.map_err("write", offset, e))
    }

    /// `fdatasync` of the map file.
    pub(super) fn sync_map(&self) -> Result<(), OverlayError> {
        self.map.sync_data().map_err(|e| self.map_err("sync", 0, e))
    }

    /// Bytes the two files take on disk (allocated, not apparent, size).
    pub(super) fn bytes_on_disk(&self) -> u64 {
        [&self.data, &self.map]
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.blocks() * STAT_BLOCK)
            .sum()
    }

    fn data_err(&self, op: &'static str, offset: u64, source: io::Error) -> OverlayError {
        self.io_err(op, &self.data_path, offset, source)
    }

    fn map_err(&self, op: &'static str, offset: u64, source: io::Error) -> OverlayError {
        self.io_err(op, &self.map_path, offset, source)
    }

    fn io_err(
        &self,
        op: &'static str,
        path: &Path,
        offset: u64,
        source: io::Error,
    ) -> OverlayError {
        OverlayError::Io {
            sandbox: self.sandbox.clone(),
            op,
            offset,
            path: path.to_path_buf(),
            source,
        }
    }
}
