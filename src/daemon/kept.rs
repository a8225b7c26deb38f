//! What the daemon keeps across its own restarts under systemd (`--fd-store`): its
//! listening sockets (HTTP API, NBD) and its FUSE mount, held in systemd's file
//! descriptor store ([`crate::fdstore`]) and taken back by the next start.
//!
//! - A listener passed back for the address still configured is served as it is:
//!   clients that connected while no daemon ran are waiting in its backlog, and a
//!   unix socket keeps its path (never unlinked and bound again). One for another
//!   address is dropped and the new address bound.
//! - The FUSE mount is taken over ([`lazyblk_fuse::adopt`]) when the directory is
//!   still that mount (its device number is in the stored name); open files keep
//!   working and requests in flight at the restart are answered by the new daemon.
//!
//! Stored names: `http`, `nbd`, `fuse.<dev>` (the `/dev/fuse` connection of the mount
//! whose device number is `<dev>`) and `fuse-record.<dev>.<generation>` (its session
//! record; the newest generation is the one read back).

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::daemon::exports::NodeImages;
use crate::daemon::node::Node;
use crate::fdstore::{self, Passed};

/// Stored name of the HTTP API's listener.
const HTTP_NAME: &str = "http";
/// Stored name of the NBD listener.
const NBD_NAME: &str = "nbd";
/// Prefix of the stored `/dev/fuse` connection's name.
const FUSE_PREFIX: &str = "fuse.";
/// Prefix of the stored session record's name.
const RECORD_PREFIX: &str = "fuse-record.";

/// The daemon's side of the store: what systemd passed back, and whether to store.
pub struct Keeper {
    /// Descriptors passed back by systemd and not taken yet.
    passed: Passed,
    /// Whether listeners and the mount are stored (`--fd-store` or `$FDSTORE`, and
    /// `$NOTIFY_SOCKET` to send them on).
    enabled: bool,
    /// The stored name of the record read back, forgotten once the new one is stored.
    read_record: Option<String>,
}

impl Keeper {
    /// Takes what systemd passed; `wanted` is `--fd-store`.
    pub fn from_env(wanted: bool) -> Keeper {
        let passed = Passed::from_env();
        let announced = std::env::var("FDSTORE")
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n > 0);
        let wanted = wanted || announced;
        let enabled = wanted && std::env::var_os("NOTIFY_SOCKET").is_some();
        if wanted && !enabled {
            tracing::warn!(
                "--fd-store without $NOTIFY_SOCKET (not started by systemd): the mount and \
                 the listeners end with this daemon"
            );
        }
        Keeper {
            passed,
            enabled,
            read_record: None,
        }
    }

    /// Whether the mount and the listeners outlive this process.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The HTTP API's listener: the stored one if it is bound to `addr`, else a new one.
    pub async fn http_listener(&mut self, addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
        if let Some(fd) = self.passed.take(HTTP_NAME) {
            let listener = std::net::TcpListener::from(fd);
            match listener.local_addr() {
                Ok(local) if tcp_matches(addr, local) => {
                    listener.set_nonblocking(true)?;
                    tracing::info!(%local, "HTTP API: serving the listener kept across the restart");
                    return Ok(tokio::net::TcpListener::from_std(listener)?);
                }
                _ => fdstore::remove(HTTP_NAME),
            }
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP API on {addr}"))?;
        self.store(HTTP_NAME, listener.as_fd());
        Ok(listener)
    }

    /// The NBD listener: the stored one if it serves `addr`, else a new one. Returns
    /// whether it is new (a unix socket's mode and group are then set).
    pub async fn nbd_listener(
        &mut self,
        addr: &str,
    ) -> anyhow::Result<(lazyblk_nbd::Listener, bool)> {
        if let Some(fd) = self.passed.take(NBD_NAME) {
            if let Some(listener) = stored_nbd_listener(fd, addr)? {
                tracing::info!(addr, "NBD: serving the listener kept across the restart");
                return Ok((listener, false));
            }
            fdstore::remove(NBD_NAME);
        }
        let listener = lazyblk_nbd::Listener::bind(addr)
            .await
            .with_context(|| format!("binding NBD on {addr}"))?;
        let fd = match &listener {
            lazyblk_nbd::Listener::Tcp(l) => l.as_fd(),
            lazyblk_nbd::Listener::Unix(l) => l.as_fd(),
        };
        self.store(NBD_NAME, fd);
        Ok((listener, true))
    }

    /// The FUSE view at `dir`: the stored mount taken over if `dir` is still it,
    /// else a new mount (clearing a stale one a killed daemon left).
    pub fn fuse_mount(
        &mut self,
        dir: &Path,
        node: Arc<Node>,
    ) -> anyhow::Result<lazyblk_fuse::Mount> {
        let files = Arc::new(NodeImages::fuse(node));
        let options = lazyblk_fuse::MountOptions {
            keep_across_restarts: self.enabled,
            ..lazyblk_fuse::MountOptions::default()
        };
        let runtime = tokio::runtime::Handle::current();
        if let Some((dev, kept)) = self.take_fuse(dir) {
            let mount = lazyblk_fuse::adopt(dir, kept, files, runtime, options)
                .with_context(|| format!("taking over the FUSE mount at {}", dir.display()))?;
            self.store_fuse(dev, &mount);
            return Ok(mount);
        }
        std::fs::create_dir_all(dir).ok();
        lazyblk_fuse::clear_stale_mount(dir)
            .with_context(|| format!("clearing a stale mount at {}", dir.display()))?;
        let mount = lazyblk_fuse::mount(dir, files, runtime, options)
            .with_context(|| format!("mounting the FUSE view at {}", dir.display()))?;
        if self.enabled {
            match std::fs::metadata(dir) {
                Ok(meta) => self.store_fuse(meta.dev(), &mount),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot stat the new mount: it will not be kept")
                }
            }
        }
        Ok(mount)
    }

    /// Forgets what systemd passed that nobody took (see [`Passed::release_unused`]).
    pub fn release_unused(self) {
        self.passed.release_unused();
    }

    /// The stored connection and record of the mount at `dir`, if `dir` is still
    /// that mount; every stored FUSE descriptor that is not is dropped.
    fn take_fuse(&mut self, dir: &Path) -> Option<(u64, lazyblk_fuse::KeptSession)> {
        // Not stat(2): a kept mount is served by nobody until it is taken over, so
        // anything that looks into it would wait for this very process.
        let dev = mounted_dev(dir);
        let mut found = None;
        for name in self.passed.names_starting(FUSE_PREFIX) {
            let fd = self.passed.take(&name);
            let stored_dev = name[FUSE_PREFIX.len()..].parse::<u64>().ok();
            match (fd, stored_dev) {
                (Some(fd), Some(stored)) if Some(stored) == dev && found.is_none() => {
                    found = Some((stored, fd));
                }
                _ => {
                    tracing::info!(name, dir = %dir.display(), "a stored FUSE connection is not the mount there; dropped");
                    fdstore::remove(&name);
                }
            }
        }
        let (dev, fuse) = found?;
        let record = self.take_record(dev);
        Some((dev, lazyblk_fuse::KeptSession { fuse, record }))
    }

    /// The newest stored record of mount `dev`; older ones are dropped.
    fn take_record(&mut self, dev: u64) -> Option<OwnedFd> {
        let prefix = format!("{RECORD_PREFIX}{dev}.");
        let mut records: Vec<(u64, String)> = self
            .passed
            .names_starting(&prefix)
            .into_iter()
            .filter_map(|name| Some((name[prefix.len()..].parse().ok()?, name)))
            .collect();
        records.sort();
        let (_, newest) = records.pop()?;
        for (_, older) in records {
            self.passed.take(&older);
            fdstore::remove(&older);
        }
        let fd = self.passed.take(&newest);
        // Forgotten once the new record is stored: until then a crash finds this one.
        self.read_record = Some(newest);
        fd
    }

    fn store_fuse(&mut self, dev: u64, mount: &lazyblk_fuse::Mount) {
        let Some(kept) = mount.kept() else { return };
        self.store(&format!("{FUSE_PREFIX}{dev}"), kept.fuse.as_fd());
        if let Some(record) = &kept.record {
            let name = format!("{RECORD_PREFIX}{dev}.{}", record_generation());
            self.store(&name, record.as_fd());
        }
        if let Some(read) = self.read_record.take() {
            fdstore::remove(&read);
        }
    }

    fn store(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        if self.enabled && fdstore::valid_name(name) {
            fdstore::store(name, &[fd]);
        }
    }
}

/// The device number of what is mounted at `dir` (the topmost mount), from the mount
/// table.
fn mounted_dev(dir: &Path) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let top = lazyblk_fuse::mountinfo::top_mount_at(&table, dir)?;
    Some(nix::sys::stat::makedev(top.major.into(), top.minor.into()))
}

/// A number that grows with every start, for the record's stored name: the start time
/// in milliseconds (a later start is a later time; two within the same millisecond
/// would be two daemons on one mount, which the mount refuses).
fn record_generation() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Whether a listener bound to `local` serves `addr` as configured (a configured
/// port 0 takes any port on the same address).
fn tcp_matches(addr: &str, local: SocketAddr) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(resolved) = addr.to_socket_addrs() else {
        return false;
    };
    resolved
        .into_iter()
        .any(|want| want == local || (want.port() == 0 && want.ip() == local.ip()))
}

/// The stored NBD listener as the server's, if it serves `addr`.
fn stored_nbd_listener(fd: OwnedFd, addr: &str) -> anyhow::Result<Option<lazyblk_nbd::Listener>> {
    match addr.strip_prefix("unix:") {
        Some(path) => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            let bound = listener.local_addr().ok();
            let same_path = bound.as_ref().and_then(|a| a.as_pathname()) == Some(Path::new(path));
            let file_there =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !(same_path && file_there) {
                return Ok(None);
            }
            listener.set_nonblocking(true)?;
            Ok(Some(lazyblk_nbd::Listener::Unix(
                tokio::net::UnixListener::from_std(listener)?,
            )))
        }
        None => {
            let listener = std::net::TcpListener::from(fd);
            match listener.local_addr() {
                Ok(local) if tcp_matches(addr, local) => {
                    listener.set_nonblocking(true)?;
                    Ok(Some(lazyblk_nbd::Listener::Tcp(
                        tokio::net::TcpListener::from_std(listener)?,
                    )))
                }
                _ => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_serves_the_address_configured() {
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(tcp_matches("127.0.0.1:4000", local));
        assert!(tcp_matches("127.0.0.1:0", local));
        assert!(!tcp_matches("127.0.0.1:4001", local));
        assert!(!tcp_matches("0.0.0.0:4000", local));
    }
}
