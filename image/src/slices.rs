//! Where a cached read's bytes lie in files: the zero-copy hook. An image hands a
//! frontend the pieces of page-cached files (and runs of zeroes) that make up a range
//! ([`crate::ReadImage::resident_pieces`]); the NBD server splices them into the
//! client's socket instead of copying them through a buffer.

use std::fs::File;
use std::sync::Arc;

/// Where a read's bytes lie in files: up to [`FileSlices::CAPACITY`] pieces, in order,
/// kept inline so that answering a read this way allocates nothing. A piece is bytes of
/// a file or a run of zeroes (a hole, which nothing stores). The files must not change
/// while a reply holds them (the daemon's chunk files never do).
#[derive(Debug, Default)]
pub struct FileSlices {
    pieces: [Option<Slice>; FileSlices::CAPACITY],
    count: usize,
}

/// One piece of a read answered from files.
#[derive(Debug, Clone)]
pub enum Slice {
    File(FileSlice),
    /// This many zero bytes: sent as a hole chunk where the client allows, otherwise
    /// spliced from zero pages.
    Zeroes(u32),
}

/// `len` bytes of `file` from `offset`.
#[derive(Debug, Clone)]
pub struct FileSlice {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u32,
    /// The export's check that bytes of the file are in the page cache, asked again
    /// right before they are spliced: when it fails (the pages left since), the splice
    /// runs in `block_in_place`, as it may wait for the disk.
    pub resident: Resident,
}

impl Slice {
    /// Bytes in the piece.
    pub fn len(&self) -> u32 {
        match self {
            Slice::File(file) => file.len,
            Slice::Zeroes(len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_zeroes(&self) -> bool {
        matches!(self, Slice::Zeroes(_))
    }
}

/// Whether bytes `offset..offset + len` of a file are in the page cache now.
pub type Resident = fn(file: &File, offset: u64, len: u64) -> bool;

impl FileSlices {
    /// Pieces one read may have: a read of up to three chunks' size (768 KiB at 256 KiB
    /// chunks, 3 MiB at the default 1 MiB). Longer reads over small chunks are copied.
    pub const CAPACITY: usize = 4;

    /// Appends a piece, with the check to ask again before it is spliced; `false` when
    /// there is no room (the read is then copied). An empty piece is left out.
    pub fn push(&mut self, file: &Arc<File>, offset: u64, len: u32, resident: Resident) -> bool {
        // An empty piece would frame as an empty data chunk, which the protocol forbids.
        if len == 0 {
            return true;
        }
        self.append(Slice::File(FileSlice {
            file: Arc::clone(file),
            offset,
            len,
            resident,
        }))
    }

    /// Appends `len` zero bytes, joined to a run of zeroes before them; `false` when
    /// there is no room. An empty run is left out.
    pub fn push_zeroes(&mut self, len: u32) -> bool {
        // A hole chunk must not be empty.
        if len == 0 {
            return true;
        }
        if let Some(Some(Slice::Zeroes(last))) =
            self.count.checked_sub(1).map(|i| &mut self.pieces[i])
        {
            if let Some(joined) = last.checked_add(len) {
                *last = joined;
                return true;
            }
        }
        self.append(Slice::Zeroes(len))
    }

    fn append(&mut self, piece: Slice) -> bool {
        if self.count == Self::CAPACITY {
            return false;
        }
        self.pieces[self.count] = Some(piece);
        self.count += 1;
        true
    }

    /// The pieces' slots, in order (every one is `Some`).
    pub fn pieces(&self) -> &[Option<Slice>] {
        &self.pieces[..self.count]
    }

    /// The pieces, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Slice> {
        self.pieces[..self.count].iter().flatten()
    }

    /// Bytes in all pieces.
    pub fn len(&self) -> u64 {
        self.iter().map(|p| u64::from(p.len())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether any piece is a run of zeroes.
    pub fn has_zeroes(&self) -> bool {
        self.iter().any(Slice::is_zeroes)
    }
}
