//! Where the daemon's mount namespace stands for its ublk devices
//! (`--ublk-mount-namespace`; the mechanics are [`lazyblk_ublk::namespace`]).
//!
//! Decided in `main` before the async runtime starts a thread, so that every thread of
//! the daemon shares the namespace it lands in: a namespace is per thread, and one
//! thread left behind could be the last holder of the old one.

use std::sync::OnceLock;

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
            let detached = tokio::task::spawn_blocking(namespace::detach_device_mounts)
                .await
                .unwrap_or_default();
            for (mount, result) in &detached {
                match result {
                    Ok(()) => {
                        tracing::info!(dir = %mount.dir.display(), device = mount.device, "detached this daemon's copy of a mount of a served device")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %mount.dir.display(), device = mount.device, error = %e, "cannot detach this daemon's copy of a mount of a served device")
                    }
                }
            }
            tracing::info!(from, "mount namespace: a private one of the daemon's own (mounts of its devices made elsewhere do not reach it)");
        }
    }
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
}
