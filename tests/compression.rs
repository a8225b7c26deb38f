//! Compressed chunks (DESIGN.md section 4, formats 2 and 3), with real clients: chunks
//! stored in blocks beside raw ones and a format-2 frame in one template, a corrupt
//! block refused and fetched again once the store is repaired, a zstd bomb refused by
//! the store and by the daemon without decoding it, and a format-1 (raw) store read by
//! this daemon.

mod support;

use std::path::{Path, PathBuf};

use support::node::{nbdsh, sh, DaemonProc};
use support::{
    corrupt_stored_chunk, http_get, make_ext4, manifest_json, pattern, publish_json, StoreProc,
    BLOCKS_MAGIC,
};

const CHUNK: usize = 1 << 20;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// An ext4 image with a random file (chunks that do not compress) and a text file
/// (chunks that do), and metadata (which compresses very well).
fn mixed_image(dir: &Path) -> PathBuf {
    let text: Vec<u8> = (0..3 * CHUNK)
        .map(|i| b"lazyblk serves templates lazily; "[i % 33])
        .collect();
    make_ext4(
        dir,
        32,
        &[
            ("usr/bin/random", pattern(3 * CHUNK + 777, 11)),
            ("usr/share/doc/text", text),
        ],
    )
}

fn chunk_path(store: &StoreProc, digest: &str) -> PathBuf {
    store.root().join("chunks").join(&digest[..2]).join(digest)
}

/// (index, digest, stored bytes) of every stored chunk of `id`.
fn stored_chunks(store: &StoreProc, id: &str) -> Vec<(usize, String, Vec<u8>)> {
    manifest_json(&store.url(), id)["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.as_str().map(|d| (i, d.to_string())))
        .map(|(i, d)| {
            let bytes = std::fs::read(chunk_path(store, &d)).unwrap();
            (i, d, bytes)
        })
        .collect()
}

fn copy_and_compare(daemon: &DaemonProc, id: &str, image: &Path, dir: &Path) {
    let copy = dir.join(format!("{id}.copy"));
    let (ok, _, err) = sh("nbdcopy", &[&daemon.nbd_uri(id), copy.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(image).unwrap(),
        "the copy of {id} differs from its image"
    );
    let (ok, out, err) = sh("e2fsck", &["-fn", copy.to_str().unwrap()]);
    assert!(ok, "e2fsck: {out}{err}");
}

/// 4 KiB at `offset` of `id` read with nbdsh: the bytes, or the error.
fn pread(daemon: &DaemonProc, id: &str, offset: usize) -> Result<Vec<u8>, String> {
    let script = format!("import sys; sys.stdout.write(h.pread(4096, {offset}).hex())");
    let (ok, out, err) = nbdsh(&daemon.nbd_uri(id), &script);
    if !ok {
        return Err(err);
    }
    Ok((0..out.trim().len() / 2)
        .map(|i| u8::from_str_radix(&out.trim()[2 * i..2 * i + 2], 16).unwrap())
        .collect())
}

#[test]
fn a_template_of_compressed_and_raw_chunks_reads_back_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = mixed_image(tmp.path());
    let report = publish_json(&image, "mixed", &store.url(), &[]);
    let uploaded = report["uploaded_chunks"].as_u64().unwrap();
    let compressed = report["compressed_chunks"].as_u64().unwrap();
    assert!(compressed > 0 && compressed < uploaded, "{report}");
    assert!(
        report["stored_bytes"].as_u64() < report["uploaded_bytes"].as_u64(),
        "{report}"
    );
    assert_eq!(manifest_json(&store.url(), "mixed")["format"], 3);
    let mut chunks = stored_chunks(&store, "mixed");
    let blocked = chunks
        .iter()
        .filter(|(_, _, b)| b.starts_with(&BLOCKS_MAGIC))
        .count();
    let raw = chunks.iter().filter(|(_, _, b)| b.len() == CHUNK).count();
    assert!(
        blocked > 1 && raw > 0,
        "{blocked} chunks in blocks, {raw} raw chunks"
    );
    // One chunk stored as format 2 stores it, one zstd frame (by the zstd tool), as a
    // store shared with an older publisher holds it.
    let image_bytes = std::fs::read(&image).unwrap();
    let (index, digest, _) = chunks
        .iter()
        .find(|(_, _, b)| b.starts_with(&BLOCKS_MAGIC))
        .cloned()
        .unwrap();
    let raw_chunk = tmp.path().join("chunk.raw");
    std::fs::write(&raw_chunk, &image_bytes[index * CHUNK..(index + 1) * CHUNK]).unwrap();
    let (ok, _, err) = sh("zstd", &["-q", "-f", "-3", raw_chunk.to_str().unwrap()]);
    assert!(ok, "zstd: {err}");
    let frame = std::fs::read(tmp.path().join("chunk.raw.zst")).unwrap();
    assert!(frame.starts_with(&ZSTD_MAGIC));
    std::fs::write(chunk_path(&store, &digest), &frame).unwrap();
    for c in chunks.iter_mut().filter(|c| c.1 == digest) {
        c.2 = frame.clone();
    }
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    // Small reads of each kind: blocks of a chunk in blocks, the whole frame and the
    // whole raw chunk (neither can be read in part).
    for (i, _, b) in &chunks {
        let offset = i * CHUNK + 8192;
        assert_eq!(
            pread(&daemon, "mixed", offset).unwrap(),
            image_bytes[offset..offset + 4096],
            "chunk {i}, stored in {} bytes",
            b.len()
        );
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(tmp.path().join("cache"));
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    copy_and_compare(&daemon, "mixed", &image, tmp.path());
    // Each distinct chunk crossed once, as stored: the stored-bytes counter is what the
    // store's files hold, less than the decoded bytes.
    let mut distinct: Vec<&(usize, String, Vec<u8>)> = chunks.iter().collect();
    distinct.sort_by(|a, b| a.1.cmp(&b.1));
    distinct.dedup_by(|a, b| a.1 == b.1);
    let stored_total: usize = distinct.iter().map(|(_, _, b)| b.len()).sum();
    let (_, page) = http_get(&format!("{}/metrics", daemon.url())).unwrap();
    let sum = |family: &str| -> f64 {
        page.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sum("lazyblk_fetched_stored_bytes_total") as usize,
        stored_total
    );
    assert!(sum("lazyblk_fetched_stored_bytes_total") < sum("lazyblk_fetched_bytes_total"));
    // The store's scrub decodes frames before it hashes: nothing is dropped.
    let (ok, out, err) = sh(
        "curl",
        &["-sf", "-X", "POST", &format!("{}/v1/scrub", store.url())],
    );
    assert!(ok, "scrub: {err}");
    let scrub: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(scrub["dropped"].as_array().unwrap().len(), 0, "{scrub}");
    let pages = support::index_pages(&manifest_json(&store.url(), "mixed"));
    assert_eq!(
        scrub["checked"].as_u64().unwrap() as usize,
        chunks.len() + pages
    );
}

#[test]
fn a_corrupt_compressed_chunk_is_refused_and_fetched_again_once_the_store_is_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = mixed_image(tmp.path());
    publish_json(&image, "spoiled", &store.url(), &[]);
    let chunks = stored_chunks(&store, "spoiled");
    let (index, digest, _) = chunks
        .into_iter()
        .find(|(_, _, b)| b.starts_with(&BLOCKS_MAGIC) && b.len() > 1000)
        .expect("a compressed chunk of some size");
    // The block that the read below needs: refused by its own sha256, then the whole
    // chunk is fetched instead and refused by the chunk's.
    corrupt_stored_chunk(&chunk_path(&store, &digest));

    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let offset = index * CHUNK;
    let refused = pread(&daemon, "spoiled", offset);
    assert!(refused.is_err(), "a corrupt frame was served");
    let verify_failures = daemon.metric(&format!(
        "lazyblk_verify_failures_total{{source=\"{}\",class=\"store\"}}",
        store.url()
    ));
    assert!(verify_failures >= 1.0, "the bad frame was not counted");

    // The store's scrub finds the bad frame and drops it; publishing the image again
    // uploads it; the same daemon then fetches it again.
    let (ok, out, err) = sh(
        "curl",
        &["-sf", "-X", "POST", &format!("{}/v1/scrub", store.url())],
    );
    assert!(ok, "scrub: {err}");
    assert!(out.contains(&digest), "{out}");
    publish_json(&image, "spoiled", &store.url(), &[]);
    let image_bytes = std::fs::read(&image).unwrap();
    assert_eq!(
        pread(&daemon, "spoiled", offset).expect("the repaired chunk"),
        image_bytes[offset..offset + 4096]
    );
}

/// A zstd frame of `n` MiB of zeros: a few kilobytes that decode far past any chunk.
fn zstd_bomb(n: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros");
    let out = dir.path().join("zeros.zst");
    let (ok, _, err) = sh(
        "sh",
        &[
            "-c",
            &format!(
                "head -c {}M /dev/zero > {z} && zstd -q -19 {z} -o {o}",
                n,
                z = zeros.display(),
                o = out.display()
            ),
        ],
    );
    assert!(ok, "zstd: {err}");
    std::fs::read(out).unwrap()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_zstd_bomb_is_refused_by_the_store_and_by_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let bomb = zstd_bomb(2048);
    assert!(bomb.len() < 1 << 20);
    let bomb_path = tmp.path().join("bomb.zst");
    std::fs::write(&bomb_path, &bomb).unwrap();

    // The store: an upload that decodes past the largest chunk is refused.
    let digest = lazyblk_digest(&vec![0u8; 16 << 20]);
    let (ok, out, err) = sh(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", bomb_path.display()),
            &format!("{}/v1/chunks/{digest}", store.url()),
        ],
    );
    assert!(ok, "curl: {err}");
    assert!(out.starts_with('4'), "the store answered {out} to a bomb");
    assert!(!chunk_path(&store, &digest).exists());

    // The daemon: a compressed chunk replaced by a bomb behind the store's back.
    let image = mixed_image(tmp.path());
    publish_json(&image, "bombed", &store.url(), &[]);
    let (index, digest, _) = stored_chunks(&store, "bombed")
        .into_iter()
        .find(|(_, _, b)| b.starts_with(&BLOCKS_MAGIC))
        .unwrap();
    std::fs::write(chunk_path(&store, &digest), &bomb).unwrap();
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    assert!(pread(&daemon, "bombed", index * CHUNK).is_err());
    // Refused without decoding 2 GiB: the daemon's peak stays far below it, and it
    // still serves the template's other chunks.
    let hwm = vm_hwm_kib(daemon.pid());
    assert!(hwm < 512 << 10, "the daemon's peak RSS reached {hwm} KiB");
    let other = stored_chunks(&store, "bombed")
        .into_iter()
        .find(|(i, _, _)| *i != index)
        .unwrap()
        .0;
    let image_bytes = std::fs::read(&image).unwrap();
    assert_eq!(
        pread(&daemon, "bombed", other * CHUNK).unwrap(),
        image_bytes[other * CHUNK..other * CHUNK + 4096]
    );
}

/// The sha256 of `bytes`, in hex, by `sha256sum`.
fn lazyblk_digest(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bytes");
    std::fs::write(&path, bytes).unwrap();
    let (ok, out, _) = sh("sha256sum", &[path.to_str().unwrap()]);
    assert!(ok);
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_format_1_store_of_raw_chunks_is_read_by_this_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = mixed_image(tmp.path());
    let report = publish_json(&image, "plain", &store.url(), &["--no-compress"]);
    assert_eq!(report["compressed_chunks"], 0, "{report}");
    assert_eq!(report["stored_bytes"], report["uploaded_bytes"], "{report}");
    assert_eq!(manifest_json(&store.url(), "plain")["format"], 1);
    for (_, digest, bytes) in stored_chunks(&store, "plain") {
        assert!(
            !bytes.starts_with(&ZSTD_MAGIC),
            "chunk {digest} was compressed"
        );
    }
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    copy_and_compare(&daemon, "plain", &image, tmp.path());
    // A compressed template over the same store shares the raw chunks it has: only
    // chunks the store lacked are stored compressed.
    let again = publish_json(&image, "plain-too", &store.url(), &[]);
    assert_eq!(again["uploaded_chunks"], 0, "{again}");
    copy_and_compare(&daemon, "plain-too", &image, tmp.path());
}
