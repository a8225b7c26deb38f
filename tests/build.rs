//! `lazyblk build --from-dir`: an ext4 image made with mkfs.ext4 -d and published,
//! then read back through a daemon.

mod support;

use support::node::{sh, DaemonProc};
use support::{pattern, run, StoreProc};

#[test]
fn a_directory_becomes_a_published_template() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), b"NAME=built\n").unwrap();
    let blob = pattern(3 << 20, 8);
    std::fs::write(root.join("blob"), &blob).unwrap();
    let store = StoreProc::start();
    let (ok, out, err) = run(&[
        "build",
        "--from-dir",
        root.to_str().unwrap(),
        "--size",
        "32M",
        "--template",
        "built",
        "--store",
        &store.url(),
        "--json",
    ]);
    assert!(ok, "build: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["template"], "built");

    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let copy = tmp.path().join("built.img");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("built"), copy.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = sh("e2fsck", &["-fn", copy.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = sh("dumpe2fs", &["-h", copy.to_str().unwrap()]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("Block size:") && l.trim_end().ends_with("4096")),
        "{out}"
    );
    let got = std::process::Command::new("debugfs")
        .args(["-R", "cat /blob", copy.to_str().unwrap()])
        .output()
        .unwrap()
        .stdout;
    assert!(got == blob);

    // Too small, or no such directory: clear errors, nothing published.
    let (ok, _, err) = run(&[
        "build",
        "--from-dir",
        root.to_str().unwrap(),
        "--size",
        "1M",
        "--template",
        "tiny",
        "--store",
        &store.url(),
    ]);
    assert!(!ok && err.contains("mkfs.ext4"), "{err}");
    let (ok, _, err) = run(&[
        "build",
        "--from-dir",
        "/nonexistent",
        "--size",
        "8M",
        "--template",
        "none",
        "--store",
        &store.url(),
    ]);
    assert!(!ok && err.contains("not a directory"), "{err}");
    let (ok, out, _) = run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
