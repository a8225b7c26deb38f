//! The client half of the fixed-newstyle handshake, up to NBD_OPT_GO: what the kernel's
//! ioctl interface expects userspace to have done before it takes over a socket.
//!
//! Blocking I/O on a `std` stream: it runs once per attach, on a blocking thread.

use std::io::{self, Read, Write};

use crate::proto;

/// The largest option reply payload read; longer ones end the handshake. Far above
/// anything NBD_OPT_GO's replies carry (a 4 KiB description at most).
const MAX_REPLY: u32 = 64 << 10;

/// Set in every option error reply (`NBD_REP_ERR_*`).
const REP_ERROR_BIT: u32 = 1 << 31;

/// The oldstyle greeting's second word: a server too old for options.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// What NBD_OPT_GO told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
}

impl ExportInfo {
    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & proto::FLAG_READ_ONLY != 0
    }
}

/// Why the client handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientHandshakeError {
    /// The socket failed (or timed out) at `stage`.
    #[error("{stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    /// The server does not speak newstyle negotiation.
    #[error("the server is not a fixed-newstyle NBD server (greeting {magic:#018x}, flags {flags:#06x})")]
    NotFixedNewstyle { magic: u64, flags: u16 },
    /// The server has no export of that name (or cannot serve it now); the server's
    /// message when it gave one.
    #[error("{}", if .message.is_empty() { format!("no export {export:?}") } else { .message.clone() })]
    UnknownExport { export: String, message: String },
    /// The server refused NBD_OPT_GO for another reason.
    #[error("the server refused NBD_OPT_GO for {export:?} (error {code:#x}){}", detail(.message))]
    Refused {
        export: String,
        code: u32,
        message: String,
    },
    /// The server's replies break the protocol.
    #[error("malformed server reply: {0}")]
    Malformed(String),
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl ClientHandshakeError {
    /// Whether the export name is what failed (as opposed to the server or the socket).
    pub fn is_unknown_export(&self) -> bool {
        matches!(self, ClientHandshakeError::UnknownExport { .. })
    }
}

/// Negotiates `export` with NBD_OPT_GO on `stream` and leaves the stream at the start
/// of transmission (simple replies only, as the kernel client expects).
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &str,
) -> Result<ExportInfo, ClientHandshakeError> {
    let mut greeting = [0u8; proto::HANDSHAKE_LEN];
    read(stream, &mut greeting, "reading the server greeting")?;
    let magic = u64::from_be_bytes(take(&greeting, 0));
    let second = u64::from_be_bytes(take(&greeting, 8));
    let flags = u16::from_be_bytes(take(&greeting, 16));
    if magic != proto::NBD_MAGIC
        || second != proto::IHAVEOPT
        || flags & proto::FLAG_FIXED_NEWSTYLE == 0
    {
        let shown = if second == OLDSTYLE_MAGIC {
            second
        } else {
            magic
        };
        return Err(ClientHandshakeError::NotFixedNewstyle {
            magic: shown,
            flags,
        });
    }
    let mut client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE;
    if flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::CLIENT_FLAG_NO_ZEROES;
    }
    let mut request = client_flags.to_be_bytes().to_vec();
    request.extend_from_slice(&go_option(export)?);
    write(stream, &request, "sending NBD_OPT_GO")?;
    read_go_replies(stream, export)
}

/// NBD_OPT_GO for `export`, asking for no extra information (NBD_INFO_EXPORT always
/// comes).
fn go_option(export: &str) -> Result<Vec<u8>, ClientHandshakeError> {
    if export.len() > proto::MAX_STRING {
        return Err(ClientHandshakeError::Malformed(format!(
            "export name of {} bytes is longer than the protocol's {} bytes",
            export.len(),
            proto::MAX_STRING
        )));
    }
    // Fits u32: bounded by MAX_STRING just above.
    let name_len = export.len() as u32;
    let payload_len = 4 + name_len + 2;
    let mut out = Vec::with_capacity(proto::OPTION_HEADER_LEN + payload_len as usize);
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    Ok(out)
}

/// Reads NBD_OPT_GO's replies up to the final ACK (or error).
fn read_go_replies<S: Read>(
    stream: &mut S,
    export: &str,
) -> Result<ExportInfo, ClientHandshakeError> {
    let mut info = None;
    loop {
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        read(stream, &mut header, "reading an NBD_OPT_GO reply")?;
        let magic = u64::from_be_bytes(take(&header, 0));
        let option = u32::from_be_bytes(take(&header, 8));
        let reply = u32::from_be_bytes(take(&header, 12));
        let length = u32::from_be_bytes(take(&header, 16));
        if magic != proto::OPTION_REPLY_MAGIC || option != proto::OPT_GO {
            return Err(ClientHandshakeError::Malformed(format!(
                "reply magic {magic:#x} for option {option} (expected NBD_OPT_GO)"
            )));
        }
        if length > MAX_REPLY {
            return Err(ClientHandshakeError::Malformed(format!(
                "reply of {length} bytes"
            )));
        }
        let mut payload = vec![0u8; length as usize];
        read(stream, &mut payload, "reading an NBD_OPT_GO reply payload")?;
        match reply {
            proto::REP_ACK => {
                return info.ok_or_else(|| {
                    ClientHandshakeError::Malformed(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                    )
                })
            }
            proto::REP_INFO => {
                if let Some(export_info) = parse_info(&payload)? {
                    info = Some(export_info);
                }
            }
            error if error & REP_ERROR_BIT != 0 => {
                let message = String::from_utf8_lossy(&payload).into_owned();
                let export = export.to_owned();
                return Err(if error == proto::REP_ERR_UNKNOWN {
                    ClientHandshakeError::UnknownExport { export, message }
                } else {
                    ClientHandshakeError::Refused {
                        export,
                        code: error,
                        message,
                    }
                });
            }
            // Other replies are informational; a client skips what it does not know.
            _ => {}
        }
    }
}

/// The export's size and flags from an NBD_REP_INFO payload, if it is NBD_INFO_EXPORT.
fn parse_info(payload: &[u8]) -> Result<Option<ExportInfo>, ClientHandshakeError> {
    if payload.len() < 2 {
        return Err(ClientHandshakeError::Malformed(
            "NBD_REP_INFO without an information type".into(),
        ));
    }
    if u16::from_be_bytes(take(payload, 0)) != proto::INFO_EXPORT {
        return Ok(None);
    }
    if payload.len() != 12 {
        return Err(ClientHandshakeError::Malformed(format!(
            "NBD_INFO_EXPORT of {} bytes (expected 12)",
            payload.len()
        )));
    }
    Ok(Some(ExportInfo {
        size: u64::from_be_bytes(take(payload, 2)),
        flags: u16::from_be_bytes(take(payload, 10)),
    }))
}

fn read<S: Read>(
    stream: &mut S,
    buf: &mut [u8],
    stage: &'static str,
) -> Result<(), ClientHandshakeError> {
    stream
        .read_exact(buf)
        .map_err(|source| ClientHandshakeError::Io { stage, source })
}

fn write<S: Write>(
    stream: &mut S,
    buf: &[u8],
    stage: &'static str,
) -> Result<(), ClientHandshakeError> {
    stream
        .write_all(buf)
        .and_then(|()| stream.flush())
        .map_err(|source| ClientHandshakeError::Io { stage, source })
}

/// The `N` bytes of `bytes` at `at`; callers check the length first or index
/// fixed-size headers with constant offsets.
fn take<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::server::{serve_connection, ServerConfig};
    use lazyblk_image::{
        Extent, Images, Kind, Listing, OpenError, PrefetchImage, ReadImage, SparseImage, WriteImage,
    };

    /// An all-zero export of `size` bytes.
    struct Zeroes {
        size: u64,
        read_only: bool,
    }

    impl ReadImage for Zeroes {
        fn size(&self) -> u64 {
            self.size
        }
        async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    impl WriteImage for Zeroes {
        fn writable(&self) -> bool {
            !self.read_only
        }
        async fn write_at(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
            Ok(())
        }
        async fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    impl SparseImage for Zeroes {
        async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
            Ok(())
        }
        async fn extents(&self, _offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            Ok(vec![Extent {
                length: len,
                hole: true,
                zero: true,
            }])
        }
    }

    impl PrefetchImage for Zeroes {}

    /// "ro" (read-only, 1 MiB) and "rw" (read-write, 2 MiB); "busy" cannot be served.
    struct TwoExports;

    impl Images for TwoExports {
        type Image = Zeroes;

        async fn open(&self, name: &str, _peer: &str) -> Result<Arc<Zeroes>, OpenError> {
            match name {
                "ro" => Ok(Arc::new(Zeroes {
                    size: 1 << 20,
                    read_only: true,
                })),
                "rw" => Ok(Arc::new(Zeroes {
                    size: 2 << 20,
                    read_only: false,
                })),
                "busy" => Err(OpenError::Unavailable("the store is unreachable".into())),
                _ => Err(OpenError::Unknown),
            }
        }

        fn open_local(
            &self,
            _kind: Kind,
            _name: &str,
            _user: &str,
        ) -> Result<Arc<Zeroes>, OpenError> {
            Err(OpenError::Unknown)
        }

        async fn list(&self) -> Vec<Listing> {
            Vec::new()
        }

        fn list_local(&self, _kind: Kind) -> Vec<String> {
            Vec::new()
        }
    }

    /// Runs the client handshake for `export` against the real server over a
    /// socketpair, then checks that transmission works by reading one block.
    async fn go(export: &str) -> Result<ExportInfo, ClientHandshakeError> {
        let (client, server) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        server.set_nonblocking(true).expect("nonblocking");
        let server = tokio::net::UnixStream::from_std(server).expect("tokio stream");
        let serving = tokio::spawn(serve_connection(
            server,
            "test".into(),
            Arc::new(TwoExports),
            ServerConfig::default(),
        ));
        let export = export.to_owned();
        let result = tokio::task::spawn_blocking(move || {
            let mut client = client;
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let info = negotiate(&mut client, &export)?;
            let request = proto::RequestHeader {
                flags: 0,
                kind: proto::CMD_READ,
                cookie: 7,
                offset: 0,
                length: 4096,
            };
            client.write_all(&request.encode()).expect("sending a read");
            let mut reply = [0u8; proto::SIMPLE_REPLY_LEN + 4096];
            client.read_exact(&mut reply).expect("a simple reply");
            assert_eq!(reply[..proto::SIMPLE_REPLY_LEN], proto::simple_reply(0, 7));
            Ok(info)
        })
        .await
        .expect("client thread");
        serving.abort();
        result
    }

    #[tokio::test]
    async fn learns_size_and_flags_and_leaves_simple_replies() {
        let ro = go("ro").await.expect("handshake for ro");
        assert_eq!(ro.size, 1 << 20);
        assert!(ro.read_only());
        assert_ne!(ro.flags & proto::FLAG_HAS_FLAGS, 0);
        let rw = go("rw").await.expect("handshake for rw");
        assert_eq!(rw.size, 2 << 20);
        assert!(!rw.read_only());
        assert_ne!(rw.flags & proto::FLAG_SEND_FLUSH, 0);
        assert_ne!(rw.flags & proto::FLAG_SEND_TRIM, 0);
    }

    #[tokio::test]
    async fn unknown_and_unavailable_exports_are_named() {
        let error = go("nope").await.expect_err("unknown export");
        assert!(error.is_unknown_export(), "{error}");
        assert!(error.to_string().contains("\"nope\""), "{error}");
        let error = go("busy").await.expect_err("unavailable export");
        assert!(
            error.to_string().contains("the store is unreachable"),
            "{error}"
        );
    }

    #[test]
    fn an_oldstyle_server_is_refused() {
        let mut greeting = Vec::new();
        greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&[0; 2]);
        let mut stream = io::Cursor::new(greeting);
        let error = negotiate(&mut stream, "x").expect_err("oldstyle");
        assert!(
            matches!(error, ClientHandshakeError::NotFixedNewstyle { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_server_that_closes_is_an_io_error_with_its_stage() {
        let mut stream = io::Cursor::new(Vec::new());
        let error = negotiate(&mut stream, "x").expect_err("closed");
        assert!(
            error.to_string().starts_with("reading the server greeting"),
            "{error}"
        );
    }
}
