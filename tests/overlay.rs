//! Issue 4: copy-on-write overlays for sandboxes over NBD and FUSE, and the FUSE view
//! of templates, checked with loop devices, mount, e2fsck, qemu-io and nbdcopy.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::node::{nbdsh, sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

/// Skips (with a message) when FUSE or loop devices are not usable here.
fn fuse_usable() -> bool {
    let root = unsafe_is_root();
    let ok = Path::new("/dev/fuse").exists() && root;
    if !ok {
        eprintln!("skipping: needs root and /dev/fuse");
    }
    ok
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A source tree with a mix of files, and its ext4 image (128 MiB).
fn tree_and_image(dir: &Path) -> (Vec<(String, Vec<u8>)>, PathBuf) {
    let mut files = vec![("etc/hostname".to_string(), b"sandbox\n".to_vec())];
    for i in 0..40 {
        files.push((
            format!("usr/share/doc/pkg{i}/README"),
            pattern(700 + i * 97, i as u64),
        ));
    }
    for i in 0..6 {
        files.push((
            format!("usr/lib/lib{i}.so"),
            pattern((1 << 20) + i * 4099, 50 + i as u64),
        ));
    }
    let borrowed: Vec<(&str, Vec<u8>)> =
        files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let image = make_ext4(dir, 128, &borrowed);
    (files, image)
}

/// A store with the tree's image published as template `rootfs`.
fn published_rootfs(dir: &Path) -> (StoreProc, Vec<(String, Vec<u8>)>, PathBuf) {
    let store = StoreProc::start();
    let (files, image) = tree_and_image(dir);
    publish(&store.url(), &image, "rootfs");
    (store, files, image)
}

/// Unmounts and detaches on drop, whatever happened.
struct LoopMount {
    device: String,
    mountpoint: PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn new(file: &Path, mountpoint: &Path, read_only: bool) -> LoopMount {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut losetup = vec!["--find", "--show"];
        if read_only {
            losetup.insert(0, "-r");
        }
        let file_s = file.to_str().unwrap();
        losetup.push(file_s);
        let (ok, out, err) = sh("losetup", &losetup);
        assert!(ok, "losetup: {err}");
        let device = out.trim().to_string();
        let mut m = LoopMount {
            device,
            mountpoint: mountpoint.to_path_buf(),
            mounted: false,
        };
        let opts = if read_only { "ro" } else { "rw" };
        let (ok, _, err) = sh(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                opts,
                &m.device,
                mountpoint.to_str().unwrap(),
            ],
        );
        assert!(ok, "mount {opts}: {err}");
        m.mounted = true;
        m
    }

    fn unmount(&mut self) {
        if self.mounted {
            let (ok, _, err) = sh("umount", &[self.mountpoint.to_str().unwrap()]);
            assert!(ok, "umount: {err}");
            self.mounted = false;
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = sh("umount", &["-l", self.mountpoint.to_str().unwrap()]);
        }
        let _ = sh("losetup", &["-d", &self.device]);
    }
}

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn create_overlay(daemon: &DaemonProc, template: &str, sandbox: &str) {
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        template,
        "--sandbox",
        sandbox,
        "--node",
        &daemon.url(),
    ]);
    assert!(ok, "overlay create: {out}{err}");
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fuse_template_file_mounts_read_only_with_every_file_intact() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (store, files, _) = published_rootfs(tmp.path());
    let fuse = tmp.path().join("fuse");
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--fuse", fuse.to_str().unwrap()],
    );
    let file = fuse.join("templates/rootfs");
    wait_for_file(&file);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 128 << 20);

    let mut m = LoopMount::new(&file, &tmp.path().join("mnt"), true);
    for (name, bytes) in &files {
        let got = std::fs::read(tmp.path().join("mnt").join(name)).unwrap();
        assert_eq!(sha(&got), sha(bytes), "{name}");
    }
    m.unmount();
    drop(m);
    assert!(
        store.metric("lazyblk_store_ranges_served_total") > 0.0,
        "the kernel's small reads of the FUSE file fetched blocks, not only chunks"
    );
    // The FUSE reads went through the same cache (small ones as blocks, the rest as
    // whole chunks): NBD then fetched each chunk the FUSE reads did not make local, and
    // every chunk crossed whole once (beside the pages of the block index the small
    // reads needed).
    let served = store.metric("lazyblk_store_chunks_served_total");
    let (ok, _, err) = sh("nbdcopy", &[&daemon.nbd_uri("rootfs"), "null:"]);
    assert!(ok, "{err}");
    let stored = served_chunks_total(&store, "rootfs");
    let pages = support::index_pages(&support::manifest_json(&store.url(), "rootfs"));
    let total = store.metric("lazyblk_store_chunks_served_total");
    assert!(
        total >= stored as f64 && total <= (stored + pages) as f64,
        "{total} objects served for {stored} chunks and {pages} pages"
    );
    assert!(served <= total);
}

fn served_chunks_total(store: &StoreProc, id: &str) -> usize {
    let (_, body) = http_get(&format!("{}/v1/templates/{id}/manifest", store.url())).unwrap();
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c.is_null())
        .count()
}

#[test]
fn a_sandbox_file_mounts_read_write_and_nbd_sees_the_same_bytes() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (store, files, image) = published_rootfs(tmp.path());
    let fuse = tmp.path().join("fuse");
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--fuse", fuse.to_str().unwrap()],
    );
    create_overlay(&daemon, "rootfs", "sb1");
    let file = fuse.join("sandboxes/sb1");
    wait_for_file(&file);

    let mnt = tmp.path().join("mnt");
    let mut m = LoopMount::new(&file, &mnt, false);
    let new_file = pattern(3 << 20, 777);
    std::fs::write(mnt.join("new.bin"), &new_file).unwrap();
    std::fs::write(mnt.join("etc/hostname"), b"changed\n").unwrap();
    std::fs::remove_file(mnt.join("usr/lib/lib0.so")).unwrap();
    m.unmount();
    drop(m);

    let (ok, out, err) = sh("e2fsck", &["-fn", file.to_str().unwrap()]);
    assert!(ok, "e2fsck found problems: {out}{err}");

    // The same bytes through NBD.
    let via_nbd = tmp.path().join("sb1.img");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("sb1"), via_nbd.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(
        std::fs::read(&via_nbd).unwrap() == std::fs::read(&file).unwrap(),
        "NBD and FUSE disagree"
    );
    let (ok, out, _) = sh(
        "debugfs",
        &["-R", "cat /etc/hostname", via_nbd.to_str().unwrap()],
    );
    assert!(ok && out.contains("changed"), "{out}");

    // The template is unchanged.
    let template_copy = tmp.path().join("t.img");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("rootfs"), template_copy.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(
        std::fs::read(&template_copy).unwrap() == std::fs::read(&image).unwrap(),
        "the template changed"
    );
    let mut ro = LoopMount::new(
        &fuse.join("templates/rootfs"),
        &tmp.path().join("mnt-ro"),
        true,
    );
    let originals: BTreeMap<_, _> = files.iter().cloned().collect();
    assert_eq!(
        std::fs::read(tmp.path().join("mnt-ro/etc/hostname")).unwrap(),
        originals["etc/hostname"]
    );
    assert!(tmp.path().join("mnt-ro/usr/lib/lib0.so").exists());
    ro.unmount();

    // Deleting an overlay in use is refused; unused, it goes.
    let (ok, out, _) = run(&["overlay", "list", "--node", &daemon.url()]);
    assert!(ok && out.contains("sb1") && out.contains("rootfs"), "{out}");
    let (ok, _, err) = run(&["overlay", "delete", "sb1", "--node", &daemon.url()]);
    assert!(ok, "{err}");
    assert!(!tmp.path().join("cache/overlays/sb1").exists());
}

#[test]
fn flushed_nbd_writes_survive_sigkill_and_sandboxes_are_isolated() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, image) = published_rootfs(tmp.path());
    let mut daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    create_overlay(&daemon, "rootfs", "sba");
    create_overlay(&daemon, "rootfs", "sbb");

    // qemu-io patterns on A, flushed.
    let a = daemon.nbd_uri("sba");
    let (ok, out, err) = sh(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 1000000 5000",
            "-c",
            "write -z 2M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xcd 1000000 5000",
            "-c",
            "read -P 0 2M 1M",
            &a,
        ],
    );
    assert!(
        ok && !out.contains("Pattern verification failed"),
        "qemu-io: {out}{err}"
    );

    // B does not see A's writes; the template does not either.
    let template_head = std::fs::read(&image).unwrap()[..65536].to_vec();
    let script = "import sys; sys.stdout.write(h.pread(65536, 0).hex())";
    let (ok, b_head, err) = nbdsh(&daemon.nbd_uri("sbb"), script);
    assert!(ok, "{err}");
    assert_eq!(b_head.trim(), hex(&template_head));
    let (ok, t_head, _) = nbdsh(&daemon.nbd_uri("rootfs"), script);
    assert!(ok);
    assert_eq!(t_head.trim(), hex(&template_head));

    // SIGKILL and restart: the flushed writes are there.
    daemon.kill9();
    daemon.restart();
    let (ok, out, err) = sh(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xcd 1000000 5000",
            "-c",
            "read -P 0 2M 1M",
            &daemon.nbd_uri("sba"),
        ],
    );
    assert!(
        ok && !out.contains("Pattern verification failed"),
        "after restart: {out}{err}"
    );
    let (ok, b_head, _) = nbdsh(&daemon.nbd_uri("sbb"), script);
    assert!(ok);
    assert_eq!(b_head.trim(), hex(&template_head));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn nbdcopy_an_image_into_an_overlay_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _) = published_rootfs(tmp.path());
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    create_overlay(&daemon, "rootfs", "sbcopy");
    // Another image of the same size, with other content and holes.
    let other = tmp.path().join("other.img");
    let mut bytes = vec![0u8; 128 << 20];
    let noise = pattern(5 << 20, 4242);
    bytes[7 << 20..12 << 20].copy_from_slice(&noise);
    bytes[100 << 20..100 << 20 | 4096].copy_from_slice(&noise[..4096]);
    std::fs::write(&other, &bytes).unwrap();
    let uri = daemon.nbd_uri("sbcopy");
    let (ok, _, err) = sh("nbdcopy", &[other.to_str().unwrap(), &uri]);
    assert!(ok, "nbdcopy in: {err}");
    let back = tmp.path().join("back.img");
    let (ok, _, err) = sh("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(ok, "nbdcopy out: {err}");
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the overlay did not return the image written into it"
    );
}

#[test]
fn overlay_bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _) = published_rootfs(tmp.path());
    let daemon = DaemonProc::start_unix(&store.url(), &tmp.path().join("cache"), &[]);
    let node = daemon.url();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "overlay",
                "create",
                "nosuch",
                "--sandbox",
                "s1",
                "--node",
                &node,
            ],
            "unknown template",
        ),
        (
            &[
                "overlay",
                "create",
                "rootfs",
                "--sandbox",
                "Bad/Id",
                "--node",
                &node,
            ],
            "invalid",
        ),
        (
            &[
                "overlay",
                "create",
                "rootfs",
                "--sandbox",
                "rootfs",
                "--node",
                &node,
            ],
            "template id",
        ),
        (
            &["overlay", "delete", "ghost", "--node", &node],
            "unknown sandbox",
        ),
    ];
    for (args, want) in cases {
        let (ok, out, err) = run(args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    create_overlay(&daemon, "rootfs", "s2");
    let (ok, _, err) = run(&[
        "overlay",
        "create",
        "rootfs",
        "--sandbox",
        "s2",
        "--node",
        &node,
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    // A write past the end of an overlay is refused, the overlay keeps working.
    let (ok, _, err) = nbdsh(
        &daemon.nbd_uri("s2"),
        "h.pwrite(b'x' * 4096, 128 * 1024 * 1024)",
    );
    assert!(
        !ok && (err.contains("No space") || err.contains("Invalid")),
        "{err}"
    );
    let (ok, _, err) = nbdsh(&daemon.nbd_uri("s2"), "h.pwrite(b'x' * 4096, 0); h.flush()");
    assert!(ok, "{err}");
    // An overlay's template is in use: evict is refused and names the overlay.
    let (ok, _, err) = run(&["evict", "rootfs", "--node", &node]);
    assert!(!ok && err.contains("overlay s2"), "{err}");
}

#[test]
fn a_stale_fuse_mount_from_a_killed_daemon_is_cleared_at_start() {
    if !fuse_usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, image) = published_rootfs(tmp.path());
    let fuse = tmp.path().join("fuse");
    let mut daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--fuse", fuse.to_str().unwrap()],
    );
    wait_for_file(&fuse.join("templates/rootfs"));
    daemon.kill9();
    daemon.restart();
    let file = fuse.join("templates/rootfs");
    wait_for_file(&file);
    let head = std::fs::read(&file).unwrap();
    assert!(head == std::fs::read(&image).unwrap());
    daemon.stop();
    // A clean stop unmounts.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(fuse.to_str().unwrap()),
        "still mounted after a clean stop"
    );
}

#[test]
fn daemon_changes_need_the_write_token_when_one_is_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _, _) = published_rootfs(tmp.path());
    let daemon = DaemonProc::start_unix(
        &store.url(),
        &tmp.path().join("cache"),
        &["--write-token", "s3cret"],
    );
    let node = daemon.url();
    let (ok, _, err) = run(&[
        "overlay",
        "create",
        "rootfs",
        "--sandbox",
        "sb",
        "--node",
        &node,
    ]);
    assert!(!ok && err.contains("write token"), "{err}");
    let (ok, _, err) = run(&[
        "overlay",
        "create",
        "rootfs",
        "--sandbox",
        "sb",
        "--node",
        &node,
        "--token",
        "wrong",
    ]);
    assert!(!ok && err.contains("write token"), "{err}");
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "rootfs",
        "--sandbox",
        "sb",
        "--node",
        &node,
        "--token",
        "s3cret",
    ]);
    assert!(ok, "{out}{err}");
    // Reads need no token.
    let (ok, out, err) = run(&["status", "rootfs", "--node", &node]);
    assert!(ok && out.contains("overlay sb"), "{out}{err}");
}
