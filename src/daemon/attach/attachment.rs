//! One attached `/dev/nbdN`: what the daemon holds for it (its kernel connection and
//! the tasks serving the daemon's ends), how the API shows it, and how
//! `kernel-devices.json` records it.

use lazyblk_nbd::kernel::Connection;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::daemon::device_state::{self, DeviceState};

/// One attached device as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AttachmentStatus {
    /// `/dev/nbdN`.
    pub device: String,
    /// N of `/dev/nbdN`.
    pub index: u32,
    pub export: String,
    /// "template" (read-only) or "sandbox" (read-write).
    pub kind: std::borrow::Cow<'static, str>,
    /// "netlink" (outlives the daemon) or "ioctl".
    pub link: std::borrow::Cow<'static, str>,
    /// Connected, waiting for reconfigure (the kernel holds the device and queues its
    /// I/O, but no socket of this daemon serves it), or dead.
    pub state: DeviceState,
    pub size: u64,
    pub read_only: bool,
    /// False once the connection has ended on its own (the error says why).
    pub connected: bool,
    pub error: Option<String>,
    pub attached_at: String,
    /// Attached through netlink: the device outlives a daemon restart.
    pub survives_restart: bool,
    /// Sockets the device has.
    pub connections: u32,
}

/// A device of [`super::Attachments`]: reserved while its attach runs, then attached.
pub(super) enum Slot {
    Attaching,
    Attached(Attachment),
}

pub(super) struct Attachment {
    pub(super) export: String,
    pub(super) connection: Connection,
    /// The tasks serving the daemon's ends; they end once the kernel disconnects.
    pub(super) servers: Vec<JoinHandle<()>>,
    /// Sockets the device was given.
    pub(super) connections: u32,
    pub(super) attached_at: String,
}

impl Attachment {
    pub(super) fn status(&mut self) -> AttachmentStatus {
        let info = self.connection.info();
        let device = self.connection.device();
        let mut error = match self.connection.ended() {
            None => None,
            Some(Ok(())) => Some("disconnected".to_string()),
            Some(Err(e)) => Some(e.clone()),
        };
        let serving = self.servers.iter().any(|server| !server.is_finished());
        let state = match (&error, serving) {
            (Some(_), _) => DeviceState::Dead,
            (None, true) => DeviceState::Connected,
            // The kernel still holds the device (netlink) but this daemon's ends of
            // its sockets are closed: it queues I/O until reconfigured or timed out.
            (None, false) => {
                error = Some("no connection of this daemon serves it".into());
                DeviceState::Waiting
            }
        };
        AttachmentStatus {
            device: device.to_string(),
            index: device.0,
            export: self.export.clone(),
            kind: device_state::kind(info.read_only()),
            link: device_state::link(self.connection.survives_restart()),
            state,
            size: info.size,
            read_only: info.read_only(),
            connected: state == DeviceState::Connected,
            error,
            attached_at: self.attached_at.clone(),
            survives_restart: self.connection.survives_restart(),
            connections: self.connections,
        }
    }
}
