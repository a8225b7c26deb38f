//! lazyblk-ublk: an image of the image crate served as `/dev/ublkbN` through the
//! kernel's ublk driver (io_uring based; no socket, no NBD framing between the kernel
//! and the daemon). Depends on `lazyblk-image` alone within the workspace.
//!
//! # Layout
//! - `guard`: which kernels ublk is offered on ([`TESTED_KERNELS`], extended by the
//!   daemon's flag) and whether `ublk_drv` and `/dev/ublk-control` are there.
//! - `device`: [`UblkDevice`], one device: created ([`UblkDevice::add`]) or taken back
//!   after a restart ([`UblkDevice::recover`]), and removed. Every control command runs
//!   on a thread of its own under a deadline ([`DeviceOptions::control_deadline`]); one
//!   that misses it is reported ([`UblkError::Deadline`]) and the caller goes on.
//! - [`namespace`]: the daemon's mount namespace, kept apart from mounts of its own
//!   devices (a server that is the last holder of a namespace where its device is
//!   mounted cannot finish exiting).
//! - `serve`: the queues. libublk runs each hardware queue on a thread with a local
//!   executor driven by the queue's io_uring; image calls are async on the daemon's
//!   tokio runtime. A request is handed to the runtime, and its completion comes back
//!   through an eventfd read on the queue's own ring, so a queue thread blocked in
//!   `io_uring_enter` wakes exactly when its answer is ready.
//!
//! # Devices outlive the daemon
//! Devices are created with `UBLK_F_USER_RECOVERY` and `UBLK_F_USER_RECOVERY_REISSUE`:
//! when the daemon dies the kernel keeps `/dev/ublkbN`, queues new I/O, and requeues the
//! I/O in flight; a restarted daemon calls [`UblkDevice::recover`]
//! (`START_USER_RECOVERY`, new queues, `END_USER_RECOVERY`) and serves all of it.
//! Nothing the kernel saw completed is lost, since a write is acknowledged only after
//! the image has taken it (and for FUA or a flush, made it durable).

mod control;
mod device;
mod guard;
pub mod namespace;
mod serve;

pub use control::delete;
pub use device::{DeviceOptions, UblkDevice, DEFAULT_CONTROL_DEADLINE, MAX_QUEUES, QUEUE_DEPTH};
pub use guard::{
    allowed_kernels, check, check_driver, fds_per_queue, kernel_allowed, kernel_release, Limits,
    CONTROL_DEVICE, TESTED_KERNELS,
};

/// Why a ublk device could not be created, recovered or removed.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// The running kernel is not one ublk is offered on.
    #[error("ublk is not offered on kernel {release}: it is offered on kernels {allowed:?} (where the project's ublk churn test passed; control commands wedge on some others); use --kind nbd, or after testing this kernel start the daemon with --ublk-kernel {release}")]
    KernelNotOffered {
        release: String,
        allowed: Vec<String>,
    },
    /// The daemon's mount namespace may hold mounts of its own devices (see
    /// [`namespace`]).
    #[error("ublk is refused in this daemon: {detail}; use --kind nbd, or see the daemon's --ublk-mount-namespace")]
    MountNamespace { detail: String },
    /// The driver or its control device is missing.
    #[error("no ublk driver: {detail}; use --kind nbd, or load ublk_drv")]
    NoDriver { detail: String },
    /// A control command did not complete within its deadline; the device may be left
    /// in the kernel and is reported.
    #[error("ublk control command {step} on {device} missed its deadline of {deadline:?}; the device is left as the kernel holds it")]
    Deadline {
        device: String,
        step: &'static str,
        deadline: std::time::Duration,
    },
    /// The device id asked for is taken (ADD_DEV answered EEXIST).
    #[error("{device} exists already (taken by another process)")]
    IdTaken { device: String },
    /// A control command failed.
    #[error("ublk {step} on {device}: {detail}")]
    Control {
        device: String,
        step: &'static str,
        detail: String,
    },
    /// The image cannot be served as a block device.
    #[error("image of {size} bytes cannot be a ublk device: {reason}")]
    BadImage { size: u64, reason: &'static str },
}

/// `/dev/ublkbN`.
pub fn block_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

/// Parses `/dev/ublkbN` or `ublkbN` into N.
pub fn parse_device(name: &str) -> Option<u32> {
    let name = name.strip_prefix("/dev/").unwrap_or(name);
    name.strip_prefix("ublkb")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_both_ways() {
        assert_eq!(parse_device("/dev/ublkb3"), Some(3));
        assert_eq!(parse_device("ublkb12"), Some(12));
        assert_eq!(parse_device("/dev/nbd3"), None);
        assert_eq!(parse_device("ublkbx"), None);
        assert_eq!(block_path(7), "/dev/ublkb7");
    }
}
