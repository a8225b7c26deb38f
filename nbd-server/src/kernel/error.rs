//! Why a kernel block device could not be attached or detached.

use std::io;
use std::time::Duration;

use super::devices::SYS_BLOCK;
use super::{ClientHandshakeError, Device};

/// Why a kernel block device could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The running kernel has no nbd driver and it could not be loaded.
    #[error("the kernel has no nbd driver (modprobe nbd failed: {detail})")]
    NoDriver { detail: String },
    /// The name is not of the form `/dev/nbdN`.
    #[error("{0:?} is not an NBD device (expected /dev/nbdN)")]
    BadDevice(String),
    /// The driver has no such device.
    #[error("{device} does not exist (the nbd driver has {count} devices; more with `modprobe nbd nbds_max=N`)")]
    NoSuchDevice { device: Device, count: usize },
    /// Every device is connected.
    #[error(
        "every NBD device is connected ({count} devices; more with `modprobe nbd nbds_max=N`)"
    )]
    NoFreeDevice { count: usize },
    /// Not connected, but the kernel still shows requests in flight or holders.
    #[error("{device} is not connected but still has requests in flight or holders; try again or use another device")]
    Settling { device: Device },
    /// The device is connected already.
    #[error("{device} is already connected (pid {pid})")]
    Busy { device: Device, pid: String },
    /// The handshake on the socket failed.
    #[error("attaching {device}: NBD handshake for export {export:?}: {source}")]
    Handshake {
        device: Device,
        export: String,
        #[source]
        source: ClientHandshakeError,
    },
    /// A step on the device failed; the message carries the errno.
    #[error("{step} on {device}: {source}")]
    Device {
        device: Device,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel kept answering EBUSY (or ENOSPC) for a step past its retries.
    #[error("{step} on {device}: still refused after {tries} tries: {source}")]
    Retried {
        device: Device,
        step: &'static str,
        tries: u32,
        #[source]
        source: io::Error,
    },
    /// `NBD_DO_IT` was entered but the device never showed up connected.
    #[error("{device} did not come up within {timeout:?} after NBD_DO_IT")]
    StartTimeout { device: Device, timeout: Duration },
    /// `NBD_DO_IT` returned before the device came up.
    #[error("{device} stopped right after NBD_DO_IT{}", match .cause { Some(e) => format!(": {e}"), None => String::new() })]
    StoppedAtStart {
        device: Device,
        cause: Option<Box<KernelError>>,
    },
    /// The device did not disconnect in time.
    #[error("{device} did not disconnect within {timeout:?}")]
    DisconnectTimeout { device: Device, timeout: Duration },
    /// The device's thread could not be started.
    #[error("starting the NBD_DO_IT thread for {device}: {source}")]
    Thread {
        device: Device,
        #[source]
        source: io::Error,
    },
    /// The device's sockets cannot serve it together.
    #[error("{device}: {why}")]
    Connections { device: Device, why: String },
    /// The device's size did not appear after the connect.
    #[error("{device} showed no size within {timeout:?} after NBD_CMD_CONNECT")]
    SizeTimeout { device: Device, timeout: Duration },
    /// A device to reconnect was attached by someone else, or is not attached.
    #[error("{device} is not this node's to reconnect: {why}")]
    NotOurs { device: Device, why: String },
    /// The export's size is not the device's any more.
    #[error("{device} has {device_size} bytes but export {export:?} now has {export_size}")]
    SizeChanged {
        device: Device,
        export: String,
        device_size: u64,
        export_size: u64,
    },
    /// `/sys/block` could not be read.
    #[error("listing NBD devices under {SYS_BLOCK}: {0}")]
    Sysfs(#[source] io::Error),
}
