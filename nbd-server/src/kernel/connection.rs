//! A device connected to a server ([`Connection`]): how it is linked (netlink or the
//! ioctls' thread), whether its connection has ended, and its disconnect.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    ioctl, netlink_turn, open_device, open_netlink, Device, ExportInfo, KernelError, Phase,
    NBD_CLEAR_SOCK, NBD_DISCONNECT, POLL_INTERVAL,
};

/// The two ways a device is connected.
#[derive(Debug)]
pub(super) enum Link {
    /// Through netlink: the kernel holds the socket; the device lives until it is
    /// disconnected (or its dead-connection timeout passes with no server).
    Netlink,
    /// Through the ioctls: a thread sits in `NBD_DO_IT` and sends its result here when
    /// the device is disconnected; the device dies with the process.
    Ioctl(Receiver<Result<(), KernelError>>),
}

/// A device connected to a server. Dropping it leaves the device connected: call
/// [`Connection::disconnect`].
#[derive(Debug)]
pub struct Connection {
    pub(super) device: Device,
    pub(super) info: ExportInfo,
    pub(super) link: Link,
    /// The backend identifier the device was given (netlink): the device is this
    /// connection's only while the kernel shows the same one.
    pub(super) backend: Option<String>,
    /// How long each phase of the attach or reconnect took, in order.
    pub(super) phases: Vec<(Phase, Duration)>,
    /// Set once the connection is seen ended.
    pub(super) ended: Option<Result<(), String>>,
}

impl Connection {
    pub fn device(&self) -> Device {
        self.device
    }

    /// Size and transmission flags the server gave.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Whether the device was connected through netlink (and so outlives the daemon).
    pub fn survives_restart(&self) -> bool {
        matches!(self.link, Link::Netlink)
    }

    /// How long each phase of the attach (or reconnect) took.
    pub fn phases(&self) -> &[(Phase, Duration)] {
        &self.phases
    }

    /// `None` while connected; once the connection has ended on its own (the server
    /// closed, a request timed out, someone disconnected it), how it ended.
    pub fn ended(&mut self) -> Option<&Result<(), String>> {
        if self.ended.is_none() {
            match &self.link {
                Link::Netlink => {
                    if self.device.connected_pid().is_none() {
                        self.ended = Some(Ok(()));
                    } else if let Some(theirs) = self.foreign_backend() {
                        // Torn down and attached again by someone else in between.
                        self.ended = Some(Err(format!("now attached by backend {theirs:?}")));
                    }
                }
                Link::Ioctl(done) => match done.try_recv() {
                    Ok(result) => self.ended = Some(result.map_err(|e| e.to_string())),
                    Err(TryRecvError::Disconnected) => {
                        self.ended = Some(Err("the device thread ended".into()))
                    }
                    Err(TryRecvError::Empty) => {}
                },
            }
        }
        self.ended.as_ref()
    }

    /// Disconnects the device. Through netlink: `NBD_CMD_DISCONNECT`, then waits until
    /// the device is free (or only its holders keep it: it is freed when they close).
    /// Through the ioctls: `NBD_DISCONNECT` (the kernel sends NBD_CMD_DISC once its
    /// queue drains), then waits for `NBD_DO_IT` to return; after `timeout` the socket
    /// is cut with `NBD_CLEAR_SOCK`. Blocks: call it from a blocking thread.
    pub fn disconnect(&mut self, timeout: Duration) -> Result<(), KernelError> {
        if self.ended().is_some() {
            return Ok(());
        }
        let device = self.device;
        if matches!(self.link, Link::Netlink) {
            let backend = self.backend.clone().unwrap_or_default();
            disconnect_netlink(device, &backend, timeout)?;
            self.ended = Some(Ok(()));
            return Ok(());
        }
        let file = open_device(device)?;
        ioctl(&file, device, NBD_DISCONNECT, 0)?;
        if self.wait_ended(timeout) {
            return Ok(());
        }
        ioctl(&file, device, NBD_CLEAR_SOCK, 0)?;
        if self.wait_ended(timeout) {
            return Ok(());
        }
        Err(KernelError::DisconnectTimeout { device, timeout })
    }

    /// The backend identifier the kernel shows for the device when it is not the one
    /// this connection gave it.
    fn foreign_backend(&self) -> Option<String> {
        let ours = self.backend.as_deref()?;
        self.device.backend().filter(|theirs| theirs != ours)
    }

    /// Waits up to `timeout` for `NBD_DO_IT` to return; whether it has.
    fn wait_ended(&mut self, timeout: Duration) -> bool {
        let Link::Ioctl(done) = &self.link else {
            return true;
        };
        let ended = match done.recv_timeout(timeout) {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(RecvTimeoutError::Disconnected) => Err("the device thread ended".into()),
            Err(RecvTimeoutError::Timeout) => return false,
        };
        self.ended = Some(ended);
        true
    }
}

/// Disconnects a netlink device by its index, if it is still `backend`'s (the kernel
/// shows no other backend identifier; a device free already is left alone); see
/// [`Connection::disconnect`].
pub fn disconnect_netlink(
    device: Device,
    backend: &str,
    timeout: Duration,
) -> Result<(), KernelError> {
    if device.connected_pid().is_none() {
        return Ok(());
    }
    if let Some(theirs) = device.backend().filter(|theirs| theirs != backend) {
        return Err(KernelError::NotOurs {
            device,
            why: format!("its backend is {theirs:?}"),
        });
    }
    let step = "NBD_CMD_DISCONNECT";
    let mut netlink = open_netlink(device, step)?;
    {
        let _one_at_a_time = netlink_turn();
        netlink.disconnect(device.0).map_err(device.error(step))?;
    }
    let deadline = Instant::now() + timeout;
    while device.connected_pid().is_some() {
        if Instant::now() >= deadline {
            // Its sockets are shut; a mount or an open keeps the device configured
            // until it lets go, which is the holder's business (a forced detach).
            if device.held() {
                return Ok(());
            }
            return Err(KernelError::DisconnectTimeout { device, timeout });
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}
