//! The capability traits of one block image. Each is small and says one thing an image
//! can do; [`Image`] is all of them, what a frontend serves.

use std::future::Future;
use std::io;

use crate::slices::FileSlices;

/// Allocation state of a byte range, as extents report it (NBD `base:allocation`,
/// `SEEK_DATA`/`SEEK_HOLE` on a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered, from the end of the previous extent (or the queried offset).
    pub length: u64,
    /// Not allocated (for a template: an all-zero chunk that is never stored).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// An image whose bytes can be read.
pub trait ReadImage: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of the opened image.
    fn size(&self) -> u64;

    /// The smallest unit the image tracks (writes below it cost a read-modify-write,
    /// extents are reported in it). Frontends advertise it as the preferred block size.
    fn block_size(&self) -> u32 {
        4096
    }

    /// Fills all of `buf` with the bytes at `offset`. Buffers are reused between
    /// requests, so an `Ok` that leaves part of `buf` unfilled would serve stale bytes.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// The `len` bytes at `offset` as pieces of files whose pages are in the page cache
    /// now (or runs of zeroes), so a frontend can send them without copying (`splice`,
    /// hole chunks). `false` (the default) when any part is not such a piece now: not
    /// local, not resident, or more than [`FileSlices::CAPACITY`] pieces; the frontend
    /// then calls [`ReadImage::read_at`]. Must not block: it is asked on a connection's
    /// reader task. A frontend asks each piece's [`crate::Resident`] check again right
    /// before sending it.
    fn resident_pieces(&self, _offset: u64, _len: u32, _out: &mut FileSlices) -> bool {
        false
    }

    /// An identity of the bytes a read-only image serves: two opens that return equal
    /// ids serve equal bytes, so a frontend may keep what it cached of one for the other
    /// (FUSE's page cache across opens). An image deleted and published again under its
    /// name with other bytes has another id. `None` (the default): no such promise, and
    /// nothing cached is kept across opens.
    fn content_id(&self) -> Option<u64> {
        None
    }
}

/// An image that may take writes.
pub trait WriteImage: ReadImage {
    /// Whether writes (and trims, write-zeroes) are accepted; read once when opened.
    fn writable(&self) -> bool;

    /// Whether every opener of this image sees one consistent view, a flush by any of
    /// them covering the writes of all (NBD's `CAN_MULTI_CONN`). Read-only images are.
    fn shared(&self) -> bool {
        !self.writable()
    }

    /// Writes `data` at `offset`; with `fua`, durably before returning.
    fn write_at(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every write that has returned durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}

/// An image that tracks which ranges hold data, and can drop or zero ranges.
pub trait SparseImage: WriteImage {
    /// The range is no longer needed; its contents become unspecified (this project's
    /// images read it as zeroes afterwards).
    fn trim(&self, offset: u64, len: u64, fua: bool)
        -> impl Future<Output = io::Result<()>> + Send;

    /// The range reads as zeroes afterwards; it may become a hole.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// The range reads as zeroes afterwards and stays allocated (NBD's `NO_HOLE`).
    ///
    /// The default writes real zeroes through [`WriteImage::write_at`], one
    /// [`ZERO_WRITE_SIZE`] piece at a time, which is always correct; an image that can
    /// provision zeroes more cheaply overrides it.
    fn write_zeroes_allocated(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let mut done = 0;
            while done < len {
                let piece = (len - done).min(ZERO_WRITE_SIZE as u64);
                // `piece` is at most ZERO_WRITE_SIZE, so it fits usize.
                self.write_at(offset + done, &ZEROES[..piece as usize], fua)
                    .await?;
                done += piece;
            }
            Ok(())
        }
    }

    /// Extents covering at least the first byte of `[offset, offset + len)`, in order,
    /// not past `len`.
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
}

/// An image that can be told what will be read soon.
pub trait PrefetchImage: ReadImage {
    /// Start bringing the range local; returns at once (a hint, never an error).
    fn prefetch(&self, _offset: u64, _len: u64) {}
}

/// Everything a frontend serves: an image with every capability (a read-only image
/// says so through [`WriteImage::writable`], and frontends refuse its writes before
/// they reach it).
pub trait Image: SparseImage + PrefetchImage {}

impl<T: SparseImage + PrefetchImage> Image for T {}

/// How much of an allocated write-zeroes the default writes per call: large enough
/// that a big range is few calls, small enough to live in static memory.
pub const ZERO_WRITE_SIZE: usize = 1 << 20;

/// Static zeroes, for writing zeroes without allocating.
pub static ZEROES: [u8; ZERO_WRITE_SIZE] = [0; ZERO_WRITE_SIZE];
