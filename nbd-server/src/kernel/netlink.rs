//! The kernel's `nbd` generic netlink family (linux/nbd-netlink.h): connect a device
//! with a dead-connection timeout and a backend identifier, give a device whose
//! sockets died new ones (`NBD_CMD_RECONFIGURE`), disconnect it.
//!
//! Hand-written rather than through a netlink crate: the family needs four commands
//! and a dozen fixed-size attributes, which is less code than adapting a general
//! generic-netlink crate's types to it, and it keeps the workspace's dependency set
//! (and its build time on small CI machines) unchanged. Every message is checked
//! against its length before it is read; nothing the kernel sends can panic here.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `NETLINK_GENERIC`'s controller, which resolves family names to ids.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;

const NBD_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Room for any reply of this family (an index, an ack, an error echoing a request).
const RECEIVE_BUFFER: usize = 16 * 1024;

/// How a device is connected (`NBD_CMD_CONNECT`).
#[derive(Debug, Clone)]
pub struct ConnectRequest<'a> {
    pub index: u32,
    pub size: u64,
    pub block_size: u64,
    pub server_flags: u64,
    /// Seconds one request may take before the kernel gives up on its socket.
    pub timeout_secs: u64,
    /// Seconds the device waits for new sockets once all of its sockets died.
    pub dead_conn_timeout_secs: u64,
    /// Who owns the device (`/sys/block/nbdN/backend`, kernel 5.14+).
    pub backend: &'a str,
    pub sockets: &'a [RawFd],
}

/// A generic netlink socket bound to the `nbd` family.
pub struct NbdNetlink {
    socket: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens the socket and looks the family up; `Ok(None)` when the kernel has no
    /// `nbd` family (a kernel before 4.10, or the driver is not loaded).
    pub fn open() -> io::Result<Option<NbdNetlink>> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor just returned to us and owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut netlink = NbdNetlink {
            socket,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut message = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        message.put_str(CTRL_ATTR_FAMILY_NAME, NBD_FAMILY);
        let reply = match netlink.request(message) {
            Ok(reply) => reply,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let family = reply
            .and_then(|payload| find_attr(&payload, CTRL_ATTR_FAMILY_ID))
            .and_then(|value| Some(u16::from_ne_bytes(value.get(..2)?.try_into().ok()?)))
            .ok_or_else(|| io::Error::other("the netlink controller gave no id for \"nbd\""))?;
        netlink.family = family;
        Ok(Some(netlink))
    }

    /// `NBD_CMD_CONNECT`; returns the index the kernel connected.
    pub fn connect(&mut self, request: &ConnectRequest) -> io::Result<u32> {
        let mut message = Message::new(self.family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
        message.put_u32(NBD_ATTR_INDEX, request.index);
        message.put_u64(NBD_ATTR_SIZE_BYTES, request.size);
        message.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, request.block_size);
        message.put_u64(NBD_ATTR_SERVER_FLAGS, request.server_flags);
        message.put_u64(NBD_ATTR_TIMEOUT, request.timeout_secs);
        message.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, request.dead_conn_timeout_secs);
        message.put_str(NBD_ATTR_BACKEND_IDENTIFIER, request.backend);
        message.put_sockets(request.sockets);
        let reply = self.request(message)?;
        Ok(reply
            .and_then(|payload| find_attr(&payload, NBD_ATTR_INDEX))
            .and_then(|value| Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?)))
            .unwrap_or(request.index))
    }

    /// `NBD_CMD_RECONFIGURE`: new sockets for a device whose sockets died. The kernel
    /// refuses it (EINVAL) unless `backend` is the identifier the device was connected
    /// with.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        dead_conn_timeout_secs: u64,
        sockets: &[RawFd],
    ) -> io::Result<()> {
        let mut message = Message::new(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
        message.put_u32(NBD_ATTR_INDEX, index);
        message.put_str(NBD_ATTR_BACKEND_IDENTIFIER, backend);
        message.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_secs);
        message.put_sockets(sockets);
        self.request(message).map(|_| ())
    }

    /// `NBD_CMD_DISCONNECT`: the kernel shuts the device's sockets; it is free once
    /// its last opener closes it.
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let mut message = Message::new(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
        message.put_u32(NBD_ATTR_INDEX, index);
        self.request(message).map(|_| ())
    }

    /// Sends `message` with an ack requested; returns the attributes of the reply
    /// message, if the kernel sent one before its ack.
    fn request(&mut self, mut message: Message) -> io::Result<Option<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = message.finish(seq);
        // SAFETY: `bytes` is a valid buffer for its length; the kernel is the
        // destination (a zeroed sockaddr_nl, pid 0).
        let sent = unsafe {
            let mut address: libc::sockaddr_nl = std::mem::zeroed();
            address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.socket.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&address as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = None;
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        loop {
            // SAFETY: `buffer` is writable for its length.
            let received = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            let mut rest = &buffer[..received as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let their_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::other("a truncated netlink message"));
                }
                let body = &rest[NLMSG_HDRLEN..len];
                rest = &rest[align(len).min(rest.len())..];
                if their_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_ne_bytes)
                            .ok_or_else(|| io::Error::other("a truncated netlink error"))?;
                        if code == 0 {
                            return Ok(reply);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    NLMSG_DONE => return Ok(reply),
                    _ => {
                        if body.len() >= GENL_HDRLEN {
                            reply = Some(body[GENL_HDRLEN..].to_vec());
                        }
                    }
                }
            }
        }
    }
}

/// A generic netlink request under construction.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(family: u16, command: u8, version: u8) -> Message {
        let mut bytes = vec![0u8; NLMSG_HDRLEN];
        bytes[4..6].copy_from_slice(&family.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        bytes.extend_from_slice(&[command, version, 0, 0]);
        Message { bytes }
    }

    fn put(&mut self, kind: u16, value: &[u8]) {
        let len = (NLA_HDRLEN + value.len()) as u16;
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(align(self.bytes.len()), 0);
    }

    fn put_u32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_ne_bytes());
    }

    fn put_u64(&mut self, kind: u16, value: u64) {
        self.put(kind, &value.to_ne_bytes());
    }

    /// A NUL-terminated string (NLA_STRING / NLA_NUL_STRING).
    fn put_str(&mut self, kind: u16, value: &str) {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes);
    }

    /// `NBD_ATTR_SOCKETS`, one nested `NBD_SOCK_ITEM { NBD_SOCK_FD }` per socket.
    fn put_sockets(&mut self, sockets: &[RawFd]) {
        let mut items = Message { bytes: Vec::new() };
        for &fd in sockets {
            let mut item = Message { bytes: Vec::new() };
            // A RawFd of a live socket is never negative.
            item.put_u32(NBD_SOCK_FD, fd as u32);
            items.put(NBD_SOCK_ITEM, &item.bytes);
        }
        self.put(NBD_ATTR_SOCKETS, &items.bytes);
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.bytes
    }
}

/// Netlink's 4-byte alignment.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The payload of the first top-level attribute of type `kind`.
fn find_attr(mut attrs: &[u8], kind: u16) -> Option<Vec<u8>> {
    while attrs.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        // Flags (nested, byte order) sit in the two top bits of the type.
        let their_kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < NLA_HDRLEN || len > attrs.len() {
            return None;
        }
        if their_kind == kind {
            return Some(attrs[NLA_HDRLEN..len].to_vec());
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_found_again() {
        let mut message = Message::new(0x20, NBD_CMD_CONNECT, 1);
        message.put_str(NBD_ATTR_BACKEND_IDENTIFIER, "node1");
        message.put_u64(NBD_ATTR_SIZE_BYTES, 1 << 30);
        message.put_sockets(&[7, 9]);
        let bytes = message.finish(5).to_vec();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        let attrs = &bytes[NLMSG_HDRLEN + GENL_HDRLEN..];
        assert_eq!(
            find_attr(attrs, NBD_ATTR_BACKEND_IDENTIFIER).unwrap(),
            b"node1\0"
        );
        assert_eq!(
            find_attr(attrs, NBD_ATTR_SIZE_BYTES).unwrap(),
            (1u64 << 30).to_ne_bytes()
        );
        let sockets = find_attr(attrs, NBD_ATTR_SOCKETS).unwrap();
        // Two items, each a 4-byte header around one 8-byte NBD_SOCK_FD attribute.
        assert_eq!(sockets.len(), 2 * 12);
        let first = find_attr(&sockets, NBD_SOCK_ITEM).unwrap();
        assert_eq!(find_attr(&first, NBD_SOCK_FD).unwrap(), 7u32.to_ne_bytes());
    }

    #[test]
    fn malformed_attributes_are_not_found() {
        assert_eq!(find_attr(&[200, 0, 1, 0, 1, 2], 1), None);
        assert_eq!(find_attr(&[2, 0, 1, 0], 1), None);
        assert_eq!(find_attr(&[], 1), None);
    }
}
