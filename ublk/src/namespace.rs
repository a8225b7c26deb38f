//! The daemon's mount namespace, kept apart from mounts of its own devices.
//!
//! A process serving a ublk device must not be the last holder of a mount namespace in
//! which that device is mounted: its exit would tear the namespace down and unmount the
//! file system, whose last writes go to the device the exiting process no longer
//! serves, and the exit never finishes (the kernel keeps the device waiting for a
//! recovery that cannot start while the old server is alive). The host's own namespace
//! is safe (its init holds it for as long as the host runs); a container's, or any
//! namespace the daemon was started in by `unshare` or `nsenter`, is not. So a daemon
//! outside the host's namespace moves into a private one of its own at start: nothing
//! mounted elsewhere later propagates into it, and copies of mounts of its devices it
//! inherited are detached once its devices are served again.

use std::io;
use std::path::{Path, PathBuf};

/// Where the daemon's mount namespace stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// The host's: the same as the init process's, and that init is the host's (its
    /// pid 2 is the kernel's `kthreadd`).
    Host,
    /// Another one (a container's, or one made by `unshare`), or one whose relation to
    /// the host's cannot be read (`/proc/1` hidden).
    Other {
        /// This process's namespace, as `/proc/self/ns/mnt` names it.
        own: String,
        /// Why it is not known to be the host's.
        why: String,
    },
}

impl Namespace {
    /// Reads this process's mount namespace and the init process's.
    pub fn probe() -> Namespace {
        Self::probe_in(Path::new("/proc"))
    }

    fn probe_in(proc: &Path) -> Namespace {
        let read = |path: &str| std::fs::read_link(proc.join(path));
        let own = match read("self/ns/mnt") {
            Ok(own) => own.display().to_string(),
            Err(e) => {
                return Namespace::Other {
                    own: "unknown".into(),
                    why: format!("/proc/self/ns/mnt cannot be read: {e}"),
                }
            }
        };
        let other = |why: String| Namespace::Other {
            own: own.clone(),
            why,
        };
        let init = match read("1/ns/mnt") {
            Ok(init) => init.display().to_string(),
            Err(e) => return other(format!("the init process's namespace cannot be read: {e}")),
        };
        if init != own {
            return other(format!("the init process is in {init}"));
        }
        let kthreadd = std::fs::read_to_string(proc.join("2/comm")).unwrap_or_default();
        if kthreadd.trim() != "kthreadd" {
            return other("the init process is a container's (pid 2 is not kthreadd)".into());
        }
        Namespace::Host
    }
}

/// Moves the calling thread (and every thread it starts later) into a new mount
/// namespace whose mounts propagate nowhere and receive nothing: a copy of the current
/// mounts, private. Call before the process starts threads, so that all of them share
/// it. On failure the thread is back in the namespace it was in (a new namespace left
/// shared would receive later mounts, with this process its only holder).
pub fn enter_private() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let old = std::fs::File::open("/proc/self/ns/mnt")?;
    // SAFETY: unshare and mount take no pointers the kernel keeps; the strings are
    // NUL-terminated literals.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let made_private = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if made_private != 0 {
        let error = io::Error::last_os_error();
        // SAFETY: a descriptor of a mount namespace this process was in.
        if unsafe { libc::setns(old.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
            let back = io::Error::last_os_error();
            return Err(io::Error::other(format!(
                "making the new mount namespace private: {error}; and returning to the old one: {back}"
            )));
        }
        return Err(error);
    }
    Ok(())
}

/// A mount of one of the daemon's kinds of device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMount {
    /// Where it is mounted.
    pub dir: PathBuf,
    /// The device (`ublkb3`, `nbd0`).
    pub device: String,
}

/// Mounts in `mountinfo` (the text of `/proc/self/mountinfo`) of a block device whose
/// name `name_of(major, minor)` gives and `is_served` accepts, innermost last.
pub fn device_mounts(
    mountinfo: &str,
    name_of: impl Fn(u32, u32) -> Option<String>,
    is_served: impl Fn(&str) -> bool,
) -> Vec<DeviceMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let numbers = fields.nth(2)?;
            let dir = fields.nth(1)?;
            let (major, minor) = numbers.split_once(':')?;
            let device = name_of(major.parse().ok()?, minor.parse().ok()?)?;
            is_served(&device).then(|| DeviceMount {
                dir: PathBuf::from(unescape(dir)),
                device,
            })
        })
        .collect()
}

/// A block device's kernel name from its numbers (`/sys/dev/block/MAJ:MIN`).
pub fn block_device_name(major: u32, minor: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Whether a block device's name is one the daemon serves: `ublkbN` or `nbdN` (not a
/// partition of either, which the daemon's devices never carry).
pub fn served_kind(name: &str) -> bool {
    let number = |rest: Option<&str>| {
        rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
    };
    number(name.strip_prefix("ublkb")) || number(name.strip_prefix("nbd"))
}

/// Detaches, in this process's namespace only, every mount of a device of the kinds
/// the daemon serves (innermost first). Other namespaces keep theirs. Returns what was
/// detached and what could not be.
pub fn detach_device_mounts() -> Vec<(DeviceMount, io::Result<()>)> {
    let table = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(table) => table,
        Err(e) => {
            return vec![(
                DeviceMount {
                    dir: "/proc/self/mountinfo".into(),
                    device: String::new(),
                },
                Err(e),
            )]
        }
    };
    let mut mounts = device_mounts(&table, block_device_name, served_kind);
    mounts.reverse();
    mounts
        .into_iter()
        .map(|mount| {
            let result = detach(&mount.dir);
            (mount, result)
        })
        .collect()
}

fn detach(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: a NUL-terminated path the call does not keep.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 259:7 / /mnt/sand\\040box rw,relatime shared:20 - ext4 /dev/ublkb3 rw
41 40 43:0 / /mnt/sand\\040box/inner rw shared:21 - ext4 /dev/nbd0 rw
42 22 43:16 / /mnt/part rw shared:22 - ext4 /dev/nbd1p1 rw
43 22 0:45 / /run/lazyblk/fuse rw - fuse /dev/fuse rw
";

    fn names(major: u32, minor: u32) -> Option<String> {
        match (major, minor) {
            (259, 1) => Some("vda1".into()),
            (259, 7) => Some("ublkb3".into()),
            (43, 0) => Some("nbd0".into()),
            (43, 16) => Some("nbd1p1".into()),
            _ => None,
        }
    }

    #[test]
    fn mounts_of_served_devices_are_found_and_nothing_else() {
        let found = device_mounts(TABLE, names, served_kind);
        assert_eq!(
            found,
            vec![
                DeviceMount {
                    dir: "/mnt/sand box".into(),
                    device: "ublkb3".into()
                },
                DeviceMount {
                    dir: "/mnt/sand box/inner".into(),
                    device: "nbd0".into()
                },
            ]
        );
    }

    #[test]
    fn device_kinds() {
        assert!(served_kind("ublkb0"));
        assert!(served_kind("nbd12"));
        assert!(!served_kind("nbd1p1"));
        assert!(!served_kind("ublkc0"));
        assert!(!served_kind("ublkb"));
        assert!(!served_kind("vda"));
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/plain\\x"), "/plain\\x");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }

    #[test]
    fn a_hidden_or_different_init_is_not_the_host() {
        let dir = std::env::temp_dir().join(format!("lazyblk-ns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["self/ns", "1/ns", "2"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let link = |target: &str, at: &str| {
            let _ = std::fs::remove_file(dir.join(at));
            std::os::unix::fs::symlink(target, dir.join(at)).unwrap();
        };
        link("mnt:[1]", "self/ns/mnt");
        assert!(
            matches!(Namespace::probe_in(&dir), Namespace::Other { why, .. } if why.contains("cannot be read"))
        );
        link("mnt:[2]", "1/ns/mnt");
        assert!(
            matches!(Namespace::probe_in(&dir), Namespace::Other { why, .. } if why.contains("mnt:[2]"))
        );
        link("mnt:[1]", "1/ns/mnt");
        std::fs::write(dir.join("2/comm"), "sleep\n").unwrap();
        assert!(
            matches!(Namespace::probe_in(&dir), Namespace::Other { why, .. } if why.contains("container"))
        );
        std::fs::write(dir.join("2/comm"), "kthreadd\n").unwrap();
        assert_eq!(Namespace::probe_in(&dir), Namespace::Host);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
