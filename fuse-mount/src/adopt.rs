//! Serving a live FUSE connection that another process opened and initialised: a
//! daemon restarted under systemd gets the `/dev/fuse` descriptor back from the file
//! descriptor store and goes on answering the mount in place.
//!
//! `fuser` starts every session with the kernel's `FUSE_INIT` handshake, which a live
//! connection does not send again. So the session is made on one end of a local
//! packet socket on which a `FUSE_INIT` is waiting (the reply goes back into that
//! socket and is dropped: the kernel keeps what it agreed with the first process), and
//! the session's descriptor is then replaced, in one `dup3`, by the live `/dev/fuse`
//! descriptor, before any thread reads from it.
//!
//! Requests the dead process had read but not answered sit on the connection's
//! processing list; `FUSE_NOTIFY_RESEND` (Linux 6.9) moves them back to the pending
//! list, where the new process reads and answers them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use fuser::{Config, Filesystem, Session};
use tracing::{info, warn};

/// `FUSE_INIT`'s opcode.
const FUSE_INIT: u32 = 26;
/// The protocol version the stand-in `FUSE_INIT` offers: 7.31 is what fuser's
/// handshake accepts without asking for another.
const PROTOCOL: (u32, u32) = (7, 31);
/// `fuse_in_header` (40 bytes) then `fuse_init_in` (64 bytes).
const INIT_LEN: usize = 40 + 64;
/// The readahead the stand-in offers; the kernel's real setting is the one agreed
/// with the first process.
const INIT_MAX_READAHEAD: u32 = 1 << 20;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND`.
const FUSE_NOTIFY_RESEND: i32 = 7;

/// A session on `live`, an initialised `/dev/fuse` connection, ready to run.
pub(crate) fn session_on_live_fd<FS: Filesystem>(
    filesystem: FS,
    live: OwnedFd,
    config: &Config,
) -> io::Result<Session<FS>> {
    let (ours, theirs) = packet_pair()?;
    let sent = nix::unistd::write(&ours, &init_request()).map_err(io::Error::from)?;
    if sent != INIT_LEN {
        return Err(io::Error::other("short write of the stand-in FUSE_INIT"));
    }
    let session = Session::from_fd(filesystem, theirs, config.acl, config.clone())?;
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: `slot` is the session's own descriptor, open, and read by no thread yet
    // (the session has not been run). dup3 makes it name the live connection instead,
    // atomically; the session keeps owning it and closes it when it ends.
    let replaced = unsafe { libc::dup3(live.as_raw_fd(), slot, libc::O_CLOEXEC) };
    if replaced < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(live);
    resend_unanswered(slot);
    Ok(session)
}

/// Asks the kernel to queue again every request read but not answered.
fn resend_unanswered(fuse: i32) {
    let mut notice = [0u8; 16];
    notice[0..4].copy_from_slice(&16u32.to_ne_bytes());
    notice[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `fuse` is open (the session owns it) and `notice` is a valid buffer.
    let written = unsafe { libc::write(fuse, notice.as_ptr().cast(), notice.len()) };
    if written < 0 {
        let err = io::Error::last_os_error();
        warn!(
            %err,
            "this kernel cannot resend FUSE requests (Linux 6.9 and later can): requests \
             the previous daemon had read but not answered will never be answered"
        );
    } else {
        info!("asked the kernel to resend the FUSE requests left unanswered");
    }
}

/// A connected pair of local packet sockets: each write is read as one message, as
/// each request is from `/dev/fuse`.
fn packet_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let made = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if made < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A `FUSE_INIT` request as the kernel sends it.
fn init_request() -> [u8; INIT_LEN] {
    let mut request = [0u8; INIT_LEN];
    let mut put = |at: usize, value: u32| request[at..at + 4].copy_from_slice(&value.to_ne_bytes());
    // fuse_in_header: len, opcode, unique (u64 at 8), nodeid, uid, gid, pid, padding.
    put(0, INIT_LEN as u32);
    put(4, FUSE_INIT);
    put(8, 1);
    // fuse_init_in: major, minor, max_readahead, flags (none offered), flags2, unused.
    put(40, PROTOCOL.0);
    put(44, PROTOCOL.1);
    put(48, INIT_MAX_READAHEAD);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stand_in_init_is_a_whole_request() {
        let request = init_request();
        assert_eq!(u32::from_ne_bytes(request[0..4].try_into().unwrap()), 104);
        assert_eq!(
            u32::from_ne_bytes(request[4..8].try_into().unwrap()),
            FUSE_INIT
        );
        assert_eq!(u32::from_ne_bytes(request[40..44].try_into().unwrap()), 7);
    }

    #[test]
    fn a_packet_pair_keeps_message_boundaries() {
        let (a, b) = packet_pair().unwrap();
        nix::unistd::write(&a, b"one").unwrap();
        nix::unistd::write(&a, b"two").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(nix::unistd::read(&b, &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
    }
}
