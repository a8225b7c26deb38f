//! Issue 24: peers and origins serve the stored form. An owner sends a peer the chunk's
//! bytes as the store sent them (zstd blocks), streamed from the file it kept, with the
//! encoding named; the reader decodes and verifies them as it would the store's. So a
//! wave of nodes reading a compressible template carries about the template's stored
//! bytes over each node's peer links, not its decoded bytes. A peer that sends wrong
//! encoded bytes is caught, one that dies mid-stream is passed over, and one from before
//! stored forms (decoded bytes, no encoding named) is still read.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{
    http_get, make_ext4, manifest_json, metric_sum, publish_json, StoreProc, BLOCKS_MAGIC,
};

/// Text that compresses about as a root file system does (2.5x to 3x with zstd -3):
/// lines of words and numbers drawn from a small vocabulary.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "usr",
        "lib",
        "share",
        "bin",
        "python3",
        "site-packages",
        "__init__",
        "import",
        "def",
        "return",
        "self",
        "class",
        "config",
        "systemd",
        "locale",
        "include",
        "x86_64",
        "linux",
        "gnu",
        "so",
        "debian",
        "doc",
        "README",
        "version",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = WORDS[(x % WORDS.len() as u64) as usize];
        out.extend_from_slice(word.as_bytes());
        match (x >> 8) % 8 {
            0 => out.extend_from_slice(format!("={}\n", (x >> 16) % 100_000).as_bytes()),
            1 => out.push(b'/'),
            2 => out.push(b'\n'),
            _ => out.push(b' '),
        }
    }
    out.truncate(len);
    out
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn peers_seen(url: &str) -> usize {
    let Ok((200, body)) = http_get(&format!("{url}/v1/node")) else {
        return 0;
    };
    let info: Value = serde_json::from_str(&body).unwrap_or_default();
    info["peers"].as_array().map_or(0, Vec::len)
}

fn sha256_of(path: &Path) -> String {
    let (ok, out, err) = sh("sha256sum", &[path.to_str().unwrap()]);
    assert!(ok, "sha256sum: {err}");
    out.split_whitespace().next().unwrap().to_string()
}

/// A compressible format-3 template of `mib` MiB published as `id`: its image, and its
/// chunks' bytes decoded and as stored (publish's report).
fn compressible_template(dir: &Path, store: &StoreProc, id: &str, mib: u64) -> (PathBuf, f64, f64) {
    let data = compressible(((mib - 8) << 20) as usize, mib);
    let image = make_ext4(dir, mib, &[("usr/share/doc/all.txt", data)]);
    let report = publish_json(&image, id, &store.url(), &[]);
    let raw = report["uploaded_bytes"].as_u64().unwrap() as f64;
    let stored = report["stored_bytes"].as_u64().unwrap() as f64;
    (image, raw, stored)
}

#[test]
fn a_wave_carries_the_stored_form_on_peer_links() {
    const NODES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let (image, raw, stored) = compressible_template(dir.path(), &store, "wave", 48);
    let expected = sha256_of(&image);
    assert!(
        raw / stored > 2.0,
        "the template compresses {:.2}x: not a compressible one",
        raw / stored
    );
    let nodes: Vec<DaemonProc> = (0..NODES)
        .map(|i| DaemonProc::start_member(&store.url(), &dir.path().join(format!("n{i}")), &[]))
        .collect();
    wait_for(
        "every node to see the others",
        Duration::from_secs(60),
        || nodes.iter().all(|n| peers_seen(&n.url()) == NODES - 1),
    );
    let store_before = store.metric("lazyblk_store_bytes_served_total");
    let copies: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let uri = n.nbd_uri("wave");
            let out = dir.path().join(format!("copy{i}"));
            std::thread::spawn(move || {
                let (ok, _, err) = sh("nbdcopy", &[&uri, out.to_str().unwrap()]);
                (ok, err, out)
            })
        })
        .collect();
    for (i, c) in copies.into_iter().enumerate() {
        let (ok, err, out) = c.join().unwrap();
        assert!(ok, "node {i}: nbdcopy: {err}");
        assert_eq!(sha256_of(&out), expected, "node {i} read wrong bytes");
        std::fs::remove_file(out).unwrap();
    }
    let store_ratio = (store.metric("lazyblk_store_bytes_served_total") - store_before) / stored;
    // Bodies each node received from its peers (the per-peer series, summed).
    let received: Vec<f64> = nodes
        .iter()
        .map(|n| metric_sum(&n.url(), "lazyblk_peer_fetched_bytes"))
        .collect();
    let sent: f64 = nodes
        .iter()
        .map(|n| n.metric("lazyblk_peer_bytes_sent_total"))
        .sum();
    let worst = received.iter().cloned().fold(0.0, f64::max) / stored;
    eprintln!(
        "wave of {NODES}: template {:.1} MiB raw, {:.1} MiB stored; store sent {store_ratio:.2}x \
         stored; peer links: {:.1} MiB sent in all, each node received {:?} MiB, the most \
         {worst:.2}x stored",
        raw / 1048576.0,
        stored / 1048576.0,
        sent / 1048576.0,
        received
            .iter()
            .map(|r| (r / 1048576.0 * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
    // The peers carried the wave (each node's share of the owners' chunks)...
    let total_received: f64 = received.iter().sum();
    assert!(
        total_received > stored * (NODES - 1) as f64 * 0.4,
        "peers carried only {total_received} bytes"
    );
    // ... as stored bytes, not decoded ones.
    assert!(
        worst <= 1.1,
        "a node received {worst:.2}x the template's stored bytes over its peer links"
    );
    // (Owners may send more than readers count as received: a read that a hedge
    // answered first drops its peer's body midway.)
}

/// What a fake peer does with a chunk it is asked for.
#[derive(Clone, Copy)]
enum Fake {
    /// A daemon from before stored forms: the decoded chunk, no encoding named.
    Old,
    /// The stored form with one byte flipped inside a block's frame, named zstd-blocks.
    Corrupt,
    /// The stored form's headers and half its bytes, then the connection closes (an
    /// owner that died mid-stream).
    Cut,
    /// Holds no whole chunk (404), and answers ranges of the stored form: its table
    /// right, every byte of its blocks flipped.
    SpoilRanges,
}

/// The stored bytes and decoded bytes of every chunk and index page of `id`, by digest.
fn chunk_bytes(store: &StoreProc, id: &str) -> HashMap<String, (Vec<u8>, Vec<u8>)> {
    let manifest = manifest_json(&store.url(), id);
    let mut digests: Vec<String> = manifest["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    if let Some(pages) = manifest["blocks"]["pages"].as_array() {
        digests.extend(pages.iter().filter_map(|p| p.as_str().map(str::to_string)));
    }
    digests
        .into_iter()
        .map(|d| {
            let path = store.root().join("chunks").join(&d[..2]).join(&d);
            let stored = std::fs::read(&path).unwrap();
            let decoded = if stored.starts_with(&BLOCKS_MAGIC)
                || stored.starts_with(&[0x28, 0xB5, 0x2F, 0xFD])
            {
                let out = std::process::Command::new("zstd")
                    .args(["-dc", path.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "zstd -dc {}", path.display());
                out.stdout
            } else {
                stored.clone()
            };
            (d, (stored, decoded))
        })
        .collect()
}

/// The `Range: bytes=A-B` of a request head, if it has one.
fn asked_range(head: &str) -> Option<(usize, usize)> {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("range:"))?;
    let spec = line.split_once("bytes=")?.1.trim();
    let (first, last) = spec.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// A fake fleet member that answers `/v1/node` and every chunk as `fake` says; its URL.
fn fake_peer(fake: Fake, chunks: HashMap<String, (Vec<u8>, Vec<u8>)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let digest = path
                .strip_prefix("/v1/peer/chunks/")
                .or_else(|| path.strip_prefix("/v1/chunks/"))
                .map(|rest| rest.split('?').next().unwrap_or("").to_string());
            let answer = if path == "/v1/node" {
                let body = br#"{"node_id":"fffffffffffffffe"}"#;
                let mut a = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).into_bytes();
                a.extend_from_slice(body);
                a
            } else if let Some((stored, decoded)) = digest.and_then(|d| chunks.get(&d)) {
                let encoded = stored.starts_with(&BLOCKS_MAGIC);
                match fake {
                    Fake::SpoilRanges => match asked_range(&head) {
                        Some((first, last)) if encoded && last < stored.len() => {
                            let mut body = stored[first..=last].to_vec();
                            let table = 20 + 4 * u32::from_le_bytes(stored[16..20].try_into().unwrap()) as usize;
                            for (at, byte) in (first..).zip(body.iter_mut()) {
                                if at >= table {
                                    *byte ^= 0xff;
                                }
                            }
                            let mut a = format!("HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {first}-{last}/{}\r\nx-lazyblk-chunk-encoding: zstd-blocks\r\nconnection: close\r\n\r\n", body.len(), stored.len()).into_bytes();
                            a.extend_from_slice(&body);
                            a
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                    },
                    Fake::Old => {
                        let mut a = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            decoded.len()
                        )
                        .into_bytes();
                        a.extend_from_slice(decoded);
                        a
                    }
                    Fake::Corrupt | Fake::Cut => {
                        let mut body = stored.clone();
                        let name = if encoded { "zstd-blocks" } else { "raw" };
                        if let Fake::Corrupt = fake {
                            let at = if encoded {
                                let word = |at: usize| {
                                    u32::from_le_bytes(body[at..at + 4].try_into().unwrap())
                                        as usize
                                };
                                20 + 4 * word(16) + word(20) / 2
                            } else {
                                body.len() / 2
                            };
                            body[at] ^= 0xff;
                        }
                        let total = body.len();
                        // A range of it, for a small read (a block of a stored form).
                        let (status, range) = match asked_range(&head) {
                            Some((first, last)) if encoded && last < total => {
                                body = body[first..=last].to_vec();
                                (
                                    "206 Partial Content",
                                    format!("content-range: bytes {first}-{last}/{total}\r\n"),
                                )
                            }
                            _ => ("200 OK", String::new()),
                        };
                        let mut a = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n{range}x-lazyblk-chunk-encoding: {name}\r\nconnection: close\r\n\r\n", body.len()).into_bytes();
                        if let Fake::Cut = fake {
                            body.truncate(body.len() / 2);
                        }
                        a.extend_from_slice(&body);
                        a
                    }
                }
            } else {
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
            };
            let _ = s.write_all(&answer);
            let _ = s.flush();
        }
    });
    url
}

/// A node whose only peer is a `fake` one reads `id` (compressible, format 3): what the
/// node's metrics say of the peer afterwards, once its bytes were checked right.
fn read_beside(fake: Fake) -> (f64, f64, f64, Value) {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let (image, _, _) = compressible_template(dir.path(), &store, "t", 24);
    let peer = fake_peer(fake, chunk_bytes(&store, "t"));
    let node = DaemonProc::start(&store.url(), &dir.path().join("cache"), &["--peers", &peer]);
    wait_for("the node to see its peer", Duration::from_secs(30), || {
        peers_seen(&node.url()) == 1
    });
    // Small reads first (the first block of each chunk of the file: ranges of the stored
    // form, which the peer spoils or cuts too), then the whole template.
    let expected = std::fs::read(&image).unwrap();
    for mib in 4..20 {
        let offset = mib << 20;
        let got = support::pread_4k(&node.nbd_uri("t"), offset).unwrap();
        assert!(got == expected[offset..offset + 4096], "4 KiB at {offset}");
    }
    let out = dir.path().join("out");
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri("t"), out.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert_eq!(
        sha256_of(&out),
        sha256_of(&image),
        "wrong bytes were served"
    );
    // Nothing unverified was cached: the node's scrub finds every chunk file right.
    let (ok, scrub, err) = sh(
        "curl",
        &["-sf", "-X", "POST", &format!("{}/v1/scrub", node.url())],
    );
    assert!(ok, "scrub: {err}");
    let _ = scrub;
    let report = wait_scrub(&node.url());
    let delivered = metric_sum(&node.url(), "lazyblk_peer_fetched_chunks");
    let corrupt = node.metric("lazyblk_verify_failures_total{source=\"peers\",class=\"peer\"}");
    let failed = node.metric("lazyblk_fetch_failures_total{source=\"peers\",class=\"peer\"}")
        + metric_sum(&node.url(), "lazyblk_peer_failures");
    (delivered, corrupt, failed, report)
}

/// The finished scrub's report (`GET /v1/scrub`).
fn wait_scrub(url: &str) -> Value {
    let mut report = Value::Null;
    wait_for("the scrub to finish", Duration::from_secs(60), || {
        let Ok((200, body)) = http_get(&format!("{url}/v1/scrub")) else {
            return false;
        };
        report = serde_json::from_str(&body).unwrap_or_default();
        report["running"] == Value::Bool(false) && report["report"].is_object()
    });
    report
}

#[test]
fn a_peer_that_sends_wrong_encoded_bytes_is_caught() {
    let (_, corrupt, _, scrub) = read_beside(Fake::Corrupt);
    assert!(corrupt >= 1.0, "the peer's bad blocks were not caught");
    assert_eq!(
        scrub["report"]["dropped"].as_array().map(Vec::len),
        Some(0),
        "a bad chunk was cached: {scrub}"
    );
}

#[test]
fn an_owner_that_dies_mid_stream_is_passed_over() {
    let (_, corrupt, failed, scrub) = read_beside(Fake::Cut);
    assert!(
        failed >= 1.0,
        "the cut stream was not counted as the peer's failure"
    );
    assert_eq!(
        corrupt, 0.0,
        "a cut stream is a transport failure, not a corrupt chunk"
    );
    assert_eq!(scrub["report"]["dropped"].as_array().map(Vec::len), Some(0));
}

#[test]
fn a_peer_from_before_stored_forms_is_still_read() {
    let (delivered, corrupt, _, _) = read_beside(Fake::Old);
    assert!(
        delivered >= 1.0,
        "the old peer's decoded chunks were not taken"
    );
    assert_eq!(corrupt, 0.0);
}

/// A node's peers are an honest owner that holds the template's stored forms and a
/// fake that spoils the blocks of every range it serves: the small reads are right, the
/// spoiled ranges are caught and held against the fake alone (its failures count, the
/// honest peer's do not), and the honest peer goes on serving ranges.
#[test]
fn a_peer_that_spoils_ranges_is_passed_over_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let (image, _, _) = compressible_template(dir.path(), &store, "t", 24);
    let expected = std::fs::read(&image).unwrap();
    // A, the only member of the store's fleet, reads it all from the store and keeps
    // the stored form of every chunk.
    let a = DaemonProc::start_member(&store.url(), &dir.path().join("a"), &[]);
    let out = dir.path().join("a.copy");
    let (ok, _, err) = sh("nbdcopy", &[&a.nbd_uri("t"), out.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    let fake = fake_peer(Fake::SpoilRanges, chunk_bytes(&store, "t"));
    let peers = format!("{},{fake}", a.url());
    let b = DaemonProc::start(&store.url(), &dir.path().join("b"), &["--peers", &peers]);
    wait_for("B to see its peers", Duration::from_secs(30), || {
        peers_seen(&b.url()) == 2
    });
    for mib in 4..22 {
        let offset = (mib << 20) + (mib % 7) * 65536;
        let got = support::pread_4k(&b.nbd_uri("t"), offset).unwrap();
        assert!(got == expected[offset..offset + 4096], "4 KiB at {offset}");
    }
    let caught = b.metric("lazyblk_verify_failures_total{source=\"peers\",class=\"peer\"}");
    let fake_failures = b.metric("lazyblk_peer_failures{peer=\"fffffffffffffffe\"}");
    let (status, info) = http_get(&format!("{}/v1/node", a.url())).unwrap();
    assert_eq!(status, 200, "{info}");
    let info: Value = serde_json::from_str(&info).unwrap();
    let honest_id = info["node_id"].as_str().unwrap().to_string();
    let honest_failures = b.metric(&format!("lazyblk_peer_failures{{peer=\"{honest_id}\"}}"));
    let from_peers = b.metric("lazyblk_fetched_blocks_total{source=\"peers\",class=\"peer\"}");
    eprintln!("B: {caught} spoiled ranges caught, fake {fake_failures} failures, honest {honest_failures}, {from_peers} ranges from peers");
    assert!(caught >= 1.0, "no spoiled range was caught");
    assert!(
        fake_failures >= 1.0,
        "the spoiled ranges were not held against the node that sent them"
    );
    assert_eq!(honest_failures, 0.0, "the honest peer was held responsible");
    assert!(from_peers >= 1.0, "the honest peer served no range");
}

/// `curl` of `url` with `headers`: (status, response headers, body).
fn curl(url: &str, headers: &[&str], out: &Path) -> (u16, String, Vec<u8>) {
    let mut args = vec!["-sS", "-D", "-", "-o", out.to_str().unwrap()];
    for h in headers {
        args.extend_from_slice(&["-H", h]);
    }
    args.push(url);
    let (ok, head, err) = sh("curl", &args);
    assert!(ok, "curl {url}: {err}");
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        head.to_lowercase(),
        std::fs::read(out).unwrap_or_default(),
    )
}

#[test]
fn small_reads_and_chunk_answers_in_a_fleet_of_stored_forms() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let (image, _, stored) = compressible_template(dir.path(), &store, "t", 24);
    let expected = std::fs::read(&image).unwrap();
    let a = DaemonProc::start_member(&store.url(), &dir.path().join("a"), &[]);
    let b = DaemonProc::start_member(&store.url(), &dir.path().join("b"), &[]);
    wait_for("the two to see each other", Duration::from_secs(60), || {
        peers_seen(&a.url()) == 1 && peers_seen(&b.url()) == 1
    });
    // A reads it all: it keeps the stored form of the chunks it fetched from the store.
    let out = dir.path().join("a.copy");
    let (ok, _, err) = sh("nbdcopy", &[&a.nbd_uri("t"), out.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert!(std::fs::read(&out).unwrap() == expected);
    // Small reads on B, one in each chunk of the file's data, are right; those of the
    // chunks A owns (and so holds as the store sent them) take their blocks from A. (B
    // holds the chunks it owns already: A asked B for them.)
    for mib in 4..22 {
        let offset = (mib << 20) + (mib % 7) * 65536;
        let got = support::pread_4k(&b.nbd_uri("t"), offset).unwrap();
        assert!(got == expected[offset..offset + 4096], "4 KiB at {offset}");
    }
    let from_a = b.metric("lazyblk_fetched_blocks_total{source=\"peers\",class=\"peer\"}");
    let from_store = metric_sum(&b.url(), "lazyblk_fetched_blocks_total") - from_a;
    eprintln!("small reads on B: {from_a} ranges from its peer, {from_store} from the store");
    assert!(
        from_a >= 1.0,
        "no small read took its blocks from the owner"
    );
    assert!(
        b.metric("lazyblk_verify_failures_total{source=\"peers\",class=\"peer\"}") == 0.0,
        "the owner's ranges matched the block index"
    );
    let (ok, _, err) = sh("nbdcopy", &[&b.nbd_uri("t"), out.to_str().unwrap()]);
    assert!(ok, "nbdcopy: {err}");
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "B read wrong bytes"
    );
    let received = metric_sum(&b.url(), "lazyblk_peer_fetched_bytes");
    assert!(
        received > 0.0 && received <= stored * 1.1,
        "B received {received} for {stored} stored"
    );

    // The chunk endpoints: the stored form to an asker that names it, decoded to one
    // that does not (curl, a daemon from before stored forms).
    let manifest = manifest_json(&store.url(), "t");
    let (index, digest) = manifest["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .skip(10)
        .find_map(|(i, c)| c.as_str().map(|d| (i, d.to_string())))
        .unwrap();
    let chunk = &expected[index << 20..(index + 1) << 20];
    let body = dir.path().join("body");
    for url in [
        format!("{}/v1/chunks/{digest}", a.url()),
        format!(
            "{}/v1/peer/chunks/{digest}?len=1048576&template=t&index={index}",
            a.url()
        ),
    ] {
        let (status, head, bytes) = curl(
            &url,
            &["x-lazyblk-accept-stored-form: zstd-blocks, zstd"],
            &body,
        );
        assert_eq!(status, 200, "{url}: {head}");
        assert!(
            head.contains("x-lazyblk-chunk-encoding: zstd-blocks"),
            "{head}"
        );
        assert!(bytes.starts_with(&BLOCKS_MAGIC) && bytes.len() < chunk.len() / 2);
        let decoded = std::process::Command::new("zstd")
            .args(["-dc", body.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            decoded.stdout == chunk,
            "{url}: the stored form is not the chunk"
        );
        let (status, head, bytes) = curl(&url, &[], &body);
        assert_eq!(status, 200);
        assert!(head.contains("x-lazyblk-chunk-encoding: raw"), "{head}");
        assert!(bytes == chunk, "{url}: the decoded chunk");
    }
}
