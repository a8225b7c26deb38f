//! Readiness for systemd (`Type=notify`, the sd_notify protocol): a datagram to the
//! unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
//! `READY=1` once a server accepts requests on every listener, `STOPPING=1` when it
//! begins to shut down. Without `$NOTIFY_SOCKET` (not started by systemd) nothing is
//! sent; a failure to send is logged and changes nothing else.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The server accepts requests; `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}",
        std::process::id()
    ));
}

/// The server has begun to shut down.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=shutting down");
}

fn send(message: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let sent = UnixDatagram::unbound().and_then(|socket| {
        if let Some(name) = bytes.strip_prefix(b"@") {
            let addr = SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)
        } else {
            socket.send_to(message.as_bytes(), &target)
        }
    });
    match sent {
        Ok(_) => tracing::debug!(message, "told systemd"),
        Err(e) => tracing::warn!(socket = ?target, error = %e, "cannot notify systemd"),
    }
}
