//! Issue 27, fetches shaped for latency: where a request to the store costs about its
//! latency whatever its size, a small read of a missing chunk fetches the chunk whole
//! (one request) instead of its table and then its blocks (two, one after the other),
//! and a later read of the chunk is local. The link is measured, not configured: the
//! daemon reports what a small and a whole request take and which way it reads.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::node::{nbdsh, DaemonProc};
use support::proxy::Proxy;
use support::{
    data_chunks, make_ext4, manifest_json, metric_sum, publish, put_trace, text_template, wait_for,
    StoreProc,
};

const CHUNK: u64 = 1 << 20;

/// An image with `data_mib` MiB of distinct file data that compresses (text, as most of
/// a root file system does: its chunks are stored in blocks) in an ext4 with room for it.
fn image_with_data(dir: &Path, data_mib: usize) -> PathBuf {
    image_with_text(dir, data_mib, "file")
}

/// [`image_with_data`] whose lines begin with `tag`: an image whose chunks no other
/// image of these tests holds (the store keeps chunks by content).
fn image_with_text(dir: &Path, data_mib: usize, tag: &str) -> PathBuf {
    let text = |file: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(CHUNK as usize);
        let mut line = 0u64;
        while out.len() < CHUNK as usize {
            out.extend_from_slice(
                format!("{tag} {file} line {line:08} {}\n", line * 7919 % 10007).as_bytes(),
            );
            line += 1;
        }
        out.truncate(CHUNK as usize);
        out
    };
    let files: Vec<(String, Vec<u8>)> = (0..data_mib)
        .map(|i| (format!("d/f{i}"), text(i)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    make_ext4(dir, (data_mib as u64 + 16).max(64), &files)
}

/// Whole objects and ranges the store has served.
fn store_requests(store: &StoreProc) -> (f64, f64) {
    (
        store.metric("lazyblk_store_chunks_served_total"),
        store.metric("lazyblk_store_ranges_served_total"),
    )
}

/// Reads `len` bytes at each offset over one NBD connection, in order, and checks
/// them against the image.
fn read_and_check(uri: &str, image: &Path, reads: &[(u64, u64)]) {
    let bytes = std::fs::read(image).unwrap();
    for &(offset, len) in reads {
        let script = format!("import sys\nsys.stdout.write(h.pread({len}, {offset}).hex())");
        let (ok, out, err) = nbdsh(uri, &script);
        assert!(ok, "nbdsh: {err}");
        let want: String = bytes[offset as usize..(offset + len) as usize]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            out.trim() == want,
            "bytes at {offset} differ from the image"
        );
    }
}

#[test]
fn a_store_a_request_away_is_read_in_whole_chunks_once_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_data(tmp.path(), 16);
    publish(&store.url(), &image, "far");
    let data = data_chunks(&store.url(), "far");
    assert!(data.len() >= 16, "{data:?}");
    // 300 ms a request: a whole chunk over loopback takes a few ms more than a range
    // (tens on a loaded machine, still far under the half request that would tip it).
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_millis(300));
    let node = DaemonProc::start_unix(&proxy.url, &tmp.path().join("node"), &["--no-replay"]);
    let uri = node.nbd_uri("far");
    let prefers_whole = || metric_sum(&node.url(), "lazyblk_store_prefers_whole_chunks");
    let took = |kind: &str| {
        let store = proxy.url.trim_end_matches('/');
        node.metric(&format!(
            "lazyblk_store_request_seconds{{store=\"{store}\",kind=\"{kind}\"}}"
        ))
    };
    assert_eq!(
        prefers_whole(),
        0.0,
        "nothing measured yet, nothing preferred"
    );

    // A boot reads a few files whole (whole chunks), then small pieces of others (in
    // blocks while the link is not measured yet).
    let (large, small) = data.split_at(5);
    let large_reads: Vec<(u64, u64)> = large.iter().map(|&c| (c * CHUNK, CHUNK)).collect();
    read_and_check(&uri, &image, &large_reads);
    let (learning, measured) = small.split_at(5);
    let pieces = |chunks: &[u64]| -> Vec<(u64, u64)> {
        chunks
            .iter()
            .flat_map(|&c| [(c * CHUNK + 8192, 4096), (c * CHUNK + 600 * 1024, 4096)])
            .collect()
    };
    let before = store_requests(&store);
    read_and_check(&uri, &image, &pieces(learning));
    let after_learning = store_requests(&store);
    assert!(
        after_learning.1 > before.1,
        "before the link is measured, small reads fetch ranges: {before:?} -> {after_learning:?}"
    );
    let (small_took, whole_took) = (took("small"), took("whole"));
    println!(
        "store requests: {before:?} -> {after_learning:?}; small {small_took} s, whole {whole_took} s"
    );
    assert!(
        small_took >= 0.3 && whole_took >= 0.3,
        "the link's means include its 300 ms: small {small_took} s, whole {whole_took} s"
    );
    assert_eq!(
        prefers_whole(),
        1.0,
        "small requests took {small_took} s and whole chunks {whole_took} s"
    );

    // Measured: each new chunk's first small read fetches it whole, one request (and,
    // beside it, the block index page that verifies the read's own blocks as soon as
    // the chunk came, once per page); the second read of it is local.
    read_and_check(&uri, &image, &pieces(measured));
    let after = store_requests(&store);
    let per_page = manifest_json(&store.url(), "far")["blocks"]["chunks_per_page"]
        .as_u64()
        .unwrap();
    let pages: std::collections::BTreeSet<u64> = measured.iter().map(|c| c / per_page).collect();
    let whole = after.0 - after_learning.0;
    assert!(
        whole >= measured.len() as f64 && whole <= (measured.len() + pages.len()) as f64,
        "one whole chunk per chunk read, and at most its index pages ({after_learning:?} -> {after:?}, {} pages)",
        pages.len()
    );
    assert_eq!(
        after.1 - after_learning.1,
        0.0,
        "no ranges ({after_learning:?} -> {after:?})"
    );
}

/// A read of a chunk fetched whole is served from its own blocks as soon as the chunk's
/// stored form came, each block checked against the block index, before the chunk is
/// decoded and verified whole. Shown with a chunk whose last block the store holds
/// corrupt: the whole chunk never verifies, yet a read of its first blocks is served
/// (and right); a read of the corrupt block is refused.
#[test]
fn a_read_of_a_chunk_fetched_whole_is_served_from_its_verified_blocks_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = image_with_text(tmp.path(), 4, "corrupt");
    publish(&store.url(), &image, "bad");
    let m = manifest_json(&store.url(), "bad");
    let data = data_chunks(&store.url(), "bad");
    let chunk = *data.last().unwrap();
    let digest = m["chunks"][chunk as usize].as_str().unwrap().to_string();
    let path = store.root().join("chunks").join(&digest[..2]).join(&digest);
    let mut stored = std::fs::read(&path).unwrap();
    assert_eq!(
        &stored[..4],
        &[0x5B, 0x2A, 0x4D, 0x18],
        "the chunk is stored in blocks"
    );
    let at = stored.len() - 3;
    stored[at] ^= 0x55;
    std::fs::write(&path, &stored).unwrap();

    // 300 ms a request: the index page (one request, beside the chunk's) is in long
    // before both passes over the chunk have failed (two requests and a backoff).
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_millis(300));
    let node = DaemonProc::start_unix(&proxy.url, &tmp.path().join("node"), &["--no-replay"]);
    measure_the_link(&store, &node, tmp.path());
    let uri = node.nbd_uri("bad");
    let served_early = || metric_sum(&node.url(), "lazyblk_reads_served_before_verified_total");
    let before = served_early();
    read_and_check(&uri, &image, &[(chunk * CHUNK + 8192, 4096)]);
    assert_eq!(
        served_early() - before,
        1.0,
        "the read was served before the chunk verified"
    );
    // The chunk itself never verified: its last block is not the chunk's.
    let last = chunk * CHUNK + CHUNK - 4096;
    let (ok, _, err) = nbdsh(&uri, &format!("h.pread(4096, {last})"));
    assert!(!ok, "the corrupt block was served");
    assert!(
        err.to_lowercase().contains("input/output error") || err.contains("EIO"),
        "{err}"
    );
}

/// Teaches `node` its store link (behind a proxy that holds each request): whole
/// chunks from large reads, small ranges from pieces of other chunks, until it prefers
/// whole chunks.
fn measure_the_link(store: &StoreProc, node: &DaemonProc, dir: &Path) {
    let image = image_with_data(dir, 12);
    publish(&store.url(), &image, "warmup");
    let data = data_chunks(&store.url(), "warmup");
    let uri = node.nbd_uri("warmup");
    let large: Vec<(u64, u64)> = data[..5].iter().map(|&c| (c * CHUNK, CHUNK)).collect();
    read_and_check(&uri, &image, &large);
    let pieces: Vec<(u64, u64)> = data[5..10]
        .iter()
        .map(|&c| (c * CHUNK + 8192, 4096))
        .collect();
    read_and_check(&uri, &image, &pieces);
    assert_eq!(
        metric_sum(&node.url(), "lazyblk_store_prefers_whole_chunks"),
        1.0,
        "the node learnt that whole chunks cost it about a small request"
    );
}

#[test]
fn a_read_of_blocks_a_replay_is_fetching_joins_it_where_whole_chunks_are_preferred() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    // Text compresses: its chunks are stored in blocks.
    let (image, at) = text_template(tmp.path(), &store.url(), "text");
    let chunk = at / CHUNK;
    // The trace: 32 KiB at the start of that chunk (four 8 KiB blocks).
    let doc = serde_json::json!({"template": "text", "chunks": [chunk], "version": 2,
        "ranges": [[chunk * CHUNK, 32768]]});
    let (code, body) = put_trace(&store.url(), "text", &doc);
    assert_eq!(code, 200, "trace PUT: {body}");
    let proxy = Proxy::start(&store.url(), 0);
    proxy.delay_every(Duration::from_millis(300));
    let node = DaemonProc::start_unix(&proxy.url, &tmp.path().join("n"), &[]);
    measure_the_link(&store, &node, &tmp.path().join("w"));
    // Each request now waits 6 s: the replay's fetch of the blocks is under way for 6 s
    // after the store served the chunk's table.
    proxy.delay_every(Duration::from_secs(6));
    let before = store_requests(&store);
    let uri = node.nbd_uri("text");
    let opener = {
        let uri = uri.clone();
        std::thread::spawn(move || nbdsh(&uri, "h.get_size()"))
    };
    wait_for(
        "the replay to fetch the chunk's table",
        Duration::from_secs(30),
        || store_requests(&store).1 > before.1,
    );
    // A read of the second block, while the replay fetches blocks 0-3.
    read_and_check(&uri, &image, &[(chunk * CHUNK + 8192, 4096)]);
    assert!(opener.join().unwrap().0);
    wait_for("the replay to end", Duration::from_secs(30), || {
        metric_sum(&node.url(), "lazyblk_replay_stopped_total") == 1.0
    });
    assert_eq!(
        node.metric("lazyblk_replay_stopped_total{reason=\"done\"}"),
        1.0,
        "the replay ran to its end"
    );
    let after = store_requests(&store);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1.0, 2.0),
        "the replay's page of the block index (a whole object), the chunk's table and one \
         range of blocks; no whole chunk: the read joined the replay's fetch"
    );
}
