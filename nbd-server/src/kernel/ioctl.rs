//! The ioctl path to the kernel's NBD client, for kernels without its netlink family:
//! a dedicated thread opens the device, configures it, hands the socket over and sits
//! in `NBD_DO_IT` (see the module header of [`crate::kernel`]).

use super::*;

/// The ioctl group of the NBD driver (`_IO(0xab, n)`).
pub(super) const NBD_IOCTL_TYPE: u64 = 0xab;

/// One NBD ioctl: its request code and its name for error messages.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    name: &'static str,
    code: u64,
}

/// `_IO(0xab, nr)`: no direction, no size; the argument is passed by value.
const fn nbd_ioctl(name: &'static str, nr: u64) -> Request {
    Request {
        name,
        code: (NBD_IOCTL_TYPE << 8) | nr,
    }
}

pub(super) const NBD_SET_SOCK: Request = nbd_ioctl("NBD_SET_SOCK", 0);
pub(super) const NBD_SET_BLKSIZE: Request = nbd_ioctl("NBD_SET_BLKSIZE", 1);
pub(super) const NBD_SET_SIZE: Request = nbd_ioctl("NBD_SET_SIZE", 2);
pub(super) const NBD_DO_IT: Request = nbd_ioctl("NBD_DO_IT", 3);
pub(super) const NBD_CLEAR_SOCK: Request = nbd_ioctl("NBD_CLEAR_SOCK", 4);
pub(super) const NBD_DISCONNECT: Request = nbd_ioctl("NBD_DISCONNECT", 8);
pub(super) const NBD_SET_TIMEOUT: Request = nbd_ioctl("NBD_SET_TIMEOUT", 9);
pub(super) const NBD_SET_FLAGS: Request = nbd_ioctl("NBD_SET_FLAGS", 10);

/// The ioctl attach: the device thread, which returns once the device is up.
pub(super) fn attach_ioctl(
    device: Device,
    socket: UnixStream,
    info: ExportInfo,
    mut clock: PhaseClock,
) -> Result<Connection, KernelError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    thread::Builder::new()
        .name(format!("{}-do-it", device.name()))
        .spawn(move || {
            let file = match configure(device, &socket, info) {
                Ok(file) => file,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let _ = done_tx.send(serve(device, &file));
        })
        .map_err(|source| KernelError::Thread { device, source })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(KernelError::StoppedAtStart {
                device,
                cause: None,
            })
        }
    }
    let mut connection = Connection {
        device,
        info,
        link: Link::Ioctl(done_rx),
        backend: None,
        phases: Vec::new(),
        ended: None,
    };
    let started = match &connection.link {
        Link::Ioctl(done) => wait_started(device, done),
        Link::Netlink => Ok(()), // not made here
    };
    if let Err(e) = started {
        // The thread may still be in NBD_DO_IT: leave no device connected without a
        // Connection to disconnect it by.
        if matches!(e, KernelError::StartTimeout { .. }) {
            let _ = connection.disconnect(DISCONNECT_TIMEOUT);
        }
        return Err(e);
    }
    // The ioctls set the size before NBD_DO_IT: it is visible once the device is up.
    clock.done(Phase::Connect);
    connection.phases = clock.phases;
    Ok(connection)
}

/// Opens the device and sets it up for `info`, ending with the socket handed over.
fn configure(device: Device, socket: &UnixStream, info: ExportInfo) -> Result<File, KernelError> {
    let file = open_device(device)?;
    ioctl(&file, device, NBD_SET_BLKSIZE, BLOCK_SIZE)?;
    ioctl(&file, device, NBD_SET_SIZE, info.size)?;
    ioctl(
        &file,
        device,
        NBD_SET_FLAGS,
        u64::from(info.flags & KERNEL_FLAGS),
    )?;
    ioctl(&file, device, NBD_SET_TIMEOUT, REQUEST_TIMEOUT.as_secs())?;
    // A negative fd cannot come from a live UnixStream.
    let fd = u64::try_from(socket.as_raw_fd()).unwrap_or(u64::MAX);
    ioctl(&file, device, NBD_SET_SOCK, fd)?;
    Ok(file)
}

/// Runs the device until it is disconnected, then releases the socket so the device
/// can be used again.
fn serve(device: Device, file: &File) -> Result<(), KernelError> {
    let result = ioctl(file, device, NBD_DO_IT, 0);
    // NBD_DO_IT has returned, so no request is in flight; clearing the socket can only
    // fail when the driver has cleared it itself.
    let _ = ioctl(file, device, NBD_CLEAR_SOCK, 0);
    result
}

/// Waits until the driver shows the device connected, or the device thread ends.
fn wait_started(
    device: Device,
    done: &Receiver<Result<(), KernelError>>,
) -> Result<(), KernelError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if device.connected_pid().is_some() {
            return Ok(());
        }
        match done.recv_timeout(POLL_INTERVAL) {
            Ok(result) => {
                return Err(KernelError::StoppedAtStart {
                    device,
                    cause: result.err().map(Box::new),
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(KernelError::StoppedAtStart {
                    device,
                    cause: None,
                })
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline {
            return Err(KernelError::StartTimeout {
                device,
                timeout: START_TIMEOUT,
            });
        }
    }
}

pub(super) fn open_device(device: Device) -> Result<File, KernelError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device.path())
        .map_err(device.error("opening"))
}

/// Issues one NBD ioctl, whose argument is passed by value.
pub(super) fn ioctl(
    file: &File,
    device: Device,
    request: Request,
    arg: u64,
) -> Result<(), KernelError> {
    // SAFETY: the NBD ioctls take an integer by value (no pointer), and `file` is an
    // open descriptor for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request.code as _, arg as libc::c_ulong) };
    if rc < 0 {
        return Err(device.error(request.name)(io::Error::last_os_error()));
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_codes_match_the_kernel_header() {
        // linux/nbd.h: #define NBD_SET_SOCK _IO( 0xab, 0 ) ... NBD_SET_FLAGS _IO( 0xab, 10)
        assert_eq!(NBD_SET_SOCK.code, 0xab00);
        assert_eq!(NBD_DO_IT.code, 0xab03);
        assert_eq!(NBD_DISCONNECT.code, 0xab08);
        assert_eq!(NBD_SET_FLAGS.code, 0xab0a);
    }
}
