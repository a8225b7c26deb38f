//! lazyblk-fuse: the FUSE filesystem that shows templates and sandbox overlays as
//! plain files, for runtimes that take a file path (Firecracker, Cloud Hypervisor,
//! QEMU) and for loop devices.
//!
//! ```text
//! DIR/templates/<id>   read-only (0444), the template's size
//! DIR/sandboxes/<sb>   read-write (0644), the overlay's size, fixed
//! ```
//!
//! # Layout
//! - `files`: [`Folder`], the two folders and the kind of image each shows. The files
//!   themselves are `lazyblk-image`'s: any [`Images`](lazyblk_image::Images) set can be
//!   mounted, and each file is one of its images.
//! - `mount`: [`mount`], [`MountOptions`] and the [`Mount`] that unmounts on drop;
//!   [`adopt`] for a mount kept across a restart ([`KeptSession`]).
//! - `adopt`: serving a live `/dev/fuse` connection another process initialised.
//! - `record`: the session record (inode numbers, generation) a restart reads back.
//! - `stale`: [`clear_stale_mount`], for a mount left behind by a killed daemon.
//! - `fs`: the state behind a mount and the `fuser::Filesystem` callbacks, with
//!   the kernel connection settings and the refusals of create, rename and remove.
//! - `namespace`: the root, the folders and their files: lookups, attributes,
//!   listings, and the checks on setattr (sizes are fixed) and access.
//! - `file_io`: open, read, write, fsync, and the page cache policy.
//! - `sparse`: fallocate (punch hole, zero range) and lseek (SEEK_DATA, SEEK_HOLE).
//! - `inodes`: stable inode numbers per (folder, name).
//! - `handles`: open files and directory listings by handle.
//! - `attrs`: the block size and name length shown, and a setattr's fields.
//! - `error`: [`FuseError`].
//!
//! # Data flow
//! The kernel's requests arrive on a few session threads. Names and attributes are
//! answered there, from `Images::list_local` and `Images::open_local` (local state
//! only). A read, write, fsync, fallocate or lseek is checked there (bounds,
//! read-only), then handed to the tokio runtime as a task that awaits the image
//! (`read_at`, `write_at`, `flush`, `write_zeroes`, `extents`), reports the operation
//! to `Images::observe` and replies to the kernel itself; so many requests are in
//! flight at once and none blocks the session threads on the network. Request buffers
//! come from `lazyblk-image`'s pool.

mod adopt;
mod attrs;
mod error;
mod file_io;
mod files;
mod fs;
mod handles;
mod inodes;
mod mount;
pub mod mountinfo;
mod namespace;
mod record;
mod sparse;
mod stale;

pub use error::FuseError;
pub use files::Folder;
pub use mount::{adopt, mount, KeptSession, Mount, MountOptions};
pub use stale::clear_stale_mount;
