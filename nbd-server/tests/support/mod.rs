//! Shared test fixtures: in-memory exports, a server on 127.0.0.1:0, and a raw-bytes
//! NBD client for driving the protocol by hand.
//!
//! Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lazyblk_image::{
    Door, Extent, Images, Kind, Listing, Op, OpenError, PrefetchImage, ReadImage, SparseImage,
    WriteImage,
};
use lazyblk_nbd::proto::{self, RequestHeader};
use lazyblk_nbd::{Listener, ServerConfig, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Granularity of the in-memory export's block status.
pub const BLOCK: u64 = 4096;
/// Size of the fixture exports: 1 MiB.
pub const SIZE: u64 = 1 << 20;
/// A zero range in the fixture bytes, reported as a hole.
pub const HOLE: Range<u64> = (256 << 10)..(512 << 10);
/// How long any single raw-protocol read may take before a test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The fixture bytes: a pattern, except for [`HOLE`] and the last 64 KiB, which are zero.
pub fn fixture_bytes() -> Vec<u8> {
    (0..SIZE)
        .map(|i| {
            if HOLE.contains(&i) || i >= SIZE - (64 << 10) {
                0
            } else {
                ((i * 7 + i / 4096) % 251) as u8 + 1
            }
        })
        .collect()
}

/// What a faulty export does on reads at a chosen offset.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Fails with this OS error code.
    Error(i32),
    /// Panics (a bug in an export must not hang the client).
    Panic,
}

/// An export over a `Vec<u8>`; all-zero blocks report as holes.
pub struct MemoryExport {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    /// Reads that touch this range sleep first, to show replies leave out of order.
    slow: Option<(Range<u64>, Duration)>,
    /// Reads starting at this offset fail this way.
    fault: Option<(u64, Fault)>,
    pub flushes: AtomicU64,
}

impl MemoryExport {
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        Self {
            data: RwLock::new(data),
            read_only,
            slow: None,
            fault: None,
            flushes: AtomicU64::new(0),
        }
    }

    pub fn with_slow_range(mut self, range: Range<u64>, delay: Duration) -> Self {
        self.slow = Some((range, delay));
        self
    }

    pub fn with_fault(mut self, offset: u64, fault: Fault) -> Self {
        self.fault = Some((offset, fault));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.data.read().expect("lock").clone()
    }

    fn range(&self, offset: u64, len: u64) -> Range<usize> {
        offset as usize..(offset + len) as usize
    }

    fn block_is_zero(&self, data: &[u8], start: u64) -> bool {
        let end = (start + BLOCK).min(data.len() as u64);
        data[start as usize..end as usize].iter().all(|&b| b == 0)
    }
}

impl ReadImage for MemoryExport {
    fn size(&self) -> u64 {
        self.data.read().expect("lock").len() as u64
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some((range, delay)) = &self.slow {
            if range.contains(&offset) {
                tokio::time::sleep(*delay).await;
            }
        }
        match self.fault {
            Some((at, Fault::Error(code))) if at == offset => {
                return Err(io::Error::from_raw_os_error(code))
            }
            Some((at, Fault::Panic)) if at == offset => panic!("injected fault at {offset}"),
            _ => {}
        }
        let data = self.data.read().expect("lock");
        buf.copy_from_slice(&data[self.range(offset, buf.len() as u64)]);
        Ok(())
    }
}

impl WriteImage for MemoryExport {
    fn writable(&self) -> bool {
        !self.read_only
    }

    async fn write_at(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let mut stored = self.data.write().expect("lock");
        let range = self.range(offset, data.len() as u64);
        stored[range].copy_from_slice(data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl SparseImage for MemoryExport {
    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let mut stored = self.data.write().expect("lock");
        let range = self.range(offset, len);
        stored[range].fill(0);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let data = self.data.read().expect("lock");
        let end = offset + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let block_end = ((at / BLOCK + 1) * BLOCK).min(end);
            let zero = self.block_is_zero(&data, at / BLOCK * BLOCK);
            let length = block_end - at;
            match extents.last_mut() {
                Some(last) if last.zero == zero => last.length += length,
                _ => extents.push(Extent {
                    length,
                    hole: zero,
                    zero,
                }),
            }
            at = block_end;
        }
        Ok(extents)
    }
}

impl PrefetchImage for MemoryExport {}

/// A named set of [`MemoryExport`]s: "ro" (read-only fixture) and "rw" (writable fixture).
pub struct MemoryExports {
    exports: HashMap<String, (Arc<MemoryExport>, String)>,
    /// Every `observe` call, for metrics tests.
    pub observed: Mutex<Vec<(Op, u64, bool)>>,
}

impl MemoryExports {
    pub fn new() -> Self {
        Self {
            exports: HashMap::new(),
            observed: Mutex::new(Vec::new()),
        }
    }

    /// The standard fixture: "ro" and "rw", both over [`fixture_bytes`].
    pub fn fixture() -> Self {
        Self::new()
            .with(
                "ro",
                "read-only template",
                MemoryExport::new(fixture_bytes(), true),
            )
            .with(
                "rw",
                "writable sandbox",
                MemoryExport::new(fixture_bytes(), false),
            )
    }

    pub fn with(mut self, name: &str, description: &str, export: MemoryExport) -> Self {
        self.exports
            .insert(name.to_owned(), (Arc::new(export), description.to_owned()));
        self
    }

    pub fn get(&self, name: &str) -> Arc<MemoryExport> {
        Arc::clone(&self.exports[name].0)
    }
}

impl Images for MemoryExports {
    type Image = MemoryExport;

    async fn open(&self, name: &str, _peer: &str) -> Result<Arc<MemoryExport>, OpenError> {
        match name {
            "busy" => Err(OpenError::Unavailable(
                "export busy: being evicted".to_owned(),
            )),
            _ => self
                .exports
                .get(name)
                .map(|(export, _)| Arc::clone(export))
                .ok_or(OpenError::Unknown),
        }
    }

    fn open_local(
        &self,
        _kind: Kind,
        name: &str,
        _user: &str,
    ) -> Result<Arc<MemoryExport>, OpenError> {
        self.exports
            .get(name)
            .map(|(export, _)| Arc::clone(export))
            .ok_or(OpenError::Unknown)
    }

    async fn list(&self) -> Vec<Listing> {
        let mut listed: Vec<_> = self
            .exports
            .iter()
            .map(|(name, (export, description))| Listing {
                name: name.clone(),
                kind: if export.read_only {
                    Kind::Template
                } else {
                    Kind::Sandbox
                },
                description: description.clone(),
            })
            .collect();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        listed
    }

    fn list_local(&self, kind: Kind) -> Vec<String> {
        let mut names: Vec<_> = self
            .exports
            .iter()
            .filter(|(_, (export, _))| export.read_only == (kind == Kind::Template))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    fn observe(&self, door: Door, op: Op, bytes: u64, _elapsed: Duration, ok: bool) {
        assert_eq!(door, Door::Nbd);
        self.observed.lock().expect("lock").push((op, bytes, ok));
    }
}

/// A server on 127.0.0.1 with an OS-chosen port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub exports: Arc<MemoryExports>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start(exports: MemoryExports) -> Self {
        Self::start_with(exports, ServerConfig::default()).await
    }

    pub async fn start_with(exports: MemoryExports, config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let exports = Arc::new(exports);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(lazyblk_nbd::serve(
            Listener::Tcp(listener),
            Arc::clone(&exports),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            exports,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Stops the server and returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("server stops")
            .expect("server task")
    }

    /// Connects a fresh client, opens "ro" and reads a block: the server still serves.
    pub async fn assert_serving(&self) {
        let mut client = RawClient::connect(self.addr).await;
        client.go("ro").await;
        let cookie = 77;
        client.request(0, proto::CMD_READ, cookie, 4096, 512).await;
        let (error, got) = client.simple_reply().await;
        assert_eq!((error, got), (0, cookie));
        let data = client.read_exact(512).await;
        assert_eq!(data, fixture_bytes()[4096..4608]);
    }
}

/// One reply to an option: (option, reply type, payload).
pub type OptionReply = (u32, u32, Vec<u8>);

/// One structured reply chunk: (flags, type, cookie, payload).
pub type Chunk = (u16, u16, u64, Vec<u8>);

/// A client that speaks NBD byte by byte.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    /// Connects, checks the greeting, and sends FIXED_NEWSTYLE | NO_ZEROES.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with_flags(
            addr,
            proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES,
        )
        .await
    }

    pub async fn connect_with_flags(addr: SocketAddr, flags: u32) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut client = Self { stream };
        let greeting = client.read_exact(18).await;
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 3);
        client.send(&flags.to_be_bytes()).await;
        client
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn read_exact(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        tokio::time::timeout(IO_TIMEOUT, self.stream.read_exact(&mut buf))
            .await
            .expect("reply within the timeout")
            .expect("read");
        buf
    }

    /// Asserts the server closes the connection (after anything still queued).
    pub async fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(IO_TIMEOUT, self.stream.read_to_end(&mut rest))
            .await
            .expect("server closes within the timeout");
        // A reset is as closed as an orderly end.
        if let Ok(n) = read {
            assert_eq!(n, 0, "unexpected bytes before close: {rest:?}");
        }
    }

    pub async fn option(&mut self, option: u32, payload: &[u8]) {
        let mut bytes = b"IHAVEOPT".to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        self.send(&bytes).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        let head = self.read_exact(20).await;
        assert_eq!(&head[0..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(head[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4"));
        let payload = self.read_exact(len as usize).await;
        (option, kind, payload)
    }

    /// Option replies up to and including the first that is not NBD_REP_INFO,
    /// NBD_REP_SERVER or NBD_REP_META_CONTEXT.
    pub async fn option_replies(&mut self) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply().await;
            let last = !matches!(
                reply.1,
                proto::REP_INFO | proto::REP_SERVER | proto::REP_META_CONTEXT
            );
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// NBD_OPT_GO for `name` with no information requests; returns the final reply
    /// and the NBD_INFO_EXPORT (size, flags) if one came.
    pub async fn try_go(&mut self, name: &str) -> (u32, Option<(u64, u16)>) {
        self.option(proto::OPT_GO, &info_payload(name, &[])).await;
        let replies = self.option_replies().await;
        let export = replies
            .iter()
            .find(|(_, kind, payload)| *kind == proto::REP_INFO && payload[0..2] == [0, 0])
            .map(|(_, _, p)| {
                (
                    u64::from_be_bytes(p[2..10].try_into().expect("8")),
                    u16::from_be_bytes(p[10..12].try_into().expect("2")),
                )
            });
        (replies.last().expect("a final reply").1, export)
    }

    /// NBD_OPT_GO that must succeed; returns (size, transmission flags).
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        let (reply, export) = self.try_go(name).await;
        assert_eq!(reply, proto::REP_ACK, "NBD_OPT_GO {name}");
        export.expect("NBD_INFO_EXPORT before the ACK")
    }

    /// NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT for base:allocation on
    /// `name`; returns the context id.
    pub async fn structured_with_block_status(&mut self, name: &str) -> u32 {
        self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.option_reply().await.1, proto::REP_ACK);
        self.option(
            proto::OPT_SET_META_CONTEXT,
            &meta_payload(name, &["base:allocation"]),
        )
        .await;
        let replies = self.option_replies().await;
        assert_eq!(replies.len(), 2, "one context then ACK: {replies:?}");
        assert_eq!(replies[0].1, proto::REP_META_CONTEXT);
        assert_eq!(&replies[0].2[4..], b"base:allocation");
        assert_eq!(replies[1].1, proto::REP_ACK);
        u32::from_be_bytes(replies[0].2[0..4].try_into().expect("4"))
    }

    pub async fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let header = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.send(&header.encode()).await;
    }

    /// A simple reply header: (error, cookie).
    pub async fn simple_reply(&mut self) -> (u32, u64) {
        let head = self.read_exact(16).await;
        assert_eq!(
            &head[0..4],
            &0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        (
            u32::from_be_bytes(head[4..8].try_into().expect("4")),
            u64::from_be_bytes(head[8..16].try_into().expect("8")),
        )
    }

    /// One structured reply chunk.
    pub async fn chunk(&mut self) -> Chunk {
        let head = self.read_exact(20).await;
        assert_eq!(
            &head[0..4],
            &0x668e_33efu32.to_be_bytes(),
            "structured reply magic"
        );
        let flags = u16::from_be_bytes(head[4..6].try_into().expect("2"));
        let kind = u16::from_be_bytes(head[6..8].try_into().expect("2"));
        let cookie = u64::from_be_bytes(head[8..16].try_into().expect("8"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4"));
        let payload = self.read_exact(len as usize).await;
        (flags, kind, cookie, payload)
    }
}

/// The payload of NBD_OPT_GO / NBD_OPT_INFO.
pub fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        out.extend_from_slice(&request.to_be_bytes());
    }
    out
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        out.extend_from_slice(&(query.len() as u32).to_be_bytes());
        out.extend_from_slice(query.as_bytes());
    }
    out
}

/// The error value at the start of an error chunk's payload.
pub fn chunk_error(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[0..4].try_into().expect("4"))
}
