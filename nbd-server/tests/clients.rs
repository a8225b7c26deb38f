//! The server against real NBD clients (libnbd's nbdinfo, nbdcopy and nbdsh, QEMU's
//! qemu-io), over TCP and a unix socket. A client that is not installed is skipped
//! with a message.

mod support;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use lazyblk_nbd::{Listener, ServerConfig};
use support::{fixture_bytes, MemoryExports, TestServer, HOLE, SIZE};
use tokio::process::Command;

/// Longest any one client run may take before the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `tool` runs; prints a skip message when it does not.
async fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .await
        .is_ok_and(|out| out.status.success());
    if !found {
        println!("skipping: {tool} is not installed");
    }
    found
}

/// Runs `program args` and returns its output, failing the test if it fails.
async fn run(program: &str, args: &[&str]) -> Output {
    run_with(Command::new(program).args(args)).await
}

async fn run_with(command: &mut Command) -> Output {
    let described = format!("{command:?}");
    let output = tokio::time::timeout(CLIENT_TIMEOUT, command.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{described} timed out"))
        .unwrap_or_else(|error| panic!("{described}: {error}"));
    assert!(
        output.status.success(),
        "{described} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdinfo_reports_size_and_flags() {
    if !have("nbdinfo").await {
        return;
    }
    let server = TestServer::start(MemoryExports::fixture()).await;
    let output = run("nbdinfo", &["--json", &server.uri("ro")]).await;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let export = &info["exports"][0];
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["structured"], true);
    assert_eq!(export["export-size"], SIZE);
    assert_eq!(export["is_read_only"], true);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_cache"], true);
    assert_eq!(export["can_trim"], false);
    assert_eq!(export["contexts"][0], "base:allocation");

    let output = run("nbdinfo", &["--json", &server.uri("rw")]).await;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let export = &info["exports"][0];
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_fua"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdinfo_lists_exports() {
    if !have("nbdinfo").await {
        return;
    }
    let server = TestServer::start(MemoryExports::fixture()).await;
    let output = run("nbdinfo", &["--list", "--json", &server.uri("")]).await;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let mut names: Vec<_> = info["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| (e["export-name"].clone(), e["description"].clone()))
        .collect();
    names.sort_by_key(|(name, _)| name.to_string());
    assert_eq!(
        names,
        vec![
            ("ro".into(), "read-only template".into()),
            ("rw".into(), "writable sandbox".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdinfo_map_shows_the_holes() {
    if !have("nbdinfo").await {
        return;
    }
    let server = TestServer::start(MemoryExports::fixture()).await;
    let output = run("nbdinfo", &["--map", &server.uri("ro")]).await;
    let map = String::from_utf8(output.stdout).expect("UTF-8");
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|line| {
            let fields: Vec<_> = line.split_whitespace().collect();
            (
                fields[0].parse().expect("offset"),
                fields[1].parse().expect("length"),
                fields[3].to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, HOLE.start, "data".to_owned()),
            (HOLE.start, HOLE.end - HOLE.start, "hole,zero".to_owned()),
            (HOLE.end, SIZE - (64 << 10) - HOLE.end, "data".to_owned()),
            (SIZE - (64 << 10), 64 << 10, "hole,zero".to_owned()),
        ],
        "{map}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdcopy_copies_the_exact_bytes() {
    if !have("nbdcopy").await {
        return;
    }
    let server = TestServer::start(MemoryExports::fixture()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("copy.img");
    let target = target.to_str().expect("UTF-8 path");
    run("nbdcopy", &[&server.uri("ro"), target]).await;
    assert_eq!(std::fs::read(target).expect("copy"), fixture_bytes());

    // And back into the writable export, in small pipelined requests.
    let source = dir.path().join("source.img");
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    std::fs::write(&source, &pattern).expect("source");
    let source = source.to_str().expect("UTF-8 path");
    run(
        "nbdcopy",
        &[
            "--request-size=16384",
            "--requests=32",
            "--flush",
            source,
            &server.uri("rw"),
        ],
    )
    .await;
    assert_eq!(server.exports.get("rw").bytes(), pattern);
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_io_writes_and_reads_back_a_pattern() {
    if !have("qemu-io").await {
        return;
    }
    let server = TestServer::start(MemoryExports::fixture()).await;
    let output = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "flush",
            &server.uri("rw"),
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("verification failed"), "{text}");
    let bytes = server.exports.get("rw").bytes();
    assert!(bytes[..65536].iter().all(|&b| b == 0xab));
    assert!(bytes[65536..131072].iter().all(|&b| b == 0));
    assert_eq!(bytes[131072..], fixture_bytes()[131072..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_io_is_refused_writes_on_a_read_only_export() {
    if !have("qemu-io").await {
        return;
    }
    let server = TestServer::start(MemoryExports::fixture()).await;
    let output = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 0 4k", &server.uri("ro")])
        .output()
        .await
        .expect("qemu-io runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        ["read-only", "Permission denied", "Operation not permitted"]
            .iter()
            .any(|refusal| text.contains(refusal)),
        "{text}"
    );
    assert_eq!(server.exports.get("ro").bytes(), fixture_bytes());
}

/// The PATH under which `nbdsh` (a script that runs `python3 -m nbd`) finds a python3
/// with libnbd's bindings; prints a skip message when there is none.
async fn nbdsh_path() -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in ["", "/usr/bin"] {
        let search = if dir.is_empty() {
            path.clone()
        } else {
            format!("{dir}:{path}")
        };
        let ok = Command::new("nbdsh")
            .args(["-n", "-c", "import nbd"])
            .env("PATH", &search)
            .output()
            .await
            .is_ok_and(|out| out.status.success());
        if ok {
            return Some(search);
        }
    }
    println!("skipping: nbdsh (with python3's nbd module) is not installed");
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn nbdsh_reads_with_structured_replies_and_block_status() {
    let Some(path) = nbdsh_path().await else {
        return;
    };
    let server = TestServer::start(MemoryExports::fixture()).await;
    let script = format!(
        r#"
import hashlib
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
chunks = []
buf = h.pread_structured(65536, 12345, lambda buf, offset, status, err: chunks.append((offset, status, len(buf))) or 0)
assert chunks == [(12345, nbd.READ_DATA, 65536)], chunks
print(hashlib.sha256(buf).hexdigest())
extents = []
h.block_status({size}, 0, lambda meta, offset, entries, err: extents.append((meta, entries)) or 0)
print(extents)
h.shutdown()
"#,
        size = SIZE,
    );
    let output = run_with(
        Command::new("nbdsh")
            .args(["--base-allocation", "-u", &server.uri("ro"), "-c", &script])
            .env("PATH", path),
    )
    .await;
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let mut lines = text.lines();
    let digest = lines.next().expect("digest line");
    let expected = sha256_hex(&fixture_bytes()[12345..12345 + 65536]);
    assert_eq!(digest, expected);
    let extents = lines.next().expect("extents line");
    let hole = nbd_state_hole_zero();
    assert_eq!(
        extents,
        format!(
            "[('base:allocation', [{}, 0, {}, {hole}, {}, 0, {}, {hole}])]",
            HOLE.start,
            HOLE.end - HOLE.start,
            SIZE - (64 << 10) - HOLE.end,
            64 << 10
        )
    );
}

fn nbd_state_hole_zero() -> u32 {
    lazyblk_nbd::proto::STATE_HOLE | lazyblk_nbd::proto::STATE_ZERO
}

/// sha256 through the system's `sha256sum`, to compare with Python's hashlib without a
/// hashing crate.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let output = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_serves_and_replaces_a_stale_socket() {
    if !have("nbdinfo").await {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    // A socket file left by a server that died.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    let addr = format!("unix:{}", path.display());
    let listener = Listener::bind(&addr)
        .await
        .expect("bind over the stale socket");
    assert_eq!(listener.to_string(), addr);

    let second = Listener::bind(&addr).await;
    assert!(second.is_err(), "a live socket is never replaced");

    let exports = Arc::new(MemoryExports::fixture());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lazyblk_nbd::serve(
        listener,
        Arc::clone(&exports),
        ServerConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let uri = format!("nbd+unix:///ro?socket={}", path.display());
    let output = run("nbdinfo", &["--size", &uri]).await;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        SIZE.to_string()
    );

    stop.send(()).expect("server running");
    server.await.expect("joined").expect("clean stop");
    assert!(!path.exists(), "the socket file is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regular_file_is_never_replaced_by_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("precious");
    std::fs::write(&path, b"keep me").expect("file");
    let error = Listener::bind(&format!("unix:{}", path.display()))
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
}
