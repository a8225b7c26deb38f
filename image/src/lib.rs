//! lazyblk-image: block images as every frontend sees them. A leaf crate: it depends on
//! nothing else in the workspace, and a frontend (the NBD server, the FUSE mount, the
//! kernel's `/dev/nbdX`, a future ublk or vhost-user-blk door) depends on it alone for
//! the image side, keeping only its own wire mapping. The daemon implements it once.
//!
//! # Layout
//! - `image`: the capability traits, in the style of cloud-hypervisor's block crate:
//!   [`ReadImage`] (size, block size, read at an offset, the zero-copy pieces of a
//!   cached range), [`WriteImage`] (write, flush, FUA), [`SparseImage`] (trim, write
//!   zeroes, extents), [`PrefetchImage`] (hints), and [`Image`], all four together,
//!   which is what a frontend serves.
//! - `set`: [`Images`], the images a frontend can open and list (templates read-only,
//!   sandboxes read-write, [`Kind`]), with [`Listing`] and [`OpenError`].
//! - `op`: [`Op`], the one neutral operation type for metrics and traces, and [`Door`],
//!   the frontend an operation came through.
//! - `slices`: [`FileSlices`], where a cached read's bytes lie in files (for `splice`).
//! - `buffers`: [`BufferPool`], the one pool of request buffers.
//! - `memory`: [`MemImage`] and [`MemImages`], an in-memory image set for tests and for
//!   the frontends' conformance suite.
//!
//! # Contract
//! A frontend checks every request against [`ReadImage::size`] and
//! [`WriteImage::writable`] before calling an image, so `offset + len` never passes the
//! end and writes never reach a read-only image. Errors are `io::Error`s whose OS error
//! code (or kind) the frontend maps to its wire (an NBD error value, a FUSE errno).

mod buffers;
mod image;
mod memory;
mod op;
mod set;
mod slices;

pub use buffers::{BufferPool, PooledBuffer, RETAINED_BYTES};
pub use image::{
    Extent, Image, PrefetchImage, ReadImage, SparseImage, WriteImage, ZEROES, ZERO_WRITE_SIZE,
};
pub use memory::{MemImage, MemImages, MEM_BLOCK_SIZE};
pub use op::{Door, Op};
pub use set::{Images, Kind, Listing, OpenError};
pub use slices::{FileSlice, FileSlices, Resident, Slice};
