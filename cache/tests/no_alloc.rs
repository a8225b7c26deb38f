//! A cached read of a template allocates nothing (DESIGN section 9): a counting global
//! allocator around `TemplateImage::read_at` of a chunk that is local, after a warm-up
//! that opens the chunk file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lazyblk_cache::{
    ChunkCache, ChunkStore, Digest, HttpClients, HttpSource, Manifest, NoObserver, Source,
    TemplateImage, DEFAULT_SOURCE_DEADLINE,
};

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

#[test]
fn a_cached_template_read_allocates_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let digest = Digest::of(&chunk);
    store.insert(&digest, &chunk).unwrap();
    let mut manifest = Manifest::new("t", 1 << 20, 1 << 20);
    manifest.chunks[0] = Some(digest);
    let cache = Arc::new(ChunkCache::new(
        store,
        Arc::new(NoObserver),
        DEFAULT_SOURCE_DEADLINE,
    ));
    let source = Source::Http(HttpSource::new(
        HttpClients::new(reqwest::Client::new),
        "http://127.0.0.1:9",
        None,
    ));
    let image = TemplateImage::new(Arc::new(manifest), cache, vec![source]);
    let mut buf = vec![0u8; 4096];
    runtime.block_on(async {
        for i in 0..100u64 {
            image
                .read_at((i * 7919 % 256) * 4096, &mut buf)
                .await
                .unwrap();
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for i in 0..1000u64 {
            image
                .read_at((i * 7919 % 256) * 4096, &mut buf)
                .await
                .unwrap();
        }
        let during = ALLOCATIONS.load(Ordering::Relaxed) - before;
        eprintln!("allocations during 1000 cached template reads: {during}");
        assert!(during < 100, "{during} allocations for 1000 cached reads");
    });
}
