//! The kernel's NBD client: connects `/dev/nbdN` to an NBD server over a socket, through
//! the driver's generic netlink family where the kernel has it ([`netlink`]), else
//! through its ioctls.
//!
//! [`attach`] runs the client half of the handshake on the socket ([`handshake`]) to
//! learn the export's size and transmission flags. Through netlink, one
//! `NBD_CMD_CONNECT` hands the kernel the socket with a dead-connection timeout and the
//! node's id as backend identifier: the kernel owns the socket from then on, and the
//! device outlives the process that attached it. When the server's end closes, the
//! device queues its I/O for up to the dead-connection timeout, and [`reconnect`] (a
//! restarted daemon) hands it a new socket with `NBD_CMD_RECONFIGURE`.
//!
//! Through the ioctls (kernels without the family), a dedicated thread opens the
//! device, configures it (`NBD_SET_BLKSIZE`, `NBD_SET_SIZE`, `NBD_SET_FLAGS`,
//! `NBD_SET_TIMEOUT`), hands the socket over (`NBD_SET_SOCK`) and sits in `NBD_DO_IT`,
//! which returns only when the device is disconnected. The driver binds the device to
//! the task that configured it, so every setup ioctl and `NBD_DO_IT` run on that one
//! thread. [`Connection::disconnect`] asks the kernel to disconnect (`NBD_DISCONNECT`)
//! and waits for that thread.
//!
//! Devices are named by [`Device`]; whether one is connected is read from
//! `/sys/block/nbdN/pid`, which the driver creates while a client is connected. A
//! connected device is a [`Connection`] (`connection`); this file attaches and
//! reconnects one.

mod connection;
mod devices;
mod error;
pub mod handshake;
mod ioctl;
mod netlink;
mod phases;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use connection::Link;
pub use connection::{disconnect_netlink, Connection};
pub use devices::{check_free, devices, ensure_driver, free_device, Device};
pub use handshake::{ClientHandshakeError, ExportInfo};

use crate::proto;
pub use error::KernelError;
use ioctl::{attach_ioctl, ioctl, open_device, NBD_CLEAR_SOCK, NBD_DISCONNECT};
pub use phases::Phase;
use phases::PhaseClock;

/// The device's logical block size: templates are ext4 with 4 KiB blocks and overlays
/// keep 4 KiB blocks, so the kernel never sends a request smaller than one block.
pub const BLOCK_SIZE: u64 = 4096;

/// How long the kernel waits for one request before it gives up on the connection:
/// well above the daemon's per-source fetch deadline, so a cold chunk that fails over
/// to the next source is still answered in time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the handshake on the socket may take: the server may load the template's
/// manifest from the store before it answers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the device gets to appear connected after `NBD_DO_IT` is entered.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a disconnect waits for in-flight requests to be answered and `NBD_DO_IT`
/// to return before the socket is cut (`NBD_CLEAR_SOCK`).
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a netlink connect or reconfigure is retried while the kernel
/// answers EBUSY (a device still being torn down) or ENOSPC (a socket not yet seen
/// dead), `RETRY_INTERVAL` apart: a teardown or a socket's death is seen within
/// milliseconds, so a few seconds in all is generous.
const BUSY_RETRIES: u32 = 50;
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Held around each request to the `nbd` netlink family, so a wave of attaches (or a
/// restart reconfiguring many devices) sends the kernel one request at a time: the
/// driver serializes them anyway (its index and config locks), and many at once from
/// one process is where other tools saw replies dropped and devices hang. Handshakes
/// and the waits for a device's size run outside it, in parallel.
static NETLINK_REQUESTS: Mutex<()> = Mutex::new(());

/// How often the device's sysfs state is polled while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The transmission flags the kernel client acts on; others (NBD_FLAG_SEND_DF,
/// NBD_FLAG_SEND_CACHE: commands it never sends) are left out.
const KERNEL_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_READ_ONLY
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_FUA
    | proto::FLAG_SEND_TRIM
    | proto::FLAG_SEND_WRITE_ZEROES
    | proto::FLAG_CAN_MULTI_CONN;

/// How a device is attached, and what it may outlive.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The backend identifier the device carries (the node's id): only its owner
    /// reconnects or disconnects it.
    pub backend: String,
    /// How long the device waits for a new socket once its socket died (the daemon
    /// stopped); only through netlink.
    pub dead_conn_timeout: Duration,
    /// Attach through the ioctls even where the netlink family exists.
    pub force_ioctl: bool,
}

fn open_netlink(device: Device, step: &'static str) -> Result<netlink::NbdNetlink, KernelError> {
    netlink::NbdNetlink::open()
        .map_err(device.error(step))?
        .ok_or_else(|| {
            device.error(step)(io::Error::other(
                "the kernel has no \"nbd\" generic netlink family",
            ))
        })
}

/// Runs the client handshake for `export` on `socket` and leaves the socket blocking
/// with no timeouts, as the kernel wants it.
fn handshake_socket(
    device: Device,
    socket: &mut UnixStream,
    export: &str,
) -> Result<ExportInfo, KernelError> {
    let handshake_error = |source| KernelError::Handshake {
        device,
        export: export.to_owned(),
        source,
    };
    let io_error = |stage, source| handshake_error(ClientHandshakeError::Io { stage, source });
    socket
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| socket.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|e| io_error("setting the handshake timeout", e))?;
    let info = handshake::negotiate(socket, export).map_err(handshake_error)?;
    // The kernel reads and writes this socket itself; a timeout left on it would look
    // to the driver like a dead server.
    socket
        .set_read_timeout(None)
        .and_then(|()| socket.set_write_timeout(None))
        .map_err(|e| io_error("clearing the handshake timeout", e))?;
    Ok(info)
}

/// Runs the client handshake on every socket of a device; they must agree, and
/// several sockets need an export that advertises multi-conn (a FLUSH on one
/// connection covers the writes completed on all of them).
fn handshake_sockets(
    device: Device,
    sockets: &mut [UnixStream],
    export: &str,
) -> Result<ExportInfo, KernelError> {
    let mut first: Option<ExportInfo> = None;
    for socket in sockets.iter_mut() {
        let info = handshake_socket(device, socket, export)?;
        if let Some(first) = first {
            if first.size != info.size || first.flags != info.flags {
                return Err(KernelError::Connections {
                    device,
                    why: "the export answered its connections differently".into(),
                });
            }
        }
        first = Some(info);
    }
    let info = first.ok_or_else(|| KernelError::Connections {
        device,
        why: "no socket was given".into(),
    })?;
    if sockets.len() > 1 && info.flags & proto::FLAG_CAN_MULTI_CONN == 0 {
        return Err(KernelError::Connections {
            device,
            why: format!("export {export:?} does not advertise multi-conn"),
        });
    }
    Ok(info)
}

/// Connects `device` to the export `export` of the server at the other end of
/// `sockets` (one per connection the device gets): the client handshake on each, then
/// netlink's `NBD_CMD_CONNECT` (or, where the kernel has no netlink family, the ioctls
/// and the device thread, with one socket). Returns once the device shows its size.
/// Blocks: call it from a blocking thread.
pub fn attach(
    device: Device,
    mut sockets: Vec<UnixStream>,
    export: &str,
    options: &AttachOptions,
) -> Result<Connection, KernelError> {
    check_free(device)?;
    let mut clock = PhaseClock::new(device);
    let info = handshake_sockets(device, &mut sockets, export)?;
    clock.done(Phase::Handshake);
    let step = "NBD_CMD_CONNECT";
    let netlink = if options.force_ioctl {
        None
    } else {
        netlink::NbdNetlink::open().map_err(device.error(step))?
    };
    let Some(mut netlink) = netlink else {
        let mut sockets = sockets.into_iter();
        return match (sockets.next(), sockets.next()) {
            (Some(socket), None) => attach_ioctl(device, socket, info, clock),
            _ => Err(KernelError::Connections {
                device,
                why: "attaching through the ioctls takes one connection".into(),
            }),
        };
    };
    let fds: Vec<_> = sockets.iter().map(|socket| socket.as_raw_fd()).collect();
    let request = netlink::ConnectRequest {
        index: device.0,
        size: info.size,
        block_size: BLOCK_SIZE,
        server_flags: u64::from(info.flags & KERNEL_FLAGS),
        timeout_secs: REQUEST_TIMEOUT.as_secs(),
        dead_conn_timeout_secs: options.dead_conn_timeout.as_secs(),
        backend: &options.backend,
        sockets: &fds,
    };
    // EBUSY while the device is still torn down is retried; once someone else has
    // connected it, it is theirs.
    let taken = || {
        device
            .connected_pid()
            .map(|pid| KernelError::Busy { device, pid })
    };
    retry_busy(device, step, false, taken, || netlink.connect(&request))?;
    clock.done(Phase::Connect);
    // The kernel holds its own references to the sockets now.
    drop(sockets);
    let mut connection = Connection {
        device,
        info,
        link: Link::Netlink,
        backend: Some(options.backend.clone()),
        phases: Vec::new(),
        ended: None,
    };
    if let Err(e) = wait_size(device) {
        let _ = connection.disconnect(DISCONNECT_TIMEOUT);
        return Err(e);
    }
    clock.done(Phase::SizeVisible);
    connection.phases = clock.phases;
    Ok(connection)
}

/// Gives `device`, attached through netlink by `options.backend` and whose sockets
/// died, the new `sockets` to the export `export` (`NBD_CMD_RECONFIGURE`); the I/O the
/// kernel queued meanwhile is sent on them. Blocks: call it from a blocking thread.
pub fn reconnect(
    device: Device,
    mut sockets: Vec<UnixStream>,
    export: &str,
    options: &AttachOptions,
) -> Result<Connection, KernelError> {
    let not_ours = |why: String| KernelError::NotOurs { device, why };
    if device.connected_pid().is_none() {
        return Err(not_ours("it is not connected".into()));
    }
    match device.backend() {
        Some(backend) if backend == options.backend => {}
        Some(backend) => return Err(not_ours(format!("its backend is {backend:?}"))),
        None => return Err(not_ours("it has no backend identifier".into())),
    }
    let mut clock = PhaseClock::new(device);
    let info = handshake_sockets(device, &mut sockets, export)?;
    clock.done(Phase::Handshake);
    // The kernel shows whole 512-byte sectors.
    let device_size = device.size_bytes().unwrap_or(0);
    if device_size != info.size / 512 * 512 {
        return Err(KernelError::SizeChanged {
            device,
            export: export.to_owned(),
            device_size,
            export_size: info.size,
        });
    }
    let step = "NBD_CMD_RECONFIGURE";
    let mut netlink = open_netlink(device, step)?;
    let fds: Vec<_> = sockets.iter().map(|socket| socket.as_raw_fd()).collect();
    let timeout = options.dead_conn_timeout.as_secs();
    // The kernel takes the sockets one by one: after a partial success a retry would
    // hand it a socket it already has, so only a single socket is retried on ENOSPC
    // (its old one not yet seen dead).
    let retry_nospc = fds.len() == 1;
    retry_busy(
        device,
        step,
        retry_nospc,
        || None,
        || netlink.reconfigure(device.0, &options.backend, timeout, &fds),
    )?;
    clock.done(Phase::Reconfigure);
    drop(sockets);
    Ok(Connection {
        device,
        info,
        link: Link::Netlink,
        backend: Some(options.backend.clone()),
        phases: clock.phases,
        ended: None,
    })
}

/// Whose turn it is to send the `nbd` family a request ([`NETLINK_REQUESTS`]).
fn netlink_turn() -> std::sync::MutexGuard<'static, ()> {
    NETLINK_REQUESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `request` (step `step` on `device`), one request of this process at a time,
/// and again while the kernel answers EBUSY (or, with `retry_nospc`, ENOSPC), up to
/// [`BUSY_RETRIES`] times, unless `gave_up` says why retrying is pointless.
fn retry_busy<T>(
    device: Device,
    step: &'static str,
    retry_nospc: bool,
    gave_up: impl Fn() -> Option<KernelError>,
    mut request: impl FnMut() -> io::Result<T>,
) -> Result<T, KernelError> {
    let mut tries = 0;
    loop {
        let answer = {
            let _one_at_a_time = netlink_turn();
            request()
        };
        tries += 1;
        let e = match answer {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let busy = e.raw_os_error() == Some(libc::EBUSY)
            || (retry_nospc && e.raw_os_error() == Some(libc::ENOSPC));
        if !busy {
            return Err(device.error(step)(e));
        }
        if let Some(why) = gave_up() {
            return Err(why);
        }
        if tries > BUSY_RETRIES {
            return Err(KernelError::Retried {
                device,
                step,
                tries,
                source: e,
            });
        }
        tracing::debug!(device = %device, step, tries, error = %e, "the kernel is busy; trying again");
        thread::sleep(RETRY_INTERVAL);
    }
}

/// Waits until the device shows a size: since about 6.13 it appears only once the
/// connect has finished, and a mount before it would see an empty device.
fn wait_size(device: Device) -> Result<(), KernelError> {
    let deadline = Instant::now() + START_TIMEOUT;
    while device.size_bytes().unwrap_or(0) == 0 {
        if Instant::now() >= deadline {
            return Err(KernelError::SizeTimeout {
                device,
                timeout: START_TIMEOUT,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(Device::parse("/dev/nbd0").unwrap(), Device(0));
        assert_eq!(Device::parse("nbd15").unwrap(), Device(15));
        assert_eq!(Device(3).to_string(), "/dev/nbd3");
        assert_eq!(Device(3).name(), "nbd3");
        for bad in [
            "/dev/sda",
            "nbd",
            "/dev/nbd",
            "nbd01",
            "nbd1p1",
            "/dev/nbd-1",
            "nbd99999999999",
        ] {
            let error = Device::parse(bad).unwrap_err();
            assert!(
                error.to_string().contains("expected /dev/nbdN"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn kernel_flags_drop_what_the_kernel_never_uses() {
        let flags = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_DF
            | proto::FLAG_SEND_CACHE
            | proto::FLAG_READ_ONLY;
        assert_eq!(
            flags & KERNEL_FLAGS,
            proto::FLAG_HAS_FLAGS | proto::FLAG_READ_ONLY
        );
    }
}
