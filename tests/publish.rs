//! `lazyblk publish` against a real store with real ext4 images: digests and zero
//! chunks as a reader of the image would compute them, only missing chunks uploaded,
//! immutable ids, and the refusals a user needs to understand.

mod support;

use std::path::Path;

use lazyblk_cache::{Digest, Manifest};
use serde_json::Value;
use support::{make_ext4, make_ext4_blocks, pattern, publish_json, run, StoreProc};

const MIB: usize = 1 << 20;

/// The chunk digests of an image as the test computes them (None = all zero).
fn expected_chunks(image: &Path, chunk_size: usize) -> Vec<Option<Digest>> {
    let bytes = std::fs::read(image).unwrap();
    bytes
        .chunks(chunk_size)
        .map(|c| c.iter().any(|b| *b != 0).then(|| Digest::of(c)))
        .collect()
}

fn publish_err(image: &Path, id: &str, store: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "publish",
        image.to_str().unwrap(),
        "--template",
        id,
        "--store",
        store,
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(!ok, "publish {id} should fail; printed {stdout}");
    stderr
}

fn stored_manifest(store: &StoreProc, id: &str) -> Manifest {
    let (status, body) =
        support::http_get(&format!("{}/v1/templates/{id}/manifest", store.url())).unwrap();
    assert_eq!(status, 200, "{body}");
    Manifest::parse(body.as_bytes(), Some(id)).unwrap()
}

fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("etc/hostname", b"sandbox\n".to_vec()),
        ("usr/lib/big.bin", pattern(3 * MIB, 1)),
        ("usr/lib/other.bin", pattern(MIB + 12345, 2)),
    ]
}

fn distinct(chunks: &[Option<Digest>]) -> std::collections::HashSet<Digest> {
    chunks.iter().flatten().copied().collect()
}

#[test]
fn publish_uploads_only_what_the_store_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let url = store.url();
    let image = make_ext4(dir.path(), 64, &sample_files());
    let expected = expected_chunks(&image, MIB);
    assert!(
        expected.iter().any(Option::is_none),
        "the image has zero chunks"
    );

    let report = publish_json(&image, "base", &url, &["--label", "guest=1.4"]);
    let manifest = stored_manifest(&store, "base");
    assert_eq!(
        manifest.chunks, expected,
        "digests and nulls match the image"
    );
    assert_eq!(manifest.size, 64 << 20);
    assert_eq!(manifest.labels["guest"], "1.4");
    assert!(
        manifest.created_at.ends_with('Z'),
        "{}",
        manifest.created_at
    );
    let nonzero = expected.iter().flatten().count();
    let unique = distinct(&expected).len();
    assert_eq!(report["status"], "created");
    assert_eq!(report["chunks"], 64);
    assert_eq!(report["zero_chunks"], (64 - nonzero) as u64);
    assert_eq!(report["uploaded_chunks"], unique as u64);
    // The chunks, and the pages of the block index (stored like chunks).
    let pages = support::index_pages(&support::manifest_json(&url, "base"));
    assert!(pages > 0);
    assert_eq!(
        store.metric("lazyblk_store_chunks_uploaded_total"),
        (unique + pages) as f64
    );

    // The same image again: nothing to do.
    let (ok, stdout, stderr) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "base",
        "--store",
        &url,
        "--label",
        "guest=1.4",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "template base already published (no change)");
    assert_eq!(
        store.metric("lazyblk_store_chunks_uploaded_total"),
        (unique + pages) as f64
    );

    // A store that lost a chunk and a page of the block index gets both back from a
    // republish of the same image.
    let lost = expected.iter().flatten().next().unwrap();
    std::fs::remove_file(store.root().join("chunks").join(lost.shard_path())).unwrap();
    let lost_page: Digest = serde_json::from_value(
        support::manifest_json(&url, "base")["blocks"]["pages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p.is_string())
            .unwrap()
            .clone(),
    )
    .unwrap();
    std::fs::remove_file(store.root().join("chunks").join(lost_page.shard_path())).unwrap();
    let report = publish_json(&image, "base", &url, &["--label", "guest=1.4"]);
    assert_eq!(report["status"], "unchanged");
    assert_eq!(report["uploaded_chunks"], 1);
    assert_eq!(report["uploaded_bytes"], MIB as u64);
    assert!(store.root().join("chunks").join(lost.shard_path()).exists());
    assert!(store
        .root()
        .join("chunks")
        .join(lost_page.shard_path())
        .exists());
    assert_eq!(
        store.metric("lazyblk_store_chunks_uploaded_total"),
        (unique + pages + 2) as f64
    );
    let uploads = unique + pages + 2; // the store's uploaded counter from here on

    // A second image that differs in two chunks uploads just those.
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[40 * MIB..40 * MIB + 4096].copy_from_slice(&pattern(4096, 40));
    bytes[41 * MIB + 100..41 * MIB + 200].copy_from_slice(&pattern(100, 41));
    let derived = dir.path().join("derived.img");
    std::fs::write(&derived, &bytes).unwrap();
    let derived_chunks = expected_chunks(&derived, MIB);
    let new = distinct(&derived_chunks)
        .difference(&distinct(&expected))
        .count();
    assert_eq!(new, 2);
    let report = publish_json(&derived, "derived", &url, &["--parent", "base"]);
    assert_eq!(report["uploaded_chunks"], 2);
    assert_eq!(report["uploaded_bytes"], 2 * MIB as u64);
    assert_eq!(
        report["present_chunks"],
        (derived_chunks.iter().flatten().count() - 2) as u64
    );
    // The two chunks, and the pages of the block index that hold their entries.
    let page_set = |id: &str| -> std::collections::HashSet<String> {
        support::manifest_json(&url, id)["blocks"]["pages"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect()
    };
    let new_pages = page_set("derived").difference(&page_set("base")).count();
    assert_eq!(new_pages, 1, "chunks 40 and 41 share one page");
    assert_eq!(
        store.metric("lazyblk_store_chunks_uploaded_total"),
        (uploads + 2 + new_pages) as f64
    );
    assert_eq!(
        stored_manifest(&store, "derived").parent.as_deref(),
        Some("base")
    );

    // Other content under a taken id is refused before anything is uploaded.
    let err = publish_err(&derived, "base", &url, &["--label", "guest=1.4"]);
    assert!(
        err.contains(
            "template base already exists in the store with other content; publish under a new id"
        ) || err.contains("template base already exists in the store with other content ("),
        "{err}"
    );
    let err = publish_err(&image, "base", &url, &["--label", "guest=2"]);
    assert!(
        err.contains("already exists in the store with other content"),
        "{err}"
    );
    assert_eq!(
        store.metric("lazyblk_store_chunks_uploaded_total"),
        (uploads + 2 + new_pages) as f64
    );
    assert!(stored_manifest(&store, "base").same_content(&manifest));

    // The templates command shows both, durable.
    let (ok, stdout, stderr) = run(&["templates", "--store", &url]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("TEMPLATE"), "{stdout}");
    assert!(
        lines[1].starts_with("base ") && lines[1].contains("DURABLE"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("derived ") && lines[2].contains(" base "),
        "{stdout}"
    );
    let (ok, stdout, _) = run(&["templates", "--store", &url, "--json"]);
    assert!(ok);
    let list: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["durability"], "DURABLE");

    // Deleting the derived template and collecting frees exactly its two own chunks and
    // its own page of the block index; the base's pages are kept with its chunks.
    let (ok, _, stderr) = run(&["delete", "derived", "--store", &url]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = run(&["gc", "--store", &url, "--grace", "0s", "--json"]);
    assert!(ok, "{stderr}");
    let gc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(gc["chunks_deleted"], (2 + new_pages) as u64, "{gc}");
    assert_eq!(gc["chunks_referenced"], (unique + pages) as u64);
}

#[test]
fn publish_refuses_what_cannot_be_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let url = store.url();

    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![1u8; 5000]).unwrap();
    let err = publish_err(&odd, "odd", &url, &[]);
    assert!(
        err.contains("multiple of 4096") && err.contains("truncate -s 8192"),
        "{err}"
    );

    let small_blocks = make_ext4_blocks(dir.path(), 16, 1024, &[("f", b"x".to_vec())]);
    let err = publish_err(&small_blocks, "small", &url, &[]);
    assert!(
        err.contains("ext4 image")
            && err.contains("1024-byte blocks")
            && err.contains("mkfs.ext4 -b 4096"),
        "{err}"
    );

    let image = make_ext4(dir.path(), 8, &[("f", b"x".to_vec())]);
    let err = publish_err(&image, "Bad/Id", &url, &[]);
    assert!(err.contains("invalid id \"Bad/Id\""), "{err}");
    let err = publish_err(&image, "ok", &url, &["--chunk-size", "3000"]);
    assert!(err.contains("power of two"), "{err}");
    let err = publish_err(&dir.path().join("nope.img"), "ok", &url, &[]);
    assert!(err.contains("nope.img"), "{err}");

    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let err = publish_err(&image, "ok", &dead, &[]);
    assert!(err.contains(&format!("store {dead} unreachable")), "{err}");
    assert_eq!(store.metric("lazyblk_store_chunks_uploaded_total"), 0.0);
}

#[test]
fn raw_images_publish_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let raw = dir.path().join("raw.img");
    let mut bytes = pattern(256 << 10, 7);
    bytes.extend(vec![0u8; 128 << 10]);
    std::fs::write(&raw, &bytes).unwrap();
    let (ok, stdout, stderr) = run(&[
        "publish",
        raw.to_str().unwrap(),
        "--template",
        "raw",
        "--store",
        &store.url(),
        "--chunk-size",
        "64K",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("not an ext4 image"), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "published raw: 6 chunks (2 zero), uploaded 4 chunks (262144 bytes, 262144 stored; 0 compressed), 0 already in store"
    );
    assert_eq!(
        stored_manifest(&store, "raw").chunks,
        expected_chunks(&raw, 64 << 10)
    );
}
