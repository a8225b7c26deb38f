//! Issue 9: the holes a bad day finds. Each test reproduces one defect with real
//! clients (nbdcopy, nbdinfo, curl, raw sockets) against the real binary, and checks
//! what a user would: bytes equal, states reached, errors named, resources bounded.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

/// How long a test waits for something the daemon does in the background.
const SETTLE: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn durability(store: &StoreProc, id: &str) -> String {
    let (ok, out, err) = run(&["templates", "--json", "--store", &store.url()]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["template"] == id)
        .map(|t| t["durability"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn nbdcopy_out(node: &DaemonProc, export: &str, to: &Path) -> (bool, String) {
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri(export), to.to_str().unwrap()]);
    (ok, err)
}

fn read_export(node: &DaemonProc, export: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{export}-{}.out", support::free_port()));
    let (ok, err) = nbdcopy_out(node, export, &out);
    assert!(ok, "nbdcopy {export}: {err}");
    std::fs::read(out).unwrap()
}

fn node_info(node: &DaemonProc) -> Value {
    let (status, body) = http_get(&format!("{}/v1/node", node.url())).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A sandbox over `base` whose whole device is overwritten with `image` (flushed).
fn sandbox_with(node: &DaemonProc, base: &str, sandbox: &str, image: &Path) {
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        base,
        "--sandbox",
        sandbox,
        "--node",
        &node.url(),
    ]);
    assert!(ok, "overlay create: {out}{err}");
    let (ok, _, err) = sh(
        "nbdcopy",
        &["--flush", image.to_str().unwrap(), &node.nbd_uri(sandbox)],
    );
    assert!(ok, "nbdcopy into {sandbox}: {err}");
}

/// Defects 1 and 2: a daemon killed after a commit, before its upload, and started again
/// at another address (a rescheduled pod) still finishes the upload: the template
/// becomes DURABLE and a fresh node reads it byte for byte from the store alone.
#[test]
fn a_commit_cut_off_before_its_upload_finishes_after_a_restart_at_a_new_address() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let base = make_ext4(dir.path(), 16, &[("a", pattern(3 << 20, 1))]);
    let next = make_ext4(dir.path(), 16, &[("b", pattern(5 << 20, 2))]);
    publish(&store.url(), &base, "base");
    let cache = dir.path().join("cache");
    let mut node = DaemonProc::start(&store.url(), &cache, &["--upload-delay", "3600"]);
    sandbox_with(&node, "base", "sb", &next);
    let (ok, out, err) = run(&["commit", "sb", "--template", "next", "--node", &node.url()]);
    assert!(ok, "commit: {out}{err}");
    assert_eq!(durability(&store, "next"), "ORIGIN_ONLY");
    node.kill9();
    // Same cache, new HTTP and NBD ports, no upload delay: nothing is keyed by address.
    let node2 = DaemonProc::start(&store.url(), &cache, &[]);
    wait_until("the upload to finish after the restart", || {
        durability(&store, "next") == "DURABLE"
    });
    // The evicted replica refuses nothing now (DURABLE), and a fresh node reads the
    // template from the store alone.
    drop(node2);
    let fresh = DaemonProc::start(&store.url(), &dir.path().join("fresh"), &[]);
    assert!(read_export(&fresh, "next", dir.path()) == std::fs::read(&next).unwrap());
}

/// Defect 1, as a crash trial: SIGKILL at randomized moments of a commit (before, in
/// the middle of and after each of its steps). After each restart the template was
/// either never published, or it is published, becomes DURABLE, and reads back right
/// through a fresh node. No trial may leave a published template that loses bytes.
#[test]
fn commits_killed_at_random_moments_publish_all_or_nothing() {
    let trials: u64 = std::env::var("LAZYBLK_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let base = make_ext4(dir.path(), 16, &[("a", pattern(3 << 20, 1))]);
    let next = make_ext4(dir.path(), 16, &[("b", pattern(9 << 20, 3))]);
    let expected = std::fs::read(&next).unwrap();
    publish(&store.url(), &base, "base");
    let mut published = 0;
    let mut never = 0;
    for trial in 0..trials {
        let cache = dir.path().join(format!("cache-{trial}"));
        // Every other trial holds the upload back a little, so that kills also land
        // between the publish and the upload.
        let delay = if trial % 2 == 1 { "0.3" } else { "0" };
        let mut node = DaemonProc::start(&store.url(), &cache, &["--upload-delay", delay]);
        let sb = format!("sb{trial}");
        let id = format!("next{trial}");
        sandbox_with(&node, "base", &sb, &next);
        let mut commit = support::lazyblk()
            .args(["commit", &sb, "--template", &id, "--node", &node.url()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A spread of kill points: from before the commit reaches the daemon to after
        // its upload has started (a 9 MiB commit takes tens to hundreds of ms here).
        let delay_ms = (trial * 2654435761 % 400) + trial % 7;
        std::thread::sleep(Duration::from_millis(delay_ms));
        node.kill9();
        let _ = commit.wait();
        let restarted = DaemonProc::start(&store.url(), &cache, &[]);
        // Settled at start: either the store has it (and the upload runs) or not.
        let state = {
            let deadline = Instant::now() + SETTLE;
            loop {
                let d = durability(&store, &id);
                if d.is_empty() || d == "DURABLE" {
                    // Give a published one a moment to show up before calling it absent.
                    if !d.is_empty() || Instant::now() + SETTLE - Duration::from_secs(3) > deadline
                    {
                        break d;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "trial {trial}: {id} stuck at {d}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        drop(restarted);
        if state == "DURABLE" {
            published += 1;
            let fresh = DaemonProc::start(
                &store.url(),
                &dir.path().join(format!("fresh-{trial}")),
                &[],
            );
            assert!(
                read_export(&fresh, &id, dir.path()) == expected,
                "trial {trial} (kill after {delay_ms} ms): published template reads back wrong"
            );
        } else {
            never += 1;
        }
    }
    eprintln!("commit crash trials: {trials} trials, {published} published and DURABLE, {never} never published, 0 losses");
    assert_eq!(published + never, trials);
}

/// Defect 3: an idle socket that never finishes the handshake is dropped at the
/// deadline; past the connection cap a client is refused at once; and the listener
/// keeps serving (nbdinfo works) afterwards.
#[test]
fn idle_sockets_are_dropped_and_the_connection_cap_refuses_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 4))]);
    publish(&store.url(), &image, "t");
    let node = DaemonProc::start(
        &store.url(),
        &dir.path().join("cache"),
        &["--nbd-max-connections", "4", "--nbd-handshake-timeout", "1"],
    );
    let addr = format!("127.0.0.1:{}", node.nbd_port);
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            let mut greeting = [0u8; 8];
            s.read_exact(&mut greeting).unwrap();
            assert_eq!(&greeting, b"NBDMAGIC");
            s
        })
        .collect();
    // The fifth is closed at once, without a greeting.
    let mut fifth = TcpStream::connect(&addr).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        fifth.read(&mut buf).unwrap_or(0),
        0,
        "a client past the cap is refused"
    );
    // The idle four are dropped at the handshake deadline.
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let n = s.read_to_end(&mut rest).unwrap_or(0);
        assert!(n < 1024, "an idle client is dropped, not served");
    }
    let (ok, out, err) = sh("nbdinfo", &["--size", &node.nbd_uri("t")]);
    assert!(ok, "nbdinfo after the idle clients: {err}");
    assert_eq!(out.trim(), (8u64 << 20).to_string());
}

/// Defect 3, the listener under a descriptor shortage: with a low descriptor limit and
/// more sockets than it allows, accepts fail; once they close, the daemon serves again
/// (before, the NBD server stopped for good while /healthz said ok).
#[test]
fn the_nbd_listener_survives_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 5))]);
    publish(&store.url(), &image, "t");
    let http_port = support::free_port();
    let nbd_port = support::free_port();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 96 && exec {} daemon --cache {} --store {} --listen 127.0.0.1:{http_port} --nbd 127.0.0.1:{nbd_port} --nbd-handshake-timeout 30",
            support::bin().display(),
            dir.path().join("cache").display(),
            store.url()
        ))
        .env("LAZYBLK_LOG", "error")
        .spawn()
        .unwrap();
    support::wait_http(&format!("http://127.0.0.1:{http_port}/healthz"));
    let addr = format!("127.0.0.1:{nbd_port}");
    // Well past the limit: some of these are accepted, the rest wait in the backlog
    // while accept fails with EMFILE.
    let sockets: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    drop(sockets);
    let uri = format!("nbd://{addr}/t");
    let mut ok = false;
    let deadline = Instant::now() + SETTLE;
    while !ok && Instant::now() < deadline {
        ok = sh("nbdinfo", &["--size", &uri]).0;
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ok,
        "the NBD listener serves again once descriptors are free"
    );
}

/// The daemon's resident memory in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Defect 4: ten connections that each send 80 reads of 1 MiB and never read the
/// replies no longer take the daemon to 680 MiB: the node-wide budget stops reading
/// requests instead (before: per connection only, 64 MiB each).
#[test]
fn clients_that_never_read_replies_cannot_exhaust_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("f", pattern(6 << 20, 6))]);
    publish(&store.url(), &image, "t");
    let node = DaemonProc::start(&store.url(), &dir.path().join("cache"), &[]);
    read_export(&node, "t", dir.path());
    let pid = node.pid();
    let before = rss(pid);
    let addr = format!("127.0.0.1:{}", node.nbd_port);
    let mut conns = Vec::new();
    for c in 0..10u64 {
        let mut s = TcpStream::connect(&addr).unwrap();
        nbd::client::handshake(&mut s, b"t").unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        for i in 0..80u64 {
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
            req.extend_from_slice(&(c * 1000 + i).to_be_bytes());
            req.extend_from_slice(&((i % 7) << 20).to_be_bytes());
            req.extend_from_slice(&(1u32 << 20).to_be_bytes());
            if s.write_all(&req).is_err() {
                break; // the server stopped reading: back-pressure
            }
        }
        conns.push(s);
    }
    std::thread::sleep(Duration::from_secs(3));
    let peak = rss(pid);
    drop(conns);
    eprintln!(
        "RSS before {} MiB, with 10 greedy clients {} MiB",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak < before + (300 << 20),
        "resident memory grew from {} to {} MiB",
        before >> 20,
        peak >> 20
    );
    let (ok, _, err) = sh("nbdinfo", &["--size", &node.nbd_uri("t")]);
    assert!(ok, "the daemon still serves: {err}");
}

/// Defect 5: with the cache on a tiny file system, reads still get the verified bytes
/// (the cache reports DEGRADED once instead of failing them with EIO).
#[test]
fn a_full_cache_disk_does_not_fail_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 48, &[("f", pattern(40 << 20, 7))]);
    publish(&store.url(), &image, "t");
    let cache = dir.path().join("small");
    std::fs::create_dir_all(&cache).unwrap();
    let (ok, _, err) = sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=12m",
            "tmpfs",
            cache.to_str().unwrap(),
        ],
    );
    assert!(ok, "mounting a small tmpfs (run as root): {err}");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = sh("umount", &["-l", self.0.to_str().unwrap()]);
        }
    }
    let _unmount = Unmount(cache.clone());
    let node = DaemonProc::start(&store.url(), &cache, &[]);
    let bytes = read_export(&node, "t", dir.path());
    assert!(
        bytes == std::fs::read(&image).unwrap(),
        "bytes read with a full cache disk"
    );
    let info = node_info(&node);
    assert_eq!(info["cache_degraded"], true, "{info}");
    assert!(info["cache_write_failures"].as_u64().unwrap() > 0);
    assert_eq!(node.metric("lazyblk_cache_degraded"), 1.0);
}

/// Defect 6: with no --nbd the daemon listens on a unix socket of mode 0660 in its
/// cache directory, and another user cannot connect to it.
#[test]
fn the_default_nbd_listener_is_a_private_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 8))]);
    publish(&store.url(), &image, "t");
    let cache = dir.path().join("cache");
    let http_port = support::free_port();
    let mut child = support::lazyblk()
        .args([
            "daemon",
            "--cache",
            cache.to_str().unwrap(),
            "--store",
            &store.url(),
        ])
        .args(["--listen", &format!("127.0.0.1:{http_port}")])
        .spawn()
        .unwrap();
    support::wait_http(&format!("http://127.0.0.1:{http_port}/healthz"));
    let sock = cache.join("nbd.sock");
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let uri = format!("nbd+unix:///t?socket={}", sock.display());
    let (ok, out, err) = sh("nbdinfo", &["--size", &uri]);
    assert!(ok, "the owner connects: {err}");
    assert_eq!(out.trim(), (8u64 << 20).to_string());
    // Let the other user reach the directory, so only the socket's mode decides.
    for p in [dir.path(), cache.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (ok, _, err) = sh(
        "setpriv",
        &[
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "nbdinfo",
            "--size",
            &uri,
        ],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(!ok, "uid 65534 must not connect to the NBD socket");
    assert!(err.contains("ermission") || err.contains("EACCES"), "{err}");
}

/// Records the Authorization header of each request and answers 404.
fn recording_origin() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let auth = head
                .lines()
                .find_map(|l| l.strip_prefix("authorization:"))
                .unwrap_or("")
                .trim()
                .to_string();
            record.lock().unwrap().push(auth);
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    (url, seen)
}

/// Defect 7: the store's read token goes to the store alone; an origin named in a
/// manifest gets the peer token (or nothing).
#[test]
fn the_read_token_is_never_sent_to_an_origin() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start_with(&["--read-token", "rtok"]);
    let image = make_ext4(dir.path(), 8, &[("f", pattern(2 << 20, 9))]);
    publish(&store.url(), &image, "t");
    // The same chunks under another id whose manifest names an origin we control.
    let (status, body) = http_get(&format!("{}/v1/templates/t/manifest", store.url())).unwrap();
    assert_eq!(status, 200);
    let (origin, seen) = recording_origin();
    let mut manifest: Value = serde_json::from_str(&body).unwrap();
    manifest["template"] = "t2".into();
    manifest["origins"] = serde_json::json!([origin]);
    let path = dir.path().join("t2.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sf",
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", path.display()),
            &format!("{}/v1/templates/t2/manifest", store.url()),
        ],
    );
    assert!(ok, "publishing t2: {out}{err}");
    let node = DaemonProc::start(
        &store.url(),
        &dir.path().join("cache"),
        &["--read-token", "rtok", "--peer-token", "ptok"],
    );
    assert!(read_export(&node, "t2", dir.path()) == std::fs::read(&image).unwrap());
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the origin was asked first");
    for auth in &seen {
        assert!(
            !auth.contains("rtok"),
            "the store's read token went to an origin: {auth}"
        );
        assert_eq!(auth, "bearer ptok", "origins get the peer token");
    }
}

/// The file of a cached chunk, under the daemon's cache directory.
fn first_cached_chunk(cache: &Path) -> std::path::PathBuf {
    let chunks = cache.join("chunks");
    for shard in std::fs::read_dir(chunks).unwrap().flatten() {
        if let Some(f) = std::fs::read_dir(shard.path()).unwrap().flatten().next() {
            return f.path();
        }
    }
    panic!("no cached chunk under {}", cache.display());
}

fn corrupt(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"BAD!", 100).unwrap();
    f.sync_all().unwrap();
}

/// Defect 8: a cached chunk overwritten on disk is caught the first time the daemon
/// opens it (dropped, counted, fetched again), and `lazyblk scrub` finds one that a
/// running daemon already has open.
#[test]
fn corrupt_cached_chunks_are_dropped_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 16, &[("f", pattern(6 << 20, 10))]);
    let expected = std::fs::read(&image).unwrap();
    publish(&store.url(), &image, "t");
    let cache = dir.path().join("cache");
    let mut node = DaemonProc::start(&store.url(), &cache, &[]);
    assert!(read_export(&node, "t", dir.path()) == expected);
    node.stop();
    corrupt(&first_cached_chunk(&cache));
    node.restart();
    assert!(
        read_export(&node, "t", dir.path()) == expected,
        "bad bytes served"
    );
    assert_eq!(node.metric("lazyblk_cache_corrupt_files"), 1.0);
    // Now while the daemon runs (the file is open and was verified): scrub finds it.
    corrupt(&first_cached_chunk(&cache));
    let (ok, out, err) = run(&["scrub", "--node", &node.url(), "--json"]);
    assert!(ok, "scrub: {out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["dropped"].as_array().unwrap().len(), 1, "{report}");
    assert!(read_export(&node, "t", dir.path()) == expected);
}

/// Defect 8, the store: a corrupted stored chunk is found by `scrub --store` and
/// deleted, and a correct PUT replaces a corrupt copy (before: "stored": false).
#[test]
fn a_corrupt_store_chunk_is_repaired_by_put_and_found_by_scrub() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let bytes = pattern(1 << 20, 11);
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let chunk = dir.path().join("chunk");
    std::fs::write(&chunk, &bytes).unwrap();
    let url = format!("{}/v1/chunks/{digest}", store.url());
    let put = || {
        sh(
            "curl",
            &[
                "-sf",
                "-X",
                "PUT",
                "--data-binary",
                &format!("@{}", chunk.display()),
                &url,
            ],
        )
    };
    let (ok, out, err) = put();
    assert!(ok, "{out}{err}");
    let stored = store.root().join("chunks").join(&digest[..2]).join(&digest);
    corrupt(&stored);
    let (ok, out, err) = put();
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("\"stored\":true"),
        "a correct PUT replaces a corrupt copy: {out}"
    );
    assert!(std::fs::read(&stored).unwrap() == bytes);
    corrupt(&stored);
    let (ok, out, err) = run(&["scrub", "--store", &store.url(), "--json"]);
    assert!(ok, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["dropped"][0], digest.as_str(), "{report}");
    assert!(!stored.exists());
}

/// Defect 9: a request whose headers never finish is dropped (before: open 45 s and
/// more); NBD_OPT_LIST does not cost a store request each; `bearer` in lower case works.
#[test]
fn http_servers_drop_unfinished_requests_and_lists_are_cached() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start_with(&["--write-token", "wtok"]);
    let image = make_ext4(dir.path(), 8, &[("f", pattern(1 << 20, 12))]);
    let (ok, out, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "t",
        "--store",
        &store.url(),
        "--write-token",
        "wtok",
    ]);
    assert!(ok, "{out}{err}");
    let mut s = TcpStream::connect(store.url().trim_start_matches("http://")).unwrap();
    s.write_all(b"GET /v1/templates HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "an unfinished request is dropped"
    );

    let node = DaemonProc::start(&store.url(), &dir.path().join("cache"), &[]);
    let listings = || {
        store.metric("lazyblk_store_http_requests_total{route=\"/v1/templates\",status=\"200\"}")
    };
    let before = listings();
    for _ in 0..20 {
        let (ok, _, err) = sh("nbdinfo", &["--list", &node.nbd_uri("")]);
        assert!(ok, "nbdinfo --list: {err}");
    }
    let asked = listings() - before;
    assert!(asked < 20.0, "20 lists asked the store {asked} times");

    let (ok, out, err) = sh(
        "curl",
        &[
            "-sf",
            "-X",
            "DELETE",
            "-H",
            "authorization: bearer wtok",
            &format!("{}/v1/templates/t", store.url()),
        ],
    );
    assert!(ok, "lower-case bearer: {out}{err}");
}
