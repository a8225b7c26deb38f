//! Issue 2: a template published once is served lazily over NBD, checked with real
//! clients (nbdinfo, nbdcopy, qemu-img, nbdsh, fio, the `nbd` crate's client).

mod support;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use support::node::{nbdsh, sh, DaemonProc};
use support::{make_ext4, manifest_json, pattern, publish, run, StoreProc};

const CHUNK: usize = 1 << 20;

/// An ext4 image of 48 MiB with a few MiB of files (so most chunks are zero), published
/// to `store` as `id`.
fn publish_image(store: &StoreProc, dir: &Path, id: &str) -> PathBuf {
    let files = vec![
        ("etc/os-release", b"NAME=lazyblk-test\n".to_vec()),
        ("usr/bin/big", pattern(3 * CHUNK + 12345, 1)),
        ("usr/lib/libx.so", pattern(CHUNK / 2, 2)),
        ("home/user/notes.txt", pattern(40000, 3)),
    ];
    let image = make_ext4(dir, 48, &files);
    publish(&store.url(), &image, id);
    image
}

#[test]
fn real_clients_read_the_template_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = publish_image(&store, tmp.path(), "t1");
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let uri = daemon.nbd_uri("t1");

    // nbdinfo: size, read-only, structured replies.
    let (ok, out, err) = sh("nbdinfo", &["--json", &uri]);
    assert!(ok, "nbdinfo: {err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 48 << 20);
    assert_eq!(export["is_read_only"], true);
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(export["can_multi_conn"], true);

    // nbdinfo --map: exactly the manifest's zero chunks are holes.
    let (ok, out, err) = sh("nbdinfo", &["--map", "--json", &uri]);
    assert!(ok, "nbdinfo --map: {err}");
    let map: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = manifest_json(&store.url(), "t1");
    let chunks = m["chunks"].as_array().unwrap();
    let mut holes_from_map = vec![false; chunks.len()];
    for extent in map.as_array().unwrap() {
        let (offset, length, kind) = (
            extent["offset"].as_u64().unwrap(),
            extent["length"].as_u64().unwrap(),
            extent["type"].as_u64().unwrap(),
        );
        for c in (offset / CHUNK as u64)..((offset + length) / CHUNK as u64) {
            holes_from_map[c as usize] = kind & 1 == 1;
        }
    }
    let holes_in_manifest: Vec<bool> = chunks.iter().map(|c| c.is_null()).collect();
    assert_eq!(holes_from_map, holes_in_manifest);
    assert!(
        holes_in_manifest.iter().filter(|h| **h).count() > 30,
        "the image is mostly zero chunks"
    );

    // nbdcopy: byte for byte.
    let copy = tmp.path().join("copy.img");
    let (ok, _, err) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap(),
        "nbdcopy output differs from the image"
    );

    // qemu-img compare over NBD.
    let (ok, out, err) = sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            image.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(ok, "qemu-img compare: {out}{err}");
    assert!(out.contains("identical"), "{out}");

    // nbdsh: a structured read at an odd offset.
    let script = "import sys; b = h.pread(10000, 1048576 + 333); sys.stdout.write(b.hex())";
    let (ok, out, err) = nbdsh(&uri, script);
    assert!(ok, "nbdsh: {err}");
    let want = &std::fs::read(&image).unwrap()[CHUNK + 333..CHUNK + 333 + 10000];
    assert_eq!(out.trim(), hex(want));

    // nbdsh: a structured read of a cached data chunk and the zero chunk after it gets
    // the zero chunk as a hole chunk (no bytes on the wire), and the bytes are right.
    let data = (0..chunks.len() - 1)
        .find(|&c| !chunks[c].is_null() && chunks[c + 1].is_null())
        .expect("a data chunk followed by a zero chunk");
    let offset = data * CHUNK + CHUNK / 2;
    let script = format!(
        "import sys\n\
         seen = []\n\
         def chunk(sub, off, status, err):\n    seen.append((off, len(sub), status)); return 0\n\
         b = h.pread_structured({CHUNK}, {offset}, chunk)\n\
         print(sorted(seen)); print(b.hex())"
    );
    let (ok, out, err) = nbdsh(&uri, &script);
    assert!(ok, "nbdsh: {err}");
    let (seen, bytes) = out.trim().split_once('\n').expect("two lines");
    let half = CHUNK / 2;
    assert_eq!(
        seen,
        format!("[({offset}, {half}, 1), ({}, {half}, 2)]", offset + half),
        "data (1) then a hole (2)"
    );
    let want = &std::fs::read(&image).unwrap()[offset..offset + CHUNK];
    assert_eq!(bytes, hex(want));

    // A read all inside zero chunks is a hole, and no cache hit: nothing was stored.
    let hits = daemon.metric("lazyblk_cache_hits_total");
    let zero = (data + 1) * CHUNK;
    let script = format!(
        "import sys; b = h.pread({}, {zero}); sys.stdout.write(str(b.count(0)))",
        CHUNK / 2
    );
    let (ok, out, err) = nbdsh(&uri, &script);
    assert!(ok, "nbdsh: {err}");
    assert_eq!(out.trim(), (CHUNK / 2).to_string(), "zeroes");
    assert_eq!(
        daemon.metric("lazyblk_cache_hits_total"),
        hits,
        "zero chunks are no hits"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn export_name_clients_and_fio_work_over_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = publish_image(&store, tmp.path(), "t2");
    let daemon = DaemonProc::start(&store.url(), &tmp.path().join("cache"), &[]);
    let bytes = std::fs::read(&image).unwrap();

    // The `nbd` crate's client negotiates with NBD_OPT_EXPORT_NAME (the oldest path).
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", daemon.nbd_port)).unwrap();
    let export = nbd::client::handshake(&mut stream, b"t2").unwrap();
    assert_eq!(export.size, 48 << 20);
    assert!(export.readonly);
    let mut client = nbd::client::NbdClient::new(&mut stream, &export);
    let mut buf = vec![0u8; 256 * 1024];
    for offset in [0u64, 4096, 3 << 20, (47 << 20) - 256 * 1024] {
        client.seek(SeekFrom::Start(offset)).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert!(
            buf == bytes[offset as usize..offset as usize + buf.len()],
            "offset {offset}"
        );
    }
    // The same reads again are cached: their bytes are spliced over TCP from the chunk
    // files once those are written (a read right after a fetch may still be answered
    // from the verified bytes in memory), and are the same bytes.
    let mut spliced = 0.0;
    for _ in 0..50 {
        for offset in [0u64, 4096, 3 << 20, (47 << 20) - 256 * 1024] {
            client.seek(SeekFrom::Start(offset)).unwrap();
            client.read_exact(&mut buf).unwrap();
            assert!(buf == bytes[offset as usize..offset as usize + buf.len()]);
        }
        spliced = daemon.metric("lazyblk_nbd_spliced_bytes_total");
        if spliced > 0.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(spliced > 0.0, "no cached read was spliced");

    // fio's nbd engine: a short random read run without errors.
    let uri = daemon.nbd_uri("t2");
    let (ok, out, err) = sh(
        "fio",
        &[
            "--name=randread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            "--size=48M",
            "--iodepth=8",
            "--runtime=2",
            "--time_based",
            "--output-format=json",
            "--readonly",
        ],
    );
    assert!(ok, "fio: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0);
    assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn one_small_read_fetches_the_block_that_holds_it_not_the_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = publish_image(&store, tmp.path(), "t3");
    let stored = manifest_json(&store.url(), "t3")["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c.is_null())
        .count();
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let before = store.metric("lazyblk_store_chunks_served_total");
    assert_eq!(before, 0.0);

    // One 4 KiB read inside /usr/bin/big's data: find a chunk that holds data.
    let bytes = std::fs::read(&image).unwrap();
    let offset = (0..bytes.len() / CHUNK)
        .rev()
        .find(|&c| bytes[c * CHUNK..(c + 1) * CHUNK].iter().any(|&b| b != 0))
        .unwrap()
        * CHUNK;
    let script = format!("import sys; sys.stdout.write(h.pread(4096, {offset}).hex())");
    let (ok, out, err) = nbdsh(&daemon.nbd_uri("t3"), &script);
    assert!(ok, "nbdsh: {err}");
    assert_eq!(out.trim(), hex(&bytes[offset..offset + 4096]));

    let served = store.metric("lazyblk_store_chunks_served_total");
    let ranges = store.metric("lazyblk_store_ranges_served_total");
    let bytes_served = store.metric("lazyblk_store_bytes_served_total");
    println!("one 4 KiB read: the store served {served} whole object(s) and {ranges} ranges, {bytes_served} bytes, of a template of {stored} stored chunks");
    // The chunk as the store keeps it (a frame per 8 KiB block).
    let m = manifest_json(&store.url(), "t3");
    let digest = m["chunks"][offset / CHUNK].as_str().unwrap().to_string();
    let stored_len =
        std::fs::metadata(store.root().join("chunks").join(&digest[..2]).join(&digest))
            .unwrap()
            .len();
    assert!(stored_len <= CHUNK as u64);
    // One page of the block index (fetched whole, like a chunk), then two ranges of the
    // chunk: its table and the block that holds the 4 KiB. Not the chunk.
    assert!(support::index_pages(&m) > 0, "{m}");
    assert_eq!(served, 1.0, "one page of the block index");
    assert_eq!(ranges, 2.0, "the chunk's table, then one block");
    let page = support::PAGE_BYTES as f64;
    assert!(
        bytes_served < page + 2.0 * 8192.0 + 1024.0,
        "a 4 KiB read fetched {bytes_served} bytes"
    );
    assert!(stored > 3);
    assert_eq!(daemon.metric("lazyblk_cache_misses_total"), 1.0);
    // A larger read (a quarter of the chunk or more) fetches the chunk whole.
    let script = format!("h.pread({}, {offset})", CHUNK / 2);
    let (ok, _, err) = nbdsh(&daemon.nbd_uri("t3"), &script);
    assert!(ok, "nbdsh: {err}");
    assert_eq!(store.metric("lazyblk_store_chunks_served_total"), 2.0);
    assert_eq!(
        store.metric("lazyblk_store_bytes_served_total"),
        bytes_served + stored_len as f64
    );
}

#[test]
fn a_corrupted_chunk_is_refused_and_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = publish_image(&store, tmp.path(), "t4");
    let m = manifest_json(&store.url(), "t4");
    let chunks = m["chunks"].as_array().unwrap();
    let (index, digest) = chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.as_str().map(|d| (i, d.to_string())))
        .nth(1)
        .unwrap();
    // Flip bytes of the chunk in the store's own files, behind its back.
    let path = store.root().join("chunks").join(&digest[..2]).join(&digest);
    support::corrupt_stored_chunk(&path);

    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let uri = daemon.nbd_uri("t4");
    let offset = index * CHUNK;
    let script = format!("h.pread(4096, {offset})");
    let (ok, _, err) = nbdsh(&uri, &script);
    assert!(!ok, "a read of a corrupted chunk must fail");
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    let page = support::http_get(&format!("{}/metrics", daemon.url()))
        .unwrap()
        .1;
    assert!(
        page.lines()
            .any(|l| l.starts_with("lazyblk_verify_failures_total{") && !l.ends_with(" 0")),
        "{page}"
    );
    // The bad bytes never reached the cache.
    assert!(!tmp
        .path()
        .join("cache/chunks")
        .join(&digest[..2])
        .join(&digest)
        .exists());
    // Other chunks still serve correctly.
    let bytes = std::fs::read(&image).unwrap();
    let (ok, out, err) = nbdsh(&uri, "import sys; sys.stdout.write(h.pread(4096, 0).hex())");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), hex(&bytes[..4096]));
    // Status names the problem.
    let (ok, out, _) = run(&["status", "t4", "--node", &daemon.url()]);
    assert!(ok);
    assert!(out.contains("did not match its digest"), "{out}");
}

#[test]
fn sigkill_mid_read_leaves_a_cache_that_serves_correct_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let files: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| (format!("data/f{i}"), pattern(CHUNK, 100 + i)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let image = make_ext4(tmp.path(), 64, &files);
    let (ok, _, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "t5",
        "--store",
        &store.url(),
    ]);
    assert!(ok, "{err}");
    let cache = tmp.path().join("cache");
    let mut daemon = DaemonProc::start_unix(&store.url(), &cache, &[]);
    let uri = daemon.nbd_uri("t5");
    let copy = tmp.path().join("copy.img");
    let mut reader = std::process::Command::new("nbdcopy")
        .args([&uri, copy.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once some chunks are local and the copy is still running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count_chunks(&cache) < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    daemon.kill9();
    let status = reader.wait().unwrap();
    assert!(
        !status.success(),
        "the copy was still running when the daemon was killed"
    );
    let before = count_chunks(&cache);
    // Every chunk file left is whole and verified.
    for (name, bytes) in chunk_files(&cache) {
        assert_eq!(
            sha256_hex(&bytes),
            name,
            "a chunk file in the cache does not match its name"
        );
    }
    daemon.restart();
    let served_before = store.metric("lazyblk_store_chunks_served_total");
    let (ok, _, err) = sh("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&image).unwrap());
    let fetched_again = store.metric("lazyblk_store_chunks_served_total") - served_before;
    let stored = manifest_json(&store.url(), "t5")["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c.is_null())
        .count();
    println!(
        "{before} chunks survived the kill; {fetched_again} of {stored} fetched after restart"
    );
    assert_eq!(
        fetched_again as usize + before,
        stored,
        "chunks kept across the kill are reused, not fetched again"
    );
}

fn chunk_files(cache: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(shards) = std::fs::read_dir(cache.join("chunks")) else {
        return out;
    };
    for shard in shards.flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            out.push((
                f.file_name().to_string_lossy().into_owned(),
                std::fs::read(f.path()).unwrap(),
            ));
        }
    }
    out
}

fn count_chunks(cache: &Path) -> usize {
    chunk_files(cache).len()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

#[test]
fn unknown_and_malformed_templates_and_a_dead_store_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    publish_image(&store, tmp.path(), "good");
    std::fs::write(
        store.root().join("manifests/broken.json"),
        b"{\"format\": 1, \"template\": \"broken\", \"size\": 4096",
    )
    .unwrap();
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);

    let (ok, _, err) = sh("nbdinfo", &[&daemon.nbd_uri("nosuch")]);
    assert!(!ok);
    assert!(
        err.to_lowercase().contains("unknown") || err.contains("nosuch"),
        "{err}"
    );

    let (status, body) =
        support::http_get(&format!("{}/v1/templates/nosuch", daemon.url())).unwrap();
    assert_eq!(status, 404);
    assert!(
        body.contains("unknown template") && body.contains("nosuch"),
        "{body}"
    );

    let (status, body) =
        support::http_get(&format!("{}/v1/templates/broken", daemon.url())).unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("malformed manifest") && body.contains("broken"),
        "{body}"
    );

    // Open once so the daemon knows "good", then stop the store: it stays servable.
    let (ok, _, err) = sh("nbdinfo", &[&daemon.nbd_uri("good")]);
    assert!(ok, "{err}");
    let url = store.url();
    drop(store);
    let (ok, _, _) = sh("nbdinfo", &[&daemon.nbd_uri("good")]);
    assert!(ok, "a known template is still offered with the store down");
    let (status, body) =
        support::http_get(&format!("{}/v1/templates/other", daemon.url())).unwrap();
    assert_eq!(status, 502);
    assert!(
        body.contains(&url) || body.contains("unreachable"),
        "{body}"
    );
    // The daemon is still healthy.
    assert_eq!(
        support::http_get(&format!("{}/healthz", daemon.url()))
            .unwrap()
            .0,
        200
    );
}
