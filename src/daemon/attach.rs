//! Kernel block devices for exports (`lazyblk attach` / `detach`): `/dev/nbdN`
//! connected to one of this daemon's exports through a socketpair. The daemon serves
//! one end like any NBD connection (so the export's size, flags and read-only come from
//! the handshake); the other end goes to the kernel through
//! [`lazyblk_nbd::kernel::attach`]. An attached device holds a lease on its export:
//! evictions and deletions name it ("kernel /dev/nbd0").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use lazyblk_nbd::kernel::{self, Connection, Device, KernelError};
use lazyblk_nbd::{Command, Exports, OpenError, ServerConfig};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::daemon::exports::{NbdExports, NodeExport};
use crate::daemon::node::Node;
use crate::daemon::state::now_rfc3339;
use crate::daemon::templates::TemplateError;

/// How long a detach waits for the daemon's end of the connection to finish once the
/// kernel has let go: in-flight requests are answered first, a cold chunk fetch at most.
const SERVER_DRAIN: Duration = Duration::from_secs(10);

/// Why an attach or detach was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The export name is not a valid template or sandbox id.
    #[error("invalid export name: {0}")]
    InvalidExport(String),
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
}

impl AttachError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            AttachError::InvalidExport(_) => StatusCode::BAD_REQUEST,
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
        KernelError::Busy { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One attached device as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AttachmentStatus {
    /// `/dev/nbdN`.
    pub device: String,
    pub export: String,
    pub size: u64,
    pub read_only: bool,
    /// False once the connection has ended on its own (the error says why).
    pub connected: bool,
    pub error: Option<String>,
    pub attached_at: String,
}

/// The devices this daemon has attached.
pub struct Attachments {
    /// Opens exports for the kernel's connections.
    exports: Arc<KernelExports>,
    /// By device; a device is reserved while its attach runs, so two requests never
    /// pick the same one.
    slots: Mutex<BTreeMap<Device, Slot>>,
}

enum Slot {
    Attaching,
    Attached(Attachment),
}

struct Attachment {
    export: String,
    connection: Connection,
    /// The task serving the daemon's end; it ends once the kernel disconnects.
    server: JoinHandle<()>,
    attached_at: String,
}

impl Attachment {
    fn status(&mut self) -> AttachmentStatus {
        let info = self.connection.info();
        let device = self.connection.device().to_string();
        let error = match self.connection.ended() {
            None => None,
            Some(Ok(())) => Some("disconnected".to_string()),
            Some(Err(e)) => Some(e.clone()),
        };
        AttachmentStatus {
            device,
            export: self.export.clone(),
            size: info.size,
            read_only: info.read_only(),
            connected: error.is_none(),
            error,
            attached_at: self.attached_at.clone(),
        }
    }
}

impl Attachments {
    pub fn new(node: Arc<Node>) -> Attachments {
        Attachments {
            exports: Arc::new(KernelExports(NbdExports { node })),
            slots: Mutex::new(BTreeMap::new()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<Device, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every attached device, including those whose connection has ended.
    pub fn list(&self) -> Vec<AttachmentStatus> {
        self.slots()
            .values_mut()
            .filter_map(|slot| match slot {
                Slot::Attached(a) => Some(a.status()),
                Slot::Attaching => None,
            })
            .collect()
    }

    /// Connects `device` (or the first free one) to `export`.
    pub async fn attach(
        &self,
        export: &str,
        device: Option<&str>,
    ) -> Result<AttachmentStatus, AttachError> {
        lazyblk_cache::validate_id(export)
            .map_err(|e| AttachError::InvalidExport(e.to_string()))?;
        let requested = device.map(Device::parse).transpose()?;
        blocking(Device(0), kernel::ensure_driver).await??;
        let device = self.reserve(requested)?;
        let connected = self.connect(device, export).await;
        let mut slots = self.slots();
        match connected {
            Ok(mut attachment) => {
                let status = attachment.status();
                tracing::info!(device = %device, export, size = status.size, read_only = status.read_only, "attached kernel block device");
                slots.insert(device, Slot::Attached(attachment));
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

    /// Serves one end of a new socketpair and hands the other to the kernel.
    async fn connect(&self, device: Device, export: &str) -> Result<Attachment, AttachError> {
        let socket_error = |source| AttachError::Socket { device, source };
        let (kernel_end, daemon_end) =
            std::os::unix::net::UnixStream::pair().map_err(socket_error)?;
        daemon_end.set_nonblocking(true).map_err(socket_error)?;
        let daemon_end = tokio::net::UnixStream::from_std(daemon_end).map_err(socket_error)?;
        let peer = format!("kernel {device}");
        let exports = self.exports.clone();
        let server = tokio::spawn(async move {
            let served =
                lazyblk_nbd::serve_socket(daemon_end, peer, exports, ServerConfig::default()).await;
            if let Err(error) = served {
                tracing::warn!(device = %device, %error, "kernel connection ended with an error");
            }
        });
        let name = export.to_owned();
        // On failure the kernel's end is dropped, so the server task sees the socket
        // close and ends by itself.
        let connection =
            blocking(device, move || kernel::attach(device, kernel_end, &name)).await??;
        Ok(Attachment {
            export: export.to_owned(),
            connection,
            server,
            attached_at: now_rfc3339(),
        })
    }

    /// Disconnects `device`; refused while it is mounted or held open, unless `force`.
    /// Returns once the kernel has let go and the export's lease is released.
    pub async fn detach(&self, device: &str, force: bool) -> Result<AttachmentStatus, AttachError> {
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
        if tokio::time::timeout(SERVER_DRAIN, attachment.server)
            .await
            .is_err()
        {
            tracing::warn!(device = %device, export, "the kernel connection's server did not end in time");
        }
        tracing::info!(device = %device, export, "detached kernel block device");
        Ok(AttachmentStatus {
            connected: false,
            ..status
        })
    }

    /// Disconnects every device (at shutdown: their server goes away with the daemon).
    pub async fn detach_all(&self) {
        let devices: Vec<Device> = self.slots().keys().copied().collect();
        for device in devices {
            if let Err(error) = self.detach(&device.name(), true).await {
                tracing::warn!(device = %device, %error, "detaching at shutdown");
            }
        }
    }
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

/// The node's exports as the kernel's connections open them: those of [`NbdExports`],
/// but the user named in status and refusals is the device itself ("kernel
/// /dev/nbd0"), which is the connection's peer name.
struct KernelExports(NbdExports);

impl Exports for KernelExports {
    type Export = NodeExport;

    async fn open(&self, name: &str, peer: &str) -> Result<Arc<NodeExport>, OpenError> {
        if lazyblk_cache::validate_id(name).is_err() {
            return Err(OpenError::Unknown);
        }
        match NodeExport::open(&self.0.node, name, peer.to_owned()).await {
            Ok(export) => Ok(Arc::new(export)),
            Err(TemplateError::UnknownTemplate(..)) => Err(OpenError::Unknown),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }

    async fn list(&self) -> Vec<(String, String)> {
        self.0.list().await
    }

    fn observe(&self, command: Command, bytes: u64, elapsed: Duration, ok: bool) {
        self.0.observe(command, bytes, elapsed, ok)
    }

    fn spliced(&self, bytes: u64) {
        self.0.spliced(bytes)
    }
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
