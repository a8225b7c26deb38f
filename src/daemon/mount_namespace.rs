//! Where the daemon's mount namespace stands for its ublk devices
//! (`--ublk-mount-namespace`; the mechanics are [`lazyblk_ublk::namespace`]).
//!
//! Decided in `main` before the async runtime starts a thread, so that every thread of
//! the daemon shares the namespace it lands in: a namespace is per thread, and one
//! thread left behind could be the last holder of the old one.

use std::sync::OnceLock;

use lazyblk_fuse::mountinfo::{self, MountEntry};
use lazyblk_ublk::namespace::{self, Namespace};

use super::args::{DaemonArgs, UblkMountNamespace};

/// What the start did with the daemon's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The host's namespace: its init outlives the daemon, so nothing to do.
    Host,
    /// Moved into a private namespace of its own, from `from`.
    Private { from: String },
    /// Left where it was by the operator's choice (`shared`).
    Shared,
    /// Left where it was, and ublk is refused for `why`.
    Refused { why: String },
    /// Left where it was, not the host's, and ublk was not offered at the start: a
    /// device made later would meet a namespace nobody looked at, so ublk is refused.
    NotOffered { why: String },
}

impl Placement {
    /// Why `attach --kind ublk` is refused, if it is.
    pub fn ublk_refusal(&self) -> Option<String> {
        match self {
            Placement::Refused { why } | Placement::NotOffered { why } => Some(why.clone()),
            _ => None,
        }
    }
}

static PLACEMENT: OnceLock<Placement> = OnceLock::new();

/// Decides, and moves the process if needed. Call once, from `main`, before any thread
/// starts; an error ends the start (a namespace asked for explicitly and not made).
pub fn place(args: &DaemonArgs) -> anyhow::Result<()> {
    let pid_one = std::process::id() == 1;
    let placement = decide(args, Namespace::probe(), ublk_offered(args), pid_one)?;
    let _ = PLACEMENT.set(placement);
    Ok(())
}

/// What [`place`] decided; a daemon started without it (a test calling `run` itself)
/// is taken to be where it is by choice.
pub fn placement() -> Placement {
    PLACEMENT.get().cloned().unwrap_or(Placement::Shared)
}

fn ublk_offered(args: &DaemonArgs) -> bool {
    lazyblk_ublk::check(&args.ublk_kernel).is_ok()
}

fn decide(
    args: &DaemonArgs,
    here: Namespace,
    offered: bool,
    pid_one: bool,
) -> anyhow::Result<Placement> {
    let fuse = args.fuse.is_some();
    match args.ublk_mount_namespace {
        UblkMountNamespace::Shared => Ok(Placement::Shared),
        UblkMountNamespace::Private => {
            if fuse {
                anyhow::bail!("--ublk-mount-namespace private and --fuse: the FUSE mount would be visible to the daemon alone; use auto or shared");
            }
            let from = own(&here);
            namespace::enter_private().map_err(|e| {
                anyhow::anyhow!(
                    "--ublk-mount-namespace private: cannot make a private mount namespace: {e}"
                )
            })?;
            Ok(Placement::Private { from })
        }
        UblkMountNamespace::Auto => Ok(match here {
            Namespace::Host => Placement::Host,
            Namespace::Other { own, why } => {
                let apart =
                    || format!("its mount namespace {own} is not known to be the host's ({why})");
                if pid_one {
                    // `docker exec`, `kubectl exec` and `nsenter -t 1` join pid 1's
                    // namespace: moving pid 1 would bring their mounts along with it.
                    Placement::Refused {
                        why: format!("{}, and the daemon is its container's init (pid 1), whose mount namespace `docker exec` and `kubectl exec` join: run it under an init (docker run --init, tini), or with --ublk-mount-namespace shared if nothing mounts its devices there", apart()),
                    }
                } else if !offered {
                    // Made later (ublk_drv loaded after the start), a device would meet
                    // a namespace nobody looked at.
                    Placement::NotOffered {
                        why: format!("ublk was not offered when the daemon started and {}: restart the daemon", apart()),
                    }
                } else if fuse {
                    Placement::Refused {
                        why: format!("{}, and the daemon mounts FUSE in it, so it cannot move to a private one: a mount of its device there would keep the daemon from exiting; start it in the host's namespace, or without --fuse, or with --ublk-mount-namespace shared if nothing mounts its devices there", apart()),
                    }
                } else {
                    match namespace::enter_private() {
                        Ok(()) => Placement::Private { from: own },
                        Err(e) => Placement::Refused {
                            why: format!("{}, and a private one could not be made: {e}", apart()),
                        },
                    }
                }
            }
        }),
    }
}

fn own(here: &Namespace) -> String {
    match here {
        Namespace::Host => "the host's".into(),
        Namespace::Other { own, .. } => own.clone(),
    }
}

/// Logs the placement, and in a private namespace detaches the copies of mounts of the
/// daemon's devices it inherited. Call once the devices are served again (a restarted
/// daemon's recovered ublk devices): a copy's detach may be the unmount that writes.
pub async fn settle() {
    let placement = placement();
    match &placement {
        Placement::Host => tracing::debug!("mount namespace: the host's"),
        Placement::Shared => {}
        Placement::NotOffered { why } => tracing::debug!("mount namespace: {why}"),
        Placement::Refused { why } => {
            tracing::warn!("attach --kind ublk is refused: {why}")
        }
        Placement::Private { from } => {
            let detached = tokio::task::spawn_blocking(detach_device_mounts)
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match detached {
                Ok(detached) => {
                    for (mount, result) in &detached {
                        let dir = mount.mount_point.display();
                        match result {
                            Ok(()) => {
                                tracing::info!(%dir, device = mount.source, "detached this daemon's copy of a mount of a served device")
                            }
                            Err(e) => {
                                tracing::warn!(%dir, device = mount.source, error = %e, "cannot detach this daemon's copy of a mount of a served device")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the mount table to detach copies of served devices' mounts")
                }
            }
            tracing::info!(from, "mount namespace: a private one of the daemon's own (mounts of its devices made elsewhere do not reach it)");
        }
    }
}

/// Detaches, in this process's namespace only, every mount of a device of the kinds the
/// daemon serves (innermost first); other namespaces keep theirs.
fn detach_device_mounts() -> std::io::Result<Vec<(MountEntry, std::io::Result<()>)>> {
    let mut mounts = device_mounts(mountinfo::read()?, block_device_name);
    mounts.reverse();
    Ok(mounts
        .into_iter()
        .map(|mount| {
            let result = nix::mount::umount2(&mount.mount_point, nix::mount::MntFlags::MNT_DETACH)
                .map_err(std::io::Error::from);
            (mount, result)
        })
        .collect())
}

/// The mounts of a block device that `name_of(major, minor)` names as one the daemon
/// serves.
fn device_mounts(
    table: Vec<MountEntry>,
    name_of: impl Fn(u32, u32) -> Option<String>,
) -> Vec<MountEntry> {
    table
        .into_iter()
        .filter(|m| name_of(m.major, m.minor).is_some_and(|name| served_kind(&name)))
        .collect()
}

/// A block device's kernel name from its numbers (`/sys/dev/block/MAJ:MIN`).
fn block_device_name(major: u32, minor: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Whether a block device's name is one the daemon serves: `ublkbN` or `nbdN` (not a
/// partition of either, which the daemon's devices never carry).
fn served_kind(name: &str) -> bool {
    let number = |rest: Option<&str>| {
        rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
    };
    number(name.strip_prefix("ublkb")) || number(name.strip_prefix("nbd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: DaemonArgs,
    }

    fn args(extra: &[&str]) -> DaemonArgs {
        let mut argv = vec!["lazyblk", "--cache", "/tmp/x"];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).args
    }

    fn other() -> Namespace {
        Namespace::Other {
            own: "mnt:[9]".into(),
            why: "the init process is in mnt:[1]".into(),
        }
    }

    #[test]
    fn the_host_namespace_stays() {
        let placed = decide(&args(&[]), Namespace::Host, true, false).unwrap();
        assert_eq!(placed, Placement::Host);
        assert_eq!(placed.ublk_refusal(), None);
    }

    #[test]
    fn elsewhere_with_fuse_ublk_is_refused_with_the_way_out() {
        let placed = decide(&args(&["--fuse", "/tmp/f"]), other(), true, false).unwrap();
        let why = placed.ublk_refusal().expect("refused");
        assert!(why.contains("mnt:[9]") && why.contains("--fuse"), "{why}");
    }

    #[test]
    fn elsewhere_without_ublk_at_start_later_attaches_are_refused() {
        let placed = decide(&args(&[]), other(), false, false).unwrap();
        assert!(placed.ublk_refusal().unwrap().contains("restart"));
    }

    #[test]
    fn a_container_init_is_refused_rather_than_moved() {
        let placed = decide(&args(&[]), other(), true, true).unwrap();
        let why = placed.ublk_refusal().expect("refused");
        assert!(why.contains("pid 1") && why.contains("--init"), "{why}");
    }

    #[test]
    fn shared_is_the_operators_word() {
        let placed = decide(
            &args(&["--ublk-mount-namespace", "shared", "--fuse", "/f"]),
            other(),
            true,
            false,
        )
        .unwrap();
        assert_eq!(placed, Placement::Shared);
    }

    #[test]
    fn private_with_fuse_does_not_start() {
        let e = decide(
            &args(&["--ublk-mount-namespace", "private", "--fuse", "/f"]),
            Namespace::Host,
            true,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--fuse"), "{e}");
    }

    #[test]
    fn mounts_of_served_devices_are_found_and_nothing_else() {
        let table = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 259:7 / /mnt/sand\\040box rw,relatime shared:20 - ext4 /dev/ublkb3 rw
41 40 43:0 / /mnt/sand\\040box/inner rw shared:21 - ext4 /dev/nbd0 rw
42 22 43:16 / /mnt/part rw shared:22 - ext4 /dev/nbd1p1 rw
43 22 0:45 / /run/lazyblk/fuse rw - fuse /dev/fuse rw
";
        let names = |major, minor| match (major, minor) {
            (259, 1) => Some("vda1".to_string()),
            (259, 7) => Some("ublkb3".to_string()),
            (43, 0) => Some("nbd0".to_string()),
            (43, 16) => Some("nbd1p1".to_string()),
            _ => None,
        };
        let entries = table.lines().filter_map(mountinfo::parse_line).collect();
        let found: Vec<_> = device_mounts(entries, names)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        assert_eq!(
            found,
            vec![
                std::path::PathBuf::from("/mnt/sand box"),
                "/mnt/sand box/inner".into()
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
}
