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

use axum::http::StatusCode;
use lazyblk_nbd::kernel::{self, AttachOptions, Connection, Device, KernelError};
use lazyblk_nbd::ServerConfig;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::daemon::counters::DaemonMetrics;
use crate::daemon::device_state::{self, DeviceState};
use crate::daemon::exports::NodeImages;
use crate::daemon::node::Node;
use crate::daemon::node_state::json_file::JsonFile;
use crate::daemon::node_state::phases::now_rfc3339;

mod restore;
mod ublk;
use restore::{DeviceRecord, Driver};
pub use ublk::UblkConfig;
use ublk::UblkDevices;

/// How long a detach waits for the daemon's end of the connection to finish once the
/// kernel has let go: in-flight requests are answered first, a cold chunk fetch at most.
const SERVER_DRAIN: Duration = Duration::from_secs(10);

/// The most sockets one device may get: the kernel serves each with a receive worker
/// and the daemon with a connection task; past the kernel's queues (one per CPU) more
/// only cost memory.
pub const MAX_DEVICE_CONNECTIONS: u32 = 16;

/// Why an attach or detach was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The export name is not a valid template or sandbox id.
    #[error("invalid export name: {0}")]
    InvalidExport(String),
    /// The number of sockets asked for is out of bounds.
    #[error("--connections must be 1 to {MAX_DEVICE_CONNECTIONS}, not {0}")]
    Connections(u32),
    /// The kernel side failed (no driver, device busy, a failed ioctl with its errno).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// This daemon has attached the device already.
    #[error("{device} is already attached to export {export:?}")]
    AlreadyAttached { device: Device, export: String },
    /// Another attach of this device is under way.
    #[error("{0} is being attached by another request")]
    Attaching(Device),
    /// This daemon did not attach the device.
    #[error("{0} is not attached by this daemon")]
    NotAttached(Device),
    /// The device is mounted or held open; detaching would fail its I/O.
    #[error("{device} (export {export:?}) is in use (mounted or held open exclusively); unmount it first or use --force")]
    InUse { device: Device, export: String },
    /// The socketpair between the daemon and the kernel could not be made.
    #[error("creating the socket for {device}: {source}")]
    Socket {
        device: Device,
        #[source]
        source: std::io::Error,
    },
    /// A task of an attach or detach panicked or was cancelled.
    #[error("{what}: {detail}")]
    Task { what: String, detail: String },
    /// The ublk side failed (kernel not offered, no driver, a control command failed
    /// or missed its deadline).
    #[error(transparent)]
    Ublk(lazyblk_ublk::UblkError),
    /// `--device` with `--kind ublk` is not `/dev/ublkbN`.
    #[error("{0:?} is not a ublk device (expected /dev/ublkbN)")]
    UblkName(String),
    /// The ublk device asked for is in use (by this daemon or another process).
    #[error("/dev/ublkb{0} is in use")]
    UblkBusy(u32),
    /// Another attach of this ublk device is under way.
    #[error("{0} is being attached by another request")]
    UblkAttaching(String),
    /// This daemon did not attach the ublk device.
    #[error("{0} is not attached by this daemon")]
    UblkNotAttached(String),
    /// The ublk device is mounted or held open.
    #[error("{device} (export {export:?}) is in use (mounted or held open exclusively); unmount it first or use --force")]
    UblkInUse { device: String, export: String },
    /// A recorded ublk device's export has another size now.
    #[error("{device}: export {export:?} is now {now} bytes, the device {had}")]
    UblkSizeChanged {
        device: String,
        export: String,
        had: u64,
        now: u64,
    },
    /// No template or sandbox has this name.
    #[error("no template or sandbox named {0:?}")]
    UnknownExport(String),
    /// The export exists but cannot be served now.
    #[error("export {export:?} cannot be served now: {why}")]
    Unavailable { export: String, why: String },
}

impl AttachError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            AttachError::InvalidExport(_)
            | AttachError::Connections(_)
            | AttachError::UblkName(_) => StatusCode::BAD_REQUEST,
            AttachError::UblkBusy(_)
            | AttachError::UblkAttaching(_)
            | AttachError::UblkInUse { .. }
            | AttachError::UblkSizeChanged { .. } => StatusCode::CONFLICT,
            AttachError::UblkNotAttached(_) | AttachError::UnknownExport(_) => {
                StatusCode::NOT_FOUND
            }
            AttachError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AttachError::Ublk(e) => match e {
                lazyblk_ublk::UblkError::KernelNotOffered { .. }
                | lazyblk_ublk::UblkError::NoDriver { .. } => StatusCode::SERVICE_UNAVAILABLE,
                lazyblk_ublk::UblkError::BadImage { .. } => StatusCode::BAD_REQUEST,
                lazyblk_ublk::UblkError::IdTaken { .. } => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AttachError::Attaching(_)
            | AttachError::AlreadyAttached { .. }
            | AttachError::InUse { .. } => StatusCode::CONFLICT,
            AttachError::NotAttached(_) => StatusCode::NOT_FOUND,
            AttachError::Kernel(e) => kernel_status(e),
            AttachError::Socket { .. } | AttachError::Task { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

fn kernel_status(e: &KernelError) -> StatusCode {
    match e {
        KernelError::BadDevice(_) => StatusCode::BAD_REQUEST,
        KernelError::NoSuchDevice { .. } => StatusCode::NOT_FOUND,
        KernelError::Handshake { source, .. } if source.is_unknown_export() => {
            StatusCode::NOT_FOUND
        }
        KernelError::NoDriver { .. } | KernelError::NoFreeDevice { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        KernelError::Busy { .. } | KernelError::Settling { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// How many free devices an attach that picks its own device tries when another
/// process takes each one first (a launch wave of several daemons or tools).
const PICK_TRIES: usize = 8;

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

enum Slot {
    Attaching,
    Attached(Attachment),
}

struct Attachment {
    export: String,
    connection: Connection,
    /// The tasks serving the daemon's ends; they end once the kernel disconnects.
    servers: Vec<JoinHandle<()>>,
    /// Sockets the device was given.
    connections: u32,
    attached_at: String,
}

impl Attachment {
    fn status(&mut self) -> AttachmentStatus {
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

    fn record(&self) -> DeviceRecord {
        DeviceRecord {
            index: self.connection.device().0,
            export: self.export.clone(),
            read_only: self.connection.info().read_only(),
            connections: self.connections,
            attached_at: self.attached_at.clone(),
            driver: Driver::Nbd,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use lazyblk_nbd::kernel::ClientHandshakeError;

    #[test]
    fn api_statuses_tell_the_client_what_to_fix() {
        let device = Device(0);
        let no_driver = AttachError::from(KernelError::NoDriver {
            detail: "Module nbd not found".into(),
        });
        assert_eq!(no_driver.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(no_driver.to_string().contains("no nbd driver"));
        let unknown = AttachError::from(KernelError::Handshake {
            device,
            export: "nosuch".into(),
            source: ClientHandshakeError::UnknownExport {
                export: "nosuch".into(),
                message: String::new(),
            },
        });
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        let in_use = AttachError::InUse {
            device,
            export: "sb1".into(),
        };
        assert_eq!(in_use.status(), StatusCode::CONFLICT);
        assert!(in_use
            .to_string()
            .starts_with("/dev/nbd0 (export \"sb1\") is in use"));
        let ioctl = AttachError::from(KernelError::Device {
            device,
            step: "NBD_SET_SOCK",
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
        assert_eq!(ioctl.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            ioctl.to_string().starts_with("NBD_SET_SOCK on /dev/nbd0: ")
                && ioctl.to_string().contains("os error 16"),
            "{ioctl}"
        );
    }
}
