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
//! mounted elsewhere later propagates into it (the daemon detaches the copies of its
//! devices' mounts it inherited).

use std::io;
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

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
