//! What the fuzz targets share: in-memory images that check the server keeps the
//! image contract of `lazyblk-image`, and a driver that plays fuzz bytes as the client's side of one
//! NBD connection over an in-memory duplex stream.
//!
//! # Layout
//! - [`MemoryExports`]: "ro" (read-only) and "rw" (writable, an unaligned size), fresh
//!   per input; every method panics if the server passes a request the contract rules
//!   out (past the end, a write to a read-only export), so such a bug is a crash.
//! - [`run_connection`]: one connection through `lazyblk_nbd::serve_connection`, bounded
//!   in time; a panic anywhere (a request task included) aborts the fuzzer.
//! - [`handshake_prefix`]: a valid fixed newstyle handshake, so the request target
//!   starts in transmission.
//!
//! # Data flow
//! The target hands bytes to [`run_connection`]: one task writes them to the server and
//! then closes the client's write side, one drains whatever the server answers, and the
//! server runs until it sees the end of its input (or gives up on a protocol error).

use std::io;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use lazyblk_image::{
    Extent, Images, Kind, Listing, OpenError, PrefetchImage, ReadImage, SparseImage, WriteImage,
};
use lazyblk_nbd::proto;
use lazyblk_nbd::ServerConfig;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;

/// Size of the read-only export: a few 4 KiB blocks, small so each input runs fast.
pub const RO_SIZE: u64 = 64 << 10;
/// Size of the writable export: not a multiple of 4096, to reach the end-of-export checks
/// with ranges that do not line up with blocks.
pub const RW_SIZE: u64 = (64 << 10) + 512;
/// Granularity of the exports' block status.
const BLOCK: u64 = 4096;
/// One block of zeroes, to compare blocks with.
static ZERO_BLOCK: [u8; BLOCK as usize] = [0; BLOCK as usize];
/// Bytes buffered in each direction of the in-memory stream: about one socket buffer,
/// so the server sees partial reads and back-pressure as it would on a socket.
const DUPLEX_BUFFER: usize = 64 << 10;
/// The longest one input may keep a connection open. Every input is served from memory
/// in milliseconds and ends with the client closing, so a connection still open after
/// this is stuck. Under libFuzzer's own per-input timeout (scripts/fuzz.sh), so a stuck
/// connection is reported with this message rather than as a bare timeout.
const SESSION_LIMIT: Duration = Duration::from_secs(5);

/// An image over a `Vec<u8>` that panics when the server breaks the image contract.
pub struct MemoryExport {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemoryExport {
    fn new(size: u64, read_only: bool) -> Self {
        Self {
            data: RwLock::new(initial_bytes()[..size as usize].to_vec()),
            read_only,
        }
    }

    /// The byte range of a request, checked against the contract.
    fn range(&self, op: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.size();
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= size),
            "the server passed {op} at {offset}+{len} past the end ({size})"
        );
        offset as usize..(offset + len) as usize
    }

    fn check_writable(&self, op: &str) {
        assert!(
            !self.read_only,
            "the server passed {op} to a read-only export"
        );
    }
}

impl ReadImage for MemoryExport {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = self.range("a read", offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.read().unwrap_or_else(|e| e.into_inner())[range]);
        Ok(())
    }
}

impl WriteImage for MemoryExport {
    fn writable(&self) -> bool {
        !self.read_only
    }

    async fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.check_writable("a write");
        let range = self.range("a write", offset, data.len() as u64);
        self.data.write().unwrap_or_else(|e| e.into_inner())[range].copy_from_slice(data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl SparseImage for MemoryExport {
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable("a trim");
        self.write_zeroes(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check_writable("a write-zeroes");
        let range = self.range("a write-zeroes", offset, len);
        self.data.write().unwrap_or_else(|e| e.into_inner())[range].fill(0);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let range = self.range("a block status", offset, len);
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = range.start as u64;
        let end = range.end as u64;
        while at < end {
            let block_end = ((at / BLOCK + 1) * BLOCK).min(end);
            // A compare with a zero block (memcmp, not an instrumented loop per byte).
            let zero =
                data[at as usize..block_end as usize] == ZERO_BLOCK[..(block_end - at) as usize];
            match extents.last_mut() {
                Some(last) if last.zero == zero => last.length += block_end - at,
                _ => extents.push(Extent {
                    length: block_end - at,
                    hole: zero,
                    zero,
                }),
            }
            at = block_end;
        }
        Ok(extents)
    }
}

impl PrefetchImage for MemoryExport {
    fn prefetch(&self, offset: u64, len: u64) {
        self.range("a prefetch", offset, len);
    }
}

/// The bytes every export starts with, made once (a copy is much cheaper than making
/// them per input): every other 4 KiB block is zero, so block status reports both holes
/// and data.
fn initial_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        (0..RO_SIZE.max(RW_SIZE))
            .map(|i| {
                if (i / BLOCK).is_multiple_of(2) {
                    (i % 251) as u8 + 1
                } else {
                    0
                }
            })
            .collect()
    })
}

/// "ro" and "rw"; "busy" is refused as unavailable, any other name as unknown.
pub struct MemoryExports {
    ro: Arc<MemoryExport>,
    rw: Arc<MemoryExport>,
}

impl MemoryExports {
    pub fn new() -> Self {
        Self {
            ro: Arc::new(MemoryExport::new(RO_SIZE, true)),
            rw: Arc::new(MemoryExport::new(RW_SIZE, false)),
        }
    }
}

impl Default for MemoryExports {
    fn default() -> Self {
        Self::new()
    }
}

impl Images for MemoryExports {
    type Image = MemoryExport;

    async fn open(&self, name: &str, _peer: &str) -> Result<Arc<MemoryExport>, OpenError> {
        match name {
            "ro" => Ok(Arc::clone(&self.ro)),
            "rw" => Ok(Arc::clone(&self.rw)),
            "busy" => Err(OpenError::Unavailable("busy: being evicted".to_owned())),
            _ => Err(OpenError::Unknown),
        }
    }

    fn open_local(
        &self,
        kind: Kind,
        name: &str,
        _user: &str,
    ) -> Result<Arc<MemoryExport>, OpenError> {
        match (kind, name) {
            (Kind::Template, "ro") => Ok(Arc::clone(&self.ro)),
            (Kind::Sandbox, "rw") => Ok(Arc::clone(&self.rw)),
            _ => Err(OpenError::Unknown),
        }
    }

    async fn list(&self) -> Vec<Listing> {
        vec![
            Listing {
                name: "ro".to_owned(),
                kind: Kind::Template,
                description: "read-only".to_owned(),
            },
            Listing {
                name: "rw".to_owned(),
                kind: Kind::Sandbox,
                description: "writable".to_owned(),
            },
        ]
    }

    fn list_local(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Template => vec!["ro".to_owned()],
            Kind::Sandbox => vec!["rw".to_owned()],
        }
    }
}

/// One runtime for every input: building a runtime per input would cost more than most
/// inputs take to serve.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building the fuzz runtime")
    })
}

/// Serves one connection whose client sends `client_bytes` and then closes its side.
/// Errors of the connection are expected (most inputs break the protocol); a panic or a
/// connection still open after [`SESSION_LIMIT`] is a bug.
pub fn run_connection(client_bytes: &[u8]) {
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(DUPLEX_BUFFER);
        let served = lazyblk_nbd::serve_connection(
            server,
            "fuzz".to_owned(),
            Arc::new(MemoryExports::new()),
            ServerConfig::default(),
        );
        let (from_server, to_server) = tokio::io::split(client);
        let session = async {
            // Most inputs break the protocol; the connection's error is the expected end.
            let (_ended, (), ()) =
                tokio::join!(served, send(to_server, client_bytes), drain(from_server));
        };
        if tokio::time::timeout(SESSION_LIMIT, session).await.is_err() {
            panic!("the connection was still open {SESSION_LIMIT:?} after its client closed");
        }
    });
}

/// Writes the client's bytes, then closes the client's write side. The server may hang
/// up first (a protocol error); that ends the sending early.
async fn send(mut to_server: tokio::io::WriteHalf<DuplexStream>, bytes: &[u8]) {
    if to_server.write_all(bytes).await.is_ok() {
        let _ = to_server.shutdown().await;
    }
}

/// Reads and drops everything the server sends, so its writes never block.
async fn drain(mut from_server: tokio::io::ReadHalf<DuplexStream>) {
    let _ = tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await;
}

/// A valid client handshake that ends in transmission, chosen by the bits of `choice`:
/// bit 0 picks "rw" over "ro", bit 1 negotiates structured replies, bit 2 (with bit 1)
/// selects `base:allocation`, bit 3 ends with NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO.
pub fn handshake_prefix(choice: u8) -> Vec<u8> {
    let export = if choice & 1 != 0 { "rw" } else { "ro" };
    let structured = choice & 2 != 0;
    let meta_context = structured && choice & 4 != 0;
    let mut out = (proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if structured {
        option(&mut out, proto::OPT_STRUCTURED_REPLY, &[]);
    }
    if meta_context {
        let mut payload = string(export);
        payload.extend_from_slice(&1u32.to_be_bytes());
        payload.extend_from_slice(&string(proto::BASE_ALLOCATION));
        option(&mut out, proto::OPT_SET_META_CONTEXT, &payload);
    }
    if choice & 8 != 0 {
        option(&mut out, proto::OPT_EXPORT_NAME, export.as_bytes());
    } else {
        let mut payload = string(export);
        payload.extend_from_slice(&0u16.to_be_bytes());
        option(&mut out, proto::OPT_GO, &payload);
    }
    out
}

/// Appends one option: `IHAVEOPT`, the option, its length, its data.
fn option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A 32-bit length and the string's bytes.
fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}
