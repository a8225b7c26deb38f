//! The kernel's NBD devices: their names, whether the driver is loaded, which are
//! connected (`/sys/block/nbdN/pid`) or held open, and a free one to attach.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::{KernelError, POLL_INTERVAL};

/// How long `/sys/block/nbd0` may take to appear after `modprobe nbd`.
const MODPROBE_SETTLE: Duration = Duration::from_secs(2);

/// Where the driver's devices show their state.
pub(super) const SYS_BLOCK: &str = "/sys/block";

/// One of the driver's devices, `/dev/nbdN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Device(pub u32);

impl Device {
    /// Parses `/dev/nbdN` or `nbdN`.
    pub fn parse(name: &str) -> Result<Device, KernelError> {
        let bad = || KernelError::BadDevice(name.to_owned());
        let short = name.strip_prefix("/dev/").unwrap_or(name);
        let digits = short.strip_prefix("nbd").ok_or_else(bad)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        // A leading zero would name the same device two ways.
        if digits.len() > 1 && digits.starts_with('0') {
            return Err(bad());
        }
        digits.parse().map(Device).map_err(|_| bad())
    }

    /// `nbdN`, as in `/sys/block`.
    pub fn name(&self) -> String {
        format!("nbd{}", self.0)
    }

    /// `/dev/nbdN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.0))
    }

    pub(super) fn sys(&self) -> PathBuf {
        Path::new(SYS_BLOCK).join(self.name())
    }

    /// Whether the driver has this device.
    pub fn exists(&self) -> bool {
        self.sys().exists()
    }

    /// The pid of the task serving the device, while a client is connected.
    pub fn connected_pid(&self) -> Option<String> {
        std::fs::read_to_string(self.sys().join("pid"))
            .ok()
            .map(|pid| pid.trim().to_owned())
    }

    /// Who attached the device (`/sys/block/nbdN/backend`: netlink devices with a
    /// backend identifier, kernel 5.14+).
    pub fn backend(&self) -> Option<String> {
        std::fs::read_to_string(self.sys().join("backend"))
            .ok()
            .map(|backend| backend.trim_end_matches('\n').to_owned())
    }

    /// Whether the kernel still shows the device busy although no client is connected:
    /// requests in flight (`inflight`, a teardown not finished) or holders (a device
    /// mapper or md device stacked on it). Such a slot is not reused.
    pub fn settling(&self) -> bool {
        let inflight = std::fs::read_to_string(self.sys().join("inflight")).unwrap_or_default();
        let busy = inflight.split_whitespace().any(|count| count != "0");
        let held = std::fs::read_dir(self.sys().join("holders"))
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        busy || held
    }

    /// The device's size in bytes as the kernel shows it (0 while not connected).
    pub fn size_bytes(&self) -> Option<u64> {
        let sectors = std::fs::read_to_string(self.sys().join("size")).ok()?;
        sectors.trim().parse::<u64>().ok()?.checked_mul(512)
    }

    /// Whether the device is mounted or held open exclusively (an exclusive open fails
    /// with EBUSY): disconnecting it would fail a file system's I/O.
    pub fn held(&self) -> bool {
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(self.path());
        matches!(opened, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
    }

    pub(super) fn error(&self, step: &'static str) -> impl FnOnce(io::Error) -> KernelError + '_ {
        move |source| KernelError::Device {
            device: *self,
            step,
            source,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/dev/nbd{}", self.0)
    }
}

/// Every device of the driver, in order.
pub fn devices() -> Result<Vec<Device>, KernelError> {
    let mut all: Vec<Device> = std::fs::read_dir(SYS_BLOCK)
        .map_err(KernelError::Sysfs)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| Device::parse(entry.file_name().to_str()?).ok())
        .collect();
    all.sort();
    Ok(all)
}

/// Makes sure the nbd driver is loaded, loading it with `modprobe nbd` if needed.
pub fn ensure_driver() -> Result<(), KernelError> {
    if Device(0).exists() {
        return Ok(());
    }
    let detail = match Command::new("modprobe").arg("nbd").output() {
        Ok(out) if out.status.success() => {
            let deadline = Instant::now() + MODPROBE_SETTLE;
            while Instant::now() < deadline {
                if Device(0).exists() {
                    return Ok(());
                }
                thread::sleep(POLL_INTERVAL);
            }
            format!("it succeeded but {SYS_BLOCK}/nbd0 did not appear")
        }
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if stderr.is_empty() {
                format!("{}", out.status)
            } else {
                stderr
            }
        }
        Err(e) => format!("cannot run modprobe: {e}"),
    };
    Err(KernelError::NoDriver { detail })
}

/// Checks that `device` exists and is not connected.
pub fn check_free(device: Device) -> Result<(), KernelError> {
    if !device.exists() {
        let count = devices()?.len();
        return Err(KernelError::NoSuchDevice { device, count });
    }
    match device.connected_pid() {
        Some(pid) => Err(KernelError::Busy { device, pid }),
        None if device.settling() => Err(KernelError::Settling { device }),
        None => Ok(()),
    }
}

/// The first device that is not connected and not in `taken`.
pub fn free_device(taken: &[Device]) -> Result<Device, KernelError> {
    let all = devices()?;
    all.iter()
        .copied()
        .find(|d| !taken.contains(d) && d.connected_pid().is_none() && !d.settling())
        .ok_or(KernelError::NoFreeDevice { count: all.len() })
}
