//! Issue 6: a chunk source that misbehaves never puts a wrong byte in front of a
//! client. A template lists a faulty origin (an HTTP server in this test that fetches
//! the real chunk from the store and then flips a bit, stalls, drops the connection
//! mid-body or sends a short body); a real daemon serves it with a one-second source
//! deadline, and nbdcopy must get the image byte for byte by failing over to the store,
//! with the failures counted on /metrics. When every source is corrupt, the read fails
//! with EIO instead.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazyblk_cache::Manifest;
use support::node::{nbdsh, sh, DaemonProc};
use support::{make_ext4, pattern, publish, StoreProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 1 << 20;
/// The daemon's per-source deadline in these tests: short, so a stalled origin costs
/// one second per chunk rather than the default eight.
const SOURCE_DEADLINE: &str = "1";
/// The longest a whole-image copy may take with a stalling origin. About ten chunks at
/// a one-second deadline each take ten seconds even fetched one after another; a copy
/// that waited on the stall instead would never finish.
const STALL_COPY_BOUND: Duration = Duration::from_secs(120);
/// The longest request head the faulty origin reads; the daemon's are a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 16 << 10;

/// How the faulty origin spoils each chunk it serves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The whole chunk with one byte changed.
    FlipBits,
    /// The response headers, then nothing, forever.
    Stall,
    /// A Content-Length of the whole chunk, half the body, then the connection closes.
    DropMidChunk,
    /// A Content-Length of half the chunk, and that half.
    ShortBody,
}

/// An origin daemon stand-in on 127.0.0.1 that answers `GET /v1/chunks/{digest}` with
/// the store's chunk spoiled by its [`Fault`]. Stops when dropped.
struct FaultyOrigin {
    /// Runs the server; shutting it down drops every connection, stalled ones included.
    runtime: Option<tokio::runtime::Runtime>,
    port: u16,
    /// Chunk requests received, to show the daemon really tried this origin first.
    requests: Arc<AtomicUsize>,
}

impl FaultyOrigin {
    fn start(fault: Fault, store_url: &str) -> FaultyOrigin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("building the faulty origin's runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the faulty origin");
        let port = listener.local_addr().expect("local address").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let origin = Origin {
            fault,
            store: store_url.to_string(),
            http: reqwest::Client::new(),
            requests: requests.clone(),
        };
        runtime.spawn(accept(listener, Arc::new(origin)));
        FaultyOrigin {
            runtime: Some(runtime),
            port,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyOrigin {
    fn drop(&mut self) {
        // Stalled connections never finish on their own; do not wait for them.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What every connection of the faulty origin shares.
struct Origin {
    fault: Fault,
    store: String,
    http: reqwest::Client,
    requests: Arc<AtomicUsize>,
}

async fn accept(listener: TcpListener, origin: Arc<Origin>) {
    while let Ok((socket, _)) = listener.accept().await {
        tokio::spawn(answer(socket, origin.clone()));
    }
}

/// Answers one request on one connection (then closes it, as `Connection: close` says).
async fn answer(mut socket: TcpStream, origin: Arc<Origin>) {
    let Some(path) = request_path(&mut socket).await else {
        return;
    };
    let Some(digest) = path.strip_prefix("/v1/chunks/") else {
        let _ = socket
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    origin.requests.fetch_add(1, Ordering::SeqCst);
    let url = format!("{}/v1/chunks/{digest}", origin.store);
    let chunk = match origin.http.get(&url).send().await {
        Ok(response) if response.status().is_success() => response.bytes().await.ok(),
        _ => None,
    };
    // An origin daemon that names no encoding serves chunks from its cache, raw: decode
    // the store's zstd frame or blocks (format 3, a zstd stream after a skippable frame).
    let encoded = |s: &[u8]| {
        s.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) || s.starts_with(&support::BLOCKS_MAGIC)
    };
    let chunk = chunk.map(|stored| match zstd::stream::decode_all(&stored[..]) {
        Ok(raw) if encoded(&stored) => bytes::Bytes::from(raw),
        _ => stored,
    });
    let Some(chunk) = chunk else {
        let _ = socket
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    let head = |len: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n"
        )
    };
    let half = &chunk[..chunk.len() / 2];
    let _ = match origin.fault {
        Fault::FlipBits => {
            let mut spoiled = chunk.to_vec();
            let middle = spoiled.len() / 2;
            spoiled[middle] ^= 0x01;
            send(&mut socket, &head(spoiled.len()), &spoiled).await
        }
        Fault::Stall => {
            let _ = send(&mut socket, &head(chunk.len()), &[]).await;
            std::future::pending::<()>().await;
            Ok(())
        }
        Fault::DropMidChunk => send(&mut socket, &head(chunk.len()), half).await,
        Fault::ShortBody => send(&mut socket, &head(half.len()), half).await,
    };
    // Dropping the socket closes the connection.
}

async fn send(socket: &mut TcpStream, head: &str, body: &[u8]) -> std::io::Result<()> {
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body).await?;
    socket.flush().await
}

/// The path of a `GET` request, once its whole head has arrived.
async fn request_path(socket: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut piece = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return None;
        }
        let n = socket.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&piece[..n]);
    }
    let line = std::str::from_utf8(&head).ok()?.lines().next()?.to_string();
    let mut parts = line.split(' ');
    (parts.next()? == "GET").then_some(())?;
    parts.next().map(str::to_string)
}

/// A 16 MiB ext4 image with about ten chunks of data, published to `store` as `id`.
fn publish_image(store: &StoreProc, dir: &Path, id: &str) -> PathBuf {
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("data/f{i}"), pattern(CHUNK, 600 + i)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let image = make_ext4(dir, 16, &files);
    publish(&store.url(), &image, id);
    image
}

/// Makes `origin` the template's only origin, in the store's own manifest file, before
/// any daemon has read it. Returns the manifest.
fn set_origin(store: &StoreProc, id: &str, origin: &str) -> Manifest {
    let path = store.root().join("manifests").join(format!("{id}.json"));
    let mut manifest = Manifest::parse(&std::fs::read(&path).unwrap(), Some(id)).unwrap();
    manifest.origins = vec![origin.to_string()];
    std::fs::write(&path, manifest.to_json()).unwrap();
    manifest
}

/// A metric sample of `daemon` for one source, e.g. `fetch_failures` of the origin.
fn by_source(daemon: &DaemonProc, name: &str, source: &str) -> f64 {
    ["store", "origin"]
        .iter()
        .map(|class| {
            daemon.metric(&format!(
                "lazyblk_{name}_total{{source=\"{source}\",class=\"{class}\"}}"
            ))
        })
        .sum()
}

/// What one whole-image copy through a faulty origin showed.
struct Copied {
    elapsed: Duration,
    origin_failures: f64,
    origin_corrupt: f64,
}

/// Publishes an image, puts a faulty origin in front of the store, copies the whole
/// export with nbdcopy, and checks what every fault must give: the image byte for byte,
/// every chunk tried at the origin first and delivered by the store, nothing verified
/// from the origin.
fn copy_through(fault: Fault) -> Copied {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let id = "faulty";
    let image = publish_image(&store, tmp.path(), id);
    let origin = FaultyOrigin::start(fault, &store.url());
    let manifest = set_origin(&store, id, &origin.url());
    let stored = manifest.stored_chunks().count();
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--source-deadline", SOURCE_DEADLINE],
    );

    let copy = tmp.path().join("copy.img");
    let started = Instant::now();
    let (ok, _, err) = sh("nbdcopy", &[&daemon.nbd_uri(id), copy.to_str().unwrap()]);
    let elapsed = started.elapsed();
    assert!(ok, "{fault:?}: nbdcopy failed: {err}");
    let (got, want) = (
        std::fs::read(&copy).unwrap(),
        std::fs::read(&image).unwrap(),
    );
    assert_eq!(got.len(), want.len());
    let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(
        wrong, 0,
        "{fault:?}: {wrong} bytes of the copy differ from the image"
    );

    // The origin is tried first until it has failed twice in a row; then the fetch
    // planner tries it last for a while (fetches already under way still ask it).
    assert!(
        origin.requests() >= 2.min(stored),
        "{fault:?}: the origin saw {} requests for {stored} chunks; it is tried first",
        origin.requests()
    );
    let from_store = by_source(&daemon, "fetched_chunks", &store.url());
    let from_origin = by_source(&daemon, "fetched_chunks", &origin.url());
    assert_eq!(
        from_store, stored as f64,
        "{fault:?}: every chunk came from the store"
    );
    assert_eq!(
        from_origin, 0.0,
        "{fault:?}: nothing from the faulty origin was accepted"
    );
    println!(
        "{fault:?}: {stored} chunks copied in {elapsed:?}, {} origin requests",
        origin.requests()
    );
    Copied {
        elapsed,
        origin_failures: by_source(&daemon, "fetch_failures", &origin.url()),
        origin_corrupt: by_source(&daemon, "verify_failures", &origin.url()),
    }
}

#[test]
fn flipped_bits_are_discarded_and_counted() {
    let copied = copy_through(Fault::FlipBits);
    assert!(
        copied.origin_corrupt >= 1.0,
        "verify failures of the origin are counted"
    );
    assert_eq!(
        copied.origin_failures, 0.0,
        "the origin answered; its bytes were wrong"
    );
}

#[test]
fn a_stalled_origin_is_passed_over_per_chunk() {
    let copied = copy_through(Fault::Stall);
    assert!(
        copied.origin_failures >= 1.0,
        "timeouts of the origin are counted"
    );
    assert!(
        copied.elapsed < STALL_COPY_BOUND,
        "the copy took {:?}: the stall was waited out instead of passed over",
        copied.elapsed
    );
}

#[test]
fn a_connection_dropped_mid_chunk_fails_over() {
    let copied = copy_through(Fault::DropMidChunk);
    assert!(
        copied.origin_failures >= 1.0,
        "cut bodies are counted as fetch failures"
    );
    assert_eq!(
        copied.origin_corrupt, 0.0,
        "a cut body is never hashed as a chunk"
    );
}

#[test]
fn a_short_body_fails_over() {
    let copied = copy_through(Fault::ShortBody);
    assert!(
        copied.origin_failures >= 1.0,
        "short bodies are counted as fetch failures"
    );
    assert_eq!(
        copied.origin_corrupt, 0.0,
        "a short body is never hashed as a chunk"
    );
}

#[test]
fn when_every_source_is_corrupt_the_read_fails_with_eio() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let id = "corrupt";
    let image = publish_image(&store, tmp.path(), id);
    let origin = FaultyOrigin::start(Fault::FlipBits, &store.url());
    let manifest = set_origin(&store, id, &origin.url());
    // The store's copy of one data chunk goes bad too, behind the store's back.
    let (index, digest) = manifest.stored_chunks().nth(1).unwrap();
    let path = store.root().join("chunks").join(digest.shard_path());
    support::corrupt_stored_chunk(&path);
    let cache = tmp.path().join("cache");
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &cache,
        &["--source-deadline", SOURCE_DEADLINE],
    );
    let uri = daemon.nbd_uri(id);

    let offset = index * CHUNK;
    let script = format!("import sys; sys.stdout.write(h.pread(4096, {offset}).hex())");
    let (ok, out, err) = nbdsh(&uri, &script);
    assert!(
        !ok,
        "a read of a chunk no source has intact must fail; it returned {} bytes",
        out.len() / 2
    );
    assert!(
        out.trim().is_empty(),
        "no bytes of the bad chunk reach the client"
    );
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    assert!(by_source(&daemon, "verify_failures", &origin.url()) >= 1.0);
    assert!(by_source(&daemon, "verify_failures", &store.url()) >= 1.0);
    assert!(
        !cache.join("chunks").join(digest.shard_path()).exists(),
        "the bad bytes never reach the cache"
    );

    // A whole-image copy fails rather than writing a corrupt image.
    let copy = tmp.path().join("copy.img");
    let (ok, _, _) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(!ok, "nbdcopy must report the unreadable chunk");

    // Chunks the store still has intact are served through the same faulty origin.
    let (good, _) = manifest.stored_chunks().next().unwrap();
    let offset = good * CHUNK;
    let script = format!("import sys; sys.stdout.write(h.pread(4096, {offset}).hex())");
    let (ok, out, err) = nbdsh(&uri, &script);
    assert!(ok, "{err}");
    let want: String = std::fs::read(&image).unwrap()[offset..offset + 4096]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(out.trim(), want);
}
