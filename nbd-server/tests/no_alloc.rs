//! A cached read allocates nothing per request (DESIGN section 9): a counting global
//! allocator, a server over TCP with an export that answers reads from memory, and a
//! client on a thread of its own that reuses its buffers. After a warm-up (buffer pool,
//! channels, socket buffers), a thousand reads must cost fewer allocations than a tenth
//! of one per request (the runtime's own bookkeeping may allocate now and then).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lazyblk_image::{
    Extent, Images, Kind, Listing, OpenError, PrefetchImage, ReadImage, SparseImage, WriteImage,
};
use lazyblk_nbd::{Listener, ServerConfig};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SIZE: u64 = 1 << 20;
static DATA: [u8; SIZE as usize] = [7; SIZE as usize];

struct Static;

impl ReadImage for Static {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&DATA[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl WriteImage for Static {
    fn writable(&self) -> bool {
        false
    }
    async fn write_at(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

impl SparseImage for Static {
    async fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    async fn extents(&self, _: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

impl PrefetchImage for Static {}

struct One(Arc<Static>);

impl Images for One {
    type Image = Static;
    async fn open(&self, _: &str, _: &str) -> Result<Arc<Static>, OpenError> {
        Ok(self.0.clone())
    }
    fn open_local(&self, _: Kind, _: &str, _: &str) -> Result<Arc<Static>, OpenError> {
        Ok(self.0.clone())
    }
    async fn list(&self) -> Vec<Listing> {
        Vec::new()
    }
    fn list_local(&self, _: Kind) -> Vec<String> {
        Vec::new()
    }
}

/// Sends `n` 4 KiB reads one after another, reusing the request and reply buffers.
fn reads(stream: &mut TcpStream, n: u64, reply: &mut [u8]) {
    let mut req = [0u8; 28];
    req[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    req[24..28].copy_from_slice(&4096u32.to_be_bytes());
    for i in 0..n {
        req[8..16].copy_from_slice(&i.to_be_bytes());
        req[16..24].copy_from_slice(&((i % 256) * 4096).to_be_bytes());
        stream.write_all(&req).unwrap();
        stream.read_exact(reply).unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "read {i} failed");
    }
}

#[test]
fn a_cached_read_allocates_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(lazyblk_nbd::serve(
        Listener::Tcp(listener),
        Arc::new(One(Arc::new(Static))),
        ServerConfig::default(),
        std::future::pending::<()>(),
    ));
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    nbd::client::handshake(&mut stream, b"x").unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    reads(&mut stream, 500, &mut reply);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    reads(&mut stream, 1000, &mut reply);
    let during = ALLOCATIONS.load(Ordering::Relaxed) - before;
    eprintln!("allocations during 1000 cached reads: {during}");
    assert!(during < 100, "{during} allocations for 1000 cached reads");
}
