//! Which kernels ublk is offered on, and whether the driver is there.
//!
//! ublk's control path has wedged on some kernels (a control command that never
//! completes, after which every later one wedges too: reported on 6.18.40 and 7.0.x;
//! EINVAL and a panic on 6.17). So a device is offered only on kernels the project has
//! run its churn test on ([`TESTED_KERNELS`]), plus those an operator names after
//! testing their own (the daemon's `--ublk-kernel`).

use std::path::Path;

use crate::UblkError;

/// Kernel series (`major.minor`) the guest test (`scripts/kernel-test.sh` with
/// `KERNEL_TEST_KIND=ublk`: template and sandbox mounted, kill -9 and recovery, a
/// launch wave, add/remove churn) has passed on. Debian 12's backports 6.12.
pub const TESTED_KERNELS: &[&str] = &["6.12"];

/// The control device the driver creates when loaded.
pub const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// The driver's sysfs directory, present when `ublk_drv` is loaded or built in.
const DRIVER_SYSFS: &str = "/sys/module/ublk_drv";

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix_uname().unwrap_or_else(|| "unknown".to_string())
}

fn nix_uname() -> Option<String> {
    // SAFETY: utsname is plain data; uname fills it or fails.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// Whether `release` (`6.12.48+deb12-cloud-amd64`) is one of `allowed`: an entry is a
/// whole release, or a prefix of one ending where a version part ends (`6.12` matches
/// `6.12.48+deb12-cloud-amd64`, not `6.120`).
pub fn kernel_allowed(release: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|entry| {
        let entry = entry.trim();
        !entry.is_empty()
            && release
                .strip_prefix(entry)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '-', '+', '_', '~']))
    })
}

/// The tested kernels followed by `extra` (an operator's own).
pub fn allowed_kernels(extra: &[String]) -> Vec<String> {
    TESTED_KERNELS
        .iter()
        .map(|k| k.to_string())
        .chain(extra.iter().cloned())
        .collect()
}

/// Checks that ublk may be used here: the running kernel is allowed, the driver is
/// loaded and its control device exists. Each refusal names what to do instead.
pub fn check(extra: &[String]) -> Result<(), UblkError> {
    let release = kernel_release();
    let allowed = allowed_kernels(extra);
    if !kernel_allowed(&release, &allowed) {
        return Err(UblkError::KernelNotOffered { release, allowed });
    }
    check_driver()
}

/// Checks that the driver is loaded and its control device exists.
pub fn check_driver() -> Result<(), UblkError> {
    if !Path::new(DRIVER_SYSFS).exists() && !Path::new(CONTROL_DEVICE).exists() {
        return Err(UblkError::NoDriver {
            detail: format!(
                "{DRIVER_SYSFS} is absent: the ublk_drv module is not loaded (modprobe ublk_drv)"
            ),
        });
    }
    if !Path::new(CONTROL_DEVICE).exists() {
        return Err(UblkError::NoDriver {
            detail: format!("ublk_drv is loaded but {CONTROL_DEVICE} is missing (no devtmpfs, or a container without the device)"),
        });
    }
    Ok(())
}

/// The driver's `ublks_max` module parameter: devices per host, all users together.
const UBLKS_MAX: &str = "/sys/module/ublk_drv/parameters/ublks_max";

/// Descriptors one device holds besides its queues' slots: the character device, the
/// control ring of its thread, and one io_uring per queue (counted per queue below).
const FDS_PER_DEVICE: u64 = 2;

/// Descriptors one queue holds: its io_uring and an eventfd per request slot.
pub fn fds_per_queue(depth: u16) -> u64 {
    1 + u64::from(depth)
}

/// What limits how many devices this process can serve, read at the daemon's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The driver's `ublks_max` (absent when the driver is not loaded).
    pub ublks_max: Option<u64>,
    /// This process's soft `RLIMIT_NOFILE`.
    pub nofile: Option<u64>,
    /// Descriptors one device with `queues` queues takes.
    pub fds_per_device: u64,
}

impl Limits {
    /// Reads the limits for devices of `queues` queues of `depth` slots.
    pub fn read(queues: u16, depth: u16) -> Limits {
        let ublks_max = std::fs::read_to_string(UBLKS_MAX)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        // SAFETY: getrlimit fills the struct or fails.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        let nofile = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
            .then_some(limit.rlim_cur);
        Limits {
            ublks_max,
            nofile,
            fds_per_device: FDS_PER_DEVICE + u64::from(queues) * fds_per_queue(depth),
        }
    }

    /// How many devices the descriptor limit leaves room for, `reserved` descriptors
    /// kept for everything else the process does.
    pub fn devices_by_nofile(&self, reserved: u64) -> Option<u64> {
        self.nofile
            .map(|n| n.saturating_sub(reserved) / self.fds_per_device.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_series_matches_its_releases_and_nothing_else() {
        let allowed = list(&["6.12"]);
        assert!(kernel_allowed("6.12.48+deb12-cloud-amd64", &allowed));
        assert!(kernel_allowed("6.12", &allowed));
        assert!(kernel_allowed("6.12-rc1", &allowed));
        assert!(!kernel_allowed("6.120.1", &allowed));
        assert!(!kernel_allowed("6.1.0-40-cloud-amd64", &allowed));
        assert!(!kernel_allowed("6.18.40", &allowed));
        assert!(!kernel_allowed("6.12.1", &list(&[""])));
    }

    #[test]
    fn the_descriptor_limit_bounds_the_devices() {
        let limits = Limits {
            ublks_max: Some(64),
            nofile: Some(10_000),
            fds_per_device: 2 + 2 * fds_per_queue(64),
        };
        assert_eq!(limits.fds_per_device, 132);
        assert_eq!(limits.devices_by_nofile(1_000), Some(68));
        assert_eq!(limits.devices_by_nofile(20_000), Some(0));
    }

    #[test]
    fn an_operator_adds_a_release_of_their_own() {
        let allowed = allowed_kernels(&list(&["6.6.80"]));
        assert!(kernel_allowed("6.6.80", &allowed));
        assert!(!kernel_allowed("6.6.81", &allowed));
        assert!(kernel_allowed("6.12.9", &allowed));
    }

    #[test]
    fn a_refused_kernel_is_named_with_the_nbd_alternative() {
        let error = UblkError::KernelNotOffered {
            release: "6.1.0-40-cloud-amd64".into(),
            allowed: allowed_kernels(&[]),
        };
        let text = error.to_string();
        assert!(text.contains("6.1.0-40-cloud-amd64"), "{text}");
        assert!(text.contains("--kind nbd"), "{text}");
        assert!(text.contains("--ublk-kernel"), "{text}");
    }
}
