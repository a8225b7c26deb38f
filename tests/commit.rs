//! Issue 5: a sandbox committed into a new template that every node can use at once:
//! served from its origin until the upload completes, durable in the store after, and
//! sharing every unchanged chunk with its parent.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

fn commit(node: &DaemonProc, sandbox: &str, id: &str) -> Value {
    let (ok, out, err) = run(&[
        "commit",
        sandbox,
        "--template",
        id,
        "--json",
        "--node",
        &node.url(),
    ]);
    assert!(ok, "commit: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits until each of `nodes` sees every other as a live member: a daemon serves its
/// commits' chunks only in a fleet, and its fellows contact it as an origin only while
/// it is a live member.
fn wait_for_fleet(nodes: &[&DaemonProc]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in nodes {
        loop {
            let seen = http_get(&format!("{}/v1/node", node.url()))
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .and_then(|info| info["peers"].as_array().map(Vec::len))
                .unwrap_or(0);
            if seen + 1 >= nodes.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} sees {seen} of the fleet's {} other nodes",
                node.url(),
                nodes.len() - 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn overlay(node: &DaemonProc, template: &str, sandbox: &str) {
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        template,
        "--sandbox",
        sandbox,
        "--node",
        &node.url(),
    ]);
    assert!(ok, "overlay create: {out}{err}");
}

fn durability(store: &StoreProc, id: &str) -> String {
    let (ok, out, err) = run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == id)
        .map(|t| t["durability"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn copy_export(node: &DaemonProc, export: &str, to: &Path) -> Vec<u8> {
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri(export), to.to_str().unwrap()]);
    assert!(ok, "nbdcopy {export}: {err}");
    std::fs::read(to).unwrap()
}

/// Writes `files` into an ext4 image through an NBD export (the image is copied out,
/// changed with debugfs, and the changed blocks written back with nbdcopy), flushing.
fn write_files_through_nbd(node: &DaemonProc, export: &str, dir: &Path, files: &[(&str, Vec<u8>)]) {
    let img = dir.join(format!("{export}-edit.img"));
    copy_export(node, export, &img);
    for (name, bytes) in files {
        let src = dir.join(format!("{export}-{}", name.replace('/', "_")));
        std::fs::write(&src, bytes).unwrap();
        let (ok, out, err) = sh(
            "debugfs",
            &[
                "-w",
                "-R",
                &format!("write {} {}", src.display(), name),
                img.to_str().unwrap(),
            ],
        );
        assert!(ok && !err.contains("rror"), "debugfs write: {out}{err}");
    }
    let (ok, out, err) = sh("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(ok, "e2fsck of the edited image: {out}{err}");
    let (ok, _, err) = sh(
        "nbdcopy",
        &["--flush", img.to_str().unwrap(), &node.nbd_uri(export)],
    );
    assert!(ok, "nbdcopy into {export}: {err}");
}

fn cat_file(image: &Path, name: &str) -> Vec<u8> {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {name}"), image.to_str().unwrap()])
        .output()
        .unwrap();
    out.stdout
}

#[test]
fn a_commit_is_servable_on_every_node_at_once_and_durable_after() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("base/f{i}"), pattern(1 << 20, 10 + i)))
        .collect();
    let borrowed: Vec<(&str, Vec<u8>)> =
        files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let image = make_ext4(tmp.path(), 96, &borrowed);
    publish(&store.url(), &image, "t");
    let _a = DaemonProc::start_unix_member(&store.url(), &tmp.path().join("a"), &[]);
    // B holds its uploads back, so the new chunks exist only on B for a while.
    let mut b = DaemonProc::start_unix_member(
        &store.url(),
        &tmp.path().join("b"),
        &["--upload-delay", "15"],
    );
    let c = DaemonProc::start_unix_member(
        &store.url(),
        &tmp.path().join("c"),
        &["--source-deadline", "2"],
    );
    wait_for_fleet(&[&_a, &b, &c]);
    // B and C read T lazily.
    copy_export(&b, "t", &tmp.path().join("b-t.img"));
    copy_export(&c, "t", &tmp.path().join("c-t.img"));

    overlay(&b, "t", "sb");
    let hello = pattern(3 << 20, 99);
    write_files_through_nbd(
        &b,
        "sb",
        tmp.path(),
        &[
            ("/hello.bin", hello.clone()),
            ("/etc-motd", b"committed on B\n".to_vec()),
        ],
    );
    let uploaded_before = store.metric("lazyblk_store_chunks_uploaded_total");
    let outcome = commit(&b, "sb", "t2");
    println!("commit: {outcome}");
    assert_eq!(outcome["parent"], "t");
    let new_chunks = outcome["new_chunks"].as_u64().unwrap();
    assert!((3..20).contains(&new_chunks), "{outcome}");
    assert!(
        outcome["shared_chunks"].as_u64().unwrap() >= 8,
        "unchanged chunks keep the parent's digests: {outcome}"
    );

    // At once: the store has the manifest, not the new chunks; C reads T2 from B.
    assert_eq!(durability(&store, "t2"), "ORIGIN_ONLY");
    let served_before = store.metric("lazyblk_store_chunks_served_total");
    let on_c = copy_export(&c, "t2", &tmp.path().join("c-t2.img"));
    assert_eq!(
        durability(&store, "t2"),
        "ORIGIN_ONLY",
        "the upload was held back during C's read"
    );
    assert_eq!(cat_file(&tmp.path().join("c-t2.img"), "/hello.bin"), hello);
    assert_eq!(
        cat_file(&tmp.path().join("c-t2.img"), "/etc-motd"),
        b"committed on B\n"
    );
    let (_, body) = http_get(&format!("{}/v1/templates/t2", c.url())).unwrap();
    let status: Value = serde_json::from_str(&body).unwrap();
    let from_b = status["bytes_by_source"][b.url()].as_u64().unwrap_or(0);
    println!("C fetched {from_b} bytes of t2 from B; status {status}");
    assert_eq!(
        from_b,
        new_chunks << 20,
        "the new chunks came from B, the origin"
    );
    // C's unchanged chunks were already local (shared with T): the store served none of t2's new chunks.
    assert!(store.metric("lazyblk_store_chunks_served_total") - served_before < new_chunks as f64);

    // B's upload completes: only the changed chunks were uploaded.
    let deadline = Instant::now() + Duration::from_secs(60);
    while durability(&store, "t2") != "DURABLE" {
        assert!(Instant::now() < deadline, "t2 never became DURABLE");
        std::thread::sleep(Duration::from_millis(200));
    }
    let uploaded = store.metric("lazyblk_store_chunks_uploaded_total") - uploaded_before;
    assert_eq!(
        uploaded as u64, new_chunks,
        "the commit uploaded exactly the chunks the sandbox changed"
    );
    let (_, body) = http_get(&format!("{}/v1/templates/t2", b.url())).unwrap();
    let on_b: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(on_b["durability"], "DURABLE");

    // B goes away; C, with a cold cache for T2, reads everything from the store.
    b.kill9();
    let (ok, _, err) = run(&["evict", "t2", "--node", &c.url()]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["evict", "t", "--node", &c.url()]);
    assert!(ok, "{err}");
    let again = copy_export(&c, "t2", &tmp.path().join("c-t2-again.img"));
    assert!(
        again == on_c,
        "T2 from the store differs from T2 from the origin"
    );
}

#[test]
fn commits_of_commits_work_to_any_depth_across_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(tmp.path(), 64, &[("a", pattern(2 << 20, 1))]);
    publish(&store.url(), &image, "l0");
    let b = DaemonProc::start_unix_member(
        &store.url(),
        &tmp.path().join("b"),
        &["--upload-delay", "60"],
    );
    let c = DaemonProc::start_unix_member(
        &store.url(),
        &tmp.path().join("c"),
        &["--upload-delay", "60"],
    );
    wait_for_fleet(&[&b, &c]);
    overlay(&b, "l0", "s1");
    write_files_through_nbd(&b, "s1", tmp.path(), &[("/one", pattern(1 << 20, 2))]);
    commit(&b, "s1", "l1");
    // On C, over l1 (its new chunks only on B): another sandbox, another commit.
    overlay(&c, "l1", "s2");
    write_files_through_nbd(&c, "s2", tmp.path(), &[("/two", pattern(1 << 20, 3))]);
    let out = commit(&c, "s2", "l2");
    assert_eq!(out["parent"], "l1");
    // And a third level on B, over l2 whose new chunks are only on C.
    overlay(&b, "l2", "s3");
    write_files_through_nbd(&b, "s3", tmp.path(), &[("/three", pattern(1 << 20, 4))]);
    commit(&b, "s3", "l3");
    assert_eq!(durability(&store, "l3"), "ORIGIN_ONLY");
    // A fresh node reads l3 from its origins (B, then C for l2's chunks, then B for l1's).
    let d = DaemonProc::start_unix(&store.url(), &tmp.path().join("d"), &[]);
    let img = tmp.path().join("d-l3.img");
    copy_export(&d, "l3", &img);
    assert_eq!(cat_file(&img, "/a"), pattern(2 << 20, 1));
    assert_eq!(cat_file(&img, "/one"), pattern(1 << 20, 2));
    assert_eq!(cat_file(&img, "/two"), pattern(1 << 20, 3));
    assert_eq!(cat_file(&img, "/three"), pattern(1 << 20, 4));
    let (ok, out, err) = sh("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
}

#[test]
fn commit_work_does_not_grow_with_the_template_size() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let node = DaemonProc::start_unix(&store.url(), &tmp.path().join("n"), &[]);
    let mut hashed = Vec::new();
    for (id, gib) in [("small", 1u64), ("large", 8u64)] {
        // A sparse image: a little data at the start, the rest zero chunks.
        let image = tmp.path().join(format!("{id}.img"));
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(gib << 30).unwrap();
        drop(f);
        std::fs::write(tmp.path().join("seed"), pattern(4 << 20, 7)).unwrap();
        let (ok, _, err) = sh(
            "dd",
            &[
                &format!("if={}", tmp.path().join("seed").display()),
                &format!("of={}", image.display()),
                "conv=notrunc",
                "status=none",
            ],
        );
        assert!(ok, "{err}");
        publish(&store.url(), &image, id);
        let sb = format!("{id}-sb");
        overlay(&node, id, &sb);
        // The same writes: 16 MiB spread over the device's first GiB.
        let (ok, out, err) = sh(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 100M 8M",
                "-c",
                "write -P 0x33 900M 8M",
                "-c",
                "flush",
                &node.nbd_uri(&sb),
            ],
        );
        assert!(ok, "{out}{err}");
        let outcome = commit(&node, &sb, &format!("{id}-c"));
        println!("{id} ({gib} GiB): {outcome}");
        hashed.push((
            outcome["bytes_hashed"].as_u64().unwrap(),
            outcome["new_chunks"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        hashed[0], hashed[1],
        "a commit of the same writes does the same work at 1 GiB and 8 GiB"
    );
    assert_eq!(hashed[0].0, 16 << 20);
}

#[test]
fn bad_commits_publish_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(tmp.path(), 32, &[("x", pattern(100_000, 5))]);
    publish(&store.url(), &image, "base");
    publish(&store.url(), &image, "taken");
    let node = DaemonProc::start_unix(&store.url(), &tmp.path().join("n"), &[]);
    overlay(&node, "base", "sb");
    let cases: [(&[&str], &str); 4] = [
        (
            &["commit", "ghost", "--template", "new1"],
            "unknown sandbox",
        ),
        (&["commit", "sb", "--template", "taken"], "already exists"),
        (&["commit", "sb", "--template", "Not/Valid"], "invalid"),
        (&["commit", "sb", "--template", "sb"], "already exists"),
    ];
    for (args, want) in cases {
        let mut args = args.to_vec();
        let url = node.url();
        args.extend(["--node", &url]);
        let (ok, out, err) = run(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (ok, out, _) = run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "nothing was published: {out}"
    );
}

/// Two chunks of a sandbox rewritten with the same bytes make one new digest: the commit
/// pins it once and its upload unpins it once, so once the template is DURABLE an evict
/// removes it (a digest pinned twice and unpinned once would stay in the cache for good,
/// out of reach of every evict).
#[test]
fn a_new_digest_written_twice_in_one_commit_is_pinned_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(tmp.path(), 16, &[("f", pattern(1 << 20, 3))]);
    publish(&store.url(), &image, "dup");
    let cache = tmp.path().join("n");
    let node = DaemonProc::start_unix(&store.url(), &cache, &[]);
    overlay(&node, "dup", "dup-sb");
    let (ok, out, err) = sh(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 8M 1M",
            "-c",
            "write -P 0x77 10M 1M",
            "-c",
            "flush",
            &node.nbd_uri("dup-sb"),
        ],
    );
    assert!(ok, "{out}{err}");
    let outcome = commit(&node, "dup-sb", "dup-c");
    println!("commit: {outcome}");
    assert_eq!(
        outcome["new_chunks"], 1,
        "two equal chunks are one new digest"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    while durability(&store, "dup-c") != "DURABLE" {
        assert!(Instant::now() < deadline, "dup-c never became DURABLE");
        std::thread::sleep(Duration::from_millis(200));
    }
    let digest = lazyblk_cache::Digest::of(&vec![0x77u8; 1 << 20]).to_hex();
    let cached = |dir: &Path| -> bool {
        walk(dir)
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == digest.as_str()))
    };
    assert!(cached(&cache), "the new chunk is not in the node's cache");
    let (ok, out, err) = run(&["overlay", "delete", "dup-sb", "--node", &node.url()]);
    assert!(ok, "overlay delete: {out}{err}");
    for id in ["dup-c", "dup"] {
        let (ok, out, err) = run(&["evict", id, "--node", &node.url()]);
        assert!(ok, "evict {id}: {out}{err}");
    }
    assert!(
        !cached(&cache),
        "the new chunk is still cached after its upload and an evict: still pinned"
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
