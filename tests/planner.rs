//! Issue 10: the fetch planner and the request paths. Demand reads do not wait behind
//! prefetch; a demand read has one budget for all its attempts; a FLUSH does not stall
//! the reads behind it on the same connection. Real daemon, real store, a delaying
//! proxy in between, raw NBD requests where the order of replies is what is measured.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::node::{sh, DaemonProc};
use support::proxy::Proxy;
use support::{make_ext4, pattern, publish, run, StoreProc};

/// One NBD connection with simple replies and pipelined requests.
struct Conn(TcpStream);

impl Conn {
    fn open(port: u16, export: &str) -> Conn {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        nbd::client::handshake(&mut s, export.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        // Pipelined small requests must not wait for each other's ACK (Nagle).
        s.set_nodelay(true).unwrap();
        Conn(s)
    }

    fn send(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.0.write_all(&req).unwrap();
    }

    /// The next reply: (cookie, error); the data of a read of `read_len` is skipped.
    fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> (u64, u32) {
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r).unwrap();
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        if error == 0 {
            let mut data = vec![0u8; read_len(cookie)];
            self.0.read_exact(&mut data).unwrap();
        }
        (cookie, error)
    }
}

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_CACHE: u16 = 5;

/// Seconds of one cold 4 KiB read of the last data chunk of `export`.
fn cold_read(node: &DaemonProc, export: &str, offset: u64) -> f64 {
    let started = Instant::now();
    let (ok, _, err) = sh(
        "/usr/bin/python3",
        &[
            "-m",
            "nbd",
            "-u",
            &node.nbd_uri(export),
            "-c",
            &format!("h.pread(4096, {offset})"),
        ],
    );
    assert!(ok, "cold read: {err}");
    started.elapsed().as_secs_f64()
}

#[test]
fn a_demand_read_does_not_wait_behind_a_prefetch_of_the_whole_template() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    // Enough chunks that a whole-template prefetch fills the node's fetch slots
    // several times over (before: one queue of 32 for every kind of fetch).
    let image = make_ext4(dir.path(), 160, &[("f", pattern(112 << 20, 21))]);
    publish(&store.url(), &image, "t");
    let proxy = Proxy::start(&store.url(), 1000);
    let proxy = proxy.url;
    // Far into the file's data: the last chunks a whole-template prefetch would reach.
    let target = 104u64 << 20;

    let alone = DaemonProc::start(&proxy, &dir.path().join("alone"), &[]);
    let baseline = cold_read(&alone, "t", target);
    drop(alone);

    let node = DaemonProc::start(&proxy, &dir.path().join("busy"), &[]);
    let mut conn = Conn::open(node.nbd_port, "t");
    conn.send(CMD_CACHE, 1, 0, 160 << 20, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let behind_prefetch = cold_read(&node, "t", target);
    eprintln!(
        "cold 4 KiB read: {baseline:.2} s alone, {behind_prefetch:.2} s behind a CACHE of 160 MiB"
    );
    assert!(
        behind_prefetch <= 2.0 * baseline + 0.25,
        "a demand read waited behind prefetch: {behind_prefetch:.2} s against {baseline:.2} s alone"
    );
}

#[test]
fn a_demand_read_fails_within_its_budget_when_every_source_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let stalled = make_ext4(dir.path(), 16, &[("f", pattern(8 << 20, 22))]);
    let other = make_ext4(dir.path(), 16, &[("g", pattern(8 << 20, 23))]);
    publish(&store.url(), &stalled, "stalled");
    publish(&store.url(), &other, "other");
    let proxy = Proxy::start(&store.url(), 0);
    let node = DaemonProc::start(
        &proxy.url,
        &dir.path().join("cache"),
        // The default source deadline (8 s) and two passes would take 16 s and more.
        &["--read-deadline", "3"],
    );
    // "other" is cached; then every chunk source stalls.
    let copy = dir.path().join("other.out");
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri("other"), copy.to_str().unwrap()]);
    assert!(ok, "{err}");
    proxy.set(support::proxy::STALL);
    let uri = node.nbd_uri("stalled");
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        let out = sh(
            "/usr/bin/python3",
            &["-m", "nbd", "-u", &uri, "-c", "h.pread(4096, 6 << 20)"],
        );
        (out, started.elapsed())
    });
    // Meanwhile the cached export is served.
    std::thread::sleep(Duration::from_millis(500));
    let copy2 = dir.path().join("other2.out");
    let (ok, _, err) = sh(
        "nbdcopy",
        &[&node.nbd_uri("other"), copy2.to_str().unwrap()],
    );
    assert!(ok, "another export is served while one stalls: {err}");
    assert!(std::fs::read(&copy2).unwrap() == std::fs::read(&other).unwrap());
    let ((ok, _, err), took) = reader.join().unwrap();
    assert!(!ok, "the stalled read must fail");
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(9),
        "the read outlived its 3 s budget: {took:?}"
    );
}

#[test]
fn a_flush_does_not_stall_reads_on_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 96, &[("f", pattern(4 << 20, 24))]);
    publish(&store.url(), &image, "t");
    let node = DaemonProc::start(&store.url(), &dir.path().join("cache"), &[]);
    let (ok, out, err) = run(&[
        "overlay",
        "create",
        "t",
        "--sandbox",
        "sb",
        "--node",
        &node.url(),
    ]);
    assert!(ok, "{out}{err}");
    let mut conn = Conn::open(node.nbd_port, "sb");
    // A cached block to read: the first 4 KiB, read once.
    conn.send(CMD_READ, 1, 0, 4096, &[]);
    conn.reply(|_| 4096);
    // 64 MiB dirty, written (not flushed).
    let block = pattern(1 << 20, 25);
    for i in 0..64u64 {
        conn.send(CMD_WRITE, 100 + i, (16 << 20) + (i << 20), 1 << 20, &block);
    }
    for _ in 0..64 {
        let (_, error) = conn.reply(|_| 0);
        assert_eq!(error, 0);
    }
    let alone = Instant::now();
    conn.send(CMD_READ, 4, 0, 4096, &[]);
    conn.reply(|_| 4096);
    eprintln!("a read alone: {:.4} s", alone.elapsed().as_secs_f64());
    let started = Instant::now();
    conn.send(CMD_FLUSH, 2, 0, 0, &[]);
    conn.send(CMD_READ, 3, 0, 4096, &[]);
    let mut times = std::collections::HashMap::new();
    for _ in 0..2 {
        let (cookie, error) = conn.reply(|c| if c == 3 { 4096 } else { 0 });
        assert_eq!(error, 0);
        times.insert(cookie, started.elapsed().as_secs_f64());
    }
    let (flush, read) = (times[&2], times[&3]);
    eprintln!("flush of 64 MiB: {flush:.3} s; the read behind it: {read:.3} s");
    assert!(
        read <= flush * 0.5 + 0.005,
        "the read waited for the flush: read {read:.3} s, flush {flush:.3} s"
    );
}
