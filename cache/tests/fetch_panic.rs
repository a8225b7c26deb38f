//! A fetch task that panics must not poison its chunk: the reader waiting on it gets an
//! error, and the next read of the same chunk starts a fresh fetch that succeeds.
//! (Before the in-flight entry was removed by a drop guard, every later read of that
//! chunk joined the dead fetch and failed with "fetch abandoned" until a restart.)
//!
//! The chunk comes from an in-memory object store through the real `Source::Object`
//! transport; the panic comes from the fetch observer, which runs inside the fetch task
//! after the bytes are verified, as any bug on that path would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lazyblk_cache::fetch::{ChunkRef, FetchObserver};
use lazyblk_cache::{ChunkCache, ChunkStore, Digest, ObjectSource, Source};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStoreExt as _;

/// Panics the first time a chunk arrives, then behaves.
#[derive(Default)]
struct PanicOnce {
    panicked: AtomicBool,
}

impl FetchObserver for PanicOnce {
    fn fetched(&self, _chunk: &ChunkRef, _source: &str, _stored: u64, _elapsed: Duration) {
        if !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("injected: a bug inside the fetch task");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_fetch_does_not_poison_its_chunk() {
    let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let digest = Digest::of(&bytes);
    let objects = Arc::new(InMemory::new());
    let hex = digest.to_hex();
    objects
        .put(
            &Path::from(format!("tpl/chunks/{}/{hex}", &hex[..2])),
            bytes.clone().into(),
        )
        .await
        .expect("putting the chunk");
    let sources: Arc<[Source]> = Arc::from(vec![Source::Object(ObjectSource::new(
        objects,
        "tpl",
        "memory://test",
    ))]);

    let dir = tempfile::tempdir().expect("tempdir");
    let store = ChunkStore::open(dir.path(), 64 << 20).expect("opening the chunk store");
    let observer = Arc::new(PanicOnce::default());
    let cache = Arc::new(ChunkCache::new(
        store,
        observer.clone(),
        Duration::from_secs(5),
    ));
    let chunk = ChunkRef {
        template: Arc::from("t"),
        index: 0,
        digest,
        len: bytes.len() as u64,
    };

    let first = cache.get(&chunk, &sources).await;
    assert!(
        observer.panicked.load(Ordering::SeqCst),
        "the panic was not injected"
    );
    let Err(error) = first else {
        panic!("a read whose fetch panicked succeeded");
    };
    assert!(
        error.to_string().contains("abandoned") || format!("{error:?}").contains("abandoned"),
        "unexpected error: {error:?}"
    );
    assert!(
        !cache.is_fetching(&digest),
        "the dead fetch is still registered as in flight"
    );

    // The next read starts a fresh fetch and gets the right bytes.
    let second = tokio::time::timeout(Duration::from_secs(10), cache.get(&chunk, &sources))
        .await
        .expect("the second read hung")
        .expect("the second read of the chunk failed");
    let mut buf = vec![0u8; bytes.len()];
    second.read_at(0, &mut buf).expect("reading the chunk");
    assert!(buf == bytes, "the second read returned the wrong bytes");
}
