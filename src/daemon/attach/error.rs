//! Why an attach or detach was refused, and the HTTP status the API answers each with.

use axum::http::StatusCode;
use lazyblk_nbd::kernel::{Device, KernelError};

use super::MAX_DEVICE_CONNECTIONS;

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
                | lazyblk_ublk::UblkError::NoDriver { .. }
                | lazyblk_ublk::UblkError::MountNamespace { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
