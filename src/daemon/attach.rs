//! Kernel block devices for exports (`lazyblk attach` / `detach`): `/dev/nbdN`
//! connected to one of this daemon's exports through a socketpair. The daemon serves
//! one end like any NBD connection (so the export's size, flags and read-only come from
//! the handshake); the other end goes to the kernel through
//! [`lazyblk_nbd::kernel::attach`]. An attached device holds a lease on its export:
//! evictions and deletions name it ("kernel /dev/nbd0").
//!
//! Devices attached through netlink outlive the daemon: each carries the node's id as
//! its backend identifier and a dead-connection timeout, and the node's cache
//! directory records each one (`kernel-devices.json`). A restarted daemon
//! ([`Attachments::restore`]) gives each recorded device that is still its own a new
//! socket; a device whose export is gone is disconnected and listed with the reason.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazyblk_nbd::kernel::{self, AttachOptions, Connection, Device, KernelError};
use lazyblk_nbd::ServerConfig;
use tokio::task::JoinHandle;

use crate::daemon::counters::DaemonMetrics;
use crate::daemon::device_state;
use crate::daemon::exports::NodeImages;
use crate::daemon::node::Node;
use crate::daemon::node_state::json_file::JsonFile;
use crate::daemon::node_state::phases::now_rfc3339;

mod attachment;
mod error;
mod restore;
mod ublk;
pub use attachment::AttachmentStatus;
use attachment::{Attachment, Slot};
pub use error::AttachError;
use restore::DeviceRecord;
pub use ublk::UblkConfig;
use ublk::UblkDevices;

/// How long a detach waits for the daemon's end of the connection to finish once the
/// kernel has let go: in-flight requests are answered first, a cold chunk fetch at most.
const SERVER_DRAIN: Duration = Duration::from_secs(10);

/// The most sockets one device may get: the kernel serves each with a receive worker
/// and the daemon with a connection task; past the kernel's queues (one per CPU) more
/// only cost memory.
pub const MAX_DEVICE_CONNECTIONS: u32 = 16;

/// How many free devices an attach that picks its own device tries when another
/// process takes each one first (a launch wave of several daemons or tools).
const PICK_TRIES: usize = 8;

/// The devices this daemon has attached.
pub struct Attachments {
    /// Opens exports for the kernel's connections.
    exports: Arc<NodeImages>,
    /// By device; a device is reserved while its attach runs, so two requests never
    /// pick the same one.
    slots: Mutex<BTreeMap<Device, Slot>>,
    /// How devices are attached (the node's id as backend, the dead-connection
    /// timeout).
    options: AttachOptions,
    /// `kernel-devices.json` ([`crate::daemon::node_state::DEVICES_FILE`]), in the
    /// node's state.
    record: JsonFile<Vec<DeviceRecord>>,
    /// Recorded devices a restart could not serve again, with the reason: listed
    /// until the daemon stops.
    lost: Mutex<Vec<AttachmentStatus>>,
    /// Recorded devices a restart could not serve for a reason that may pass (the
    /// store unreachable): kept in `kernel-devices.json` so the next run tries again.
    retry: Mutex<Vec<DeviceRecord>>,
    /// Held while `kernel-devices.json` is written: one writer at a time.
    saving: Mutex<()>,
    /// The attach phases' histogram.
    metrics: Arc<DaemonMetrics>,
    /// The `/dev/ublkbN` devices.
    ublk: UblkDevices,
}

impl Attachments {
    /// `dead_timeout`: how long a device waits for a restarted daemon;
    /// `force_ioctl`: attach through the ioctls even where netlink exists.
    /// `ublk`: how `/dev/ublkbN` devices are made.
    pub fn new(
        node: Arc<Node>,
        dead_timeout: Duration,
        force_ioctl: bool,
        ublk: UblkConfig,
    ) -> Attachments {
        let options = AttachOptions {
            backend: node.node_id.clone(),
            dead_conn_timeout: dead_timeout,
            force_ioctl,
        };
        let metrics = node.metrics.clone();
        let record = node.state.devices_file();
        let ublk = UblkDevices::new(ublk, Arc::new(NodeImages::kernel(node.clone(), true)));
        Attachments {
            // Devices through the ioctls die with the daemon: nothing to keep.
            exports: Arc::new(NodeImages::kernel(node, !force_ioctl)),
            slots: Mutex::new(BTreeMap::new()),
            options,
            record,
            lost: Mutex::new(Vec::new()),
            retry: Mutex::new(Vec::new()),
            saving: Mutex::new(()),
            metrics,
            ublk,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<Device, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every attached device, including those whose connection has ended.
    pub fn list(&self) -> Vec<AttachmentStatus> {
        let mut list: Vec<AttachmentStatus> = self
            .slots()
            .values_mut()
            .filter_map(|slot| match slot {
                Slot::Attached(a) => Some(a.status()),
                Slot::Attaching => None,
            })
            .collect();
        list.extend(self.ublk.list());
        let backend = &self.options.backend;
        list.extend(self.lost_list().iter().map(|lost| {
            let mut lost = lost.clone();
            if lost.link != "ublk" {
                lost.state = device_state::unserved(Device(lost.index), backend);
            }
            lost
        }));
        list
    }

    /// Connects `device` (or the first free one) to `export`: an NBD device with
    /// `connections` sockets, or with `ublk` a ublk device.
    pub async fn attach(
        &self,
        export: &str,
        device: Option<&str>,
        connections: u32,
        ublk: bool,
    ) -> Result<AttachmentStatus, AttachError> {
        lazyblk_cache::validate_id(export)
            .map_err(|e| AttachError::InvalidExport(e.to_string()))?;
        if ublk {
            return self.attach_ublk(export, device).await;
        }
        let connections = check_connections(connections)?;
        let requested = device.map(Device::parse).transpose()?;
        blocking(Device(0), kernel::ensure_driver).await??;
        let mut tries = 0;
        let (device, connected) = loop {
            let device = self.reserve(requested)?;
            let connected = self.connect(device, export, connections).await;
            tries += 1;
            match connected {
                // Another process connected the device this one picked between the
                // look at sysfs and the connect: the next free one.
                Err(AttachError::Kernel(KernelError::Busy { .. }))
                    if requested.is_none() && tries < PICK_TRIES =>
                {
                    tracing::debug!(device = %device, export, "taken by someone else meanwhile; picking another");
                    self.slots().remove(&device);
                }
                connected => break (device, connected),
            }
        };
        let mut slots = self.slots();
        match connected {
            Ok(mut attachment) => {
                let status = attachment.status();
                tracing::info!(device = %device, export, size = status.size, read_only = status.read_only, "attached kernel block device");
                slots.insert(device, Slot::Attached(attachment));
                drop(slots);
                self.save();
                Ok(status)
            }
            Err(e) => {
                slots.remove(&device);
                tracing::warn!(device = %device, export, error = %e, "attaching a kernel block device failed");
                Err(e)
            }
        }
    }

    /// Takes `requested` (or the first free device) for an attach.
    fn reserve(&self, requested: Option<Device>) -> Result<Device, AttachError> {
        let mut slots = self.slots();
        slots.retain(|device, slot| match slot {
            Slot::Attached(a) => match a.connection.ended() {
                Some(how) => {
                    tracing::warn!(device = %device, export = a.export, ended = ?how, "forgetting a kernel device whose connection ended");
                    false
                }
                None => true,
            },
            Slot::Attaching => true,
        });
        let device = match requested {
            Some(device) => {
                match slots.get(&device) {
                    Some(Slot::Attaching) => return Err(AttachError::Attaching(device)),
                    Some(Slot::Attached(a)) => {
                        let export = a.export.clone();
                        return Err(AttachError::AlreadyAttached { device, export });
                    }
                    None => {}
                }
                kernel::check_free(device)?;
                device
            }
            None => {
                let taken: Vec<Device> = slots.keys().copied().collect();
                kernel::free_device(&taken)?
            }
        };
        slots.insert(device, Slot::Attaching);
        Ok(device)
    }

    /// Serves one end of each new socketpair and hands the others to the kernel.
    async fn connect(
        &self,
        device: Device,
        export: &str,
        connections: u32,
    ) -> Result<Attachment, AttachError> {
        let options = self.options.clone();
        let attachment = self
            .link(device, export, connections, move |device, sockets, name| {
                kernel::attach(device, sockets, name, &options)
            })
            .await?;
        self.measure(&attachment);
        Ok(attachment)
    }

    /// Records the phases of an attach or reconnect in the histogram.
    fn measure(&self, attachment: &Attachment) {
        for (phase, took) in attachment.connection.phases() {
            self.metrics.device_attach_phase(phase.name(), *took);
        }
    }

    /// Gives a recorded device new sockets to its export, as many as it had.
    async fn reconnect(
        &self,
        device: Device,
        record: &DeviceRecord,
    ) -> Result<Attachment, AttachError> {
        let options = self.options.clone();
        let connections = check_connections(record.connections)?;
        let mut attachment = self
            .link(
                device,
                &record.export,
                connections,
                move |device, sockets, name| kernel::reconnect(device, sockets, name, &options),
            )
            .await?;
        attachment.attached_at = record.attached_at.clone();
        self.measure(&attachment);
        Ok(attachment)
    }

    /// Serves one end of each of `connections` new socketpairs and runs `kernel_side`
    /// (an attach or a reconnect) with the other ends.
    async fn link(
        &self,
        device: Device,
        export: &str,
        connections: u32,
        kernel_side: impl FnOnce(Device, Vec<StdUnixStream>, &str) -> Result<Connection, KernelError>
            + Send
            + 'static,
    ) -> Result<Attachment, AttachError> {
        let socket_error = |source| AttachError::Socket { device, source };
        let mut kernel_ends = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..connections {
            let (kernel_end, daemon_end) = StdUnixStream::pair().map_err(socket_error)?;
            daemon_end.set_nonblocking(true).map_err(socket_error)?;
            let daemon_end = tokio::net::UnixStream::from_std(daemon_end).map_err(socket_error)?;
            let peer = format!("kernel {device}");
            let exports = self.exports.clone();
            servers.push(tokio::spawn(async move {
                let config = ServerConfig::default();
                let served = lazyblk_nbd::serve_socket(daemon_end, peer, exports, config).await;
                if let Err(error) = served {
                    tracing::warn!(device = %device, %error, "kernel connection ended with an error");
                }
            }));
            kernel_ends.push(kernel_end);
        }
        let name = export.to_owned();
        // On failure the kernel's ends are dropped, so the server tasks see their sockets
        // close and end by themselves.
        let connection =
            blocking(device, move || kernel_side(device, kernel_ends, &name)).await??;
        Ok(Attachment {
            export: export.to_owned(),
            connection,
            servers,
            connections,
            attached_at: now_rfc3339(),
        })
    }

    /// Disconnects `device`; refused while it is mounted or held open, unless `force`.
    /// Returns once the kernel has let go and the export's lease is released.
    pub async fn detach(&self, device: &str, force: bool) -> Result<AttachmentStatus, AttachError> {
        if let Some(id) = lazyblk_ublk::parse_device(device) {
            return self.detach_ublk(id, force).await;
        }
        let device = Device::parse(device)?;
        let export = match self.slots().get(&device) {
            Some(Slot::Attached(a)) => a.export.clone(),
            Some(Slot::Attaching) => return Err(AttachError::Attaching(device)),
            None => return Err(AttachError::NotAttached(device)),
        };
        if !force && blocking(device, move || device.held()).await? {
            return Err(AttachError::InUse { device, export });
        }
        // Taken out while the kernel lets go, so a second detach finds nothing to do.
        let taken = self.slots().remove(&device);
        let mut attachment = match taken {
            Some(Slot::Attached(a)) => a,
            Some(other) => {
                self.slots().insert(device, other);
                return Err(AttachError::Attaching(device));
            }
            None => return Err(AttachError::NotAttached(device)),
        };
        let status = attachment.status();
        let (mut attachment, disconnected) = blocking(device, move || {
            let disconnected = attachment.connection.disconnect(kernel::DISCONNECT_TIMEOUT);
            (attachment, disconnected)
        })
        .await?;
        if let Err(e) = disconnected {
            // Still connected as far as anyone knows: keep it, so it can be detached again.
            if attachment.connection.ended().is_none() {
                self.slots().insert(device, Slot::Attached(attachment));
            }
            return Err(e.into());
        }
        let servers = wait_all(attachment.servers);
        if tokio::time::timeout(SERVER_DRAIN, servers).await.is_err() {
            tracing::warn!(device = %device, export, "the kernel connection's server did not end in time");
        }
        self.save();
        tracing::info!(device = %device, export, "detached kernel block device");
        Ok(AttachmentStatus {
            connected: false,
            ..status
        })
    }

    /// At shutdown: disconnects every device that cannot outlive the daemon (attached
    /// through the ioctls); those attached through netlink stay, waiting up to their
    /// dead-connection timeout for the next run of this node.
    pub async fn detach_all(&self) {
        let devices: Vec<Device> = self
            .slots()
            .iter()
            .filter_map(|(device, slot)| match slot {
                Slot::Attached(a) if a.connection.survives_restart() => {
                    tracing::info!(device = %device, export = a.export, "leaving kernel block device attached for the next run");
                    None
                }
                _ => Some(*device),
            })
            .collect();
        for device in devices {
            if let Err(error) = self.detach(&device.name(), true).await {
                tracing::warn!(device = %device, %error, "detaching at shutdown");
            }
        }
    }
}

/// Waits for every task.
async fn wait_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Checks a device's number of sockets against [`MAX_DEVICE_CONNECTIONS`].
fn check_connections(connections: u32) -> Result<u32, AttachError> {
    if (1..=MAX_DEVICE_CONNECTIONS).contains(&connections) {
        Ok(connections)
    } else {
        Err(AttachError::Connections(connections))
    }
}

/// Runs blocking ublk work (control commands, each under its own deadline) off the
/// runtime.
async fn blocking_ublk<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AttachError::Task {
            what: "ublk control work".into(),
            detail: e.to_string(),
        })
}

/// Runs blocking kernel work (device opens, ioctls, sysfs polls) off the runtime.
async fn blocking<T: Send + 'static>(
    device: Device,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AttachError::Task {
            what: format!("kernel work on {device}"),
            detail: e.to_string(),
        })
}
