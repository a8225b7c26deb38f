//! Issue 24, "one fetch pipeline": every attempt of a demand read, the byte ranges of a
//! small read included, runs under one budget (`--read-deadline`), and a peer whose
//! bytes fail verification is passed over by itself while the other peers keep serving.
//!
//! - Every source stalls during a small read of a format-3 template: the read fails
//!   with EIO within its budget (not after the kernel NBD client's 30 s timeout, which
//!   the old second pipeline outlived by the length of its own per-source deadline),
//!   and other exports are served meanwhile.
//! - A four-node wave where one node answers every chunk it owns with wrong bytes: the
//!   other peers keep serving, the store sends about one copy of the template, and every
//!   node reads the right bytes. The same when that node dies mid-stream at every chunk
//!   it owns: a cut answer is a transport failure, never hashed or served.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::proxy::{Proxy, STALL};
use support::{http_get, make_ext4, manifest_json, pattern, publish, run, StoreProc};

const CHUNK: usize = 1 << 20;
/// How long a test waits for a condition: generous, the machine is shared.
const WAIT: Duration = Duration::from_secs(90);
/// The kernel NBD client's request timeout: a read that takes longer sees the device
/// declared dead. The stalled read must fail with EIO before it.
const KERNEL_NBD_TIMEOUT: Duration = Duration::from_secs(30);

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An ext4 image of 48 MiB with a few MiB of compressible files (stored in blocks),
/// published to `store` as `id`.
fn publish_image(store_url: &str, dir: &Path, id: &str, seed: u64) -> PathBuf {
    let dir = dir.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let files = vec![
        ("etc/os-release", b"NAME=lazyblk-test\n".to_vec()),
        ("usr/bin/big", pattern(3 * CHUNK + 12345, seed)),
        ("usr/lib/libx.so", pattern(CHUNK / 2, seed + 1)),
    ];
    let image = make_ext4(&dir, 48, &files);
    publish(store_url, &image, id);
    image
}

/// The first bytes of the chunks of `image` that hold data, by index.
fn data_chunks(image: &[u8]) -> Vec<usize> {
    (0..image.len() / CHUNK)
        .filter(|&c| image[c * CHUNK..(c + 1) * CHUNK].iter().any(|&b| b != 0))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_small_read_with_every_source_stalled_fails_within_its_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = std::fs::read(publish_image(&store.url(), tmp.path(), "t3", 1)).unwrap();
    let other = std::fs::read(publish_image(&store.url(), tmp.path(), "other", 7)).unwrap();
    let m = manifest_json(&store.url(), "t3");
    assert_eq!(m["format"], 3, "a template stored in blocks");
    let proxy = Proxy::start(&store.url(), 0);
    // A per-source deadline far past the read's budget: the budget alone must end the
    // read. The old small-read pipeline gave each range attempt the whole source
    // deadline, outside the read's budget, and took over 60 s here.
    let daemon = DaemonProc::start_unix(
        &proxy.url,
        &tmp.path().join("cache"),
        &["--read-deadline", "3", "--source-deadline", "60"],
    );
    // Two chunks holding data whose block index entries are on one page: the first
    // read brings the page, so the second read's attempts are the chunk's ranges.
    let per_page = m["blocks"]["chunks_per_page"].as_u64().unwrap() as usize;
    let chunks = data_chunks(&image);
    let (warm, cold) = chunks
        .iter()
        .find_map(|&a| {
            let b = chunks
                .iter()
                .rev()
                .find(|&&b| b != a && b / per_page == a / per_page)?;
            Some((a * CHUNK, b * CHUNK + 8192))
        })
        .unwrap_or_else(|| panic!("two data chunks on one page of {per_page}: {chunks:?}"));

    // Sources answer: a small read fetches the block index page, the chunk's table and
    // one block; the other export is read whole and kept.
    let got = support::pread_4k(&daemon.nbd_uri("t3"), warm).expect("a small read");
    assert_eq!(got, image[warm..warm + 4096]);
    let copy = tmp.path().join("other.copy");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("other"), copy.to_str().unwrap()],
    );
    assert!(ok, "nbdcopy: {err}");
    assert!(std::fs::read(&copy).unwrap() == other);

    // Every source stalls for good: a small read of a chunk not read yet.
    proxy.set(STALL);
    let (done, finished) = mpsc::channel();
    let uri = daemon.nbd_uri("t3");
    std::thread::spawn(move || {
        let _ = done.send(support::pread_4k(&uri, cold));
    });

    // Meanwhile the other export, and what the node holds of this one, are served.
    let copy = tmp.path().join("other.again");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&daemon.nbd_uri("other"), copy.to_str().unwrap()],
    );
    assert!(ok, "another export while a read stalls: {err}");
    assert!(std::fs::read(&copy).unwrap() == other);
    let got = support::pread_4k(&daemon.nbd_uri("t3"), warm).expect("a held block");
    assert_eq!(got, image[warm..warm + 4096]);

    let stalled = finished
        .recv_timeout(KERNEL_NBD_TIMEOUT)
        .unwrap_or_else(|_| {
            panic!(
                "a small read with every source stalled was not answered within the kernel NBD \
             client's {KERNEL_NBD_TIMEOUT:?} (its budget is 3 s)"
            )
        });
    let err = stalled.expect_err("no source delivered: the read must fail");
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    assert_eq!(
        daemon.metric("lazyblk_read_budget_spent_total"),
        1.0,
        "the daemon counts the read that ran out of its budget"
    );
    // The store answers again: the same read gets the right bytes.
    proxy.set(0);
    let got =
        support::pread_4k(&daemon.nbd_uri("t3"), cold).expect("the read once the store answers");
    assert_eq!(hex(&got), hex(&image[cold..cold + 4096]));
}

/// Two guests booting one template on a node read the same blocks at the same time:
/// their small reads share one fetch of the chunk's table and one of its blocks (the
/// in-flight table holds byte ranges as it holds whole chunks), whenever the second
/// arrives.
#[test]
fn concurrent_small_reads_of_one_block_share_one_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = std::fs::read(publish_image(&store.url(), tmp.path(), "t3", 3)).unwrap();
    // Each chunk GET (whole or a range) takes a second: the reads overlap.
    let proxy = Proxy::start(&store.url(), 1000);
    let daemon = DaemonProc::start_unix(&proxy.url, &tmp.path().join("cache"), &[]);
    let chunks = data_chunks(&image);
    let offset = chunks[chunks.len() - 1] * CHUNK + 3 * 8192;
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let uri = daemon.nbd_uri("t3");
            std::thread::spawn(move || support::pread_4k(&uri, offset))
        })
        .collect();
    for r in readers {
        let got = r.join().unwrap().expect("a small read");
        assert_eq!(hex(&got), hex(&image[offset..offset + 4096]));
    }
    eprintln!(
        "two concurrent 4 KiB reads of one block: the store served {} objects, {} ranges; \
         the daemon counted {} misses",
        store.metric("lazyblk_store_chunks_served_total"),
        store.metric("lazyblk_store_ranges_served_total"),
        daemon.metric("lazyblk_cache_misses_total"),
    );
    assert_eq!(
        store.metric("lazyblk_store_chunks_served_total"),
        1.0,
        "one page of the block index"
    );
    assert_eq!(
        store.metric("lazyblk_store_ranges_served_total"),
        2.0,
        "one fetch of the chunk's table and one of the block, for both reads"
    );
}

fn live_nodes(store: &StoreProc) -> usize {
    let (ok, out, err) = run(&["nodes", "--store", &store.url(), "--json"]);
    assert!(ok, "lazyblk nodes: {err}");
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .map_or(0, Vec::len)
}

/// How many peers a daemon sees (`GET /v1/node`).
fn peers_seen(url: &str) -> usize {
    let Ok((200, body)) = http_get(&format!("{url}/v1/node")) else {
        return 0;
    };
    let info: Value = serde_json::from_str(&body).unwrap_or_default();
    info["peers"].as_array().map_or(0, Vec::len)
}

/// What a [`HostileFront`] does to the chunks peers ask its node for.
#[derive(Clone, Copy)]
enum Hostility {
    /// Answers with bytes that are not the chunk, of the length asked.
    Lie,
    /// Sends the headers and half the body, then closes the connection: an owner that
    /// dies mid-stream.
    Die,
}

/// A front for one real node's API: forwards every request to the node, except the
/// chunks peers ask it for (`GET /v1/peer/chunks/..`), which it answers itself as its
/// [`Hostility`] says. The node advertises the front, so the fleet sees a member that
/// fails every chunk it owns that way (and never fetches them from the store).
struct HostileFront {
    url: String,
    node: Arc<Mutex<String>>,
    lies: Arc<AtomicUsize>,
}

impl HostileFront {
    fn start(how: Hostility) -> HostileFront {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let node: Arc<Mutex<String>> = Arc::default();
        let lies = Arc::new(AtomicUsize::new(0));
        let (to, told) = (node.clone(), lies.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (to, told) = (to.lock().unwrap().clone(), told.clone());
                std::thread::spawn(move || {
                    let _ = answer(client, &to, how, &told);
                });
            }
        });
        HostileFront { url, node, lies }
    }
}

fn answer(
    mut client: TcpStream,
    node: &str,
    how: Hostility,
    lies: &AtomicUsize,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    if text.starts_with("GET /v1/peer/chunks/") {
        let len: usize = text
            .split("len=")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(4096);
        lies.fetch_add(1, Ordering::SeqCst);
        let mut a =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
                .into_bytes();
        let sent = match how {
            Hostility::Lie => len,
            Hostility::Die => len / 2,
        };
        a.extend(std::iter::repeat_n(0x5au8, sent));
        client.write_all(&a)?;
        // Gone: no more bytes, the connection reset.
        return client.shutdown(std::net::Shutdown::Both);
    }
    let length: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    // One request per connection: ask the node to close after answering.
    let head = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    let mut upstream = TcpStream::connect(node.trim_start_matches("http://"))?;
    upstream.write_all(head.as_bytes())?;
    upstream.write_all(&body)?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    client.write_all(&answer)
}

/// A fleet of three honest members and one behind a [`HostileFront`]; the three read
/// the template "wave" at once. Returns the store's bytes sent over the template's
/// stored bytes, the bytes the honest peers served each other, and what the honest
/// nodes counted against the peers (verify failures, fetch failures).
struct Wave {
    ratio: f64,
    stored_bytes: u64,
    from_peers: f64,
    corrupt: f64,
    failed: f64,
    asked: usize,
}

fn wave_beside(how: Hostility, seed: u64) -> Wave {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 64, &[("f", pattern(48 << 20, seed))]);
    let expected = std::fs::read(&image).unwrap();
    publish(&store.url(), &image, "wave");
    let stored_bytes = {
        let (_, body) = http_get(&format!("{}/v1/templates/wave", store.url())).unwrap();
        let summary: Value = serde_json::from_str(&body).unwrap();
        summary["stored_bytes"].as_u64().unwrap()
    };
    let honest: Vec<DaemonProc> = (0..3)
        .map(|i| DaemonProc::start_member(&store.url(), &dir.path().join(format!("n{i}")), &[]))
        .collect();
    let front = HostileFront::start(how);
    let hostile = DaemonProc::start(
        &store.url(),
        &dir.path().join("hostile"),
        &["--advertise", &front.url],
    );
    *front.node.lock().unwrap() = hostile.url();
    wait_for("four live nodes", WAIT, || live_nodes(&store) == 4);
    wait_for("every honest node to see the three others", WAIT, || {
        honest.iter().all(|n| peers_seen(&n.url()) == 3)
    });

    // The wave: the three honest nodes read the whole template at once.
    let served_before = store.metric("lazyblk_store_bytes_served_total");
    let copies: Vec<_> = honest
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
        assert!(
            std::fs::read(out).unwrap() == expected,
            "node {i} read wrong bytes"
        );
    }
    let served = store.metric("lazyblk_store_bytes_served_total") - served_before;
    let sum = |name: &str| -> f64 { honest.iter().map(|n| n.metric(name)).sum() };
    let wave = Wave {
        ratio: served / stored_bytes as f64,
        stored_bytes,
        from_peers: sum("lazyblk_peer_bytes_served_total"),
        corrupt: sum("lazyblk_verify_failures_total{source=\"peers\",class=\"peer\"}"),
        failed: sum("lazyblk_fetch_failures_total{source=\"peers\",class=\"peer\"}"),
        asked: front.lies.load(Ordering::SeqCst),
    };
    eprintln!(
        "wave of 3 beside a hostile node: the store sent {:.1} MiB for {:.1} MiB stored \
         ({:.2}x); honest peers served {:.1} MiB; the hostile node was asked {} times; \
         the honest nodes counted {} corrupt chunks and {} failed fetches from peers",
        served / 1048576.0,
        stored_bytes as f64 / 1048576.0,
        wave.ratio,
        wave.from_peers / 1048576.0,
        wave.asked,
        wave.corrupt,
        wave.failed,
    );
    // The hostile node's own reads are right too (its peers are honest).
    let out = dir.path().join("copy-hostile");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&hostile.nbd_uri("wave"), out.to_str().unwrap()],
    );
    assert!(ok, "the hostile node: nbdcopy: {err}");
    assert!(
        std::fs::read(out).unwrap() == expected,
        "the hostile node read wrong bytes"
    );
    wave
}

#[test]
fn one_node_of_four_lying_about_every_chunk_it_owns_costs_only_itself() {
    let wave = wave_beside(Hostility::Lie, 41);
    assert!(
        wave.asked >= 1 && wave.corrupt >= 1.0,
        "the liar was asked and caught"
    );
    assert!(
        wave.ratio <= 1.2,
        "the store sent {:.2}x the template's stored bytes",
        wave.ratio
    );
    assert!(
        wave.from_peers >= wave.stored_bytes as f64,
        "the honest peers kept serving: {} bytes for {} stored",
        wave.from_peers,
        wave.stored_bytes
    );
}

#[test]
fn an_owner_that_dies_mid_stream_is_passed_over_and_nothing_partial_is_served() {
    let wave = wave_beside(Hostility::Die, 43);
    assert!(
        wave.asked >= 1 && wave.failed >= 1.0,
        "the owner was asked and its cut answers counted as failures"
    );
    assert_eq!(
        wave.corrupt, 0.0,
        "a cut answer is a transport failure, never bytes that are hashed"
    );
    assert!(
        wave.ratio <= 1.2,
        "the store sent {:.2}x the template's stored bytes",
        wave.ratio
    );
    assert!(
        wave.from_peers >= wave.stored_bytes as f64,
        "the other peers kept serving: {} bytes for {} stored",
        wave.from_peers,
        wave.stored_bytes
    );
}
