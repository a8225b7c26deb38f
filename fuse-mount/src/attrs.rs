//! What the filesystem's parts share about attributes: the block size and name length
//! it shows, and the fields of a setattr request.

/// The block size shown by `stat` and `statfs`: the page size and the block size of
/// the ext4 templates, so tools that size their I/O by it stay aligned.
pub(crate) const BLOCK_SIZE: u32 = 4096;

/// The longest file name the folders show (the kernel's `NAME_MAX`).
pub(crate) const NAME_MAX: u32 = 255;

/// The owner and size fields of a setattr request.
pub(crate) struct AttrChange {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
}
