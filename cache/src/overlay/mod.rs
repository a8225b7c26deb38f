//! A sandbox's overlay: its private copy-on-write layer over a template, at 4 KiB
//! ([`BLOCK_SIZE`]) granularity. Sandboxes write; templates never change.
//!
//! # Layout
//! - [`meta`]: `overlay.json`, the sandbox and template an overlay belongs to.
//! - `map`: the block map (template, own data or zero, per block) in memory.
//! - `disk`: the `data` and `map` files, and how their blocking calls are run.
//! - `error`: [`OverlayError`], why an operation failed.
//! - `locks`: region locks that make every block's reads and writes atomic.
//! - `read`: merged reads. `write`: writes, TRIM / WRITE_ZEROES, FLUSH.
//!
//! # On disk
//! An overlay is a directory (the daemon uses `<cache>/overlays/<sandbox>/`):
//! - `overlay.json`: `{format, sandbox, template, size, block_size, created_at}`,
//!   written last at create (temporary file, fsync, rename, fsync of the directory).
//! - `data`: a sparse file of the template's size; block `b` is stored at `b * 4096`.
//! - `map`: a sparse file of one byte per block: 0 the template's bytes, 1 the
//!   block's bytes in `data`, 2 zeros (TRIM / WRITE_ZEROES; its range in `data` is
//!   punched out).
//!
//! # Data flow
//! A read walks runs of blocks in one state: a run of written blocks is one `pread`
//! of `data`, a zero run is a fill, a template run is one [`TemplateImage::read_at`]
//! (which fetches lazily). A write of whole blocks is one `pwrite` and a map update;
//! a partial block is read (merged), patched and written whole.
//!
//! # Durability
//! The map in memory is the truth while the process runs; the `map` file is brought up
//! to date at each FLUSH (and FUA). A flush (1) snapshots the map pages changed since
//! the last flush, (2) `fdatasync`s `data`, (3) writes the snapshot pages into `map`
//! and (4) `fdatasync`s `map`. A block's map byte changes only after its data `pwrite`
//! returned, so every "data" byte in the snapshot names bytes that step 2 made durable:
//! after a crash the `map` file never points at data that did not reach the disk. A
//! write acknowledged before a flush began set its byte (and marked its page dirty)
//! before the flush took the dirty pages, so it is durable when the flush returns.
//! Writes that were never flushed are either lost (the durable map still says
//! template or zero for their blocks) or present; an unflushed overwrite of a block that
//! was already data is done in place, so after a process kill it reads old or new (a
//! page is copied whole), and after a power loss as a disk would (the sectors that
//! reached it). Flushes run one at a time; after a failed `fdatasync` the kernel may
//! have dropped the pages it could not write, so every later flush of the overlay
//! fails instead of promising durability it cannot give.

mod disk;
mod error;
mod locks;
mod map;
pub mod meta;
mod read;
mod write;

#[cfg(test)]
mod tests;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::image::{ImageExtent, TemplateImage};
use crate::manifest::{validate_id, BLOCK_SIZE};
use disk::Disk;
pub use error::OverlayError;
use locks::RegionLocks;
use map::{BlockMap, BlockState};
pub use meta::{OverlayMeta, META_FILE, OVERLAY_FORMAT};

/// What a map file recovers to: its blocks and how many hold data or read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSummary {
    pub blocks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
}

/// Recovers a block map from the bytes of a map file, as opening an overlay does; a
/// byte that is no state is refused with its block index. The fuzz target of torn map
/// files drives this.
pub fn recover_block_map(bytes: &[u8]) -> Result<MapSummary, (u64, u8)> {
    let map = map::BlockMap::from_bytes(bytes.iter().copied())?;
    Ok(MapSummary {
        blocks: map.len(),
        data_blocks: map.data_blocks(),
        zero_blocks: map.zero_blocks(),
    })
}

/// What an overlay holds, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OverlayStats {
    /// Blocks whose bytes are in `data`.
    pub blocks_data: u64,
    /// Blocks trimmed or zeroed.
    pub blocks_zero: u64,
    /// Bytes the `data` and `map` files take on disk.
    pub bytes_on_disk: u64,
}

/// Holds an overlay's writes, trims and zeroings back while alive (reads and flushes
/// go on). Writes that arrive meanwhile wait, then go on into the sandbox.
pub struct FreezeGuard {
    _exclusive: OwnedRwLockWriteGuard<()>,
}

/// What flushes share; its mutex makes them run one at a time.
#[derive(Default)]
struct FlushState {
    /// The file whose `fdatasync` failed, once one has.
    failed: Option<PathBuf>,
}

/// A sandbox's copy-on-write layer over a template. `Send + Sync`: share it as
/// `Arc<Overlay>` between connections.
pub struct Overlay {
    /// The sandbox id; names every error and log line.
    sandbox: Arc<str>,
    dir: PathBuf,
    meta: OverlayMeta,
    /// The template under the overlay (read for blocks the sandbox never wrote).
    base: Arc<TemplateImage>,
    disk: Disk,
    map: BlockMap,
    locks: RegionLocks,
    /// Writers, trims and zeroings take it shared; `freeze` takes it exclusively.
    freeze: Arc<RwLock<()>>,
    flush: Mutex<FlushState>,
    /// Whether `data` has been written since its last `fdatasync` (a flush with nothing
    /// to sync costs no system call).
    unsynced: AtomicBool,
}

impl Overlay {
    /// Creates an empty overlay of sandbox `sandbox` over `base` in `dir` (made if
    /// missing). Refused if `dir` already holds an overlay.
    pub async fn create(
        dir: impl Into<PathBuf>,
        sandbox: &str,
        base: Arc<TemplateImage>,
    ) -> Result<Overlay, OverlayError> {
        validate_id(sandbox)?;
        let dir = dir.into();
        let sandbox: Arc<str> = sandbox.into();
        let name = sandbox.clone();
        run_detached(&name, "create", move || {
            Overlay::create_blocking(dir, sandbox, base)
        })
        .await
    }

    fn create_blocking(
        dir: PathBuf,
        sandbox: Arc<str>,
        base: Arc<TemplateImage>,
    ) -> Result<Overlay, OverlayError> {
        let size = base.size();
        if !size.is_multiple_of(BLOCK_SIZE) {
            return Err(OverlayError::UnalignedTemplate {
                template: base.id().clone(),
                size,
            });
        }
        let dir_err = |op, path: &Path, source| OverlayError::Io {
            sandbox: sandbox.clone(),
            op,
            offset: 0,
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(&dir).map_err(|e| dir_err("create directory", &dir, e))?;
        let meta_path = dir.join(META_FILE);
        if meta_path.exists() {
            return Err(OverlayError::Exists { sandbox, path: dir });
        }
        let blocks = size / BLOCK_SIZE;
        let disk = Disk::create(sandbox.clone(), &dir, size, blocks)?;
        let meta = OverlayMeta {
            format: OVERLAY_FORMAT,
            sandbox: sandbox.to_string(),
            template: base.id().to_string(),
            size,
            block_size: BLOCK_SIZE,
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        meta.store(&dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::durable::sync_dir(parent).map_err(|e| dir_err("sync directory", parent, e))?;
        }
        let map = BlockMap::from_bytes(std::iter::repeat_n(0, blocks as usize))
            .map_err(|(block, _)| corrupt_map(&dir, block))?;
        tracing::info!(%sandbox, template = %base.id(), size, dir = %dir.display(),
            "overlay created");
        Ok(Overlay::assemble(dir, meta, base, disk, map))
    }

    /// Reopens the overlay in `dir` over `base` (after a restart): reads its map into
    /// memory (`size / 4096` bytes). Refused if the overlay was made over another
    /// template or size.
    pub async fn open(
        dir: impl Into<PathBuf>,
        base: Arc<TemplateImage>,
    ) -> Result<Overlay, OverlayError> {
        let dir = dir.into();
        let name = meta::sandbox_of_dir(&dir);
        run_detached(&name, "open", move || Overlay::open_blocking(dir, base)).await
    }

    fn open_blocking(dir: PathBuf, base: Arc<TemplateImage>) -> Result<Overlay, OverlayError> {
        let meta = OverlayMeta::load(&dir)?;
        validate_id(&meta.sandbox).map_err(|e| OverlayError::Corrupt {
            path: dir.join(META_FILE),
            reason: e.to_string(),
        })?;
        let sandbox: Arc<str> = meta.sandbox.as_str().into();
        if meta.template != **base.id() || meta.size != base.size() {
            return Err(OverlayError::MetaMismatch {
                sandbox,
                path: dir,
                found_template: meta.template,
                found_size: meta.size,
                template: base.id().clone(),
                size: base.size(),
            });
        }
        let blocks = meta.size / BLOCK_SIZE;
        let disk = Disk::open(sandbox, &dir, meta.size, blocks)?;
        let mut bytes = Vec::with_capacity(blocks as usize);
        disk.read_map(blocks, &mut bytes)?;
        let map = BlockMap::from_bytes(bytes).map_err(|(block, _)| corrupt_map(&dir, block))?;
        Ok(Overlay::assemble(dir, meta, base, disk, map))
    }

    fn assemble(
        dir: PathBuf,
        meta: OverlayMeta,
        base: Arc<TemplateImage>,
        disk: Disk,
        map: BlockMap,
    ) -> Overlay {
        Overlay {
            sandbox: meta.sandbox.as_str().into(),
            dir,
            meta,
            base,
            disk,
            map,
            locks: RegionLocks::new(),
            freeze: Arc::new(RwLock::new(())),
            flush: Mutex::new(FlushState::default()),
            unsynced: AtomicBool::new(false),
        }
    }

    /// Deletes this overlay's files and directory. Other handles (`Arc` clones) must be
    /// gone first: take it with `Arc::try_unwrap`.
    pub async fn delete(self) -> Result<(), OverlayError> {
        let dir = self.dir.clone();
        drop(self);
        Overlay::remove_dir(dir).await
    }

    /// Deletes the overlay in `dir`: the meta file first (so an interrupted delete
    /// leaves no half overlay that `open` would accept), then the rest. A missing
    /// directory is not an error.
    pub async fn remove_dir(dir: impl Into<PathBuf>) -> Result<(), OverlayError> {
        let dir = dir.into();
        let name = meta::sandbox_of_dir(&dir);
        let sandbox = name.clone();
        run_detached(&name, "delete", move || {
            let gone = |r: io::Result<()>| match r {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            };
            let meta_path = dir.join(META_FILE);
            // The meta file's removal is made durable before the rest goes, so a crash
            // in between never leaves a meta file naming missing data.
            gone(fs::remove_file(&meta_path))
                .and_then(|()| gone(crate::durable::sync_dir(&dir)))
                .and_then(|()| gone(fs::remove_dir_all(&dir)))
                .map_err(|source| OverlayError::Io {
                    sandbox,
                    op: "delete",
                    offset: 0,
                    path: dir,
                    source,
                })
        })
        .await
    }

    pub fn sandbox(&self) -> &Arc<str> {
        &self.sandbox
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn meta(&self) -> &OverlayMeta {
        &self.meta
    }

    /// The template under the overlay.
    pub fn base(&self) -> &Arc<TemplateImage> {
        &self.base
    }

    /// Bytes; the template's size.
    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// Checks `[offset, offset+len)` lies inside the overlay; returns its end.
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<u64, OverlayError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(end),
            _ => Err(OverlayError::OutOfRange {
                sandbox: self.sandbox.clone(),
                op,
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// Zero and data runs covering `[offset, offset+len)`, clipped to the overlay (NBD
    /// block status). A block is zero if marked zero, or if it is the template's and its
    /// chunk is an all-zero chunk; data otherwise.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<ImageExtent> {
        let mut out: Vec<ImageExtent> = Vec::new();
        let end = offset.saturating_add(len).min(self.size());
        let chunk_size = self.base.manifest().chunk_size as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let next = ((block + 1) * BLOCK_SIZE).min(end);
            let zero = match self.map.get(block) {
                BlockState::Zero => true,
                BlockState::Data => false,
                BlockState::Base => {
                    self.base.manifest().chunks[(pos / chunk_size) as usize].is_none()
                }
            };
            ImageExtent::append(&mut out, next - pos, zero);
            pos = next;
        }
        out
    }

    /// Indices of the template's chunks that hold at least one block the sandbox wrote,
    /// trimmed or zeroed: the chunks a commit must rebuild.
    pub fn dirty_chunks(&self) -> Vec<usize> {
        let blocks_per_chunk = self.base.manifest().chunk_size as u64 / BLOCK_SIZE;
        (0..self.base.manifest().chunk_count())
            .filter(|&index| {
                let start = index as u64 * blocks_per_chunk;
                self.map
                    .any_written(start, (start + blocks_per_chunk).min(self.map.len()))
            })
            .collect()
    }

    /// The overlay's bytes of chunk `index` of the template (the template's bytes with
    /// the sandbox's blocks over them), `manifest.chunk_len(index)` long.
    pub async fn materialize_chunk(&self, index: usize) -> Result<Vec<u8>, OverlayError> {
        let manifest = self.base.manifest();
        if index >= manifest.chunk_count() {
            return Err(OverlayError::NoSuchChunk {
                sandbox: self.sandbox.clone(),
                index,
                count: manifest.chunk_count(),
            });
        }
        let mut bytes = vec![0u8; manifest.chunk_len(index) as usize];
        self.read_at(index as u64 * manifest.chunk_size as u64, &mut bytes)
            .await?;
        Ok(bytes)
    }

    /// Waits for the writes under way to finish, then holds new writes, trims and
    /// zeroings back until the guard is dropped. For a commit: flush, freeze,
    /// materialize the dirty chunks, drop the guard.
    pub async fn freeze(&self) -> FreezeGuard {
        FreezeGuard {
            _exclusive: self.freeze.clone().write_owned().await,
        }
    }

    /// Starts fetching the template chunks under `[offset, offset+len)` (NBD CACHE).
    pub fn prefetch(&self, offset: u64, len: u64) {
        self.base.prefetch_range(offset, len);
    }

    /// Counts of written and zeroed blocks, and the space the files take.
    pub fn stats(&self) -> OverlayStats {
        OverlayStats {
            blocks_data: self.map.data_blocks(),
            blocks_zero: self.map.zero_blocks(),
            bytes_on_disk: self.disk.bytes_on_disk(),
        }
    }
}

fn corrupt_map(dir: &Path, block: u64) -> OverlayError {
    OverlayError::Corrupt {
        path: dir.join(disk::MAP_FILE),
        reason: format!("byte {block} is not a block state (0, 1 or 2)"),
    }
}

/// Runs `f` (whole-file work: create, open, delete) on the blocking pool.
async fn run_detached<T: Send + 'static>(
    sandbox: &Arc<str>,
    op: &'static str,
    f: impl FnOnce() -> Result<T, OverlayError> + Send + 'static,
) -> Result<T, OverlayError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(OverlayError::Interrupted {
            sandbox: sandbox.clone(),
            op,
            detail: e.to_string(),
        })
    })
}
