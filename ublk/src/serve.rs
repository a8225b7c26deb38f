//! The queues of one device: a thread per hardware queue (libublk's), a task per tag on
//! the thread's local executor, each image call run on the daemon's tokio runtime.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};
use lazyblk_image::{BufferPool, Door, Images, Op, ReadImage, SparseImage, WriteImage};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError as LibError, UblkUringData};
use tokio::runtime::Handle;

/// How long a queue thread's ring wait may sleep with nothing to do before it looks
/// whether the queue is stopping (libublk's idle wake-up).
const IDLE_WAKE_SECS: u64 = 20;

/// What every queue of a device shares.
pub(crate) struct Target<S: Images> {
    pub(crate) images: Arc<S>,
    pub(crate) image: Arc<S::Image>,
    pub(crate) runtime: Handle,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) read_only: bool,
}

/// Serves queue `qid` of `dev` until the device stops (or the daemon exits).
pub(crate) fn serve_queue<S: Images>(qid: u16, dev: &UblkDev, target: Arc<Target<S>>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(queue) => Rc::new(queue),
        Err(error) => {
            tracing::error!(device = dev.dev_info.dev_id, qid, %error, "creating a ublk queue");
            return;
        }
    };
    let executor = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in queue.tags() {
        let queue = queue.clone();
        let target = target.clone();
        tasks.push(executor.spawn(async move {
            match serve_tag(&queue, tag, &target).await {
                Ok(()) | Err(LibError::QueueIsDown) => {}
                Err(error) => tracing::warn!(qid, tag, %error, "a ublk tag's task ended"),
            }
        }));
    }
    let ticker = executor.clone();
    smol::block_on(executor.run(async move {
        let run = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|task| task.is_finished());
        if let Err(error) =
            libublk::wait_and_handle_io_events(&queue, Some(IDLE_WAKE_SECS), run, done).await
        {
            tracing::warn!(qid, %error, "a ublk queue's event loop ended");
        }
    }));
}

/// One tag: fetch a request, serve it, commit the result and fetch the next, until the
/// queue goes down.
async fn serve_tag<S: Images>(
    queue: &UblkQueue<'_>,
    tag: u16,
    target: &Target<S>,
) -> Result<(), LibError> {
    let mut buf = IoBuf::<u8>::new(queue.dev.dev_info.max_io_buf_bytes as usize);
    let wake = Waker::new().map_err(LibError::IOError)?;
    queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = *queue.get_iod(tag);
        let result = serve_request(&iod, buf.as_mut_slice(), target, &wake).await;
        queue
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), result)
            .await?;
    }
}

/// Serves one request; the result is the bytes done or a negative errno.
async fn serve_request<S: Images>(
    iod: &sys::ublksrv_io_desc,
    buf: &mut [u8],
    target: &Target<S>,
    wake: &Waker,
) -> i32 {
    let op_code = iod.op_flags & 0xff;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let op = match op_code {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write,
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Trim,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return -libc::EOPNOTSUPP,
    };
    let image = &target.image;
    // A flush has no range: the kernel's flush request carries whatever sector its
    // request structure last held.
    let (offset, len) = if op == Op::Flush {
        (0, 0)
    } else {
        (iod.start_sector << 9, u64::from(iod.nr_sectors) << 9)
    };
    if offset.checked_add(len).is_none_or(|end| end > image.size()) {
        tracing::warn!(
            op = op.name(),
            offset,
            len,
            size = image.size(),
            "ublk request past the end of its image"
        );
        return -libc::EINVAL;
    }
    if op != Op::Read && op != Op::Flush && target.read_only {
        return -libc::EROFS;
    }
    let started = Instant::now();
    let data_len = usize::try_from(len).unwrap_or(usize::MAX);
    if matches!(op, Op::Read | Op::Write) && data_len > buf.len() {
        return -libc::EINVAL;
    }
    let outcome: io::Result<()> = match op {
        Op::Read => match read_in_place(target, offset, &mut buf[..data_len]) {
            Some(read) => read,
            None => read_handed_off(target, wake, offset, data_len, buf).await,
        },
        Op::Write => {
            let mut data = target.pool.take_filled(data_len);
            data.copy_from_slice(&buf[..data_len]);
            let image = image.clone();
            let (data, written) = on_runtime(&target.runtime, wake, async move {
                let written = image.write_at(offset, &data, fua).await;
                (data, written)
            })
            .await
            .unwrap_or_else(|e| (Vec::new(), Err(e)));
            target.pool.give_back(data);
            written
        }
        Op::Flush => {
            let image = image.clone();
            flatten(on_runtime(&target.runtime, wake, async move { image.flush().await }).await)
        }
        Op::Trim => {
            let image = image.clone();
            flatten(
                on_runtime(&target.runtime, wake, async move {
                    image.trim(offset, len, fua).await
                })
                .await,
            )
        }
        _ => {
            // Write zeroes; NOUNMAP asks that the range stay allocated.
            let allocated = iod.op_flags & sys::UBLK_IO_F_NOUNMAP != 0;
            let image = image.clone();
            flatten(
                on_runtime(&target.runtime, wake, async move {
                    if allocated {
                        image.write_zeroes_allocated(offset, len, fua).await
                    } else {
                        image.write_zeroes(offset, len, fua).await
                    }
                })
                .await,
            )
        }
    };
    target
        .images
        .observe(Door::Ublk, op, len, started.elapsed(), outcome.is_ok());
    match outcome {
        // The kernel splits requests at max_sectors (the buffer size), so this fits.
        Ok(()) => i32::try_from(len).unwrap_or(i32::MAX),
        Err(error) => {
            tracing::warn!(op = op.name(), offset, len, %error, "ublk request failed");
            -error.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::EIO)
        }
    }
}

/// A read answered at its first poll (bytes in the page cache), polled on the queue's
/// thread in the runtime's context and straight into the queue slot's buffer: no copy
/// between buffers, no hand-off. None when it would have to wait: the read is dropped
/// half-way and done again by [`read_handed_off`] (as NBD's server does with its
/// reads; a fetch it started goes on by itself). A panic is the request's EIO.
///
/// The B11 profile of a qd 32 run showed the hand-off on every request (a task spawned
/// on a worker, a futex wake, the eventfd back through the ring, a copy from a pooled
/// buffer) costing ublk more than NBD's whole request path.
fn read_in_place<S: Images>(
    target: &Target<S>,
    offset: u64,
    buf: &mut [u8],
) -> Option<io::Result<()>> {
    let len = buf.len();
    let _context = target.runtime.enter();
    let read = std::pin::pin!(target.image.read_at(offset, buf));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read.poll(&mut cx))) {
        Ok(std::task::Poll::Ready(result)) => Some(result),
        Ok(std::task::Poll::Pending) => None,
        Err(_) => {
            tracing::error!(offset, len, "a ublk read panicked; the kernel gets EIO");
            Some(Err(io::Error::from_raw_os_error(libc::EIO)))
        }
    }
}

/// A read that waits (a fetch, the disk) on the daemon's runtime, into a pooled buffer
/// then copied into the slot's.
async fn read_handed_off<S: Images>(
    target: &Target<S>,
    wake: &Waker,
    offset: u64,
    data_len: usize,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut data = target.pool.take_filled(data_len);
    let image = target.image.clone();
    let (data, read) = on_runtime(&target.runtime, wake, async move {
        let read = image.read_at(offset, &mut data).await;
        (data, read)
    })
    .await
    .unwrap_or_else(|e| (Vec::new(), Err(e)));
    if read.is_ok() {
        buf[..data_len].copy_from_slice(&data);
    }
    target.pool.give_back(data);
    read
}

fn flatten(result: io::Result<io::Result<()>>) -> io::Result<()> {
    result.and_then(|inner| inner)
}

/// An eventfd a tag's task waits on through its queue's ring, written when the
/// runtime has finished the tag's image call.
struct Waker {
    fd: Arc<OwnedFd>,
    /// Where the ring puts the eventfd's counter; lives as long as the task.
    counter: std::cell::UnsafeCell<[u8; 8]>,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker {
            fd: Arc::new(fd),
            counter: std::cell::UnsafeCell::new([0; 8]),
        })
    }
}

/// Writes the eventfd when dropped: after the image call, or when the runtime drops
/// the task unfinished (it is shutting down), so the queue's task never waits forever.
struct Wake(Arc<OwnedFd>);

impl Drop for Wake {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to a descriptor we hold.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Runs `work` on the daemon's runtime and waits for it on the queue's ring. Writes,
/// flushes and the other changes always come here: they may block on the disk (an
/// `fdatasync`), which must not hold up the queue's other requests.
async fn on_runtime<T: Send + 'static>(
    runtime: &Handle,
    waker: &Waker,
    work: impl Future<Output = T> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let wake = Wake(waker.fd.clone());
    runtime.spawn(async move {
        let value = work.await;
        let _ = tx.send(value);
        drop(wake);
    });
    let sqe = opcode::Read::new(
        types::Fd(waker.fd.as_raw_fd()),
        waker.counter.get().cast::<u8>(),
        8,
    )
    .build();
    let read = libublk::uring_async::ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    if read < 0 {
        // The ring could not read the eventfd: wait for the answer off the ring.
        tracing::debug!(errno = -read, "reading a ublk tag's eventfd on its ring");
    }
    rx.recv()
        .map_err(|_| io::Error::other("the image call was cancelled (the daemon is stopping)"))
}
