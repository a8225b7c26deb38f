//! Where the NBD server listens: a [`Listener`] bound to a TCP address or a unix socket
//! (a stale socket file replaced, a live one or a non-socket refused), and the
//! connections it accepts with a printable peer.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tracing::debug;

/// The prefix that makes a listen address a unix socket path.
const UNIX_PREFIX: &str = "unix:";

/// A failure of the server as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listen address failed.
    #[error("binding NBD listener on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    /// A path exists where the unix socket should go and it is not a socket.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    /// Another server answers on the unix socket.
    #[error("another server is listening on {path}")]
    SocketInUse { path: PathBuf },
    /// Removing a stale unix socket failed.
    #[error("removing stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket; accepted connections get TCP_NODELAY.
    Tcp(TcpListener),
    /// A unix socket; its file is removed when [`crate::serve`] returns.
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr`: `host:port` for TCP, `unix:/path/sock` for a unix socket. A socket
    /// file left behind by a server that is gone is replaced; a live one is not.
    pub async fn bind(addr: &str) -> Result<Listener, ServerError> {
        let bind_error = |source| ServerError::Bind {
            addr: addr.to_owned(),
            source,
        };
        match addr.strip_prefix(UNIX_PREFIX) {
            Some(path) => {
                let path = Path::new(path);
                remove_stale_socket(path).await?;
                UnixListener::bind(path)
                    .map(Listener::Unix)
                    .map_err(bind_error)
            }
            None => TcpListener::bind(addr)
                .await
                .map(Listener::Tcp)
                .map_err(bind_error),
        }
    }

    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                Ok(Accepted::Tcp(stream, addr.to_string()))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred().ok().and_then(|cred| cred.pid()) {
                    Some(pid) => format!("unix:pid={pid}"),
                    None => "unix".to_owned(),
                };
                Ok(Accepted::Unix(stream, peer))
            }
        }
    }

    pub(crate) fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix(listener) => listener
                .local_addr()
                .ok()
                .and_then(|addr| addr.as_pathname().map(Path::to_path_buf)),
        }
    }
}

impl fmt::Display for Listener {
    /// The bound address, in the form [`Listener::bind`] takes (with the real port when
    /// bound to port 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => write!(f, "{addr}"),
                Err(_) => f.write_str("tcp:?"),
            },
            Listener::Unix(_) => match self.socket_path() {
                Some(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
                None => f.write_str("unix:?"),
            },
        }
    }
}

/// The send buffer asked for on an accepted unix socket connection (the kernel caps it
/// at `net.core.wmem_max`, then doubles it; a stock 208 KiB cap gives 416 KiB). A unix
/// socket's default (about 208 KiB) is less than one large read, so a cached sequential
/// reader's replies stall on it; what is asked for is what TCP's autotuning may grow
/// to by default (`net.ipv4.tcp_wmem`), so a unix connection may pin no more kernel
/// memory than a TCP one. Measured by bench B1 (where `wmem_max` is 4 MiB): 0.16 s of
/// nbdcopy's 1 GiB read at the default, 0.11 s at 2 MiB (4 MiB is no faster).
const UNIX_SEND_BUFFER: libc::c_int = 2 << 20;

/// Asks for [`UNIX_SEND_BUFFER`] on `stream`; a refusal keeps the default (logged).
pub(crate) fn widen_send_buffer(stream: &UnixStream, peer: &str) {
    let size = UNIX_SEND_BUFFER;
    // SAFETY: a valid socket descriptor and a c_int option value of its own size.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        debug!(peer, error = %io::Error::last_os_error(), "could not widen the send buffer");
    }
}

/// A newly accepted connection and its printable peer.
pub(crate) enum Accepted {
    Tcp(TcpStream, String),
    Unix(UnixStream, String),
}

impl Accepted {
    pub(crate) fn peer(&self) -> &str {
        match self {
            Accepted::Tcp(_, peer) | Accepted::Unix(_, peer) => peer,
        }
    }
}

/// Replaces a socket file that no server answers on; refuses to touch anything else.
async fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let metadata = match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(ServerError::SocketInUse {
            path: path.to_owned(),
        });
    }
    tokio::fs::remove_file(path)
        .await
        .map_err(|source| ServerError::RemoveStale {
            path: path.to_owned(),
            source,
        })
}
