//! Reads answered from files with splice: the bytes on the wire are the file's, in the
//! right place among copied replies, with simple and structured framing.

mod support;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lazyblk_image::{
    Extent, FileSlices, Images, Kind, Listing, OpenError, PrefetchImage, ReadImage, Resident,
    SparseImage, WriteImage,
};
use lazyblk_nbd::{proto, Listener, ServerConfig, SPLICE_MIN_READ};
use support::RawClient;
use tokio::net::TcpListener;

/// Pieces are cut at this size, like chunk files.
const PIECE: u64 = 256 << 10;
const SIZE: u64 = 4 << 20;

/// An export over one file, whose large reads are offered as file pieces.
struct FileExport {
    file: Arc<File>,
    /// Bytes handed out as pieces.
    offered: AtomicU64,
    /// Reads that went through `read` (copied).
    copied: AtomicU64,
    /// Bytes the server reported spliced into the socket.
    spliced: AtomicU64,
    /// The check asked again before each splice.
    recheck: Resident,
    /// Whether the pieces [`is_hole`] names are offered as runs of zeroes (their bytes
    /// in the file are zero too, so copied reads agree).
    sparse: bool,
}

/// Which pieces a sparse export holds as holes: every third, from the second.
fn is_hole(piece: u64) -> bool {
    piece % 3 == 1
}

impl ReadImage for FileExport {
    fn size(&self) -> u64 {
        SIZE
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.copied.fetch_add(1, Ordering::Relaxed);
        self.file.read_exact_at(buf, offset)
    }

    fn resident_pieces(&self, offset: u64, len: u32, out: &mut FileSlices) -> bool {
        let end = offset + u64::from(len);
        let mut pos = offset;
        while pos < end {
            let take = ((pos / PIECE + 1) * PIECE).min(end) - pos;
            let pushed = if self.sparse && is_hole(pos / PIECE) {
                out.push_zeroes(take as u32)
            } else {
                out.push(&self.file, pos, take as u32, self.recheck)
            };
            if !pushed {
                return false;
            }
            pos += take;
        }
        self.offered.fetch_add(u64::from(len), Ordering::Relaxed);
        true
    }
}

impl WriteImage for FileExport {
    fn writable(&self) -> bool {
        false
    }

    async fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl SparseImage for FileExport {
    async fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    async fn extents(&self, _: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

impl PrefetchImage for FileExport {}

struct OneFile(Arc<FileExport>);

impl Images for OneFile {
    type Image = FileExport;

    async fn open(&self, name: &str, _peer: &str) -> Result<Arc<FileExport>, OpenError> {
        match name {
            "f" => Ok(Arc::clone(&self.0)),
            _ => Err(OpenError::Unknown),
        }
    }

    fn open_local(
        &self,
        _kind: Kind,
        name: &str,
        _user: &str,
    ) -> Result<Arc<FileExport>, OpenError> {
        match name {
            "f" => Ok(Arc::clone(&self.0)),
            _ => Err(OpenError::Unknown),
        }
    }

    async fn list(&self) -> Vec<Listing> {
        vec![Listing {
            name: "f".into(),
            kind: Kind::Template,
            description: String::new(),
        }]
    }

    fn list_local(&self, _kind: Kind) -> Vec<String> {
        vec!["f".into()]
    }

    fn spliced(&self, bytes: u64) {
        self.0.spliced.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A file of `SIZE` patterned bytes, and a server of it on a TCP port.
async fn serve_file() -> (Vec<u8>, Arc<FileExport>, std::net::SocketAddr) {
    serve_file_checked(|_, _, _| true).await
}

/// As [`serve_file`], with `recheck` asked before each splice.
async fn serve_file_checked(recheck: Resident) -> (Vec<u8>, Arc<FileExport>, std::net::SocketAddr) {
    serve(recheck, false).await
}

/// As [`serve_file`], with the pieces [`is_hole`] names zero and offered as zeroes.
async fn serve_sparse_file() -> (Vec<u8>, Arc<FileExport>, std::net::SocketAddr) {
    serve(|_, _, _| true, true).await
}

async fn serve(
    recheck: Resident,
    sparse: bool,
) -> (Vec<u8>, Arc<FileExport>, std::net::SocketAddr) {
    let bytes: Vec<u8> = (0..SIZE)
        .map(|i| match sparse && is_hole(i / PIECE) {
            true => 0,
            false => (i * 7 + i / 4096) as u8,
        })
        .collect();
    let mut file = tempfile::tempfile().expect("temp file");
    file.write_all(&bytes).expect("write");
    let export = Arc::new(FileExport {
        file: Arc::new(file),
        offered: AtomicU64::new(0),
        copied: AtomicU64::new(0),
        spliced: AtomicU64::new(0),
        recheck,
        sparse,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(lazyblk_nbd::serve(
        Listener::Tcp(listener),
        Arc::new(OneFile(Arc::clone(&export))),
        ServerConfig::default(),
        std::future::pending::<()>(),
    ));
    (bytes, export, addr)
}

/// The bytes the server reported spliced, once they reach `expected` or after 5 s: the
/// server counts file bytes after the socket took them, so the client may read the
/// bytes a moment before they are counted.
async fn spliced(export: &FileExport, expected: u64) -> u64 {
    for _ in 0..500 {
        if export.spliced.load(Ordering::Relaxed) >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    export.spliced.load(Ordering::Relaxed)
}

/// Sends every read of `reads` (offset, length) at once, then checks that each simple
/// reply comes back whole and in request order, as cached reads finish at once.
async fn read_pipelined(client: &mut RawClient, bytes: &[u8], reads: &[(u64, u32)]) {
    for (cookie, &(offset, len)) in reads.iter().enumerate() {
        client
            .request(0, proto::CMD_READ, cookie as u64, offset, len)
            .await;
    }
    for (cookie, &(offset, len)) in reads.iter().enumerate() {
        assert_eq!(client.simple_reply().await, (0, cookie as u64));
        let got = client.read_exact(len as usize).await;
        let start = offset as usize;
        assert!(
            got == bytes[start..start + len as usize],
            "read {cookie} at {offset} of {len} bytes differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spliced_and_copied_simple_replies_arrive_whole_and_in_order() {
    let (bytes, export, addr) = serve_file().await;
    let mut client = RawClient::connect(addr).await;
    client.go("f").await;
    // Pipelined: large reads across piece boundaries (spliced) between small ones
    // (copied), so a spliced body must follow its own header and precede the next one.
    let reads: Vec<(u64, u32)> = vec![
        (0, 4096),
        (PIECE - 1000, 3 * PIECE as u32),
        (12_345, 512),
        (SIZE - (1 << 20), 1 << 20),
        (8192, SPLICE_MIN_READ),
        (PIECE * 3 + 17, 100_000),
        (SIZE - 4096, 4096),
    ];
    read_pipelined(&mut client, &bytes, &reads).await;
    let large: u64 = reads
        .iter()
        .filter(|(_, len)| *len >= SPLICE_MIN_READ)
        .map(|&(_, len)| u64::from(len))
        .sum();
    assert_eq!(export.offered.load(Ordering::Relaxed), large);
    assert_eq!(
        spliced(&export, large).await,
        large,
        "sent by splice, not copied"
    );
    assert_eq!(export.copied.load(Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spliced_structured_read_is_one_offset_data_chunk() {
    let (bytes, export, addr) = serve_file().await;
    let mut client = RawClient::connect(addr).await;
    client.structured_with_block_status("f").await;
    client.go("f").await;
    let (offset, len) = (PIECE / 2, 2 * PIECE as u32);
    client
        .request(proto::CMD_FLAG_DF, proto::CMD_READ, 3, offset, len)
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 3)
    );
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), offset);
    assert!(payload[8..] == bytes[offset as usize..(offset + u64::from(len)) as usize]);
    assert_eq!(export.offered.load(Ordering::Relaxed), u64::from(len));
    assert_eq!(spliced(&export, u64::from(len)).await, u64::from(len));
    assert_eq!(export.copied.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_with_more_pieces_than_fit_is_copied() {
    let (bytes, export, addr) = serve_file().await;
    let mut client = RawClient::connect(addr).await;
    client.go("f").await;
    // Five pieces of PIECE: more than FileSlices holds.
    let len = (FileSlices::CAPACITY as u64 + 1) * PIECE;
    client.request(0, proto::CMD_READ, 1, 0, len as u32).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    assert!(client.read_exact(len as usize).await == bytes[..len as usize]);
    assert_eq!(export.offered.load(Ordering::Relaxed), 0);
    assert_eq!(export.copied.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_mid_splice_ends_only_its_connection() {
    let (bytes, export, addr) = serve_file().await;
    {
        let mut client = RawClient::connect(addr).await;
        client.go("f").await;
        // More spliced bytes than the socket buffers hold, then gone after a few.
        for cookie in 0..32u64 {
            client
                .request(
                    0,
                    proto::CMD_READ,
                    cookie,
                    (cookie % 4) * (1 << 20),
                    1 << 20,
                )
                .await;
        }
        assert_eq!(client.simple_reply().await, (0, 0));
        client.read_exact(1000).await;
    }
    let mut client = RawClient::connect(addr).await;
    client.go("f").await;
    client.request(0, proto::CMD_READ, 1, PIECE, 1 << 20).await;
    assert_eq!(client.simple_reply().await, (0, 1));
    let start = PIECE as usize;
    assert!(client.read_exact(1 << 20).await == bytes[start..start + (1 << 20)]);
    assert!(export.offered.load(Ordering::Relaxed) > 1 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn pieces_that_left_the_page_cache_are_still_spliced_whole() {
    // The check fails when asked again: each piece is spliced off the runtime's hands.
    let (bytes, export, addr) = serve_file_checked(|_, _, _| false).await;
    let mut client = RawClient::connect(addr).await;
    client.go("f").await;
    let (offset, len) = (PIECE + 5, 3 * PIECE as u32);
    client.request(0, proto::CMD_READ, 7, offset, len).await;
    assert_eq!(client.simple_reply().await, (0, 7));
    let start = offset as usize;
    assert!(client.read_exact(len as usize).await == bytes[start..start + len as usize]);
    assert_eq!(spliced(&export, u64::from(len)).await, u64::from(len));
}

/// A read over data, a hole and data again (and the hole's bytes are zero).
const ACROSS_A_HOLE: (u64, u32) = (PIECE / 2, 2 * PIECE as u32);

#[tokio::test(flavor = "multi_thread")]
async fn a_structured_read_over_a_hole_sends_the_hole_as_a_hole_chunk() {
    let (bytes, export, addr) = serve_sparse_file().await;
    let mut client = RawClient::connect(addr).await;
    client.structured_with_block_status("f").await;
    client.go("f").await;
    let (offset, len) = ACROSS_A_HOLE;
    client.request(0, proto::CMD_READ, 5, offset, len).await;
    // Data up to the hole, the hole, data after it: the last chunk DONE.
    let mut got = vec![0xee; len as usize];
    let mut kinds = Vec::new();
    loop {
        let (flags, kind, cookie, payload) = client.chunk().await;
        assert_eq!(cookie, 5);
        let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
        let start = (at - offset) as usize;
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                got[start..start + payload.len() - 8].copy_from_slice(&payload[8..]);
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(payload.len(), 12, "a hole chunk is an offset and a length");
                let hole = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                got[start..start + hole].fill(0);
            }
            other => panic!("unexpected chunk type {other}"),
        }
        kinds.push((kind, at));
        if flags & proto::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            (proto::REPLY_TYPE_OFFSET_DATA, offset),
            (proto::REPLY_TYPE_OFFSET_HOLE, PIECE),
            (proto::REPLY_TYPE_OFFSET_DATA, 2 * PIECE),
        ]
    );
    assert!(got == bytes[offset as usize..(offset + u64::from(len)) as usize]);
    // Only the data was spliced; the hole cost no bytes at all.
    let data = u64::from(len) - PIECE;
    assert_eq!(spliced(&export, data).await, data);
    assert_eq!(export.copied.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_that_must_not_fragment_carries_its_zeroes_as_data() {
    let (bytes, export, addr) = serve_sparse_file().await;
    let mut client = RawClient::connect(addr).await;
    client.structured_with_block_status("f").await;
    client.go("f").await;
    let (offset, len) = ACROSS_A_HOLE;
    client
        .request(proto::CMD_FLAG_DF, proto::CMD_READ, 6, offset, len)
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 6)
    );
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), offset);
    assert!(payload[8..] == bytes[offset as usize..(offset + u64::from(len)) as usize]);
    assert_eq!(
        export.copied.load(Ordering::Relaxed),
        0,
        "zeroes spliced, not read"
    );

    // A read all inside a hole is one content chunk even so: the hole.
    client
        .request(proto::CMD_FLAG_DF, proto::CMD_READ, 7, PIECE, PIECE as u32)
        .await;
    let (flags, kind, cookie, payload) = client.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE, 7)
    );
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), PIECE);
    assert_eq!(
        u32::from_be_bytes(payload[8..12].try_into().unwrap()),
        PIECE as u32
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simple_replies_over_holes_carry_zeroes_among_spliced_and_copied_replies() {
    let (bytes, export, addr) = serve_sparse_file().await;
    let mut client = RawClient::connect(addr).await;
    client.go("f").await;
    // Pipelined, so that zeroes, file pieces and copied replies (small ones that may
    // join the pipe, a larger one and one of five pieces that send it first) follow
    // each other on the wire. The copied reads lie on data, so a misplaced body shows.
    let reads: Vec<(u64, u32)> = vec![
        ACROSS_A_HOLE,
        (2 * PIECE + 100, 4096),
        (3 * PIECE + 5, 8192),
        (4 * PIECE, 3 * PIECE as u32),
        (PIECE, PIECE as u32),
        (0, 5 * PIECE as u32),
        (7 * PIECE - 1, SPLICE_MIN_READ),
    ];
    read_pipelined(&mut client, &bytes, &reads).await;
    assert_eq!(
        export.copied.load(Ordering::Relaxed),
        3,
        "the two small reads and the one of five pieces"
    );
}
