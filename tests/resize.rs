//! `lazyblk resize`: a template grown into a new one through e2fsck and resize2fs on a
//! scratch overlay, sharing every chunk resize2fs did not touch.

mod support;

use std::path::Path;

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{make_ext4, pattern, run, StoreProc};

fn fuse_usable() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let ok = root && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}

#[test]
fn a_template_grows_into_a_new_one_that_shares_its_chunks() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let blob = pattern(5 << 20, 31);
    let image = make_ext4(
        tmp.path(),
        64,
        &[
            ("data/blob", blob.clone()),
            ("etc/motd", b"small\n".to_vec()),
        ],
    );
    let (ok, _, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "small",
        "--store",
        &store.url(),
    ]);
    assert!(ok, "{err}");
    let fuse = tmp.path().join("fuse");
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--fuse", fuse.to_str().unwrap()],
    );
    let uploaded_before = store.metric("lazyblk_store_chunks_uploaded_total");

    let (ok, out, err) = run(&[
        "resize",
        "small",
        "--size",
        "256M",
        "--template",
        "big",
        "--json",
        "--node",
        &daemon.url(),
    ]);
    assert!(ok, "resize: {out}{err}");
    let outcome: Value = serde_json::from_str(&out).unwrap();
    println!("{outcome}");
    assert_eq!(outcome["new_size"], 256 << 20);
    assert_eq!(outcome["commit"]["parent"], "small");
    let new_chunks = outcome["commit"]["new_chunks"].as_u64().unwrap();
    assert!(
        new_chunks > 0 && new_chunks < 64,
        "resize2fs touches a few chunks, not the template: {outcome}"
    );

    // The new template: 256 MiB, a clean file system of that size, the same files.
    let copy = tmp.path().join("big.img");
    let (ok, _, err) = sh("nbdcopy", &[&daemon.nbd_uri("big"), copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 256 << 20);
    let (ok, out, err) = sh("e2fsck", &["-fn", copy.to_str().unwrap()]);
    assert!(ok, "e2fsck of the grown template: {out}{err}");
    let (ok, out, _) = sh("dumpe2fs", &["-h", copy.to_str().unwrap()]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("Block count:") && l.trim_end().ends_with(" 65536")),
        "{out}"
    );
    let got = std::process::Command::new("debugfs")
        .args(["-R", "cat /data/blob", copy.to_str().unwrap()])
        .output()
        .unwrap()
        .stdout;
    assert!(got == blob, "a file changed in the resize");

    // The old template is unchanged; the scratch overlay is gone.
    let old = tmp.path().join("small.img");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("small"), old.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(std::fs::read(&old).unwrap() == std::fs::read(&image).unwrap());
    let (ok, list, _) = run(&["overlay", "list", "--json", "--node", &daemon.url()]);
    assert!(ok && list.trim() == "[]", "{list}");

    // Only the changed chunks go to the store.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.metric("lazyblk_store_chunks_uploaded_total") - uploaded_before < new_chunks as f64
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the resize's chunks were not uploaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        (store.metric("lazyblk_store_chunks_uploaded_total") - uploaded_before) as u64,
        new_chunks
    );

    // Bad input: clear errors, nothing published.
    let node = daemon.url();
    let cases: [(&[&str], &str); 4] = [
        (
            &["resize", "small", "--size", "32M", "--template", "smaller"],
            "shrinking is not supported",
        ),
        (
            &["resize", "small", "--size", "512M", "--template", "big"],
            "already exists",
        ),
        (
            &["resize", "nosuch", "--size", "512M", "--template", "x2"],
            "unknown template",
        ),
        (
            &["resize", "small", "--size", "300000001", "--template", "x3"],
            "multiples of 4096",
        ),
    ];
    for (args, want) in cases {
        let mut args = args.to_vec();
        args.extend(["--node", &node]);
        let (ok, out, err) = run(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn resize_without_a_fuse_mount_says_what_it_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(tmp.path(), 16, &[("a", b"a".to_vec())]);
    let (ok, _, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "t",
        "--store",
        &store.url(),
    ]);
    assert!(ok, "{err}");
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let (ok, _, err) = run(&[
        "resize",
        "t",
        "--size",
        "32M",
        "--template",
        "t2",
        "--node",
        &daemon.url(),
    ]);
    assert!(!ok && err.contains("--fuse"), "{err}");
}
