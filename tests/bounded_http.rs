//! Issue 23, findings 3 to 5: the daemon's chunk endpoints serve only a fleet, only the
//! chunks of templates it knows, with the peer token when the store is protected;
//! peer responses stream with bytes in flight bounded node-wide; request bodies have a
//! deadline and a minimum rate, a 401 does not wait for the body, and a store under a
//! low descriptor limit keeps answering /healthz while slow clients hold connections.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::*;

/// `(index, digest, len)` of every stored chunk of `id` in the store's manifest.
fn stored_chunks(store: &str, id: &str) -> Vec<(usize, String, u64)> {
    let m = manifest_json(store, id);
    let size = m["size"].as_u64().unwrap();
    let chunk = m["chunk_size"].as_u64().unwrap();
    m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let d = d.as_str()?;
            Some((i, d.to_string(), (size - i as u64 * chunk).min(chunk)))
        })
        .collect()
}

/// `curl` of `url` with `headers`: (HTTP status, body bytes).
fn curl(url: &str, headers: &[&str]) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("body");
    let mut args = vec![
        "-s".to_string(),
        "--max-time".into(),
        "30".into(),
        "-o".into(),
        out.display().to_string(),
        "-w".into(),
        "%{http_code}".into(),
    ];
    for h in headers {
        args.push("-H".into());
        args.push(h.to_string());
    }
    args.push(url.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, code, _) = sh("curl", &args);
    let body = std::fs::read(&out).unwrap_or_default();
    (code.trim().parse().unwrap_or(0), body)
}

/// The start of a body, for a failure message (a chunk's bytes are not text).
fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// Whether the daemon's cache directory holds a file named `digest`.
fn cached(cache: &std::path::Path, digest: &str) -> bool {
    cache
        .join("chunks")
        .join(&digest[..2])
        .join(digest)
        .exists()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Finding 3: a daemon with the store's read token was an open proxy to the protected
/// store. Now a node outside a fleet serves no chunks, a fleet member with a read token
/// needs a peer token to start, and an owner fetches only chunks named by a manifest it
/// knows, at their place in it.
#[test]
fn peer_endpoints_serve_only_a_fleet_and_only_known_templates() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start_with(&["--write-token", "w", "--read-token", "r"]);
    let image = make_ext4(dir.path(), 8, &[("f", pattern(3 << 20, 31))]);
    let (ok, out, err) = run(&[
        "publish",
        image.to_str().unwrap(),
        "--template",
        "t",
        "--store",
        &store.url(),
        "--write-token",
        "w",
    ]);
    assert!(ok, "publish: {out}{err}");
    let chunks = stored_chunks(&store.url(), "t");
    let (index, digest, len) = chunks[0].clone();
    // A chunk in the store that no manifest names.
    let stray = pattern(1 << 20, 77);
    let stray_digest = lazyblk_cache::Digest::of(&stray).to_string();
    let stray_file = dir.path().join("stray");
    std::fs::write(&stray_file, &stray).unwrap();
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Authorization: Bearer w",
            "--data-binary",
            &format!("@{}", stray_file.display()),
            &format!("{}/v1/chunks/{stray_digest}", store.url()),
        ],
    );
    assert!(ok, "putting a stray chunk: {out}{err}");

    // Outside a fleet: neither chunk endpoint serves anything, and nothing is fetched.
    let alone_cache = dir.path().join("alone");
    let alone = DaemonProc::start(&store.url(), &alone_cache, &["--read-token", "r"]);
    let peer_url = |node: &DaemonProc, d: &str, l: u64, i: usize| {
        format!(
            "{}/v1/peer/chunks/{d}?len={l}&template=t&index={i}",
            node.url()
        )
    };
    let (status, body) = curl(&peer_url(&alone, &digest, len, index), &[]);
    assert_eq!(
        status,
        403,
        "a node outside a fleet serves no peer: {}",
        text(&body)
    );
    let (status, _) = curl(&format!("{}/v1/chunks/{digest}", alone.url()), &[]);
    assert_eq!(status, 403, "nor the chunks it holds");
    assert!(
        !cached(&alone_cache, &digest),
        "the refused request fetched the chunk"
    );
    drop(alone);

    // A member with the store's read token and no peer token refuses to start.
    let port = free_port();
    let mut child = lazyblk()
        .arg("daemon")
        .arg("--cache")
        .arg(dir.path().join("open"))
        .args(["--store", &store.url(), "--read-token", "r"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--nbd", &format!("127.0.0.1:{}", free_port())])
        .args(["--advertise", &format!("http://127.0.0.1:{port}")])
        .env_remove("LAZYBLK_PEER_TOKEN")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = status.expect("a member with --read-token and no --peer-token kept running");
    assert!(!status.success());
    assert!(
        stderr.contains("--peer-token"),
        "the refusal names the fix: {stderr}"
    );

    // A member with both tokens: the peer token is needed, and only chunks of a known
    // template at their index are fetched for a peer.
    let member_cache = dir.path().join("member");
    let member = DaemonProc::start_member(
        &store.url(),
        &member_cache,
        &["--read-token", "r", "--peer-token", "p"],
    );
    let (status, _) = curl(&format!("{}/v1/templates/t", member.url()), &[]);
    assert_eq!(status, 200);
    let (status, _) = curl(&peer_url(&member, &digest, len, index), &[]);
    assert_eq!(status, 401, "no peer token");
    let auth = "Authorization: Bearer p";
    let (status, body) = curl(&peer_url(&member, &stray_digest, 1 << 20, index), &[auth]);
    assert_eq!(
        status,
        404,
        "a digest no known manifest names: {}",
        text(&body)
    );
    let (status, _) = curl(
        &format!(
            "{}/v1/peer/chunks/{stray_digest}?len={}",
            member.url(),
            1 << 20
        ),
        &[auth],
    );
    assert!(
        status == 400 || status == 404,
        "a request without its template: {status}"
    );
    assert!(
        !cached(&member_cache, &stray_digest),
        "the stray chunk was fetched and cached"
    );
    let (status, body) = curl(&peer_url(&member, &digest, len + 4096, index), &[auth]);
    assert_eq!(
        status,
        400,
        "a wrong length is the asker's error: {}",
        text(&body)
    );
    let (status, body) = curl(&peer_url(&member, &digest, len, index), &[auth]);
    assert_eq!(status, 200);
    let want = std::fs::read(&image).unwrap();
    let start = index * (1 << 20);
    assert!(
        body == want[start..start + len as usize],
        "the owner served other bytes"
    );
    assert!(cached(&member_cache, &digest));
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

/// Finding 4: 400 peer requests whose askers never read took an owner from 22 to
/// 437 MB (a whole chunk held per request). Now responses stream from the chunk file
/// and the bytes in flight over all of them are bounded.
#[test]
fn peers_that_never_read_cannot_exhaust_an_owners_memory() {
    const CONNECTIONS: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 48, &[("f", pattern(40 << 20, 41))]);
    publish(&store.url(), &image, "t");
    let chunks = stored_chunks(&store.url(), "t");
    let node = DaemonProc::start_member(&store.url(), &dir.path().join("n"), &[]);
    let (ok, out, err) = run(&["warm", "t", "--wait", "--node", &node.url()]);
    assert!(ok, "warm: {out}{err}");
    let pid = node.pid();
    std::thread::sleep(Duration::from_secs(1));
    let before = rss(pid);
    let addr = format!("127.0.0.1:{}", node.http_port);
    let mut conns = Vec::new();
    for c in 0..CONNECTIONS {
        let (index, digest, len) = &chunks[c % chunks.len()];
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /v1/peer/chunks/{digest}?len={len}&template=t&index={index} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )
        .unwrap();
        conns.push(s);
    }
    // Sample while the connections stay open and unread.
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        peak = peak.max(rss(pid));
    }
    drop(conns);
    eprintln!(
        "RSS before {} MiB, with {CONNECTIONS} peers that never read {} MiB",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak < before + (160 << 20),
        "resident memory grew from {} to {} MiB",
        before >> 20,
        peak >> 20
    );
    // The budget comes back: a peer that reads gets its chunk.
    let (index, digest, len) = &chunks[0];
    let url = format!(
        "{}/v1/peer/chunks/{digest}?len={len}&template=t&index={index}",
        node.url()
    );
    let mut body = Vec::new();
    wait_until("a peer request answered 200", || {
        let (status, b) = curl(&url, &[]);
        body = b;
        status == 200
    });
    let want = std::fs::read(&image).unwrap();
    let start = index * (1 << 20);
    assert!(body == want[start..start + *len as usize]);
}

/// A raw connection that sent a request's headers and one byte of its body.
fn slow_body(addr: &str, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{request}\r\nHost: {addr}\r\nContent-Length: 1048576\r\n\r\nX"
    )
    .unwrap();
    s
}

/// Reads until the server closes the connection; false if it is still open at `deadline`.
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A store under `prlimit --nofile=128`.
struct LimitedStore {
    child: Child,
    url: String,
    _root: tempfile::TempDir,
}

impl Drop for LimitedStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn limited_store(extra: &[&str]) -> LimitedStore {
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("prlimit")
        .arg("--nofile=128:128")
        .arg(bin())
        .arg("store")
        .arg("--root")
        .arg(root.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("LAZYBLK_LOG", "warn")
        .env_remove("LAZYBLK_WRITE_TOKEN")
        .env_remove("LAZYBLK_READ_TOKEN")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{url}/healthz"));
    LimitedStore {
        child,
        url,
        _root: root,
    }
}

/// Finding 5: 140 connections that sent headers and one byte held a store's
/// descriptors for 75 s and more, and under a 128-descriptor limit /healthz stopped
/// answering. Now a 401 goes out without waiting for the body, a body that stalls is
/// cut off, connections are bounded below the descriptor limit, and /healthz answers.
#[test]
fn slow_bodies_cannot_hold_a_stores_descriptors() {
    const SLOW: usize = 140;
    let store = limited_store(&["--write-token", "w"]);
    let addr = store.url.trim_start_matches("http://").to_string();
    let digest = "ab".repeat(32);
    let mut conns = Vec::new();
    for i in 0..SLOW {
        // Half without the token (401 at once), half with it (cut off when the body stalls).
        let auth = if i % 2 == 0 {
            ""
        } else {
            "\r\nAuthorization: Bearer w"
        };
        conns.push(slow_body(
            &addr,
            &format!("PUT /v1/chunks/{digest} HTTP/1.1{auth}"),
        ));
    }
    let (status, body) = curl(&format!("{}/healthz", store.url), &[]);
    assert_eq!(
        (status, text(&body).trim().to_string()),
        (200, "ok".to_string()),
        "/healthz answers while {SLOW} slow clients are connected"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let open = conns
        .iter_mut()
        .map(|s| closed_by(s, deadline))
        .filter(|closed| !closed)
        .count();
    assert_eq!(
        open, 0,
        "slow connections still open after the body deadline"
    );
    // The store still takes a real upload.
    let dir = tempfile::tempdir().unwrap();
    let bytes = pattern(1 << 20, 5);
    let file = dir.path().join("c");
    std::fs::write(&file, &bytes).unwrap();
    let d = lazyblk_cache::Digest::of(&bytes).to_string();
    let (ok, out, err) = sh(
        "curl",
        &[
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Authorization: Bearer w",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("{}/v1/chunks/{d}", store.url),
        ],
    );
    assert!(ok, "an upload after the slow clients: {out}{err}");
}

/// Finding 5 on the daemon's server: a request body that stalls after one byte is cut
/// off (the connection closed), and the daemon answers meanwhile.
#[test]
fn a_stalled_body_is_cut_off_by_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let node = DaemonProc::start(&store.url(), &dir.path().join("n"), &[]);
    let addr = format!("127.0.0.1:{}", node.http_port);
    let mut s = slow_body(
        &addr,
        "POST /v1/overlays HTTP/1.1\r\nContent-Type: application/json",
    );
    let (status, _) = curl(&format!("{}/healthz", node.url()), &[]);
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    assert!(
        closed_by(&mut s, deadline),
        "the stalled request is still open"
    );
    let v: Value = serde_json::from_slice(&curl(&format!("{}/v1/node", node.url()), &[]).1)
        .unwrap_or(Value::Null);
    assert!(!v.is_null(), "the daemon still answers");
}
