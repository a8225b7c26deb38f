//! Sending file pieces on a socket without copying them through memory: `splice(2)`
//! moves page references from a chunk file into a pipe and from the pipe into the
//! socket, so a cached read costs the server no copy at all (a `pread` into a buffer
//! and a `write` out of it cost two).
//!
//! Each connection on a plain TCP or unix socket has one [`SpliceSink`], owned by its
//! writer task: a pipe, and a duplicate of the socket's descriptor registered for write
//! readiness. The writer puts a reply's header into the pipe (a copy of a few bytes),
//! then its file pieces (references), and small replies queued behind it; the pipe goes
//! to the socket when it is full or the batch ends, so a run of cached reads reaches the
//! socket in few large sends. Runs of zeroes are spliced from one shared memory file of
//! zeroes. The export offers only pieces in the page cache ([`ReadImage::resident_pieces`](lazyblk_image::ReadImage::resident_pieces));
//! each is checked again right before its splice, and one whose pages left the cache
//! since is spliced in `block_in_place`. If the kernel refuses to splice a file, the
//! sink sends what the pipe holds, copies that piece, in bounded reads, and tells the
//! connection to stop offering file replies.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::debug;

use lazyblk_image::{FileSlice, Slice, ZEROES};

/// Reads shorter than this are copied: for a 4 KiB read one `pread` is cheaper than the
/// extra system calls of a splice, and the copy is small.
pub const SPLICE_MIN_READ: u32 = 64 << 10;

/// The pipe size asked for: a 1 MiB chunk piece moves in one pair of splices. A system
/// that allows less (`/proc/sys/fs/pipe-max-size`) keeps the default 64 KiB, which
/// works in more steps.
const PIPE_SIZE: i32 = 1 << 20;
/// The buffer of the copy a file that cannot be spliced falls back to.
const COPY_PIECE: usize = 256 << 10;

/// One connection's way to send file pieces with `splice`.
pub struct SpliceSink {
    /// A duplicate of the connection's socket, for its write readiness.
    socket: AsyncFd<OwnedFd>,
    pipe_read: OwnedFd,
    pipe_write: OwnedFd,
    /// Bytes the pipe holds at most.
    capacity: usize,
    /// Whether the request side may produce file replies; cleared when a splice is
    /// refused, so later reads on this connection are copied.
    enabled: Arc<AtomicBool>,
    /// For a piece whose file cannot be spliced; allocated on first use.
    fallback: Vec<u8>,
    /// Told the bytes of file pieces once they are sent ([`Images::spliced`](lazyblk_image::Images::spliced)).
    counted: Box<dyn Fn(u64) + Send + Sync>,
    /// Bytes in the pipe, not yet sent: reply headers and pieces, in order.
    pending: usize,
    /// Of those, bytes of file pieces: counted once sent.
    pending_file: u64,
}

impl SpliceSink {
    /// A sink writing to `socket` (a duplicate of a non-blocking TCP or unix socket
    /// this runtime serves); `None`, logged, when the system gives no pipe.
    /// `counted` is told the bytes of file pieces once they reached the socket.
    pub fn new(socket: OwnedFd, counted: Box<dyn Fn(u64) + Send + Sync>) -> Option<Self> {
        match Self::try_new(socket, counted) {
            Ok(sink) => Some(sink),
            Err(error) => {
                debug!(%error, "no splice for this connection; reads are copied");
                None
            }
        }
    }

    fn try_new(socket: OwnedFd, counted: Box<dyn Fn(u64) + Send + Sync>) -> io::Result<Self> {
        // SAFETY: the OwnedFd is this sink's own descriptor: open, never replaced, and
        // closed only when the AsyncFd drops it.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are new descriptors this sink now owns.
        let (pipe_read, pipe_write) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; a refusal leaves the default size.
        unsafe { libc::fcntl(pipe_write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        // SAFETY: as above; F_GETPIPE_SZ only reads the size.
        let capacity = unsafe { libc::fcntl(pipe_write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            socket,
            pipe_read,
            pipe_write,
            capacity: capacity as usize,
            enabled: Arc::new(AtomicBool::new(true)),
            fallback: Vec::new(),
            counted,
            pending: 0,
            pending_file: 0,
        })
    }

    /// The switch the request side reads before answering a read with file pieces.
    pub fn enabled(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.enabled)
    }

    /// Bytes in the pipe not yet sent.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Puts a copy of `bytes` in the pipe, after what it holds (sending that first when
    /// the pipe is full).
    pub async fn put_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            match write_some(self.pipe_write.as_raw_fd(), &bytes[done..]) {
                Ok(n) => {
                    done += n;
                    self.pending += n;
                }
                Err(error) => {
                    if !self.retry(&error).await? {
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts every piece in the pipe, in order, after what it holds (sending whenever the
    /// pipe is full). Runs of zeroes are spliced from shared zero pages.
    pub async fn put_files(&mut self, pieces: &[Option<Slice>]) -> io::Result<()> {
        for piece in pieces.iter().flatten() {
            match piece {
                Slice::File(piece) => self.put_file(piece).await?,
                Slice::Zeroes(len) => self.put_zeroes(*len as usize).await?,
            }
        }
        Ok(())
    }

    async fn put_file(&mut self, piece: &FileSlice) -> io::Result<()> {
        let mut offset = piece.offset as libc::loff_t;
        let mut left = piece.len as usize;
        while left > 0 {
            let want = left.min(self.capacity);
            // Resident when the read was answered; asked again, as the pages may have
            // left since: then the splice may wait for the disk, so it runs off the
            // runtime, and what the pipe holds goes first rather than wait with it.
            let resident = (piece.resident)(&piece.file, offset as u64, want as u64);
            if !resident {
                self.flush(true).await?;
            }
            let (file, pipe) = (piece.file.as_raw_fd(), self.pipe_write.as_raw_fd());
            let moved = if resident {
                splice_in(file, &mut offset, pipe, want)
            } else {
                off_runtime(|| splice_in(file, &mut offset, pipe, want))
            };
            match self.moved(moved).await? {
                Some(n) => {
                    left -= n;
                    self.pending_file += n as u64;
                }
                None => {
                    // A file system without splice: copy the rest of this piece and
                    // every later read of the connection.
                    self.enabled.store(false, Ordering::Relaxed);
                    self.flush(true).await?;
                    self.copy(&piece.file, offset as u64, left).await?;
                    left = 0;
                }
            }
        }
        Ok(())
    }

    /// Puts `len` zero bytes in the pipe: references to the pages of [`zero_file`], or
    /// copies of static zeroes where the system gives no such file.
    async fn put_zeroes(&mut self, mut left: usize) -> io::Result<()> {
        while left > 0 {
            let want = left.min(self.capacity).min(ZEROES.len());
            let moved = match zero_file() {
                Some(zeroes) => {
                    let pipe = self.pipe_write.as_raw_fd();
                    self.moved(splice_in(zeroes.as_raw_fd(), &mut 0, pipe, want))
                        .await?
                }
                None => None,
            };
            match moved {
                Some(n) => left -= n,
                None => {
                    self.put_bytes(&ZEROES[..want]).await?;
                    left -= want;
                }
            }
        }
        Ok(())
    }

    /// What a splice into the pipe came to: `Some(bytes)` moved (0 when interrupted or
    /// when the full pipe was sent, to try again), `None` when the kernel refused the
    /// source (logged; the caller copies instead).
    async fn moved(&mut self, moved: io::Result<usize>) -> io::Result<Option<usize>> {
        match moved {
            Ok(0) => Err(short_file()),
            Ok(n) => {
                self.pending += n;
                Ok(Some(n))
            }
            Err(error) if self.retry(&error).await? => Ok(Some(0)),
            Err(error) => {
                debug!(%error, "splice into the pipe refused; copying");
                Ok(None)
            }
        }
    }

    /// Sends everything the pipe holds; `more` when other bytes follow at once.
    pub async fn flush(&mut self, more: bool) -> io::Result<()> {
        if self.pending > 0 {
            self.drain(self.pending, more).await?;
            self.pending = 0;
            (self.counted)(std::mem::take(&mut self.pending_file));
        }
        Ok(())
    }

    /// After a write into the pipe failed with `error`: whether to try it again, as it
    /// was interrupted, or the pipe was full (what it holds is sent first).
    async fn retry(&mut self, error: &io::Error) -> io::Result<bool> {
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(true);
        }
        if !is_full(error) || self.pending == 0 {
            return Ok(false);
        }
        self.flush(true).await?;
        Ok(true)
    }

    /// Moves `len` bytes from the pipe into the socket, waiting while it is full.
    async fn drain(&mut self, len: usize, more: bool) -> io::Result<()> {
        let flags = libc::SPLICE_F_MOVE
            | libc::SPLICE_F_NONBLOCK
            | if more { libc::SPLICE_F_MORE } else { 0 };
        let pipe = self.pipe_read.as_raw_fd();
        self.send_all(len, |socket, _, left| {
            // SAFETY: valid descriptors; no offsets (both are streams).
            let n = unsafe {
                libc::splice(
                    pipe,
                    std::ptr::null_mut(),
                    socket,
                    std::ptr::null_mut(),
                    left,
                    flags,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
        .await
    }

    /// Sends `len` bytes of `file` at `offset` by reading them into a buffer, a bounded
    /// piece at a time, each read off the runtime's hands.
    async fn copy(&mut self, file: &File, mut offset: u64, mut len: usize) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.fallback);
        buf.resize(COPY_PIECE, 0);
        let result = async {
            while len > 0 {
                let piece = &mut buf[..len.min(COPY_PIECE)];
                off_runtime(|| file.read_exact_at(piece, offset))?;
                let piece = &*piece;
                self.send_all(piece.len(), |socket, done, _| {
                    write_some(socket, &piece[done..])
                })
                .await?;
                offset += piece.len() as u64;
                len -= piece.len();
            }
            Ok(())
        }
        .await;
        self.fallback = buf;
        result
    }

    /// Calls `send(socket, bytes sent so far, bytes left)` until `len` bytes are sent,
    /// waiting while the socket is full.
    async fn send_all(
        &self,
        len: usize,
        mut send: impl FnMut(RawFd, usize, usize) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let mut ready = self.socket.writable().await?;
            match ready.try_io(|socket| send(socket.as_raw_fd(), done, len - done)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => done += n,
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Err(error),
                // Not writable after all: readiness was cleared; wait again.
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// Runs a system call that may wait for the disk: through `block_in_place` on a
/// multi-thread runtime (this worker's other tasks move to another thread meanwhile),
/// inline elsewhere (a current-thread runtime, where that is not allowed).
fn off_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// A memory file of [`ZEROES`]' size holding zeroes, written once and shared by every
/// connection: runs of zeroes are spliced from its pages, so sending them copies
/// nothing. `None` when the system gives no memory file (zeroes are then copied).
fn zero_file() -> Option<&'static File> {
    static ZERO_FILE: OnceLock<Option<File>> = OnceLock::new();
    ZERO_FILE
        .get_or_init(|| match make_zero_file() {
            Ok(file) => Some(file),
            Err(error) => {
                debug!(%error, "no memory file for zeroes; zeroes are copied");
                None
            }
        })
        .as_ref()
}

/// The memory file of [`zero_file`]: written (splicing a sparse memory file's holes is
/// not supported by every kernel), then sealed, so that nothing can ever change what
/// every client is sent as zeroes.
fn make_zero_file() -> io::Result<File> {
    // SAFETY: a constant NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"lazyblk-zeroes".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor this file now owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.write_all_at(&ZEROES, 0)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Moves up to `len` bytes of `file` at `offset` (advanced) into the pipe.
fn splice_in(file: RawFd, offset: &mut libc::loff_t, pipe: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: valid descriptors; `offset` outlives the call.
    let n = unsafe {
        libc::splice(
            file,
            offset,
            pipe,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_some(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for reads of its length during the call.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether a write into the non-blocking pipe failed because the pipe is full.
fn is_full(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

fn short_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "a file ended before the piece a read reply promised",
    )
}
