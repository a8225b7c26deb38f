//! A demand read of a chunk that a fill is fetching does not wait on the fill's fetch:
//! that fetch runs on the low-priority runtime (it yields to readers, and may be starved
//! by them), so the reader fetches the chunk itself. Through the real HTTP transport,
//! against a source that holds the fill's request until the test lets it go.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lazyblk_cache::{
    ChunkCache, ChunkStore, Digest, HttpClients, HttpSource, Manifest, NoObserver, Priority,
    Source, TemplateImage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// Serves `chunk` for every request; holds the first one until `release` is notified.
async fn serve(
    listener: tokio::net::TcpListener,
    chunk: Arc<Vec<u8>>,
    requests: Arc<AtomicUsize>,
    release: Arc<Notify>,
) {
    while let Ok((mut socket, _)) = listener.accept().await {
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let (chunk, release) = (chunk.clone(), release.clone());
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            if n == 0 {
                release.notified().await;
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                chunk.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
            let _ = socket.write_all(&chunk).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demand_read_does_not_wait_on_a_fill_fetch_of_its_chunk() {
    let chunk: Arc<Vec<u8>> = Arc::new((0..64u32 << 10).map(|i| (i % 253) as u8).collect());
    let digest = Digest::of(&chunk);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    tokio::spawn(serve(
        listener,
        chunk.clone(),
        requests.clone(),
        release.clone(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    let mut manifest = Manifest::new("t", 64 << 10, 64 << 10);
    manifest.chunks[0] = Some(digest);
    let cache = Arc::new(ChunkCache::new(
        store,
        Arc::new(NoObserver),
        Duration::from_secs(30),
    ));
    let source = Source::Http(HttpSource::new(
        HttpClients::new(reqwest::Client::new),
        &url,
        None,
    ));
    let image = Arc::new(TemplateImage::new(Arc::new(manifest), cache, vec![source]));

    let fill = tokio::spawn({
        let image = image.clone();
        async move { image.fetch_chunk(0, Priority::Fill).await.map(|_| ()) }
    });
    while requests.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The fill's request is held; the demand read is answered all the same.
    let mut buf = vec![0u8; 4096];
    image.read_at(0, &mut buf).await.expect("the demand read");
    assert_eq!(&buf[..], &chunk[..4096]);
    assert!(
        !fill.is_finished(),
        "the demand read waited for the fill's fetch"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 2);

    // The fill's fetch still completes, and the chunk is cached once.
    release.notify_one();
    fill.await.unwrap().expect("the fill's fetch");
    assert!(image.is_local(0));
}
