//! What the server serves: the [`Export`] trait (one block device's bytes) and the
//! [`Exports`] trait (the set of exports, looked up by name at handshake).
//!
//! The server knows nothing else about an export: the daemon implements these traits
//! over its cache and overlays, and tests implement them over a `Vec<u8>`.

use std::fs::File;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Allocation state of a byte range, as reported by NBD_CMD_BLOCK_STATUS for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered, from the end of the previous extent (or the queried offset).
    pub length: u64,
    /// Not allocated (for a template: an all-zero chunk that is never stored).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// One block device's bytes, served to the connections that opened it.
///
/// The server checks every request against `size()` and `read_only()` before calling a
/// method, so `offset + len` never passes the end and writes never reach a read-only
/// export. Errors are `io::Error`s; their OS error code (or kind) picks the NBD error.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; read once at handshake.
    fn size(&self) -> u64;

    /// Whether writes are refused; read once at handshake.
    fn read_only(&self) -> bool;

    /// Whether several connections to this export see one consistent view (advertise NBD_FLAG_CAN_MULTI_CONN).
    fn can_multi_conn(&self) -> bool {
        self.read_only()
    }

    /// Fills all of `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes `data` at `offset`; with `fua`, durably before returning.
    fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every write that has returned durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// The range is no longer needed; its contents become unspecified.
    fn trim(&self, offset: u64, len: u64, fua: bool)
        -> impl Future<Output = io::Result<()>> + Send;

    /// The range reads as zeroes afterwards; it may become a hole.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// The range reads as zeroes afterwards and stays allocated (NBD_CMD_FLAG_NO_HOLE).
    ///
    /// The default writes real zeroes through [`Export::write`], one
    /// [`NO_HOLE_WRITE_SIZE`] piece at a time, which is always correct; an export that can
    /// provision zeroes more cheaply overrides it.
    fn write_zeroes_no_hole(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let mut done = 0;
            while done < len {
                let piece = (len - done).min(NO_HOLE_WRITE_SIZE as u64);
                // `piece` is at most NO_HOLE_WRITE_SIZE, so it fits usize.
                let zeroes = &ZEROES[..piece as usize];
                self.write(offset + done, zeroes, fua).await?;
                done += piece;
            }
            Ok(())
        }
    }

    /// The `len` bytes at `offset` as pieces of files whose pages are already in the page
    /// cache (or runs of zeroes, [`FileSlices::push_zeroes`]), so the server can send them
    /// with `splice`, or as hole chunks, instead of copying them through a buffer.
    /// `false` (the default) when any part is not such a piece now: not local, not
    /// resident, or more than [`FileSlices::CAPACITY`] pieces; the
    /// server then calls [`Export::read`]. Must not block: it is asked when the request
    /// is first polled, on the connection's reader task (and again from the request's
    /// own task if that first attempt would wait), and only for reads of at least
    /// [`SPLICE_MIN_READ`](crate::SPLICE_MIN_READ) bytes on a socket served with
    /// [`serve`](crate::serve) or [`serve_socket`](crate::serve_socket) without TLS. The
    /// server asks each piece's [`Resident`] check again right before splicing it, and
    /// splices a piece that left the page cache since off the runtime's hands
    /// (`block_in_place`).
    fn read_files(&self, _offset: u64, _len: u32, _out: &mut FileSlices) -> bool {
        false
    }

    /// NBD_CMD_CACHE: start bringing the range local; may return before it is.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// Extents covering at least the first byte of [offset, offset+len), in order, not past len.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send;
}

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
    pub(crate) fn pieces(&self) -> &[Option<Slice>] {
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

/// How much of a NO_HOLE write-zeroes the default implementation writes per call:
/// large enough that a big range is few calls, small enough to live in static memory.
pub const NO_HOLE_WRITE_SIZE: usize = 1 << 20;

/// The zeroes written by [`Export::write_zeroes_no_hole`]'s default; static, so zeroing
/// never allocates.
pub(crate) static ZEROES: [u8; NO_HOLE_WRITE_SIZE] = [0; NO_HOLE_WRITE_SIZE];

/// The set of exports a server offers, looked up by name at handshake.
pub trait Exports: Send + Sync + 'static {
    /// The export type a name opens to.
    type Export: Export;

    /// Open `name` for one connection from `peer` (a printable address). The returned value is held for the
    /// connection's lifetime and dropped when it closes (the daemon uses that to know who uses an export).
    ///
    /// `NBD_OPT_INFO` opens an export too, and drops it as soon as the reply is sent.
    fn open(
        &self,
        name: &str,
        peer: &str,
    ) -> impl Future<Output = Result<Arc<Self::Export>, OpenError>> + Send;

    /// (name, description) of every export, for NBD_OPT_LIST.
    fn list(&self) -> impl Future<Output = Vec<(String, String)>> + Send;

    /// Called once per finished request, for metrics. Default: nothing.
    ///
    /// `bytes` is the request's length (the data moved for reads and writes, the range
    /// covered otherwise); `ok` is false when the client got an error.
    fn observe(&self, _command: Command, _bytes: u64, _elapsed: Duration, _ok: bool) {}

    /// Called with the bytes of a read's file pieces once they were spliced into a
    /// client's socket ([`Export::read_files`]), for metrics. Default: nothing.
    fn spliced(&self, _bytes: u64) {}
}

/// Why [`Exports::open`] refused a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No export has this name (NBD_REP_ERR_UNKNOWN).
    Unknown,
    /// The export exists but cannot be served now; the text is shown to the client
    /// (NBD_REP_ERR_UNKNOWN with this message).
    Unavailable(String),
}

/// A transmission command, as reported to [`Exports::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_DISC (the client disconnects).
    Disc,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_CACHE (prefetch).
    Cache,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
}

impl Command {
    /// Every command, for metrics that pre-register a series per command.
    pub const ALL: [Command; 8] = [
        Command::Read,
        Command::Write,
        Command::Disc,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
    ];

    /// A short lowercase name for logs and metric labels ("read", "write_zeroes", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
        }
    }

    /// The command a request type on the wire stands for, if this server knows it.
    pub fn from_wire(kind: u16) -> Option<Command> {
        use crate::proto::*;
        Some(match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_command_has_a_distinct_name() {
        let names: std::collections::HashSet<_> = (0..=7u16)
            .map(|kind| Command::from_wire(kind).map(|c| c.name()))
            .collect();
        assert_eq!(names.len(), 8);
        assert!(!names.contains(&None));
        assert_eq!(Command::from_wire(8), None);
        assert_eq!(Command::from_wire(0xffff), None);
    }

    #[test]
    fn all_lists_every_command_once() {
        let names: std::collections::HashSet<_> = Command::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Command::ALL.len());
    }
}
