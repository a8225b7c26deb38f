//! What the daemon tells about its kernel block devices ([`crate::daemon::attach`]):
//! each device's state as `lazyblk status` and `/v1/attachments` show it, and the
//! devices the kernel shows as this node's that its record does not name.

use lazyblk_nbd::kernel::{self, Device, KernelError};
use std::borrow::Cow;

use serde::Serialize;

/// A kernel device's state, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// A socket of this daemon serves it.
    #[serde(rename = "connected")]
    Connected,
    /// The kernel still holds the device (attached through netlink) and queues its I/O
    /// for up to the dead-connection timeout, but no socket of this daemon serves it:
    /// a restarted daemon could not reconnect it yet, or its connection ended.
    #[serde(rename = "waiting for reconfigure")]
    Waiting,
    /// The kernel no longer has it connected for this node (disconnected, timed out,
    /// or attached by someone else since).
    #[serde(rename = "dead")]
    Dead,
}

/// What a device exports: templates are served read-only, sandboxes read-write.
pub fn kind(read_only: bool) -> Cow<'static, str> {
    Cow::Borrowed(if read_only { "template" } else { "sandbox" })
}

/// How a device was attached.
pub fn link(netlink: bool) -> Cow<'static, str> {
    Cow::Borrowed(if netlink { "netlink" } else { "ioctl" })
}

/// The state of a device this daemon does not serve, from the kernel: still connected
/// with this node's backend identifier (queueing its I/O), or dead to this node.
pub fn unserved(device: Device, backend: &str) -> DeviceState {
    let ours = device.backend().is_none_or(|theirs| theirs == backend);
    if device.connected_pid().is_some() && ours {
        DeviceState::Waiting
    } else {
        DeviceState::Dead
    }
}

/// The connected devices whose backend identifier is `backend` (this node's) and
/// that are not in `recorded`. Blocks (sysfs reads).
pub fn unrecorded(backend: &str, recorded: &[Device]) -> Result<Vec<Device>, KernelError> {
    if !Device(0).exists() {
        // No driver loaded: no devices at all.
        return Ok(Vec::new());
    }
    Ok(kernel::devices()?
        .into_iter()
        .filter(|device| !recorded.contains(device))
        .filter(|device| device.connected_pid().is_some())
        .filter(|device| device.backend().as_deref() == Some(backend))
        .collect())
}
