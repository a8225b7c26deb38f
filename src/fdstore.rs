//! systemd's file descriptor store (`FileDescriptorStoreMax=` in the unit): a service
//! hands descriptors to systemd (`FDSTORE=1`, `FDNAME=`, the descriptors attached with
//! `SCM_RIGHTS` to a datagram on `$NOTIFY_SOCKET`), systemd holds them while the
//! service restarts, and passes them to the next start as `LISTEN_FDS` descriptors
//! from 3 on, named in `LISTEN_FDNAMES`, for the process `LISTEN_PID`.
//!
//! What a descriptor refers to lives as long as one copy of it does: a listening
//! socket keeps accepting into its backlog, a `/dev/fuse` connection keeps its mount
//! and its queued requests, while no daemon runs.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The first descriptor systemd passes (after stdin, stdout and stderr).
const LISTEN_FDS_START: RawFd = 3;

/// The most descriptors taken from `LISTEN_FDS`; bounds what a malformed environment
/// could make the daemon adopt. systemd caps a service's store far lower in practice
/// (the unit sets 16).
const MAX_PASSED_FDS: usize = 1024;

/// Descriptors passed to this process by systemd, by name.
#[derive(Debug, Default)]
pub struct Passed {
    fds: HashMap<String, Vec<OwnedFd>>,
}

impl Passed {
    /// Takes the descriptors systemd passed to this process, if it passed any, and
    /// removes `LISTEN_*` from the environment so that no child takes them too.
    pub fn from_env() -> Passed {
        let mut passed = Passed::default();
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            == Some(std::process::id());
        let count = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY (of remove_var): called at start, before the runtime's threads
            // read the environment.
            std::env::remove_var(var);
        }
        if !for_us || count == 0 {
            return passed;
        }
        let mut names = names.split(':');
        for offset in 0..count.min(MAX_PASSED_FDS) {
            let raw = LISTEN_FDS_START + offset as RawFd;
            // SAFETY: systemd opened descriptors 3..3+LISTEN_FDS for this process
            // (LISTEN_PID says so); nothing else in it owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if let Err(e) = set_cloexec(&fd) {
                tracing::warn!(fd = raw, error = %e, "cannot mark a passed descriptor close-on-exec");
            }
            let name = names.next().unwrap_or("unknown").to_owned();
            passed.fds.entry(name).or_default().push(fd);
        }
        tracing::info!(
            names = ?passed.fds.keys().collect::<Vec<_>>(),
            "descriptors passed back by systemd"
        );
        passed
    }

    /// The descriptor named `name`, if one was passed (the last one, if several).
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let fds = self.fds.get_mut(name)?;
        let fd = fds.pop();
        if fds.is_empty() {
            self.fds.remove(name);
        }
        fd
    }

    /// Names passed that start with `prefix`.
    pub fn names_starting(&self, prefix: &str) -> Vec<String> {
        self.fds
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Closes what nobody took, and asks systemd to forget it: a descriptor this
    /// daemon no longer uses (a listener for an address no longer configured, a
    /// mount no longer there) must not be held for ever.
    pub fn release_unused(self) {
        for (name, fds) in self.fds {
            tracing::info!(
                name,
                count = fds.len(),
                "dropping a stored descriptor no longer used"
            );
            remove(&name);
        }
    }
}

/// Hands `fds` to systemd's store under `name`. Returns false (and logs) when they
/// could not be sent; without `$NOTIFY_SOCKET` nothing is sent.
pub fn store(name: &str, fds: &[BorrowedFd<'_>]) -> bool {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    match send(&format!("FDSTORE=1\nFDNAME={name}"), &raw) {
        Ok(()) => {
            tracing::debug!(name, "descriptor kept in systemd's store");
            true
        }
        Err(e) => {
            tracing::warn!(name, error = %e, "cannot keep a descriptor in systemd's store");
            false
        }
    }
}

/// Asks systemd to close and forget every stored descriptor named `name`.
pub fn remove(name: &str) {
    if let Err(e) = send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[]) {
        tracing::warn!(name, error = %e, "cannot remove a descriptor from systemd's store");
    }
}

/// Whether `name` may be an `FDNAME`: systemd takes printable ASCII without `:` (the
/// separator of `LISTEN_FDNAMES`), at most 255 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

fn send(message: &str, fds: &[RawFd]) -> io::Result<()> {
    let target = std::env::var_os("NOTIFY_SOCKET")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no $NOTIFY_SOCKET"))?;
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(bytes)?,
    };
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let rights = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(message.as_bytes())],
        control,
        MsgFlags::empty(),
        Some(&addr),
    )?;
    Ok(())
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_systemd_refuses_are_refused() {
        assert!(valid_name("fuse.64"));
        assert!(valid_name("nbd"));
        assert!(!valid_name(""));
        assert!(!valid_name("a:b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(256)));
    }
}
