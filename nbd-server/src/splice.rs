//! Sending file pieces on a socket without copying them through memory: `splice(2)`
//! moves page references from a chunk file into a pipe and from the pipe into the
//! socket, so a cached read costs the server no copy at all (a `pread` into a buffer
//! and a `write` out of it cost two).
//!
//! Each connection on a plain TCP or unix socket has one [`SpliceSink`], owned by its
//! writer task: a pipe, and a duplicate of the socket's descriptor registered for write
//! readiness. The writer sends a reply's header through the socket as usual, then the
//! reply's file pieces through the pipe. The export offers only pieces in the page
//! cache ([`crate::Export::read_files`]); each is checked again right before its
//! splice, and one whose pages left the cache since is spliced in `block_in_place`. If the
//! kernel refuses to splice a file, the sink copies that piece instead, in bounded
//! reads, and tells the connection to stop offering file replies.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::debug;

use crate::export::FileSlices;

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
    /// Told the bytes of every splice into the socket ([`crate::Exports::spliced`]).
    counted: Box<dyn Fn(u64) + Send + Sync>,
}

impl SpliceSink {
    /// A sink writing to `socket` (a duplicate of a non-blocking TCP or unix socket
    /// this runtime serves); `None`, logged, when the system gives no pipe.
    /// `counted` is told the bytes of each splice that reached the socket.
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
        })
    }

    /// The switch the request side reads before answering a read with file pieces.
    pub fn enabled(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.enabled)
    }

    /// Sends every piece, in order, after whatever was written to the socket before.
    pub async fn send(&mut self, pieces: &FileSlices) -> io::Result<()> {
        let count = pieces.iter().count();
        for (i, piece) in pieces.iter().enumerate() {
            let last_piece = i + 1 == count;
            let mut offset = piece.offset as libc::loff_t;
            let mut left = piece.len as usize;
            while left > 0 {
                // The pipe is empty here: every byte put in is drained before the next.
                let want = left.min(self.capacity);
                let (file, pipe) = (piece.file.as_raw_fd(), self.pipe_write.as_raw_fd());
                // Resident when the read was answered; asked again, as the pages may
                // have left since (and a splice of them would wait for the disk).
                let moved = if (piece.resident)(&piece.file, offset as u64, want as u64) {
                    splice_in(file, &mut offset, pipe, want)
                } else {
                    off_runtime(|| splice_in(file, &mut offset, pipe, want))
                };
                match moved {
                    Ok(0) => return Err(short_file()),
                    Ok(n) => {
                        left -= n;
                        self.drain(n, left > 0 || !last_piece).await?;
                        (self.counted)(n as u64);
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        // A file system without splice: copy the rest of this piece and
                        // every later read of the connection.
                        debug!(%error, "splice from a file refused; copying reads");
                        self.enabled.store(false, Ordering::Relaxed);
                        self.copy(&piece.file, offset as u64, left).await?;
                        left = 0;
                    }
                }
            }
        }
        Ok(())
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
        use std::os::unix::fs::FileExt;
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

fn short_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "a file ended before the piece a read reply promised",
    )
}
