//! Crash trials (issue 9): the daemon is SIGKILLed at randomized moments of mixed
//! overlay traffic and of fills; after each restart the test checks what a user relies
//! on. Overlays: every write acknowledged by a FLUSH or sent with FUA reads back (or a
//! later write of the same block does). Fills: no replica is READY without every chunk,
//! and the template reads back right. `LAZYBLK_CRASH_TRIALS` sets the trials per
//! scenario (default 20); `scripts/crash-trials.sh` prints the table.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::node::{sh, DaemonProc};
use support::{http_get, make_ext4, pattern, publish, run, StoreProc};

const BLOCK: u64 = 4096;
/// Blocks of the sandbox the trials write to (the first 8 MiB of a 16 MiB template).
const BLOCKS: u64 = 2048;

const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const FLAG_FUA: u16 = 1;

fn trials() -> u64 {
    std::env::var("LAZYBLK_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A small deterministic generator, so a failing trial can be replayed by its number.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// One NBD connection speaking simple replies, one request at a time.
struct Client {
    stream: TcpStream,
    cookie: u64,
}

impl Client {
    fn connect(port: u16, export: &str) -> std::io::Result<Client> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        nbd::client::handshake(&mut stream, export.as_bytes())?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Client { stream, cookie: 0 })
    }

    /// Sends one request and waits for its reply; Ok(true) when the server said yes.
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        data: &[u8],
        len: u32,
    ) -> std::io::Result<bool> {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.stream.write_all(&req)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        Ok(error == 0)
    }
}

/// What each block may hold after a crash: the value last made durable, and every
/// value sent after it (acknowledged or not).
#[derive(Default)]
struct Model {
    durable: HashMap<u64, Vec<u8>>,
    since: HashMap<u64, Vec<Vec<u8>>>,
    acknowledged_durable: u64,
}

impl Model {
    fn sent(&mut self, block: u64, value: Vec<u8>) {
        self.since.entry(block).or_default().push(value);
    }

    /// A FUA write (or a flush) made these values durable.
    fn durable(&mut self, block: u64, value: Vec<u8>) {
        self.durable.insert(block, value);
        self.since.remove(&block);
        self.acknowledged_durable += 1;
    }

    fn flushed(&mut self) {
        let pending: Vec<(u64, Vec<Vec<u8>>)> = self.since.drain().collect();
        for (block, mut values) in pending {
            if let Some(last) = values.pop() {
                self.durable.insert(block, last);
                self.acknowledged_durable += 1;
            }
        }
    }

    fn allowed(&self, block: u64, base: &[u8], got: &[u8]) -> bool {
        let durable = self.durable.get(&block).map(Vec::as_slice).unwrap_or(base);
        got == durable
            || self
                .since
                .get(&block)
                .is_some_and(|vs| vs.iter().any(|v| v.as_slice() == got))
    }
}

/// Writes, TRIMs, FUA writes and FLUSHes until the connection fails (the kill).
fn traffic(port: u16, export: &str, seed: u64, model: &Mutex<Model>, stop: &AtomicBool) {
    let Ok(mut client) = Client::connect(port, export) else {
        return;
    };
    let mut rng = Lcg(seed);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let block = rng.next() % BLOCKS;
        let kind = rng.next() % 20;
        let result = if kind == 0 {
            match client.request(CMD_FLUSH, 0, 0, &[], 0) {
                Ok(true) => {
                    model.lock().unwrap().flushed();
                    Ok(true)
                }
                other => other,
            }
        } else if kind == 1 {
            model.lock().unwrap().sent(block, vec![0u8; BLOCK as usize]);
            client.request(CMD_TRIM, 0, block * BLOCK, &[], BLOCK as u32)
        } else {
            let value = pattern(BLOCK as usize, seed ^ (n << 20));
            let fua = kind < 6;
            model.lock().unwrap().sent(block, value.clone());
            let flags = if fua { FLAG_FUA } else { 0 };
            match client.request(CMD_WRITE, flags, block * BLOCK, &value, BLOCK as u32) {
                Ok(true) if fua => {
                    model.lock().unwrap().durable(block, value);
                    Ok(true)
                }
                other => other,
            }
        };
        if !matches!(result, Ok(true)) {
            return;
        }
    }
}

fn read_blocks(node: &DaemonProc, export: &str, dir: &std::path::Path) -> Vec<u8> {
    let out = dir.join(format!("{export}.read"));
    let _ = std::fs::remove_file(&out);
    let (ok, _, err) = sh("nbdcopy", &[&node.nbd_uri(export), out.to_str().unwrap()]);
    assert!(ok, "nbdcopy {export}: {err}");
    std::fs::read(out).unwrap()
}

#[test]
fn overlay_writes_acknowledged_as_durable_survive_sigkill() {
    let trials = trials();
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let base_image = make_ext4(dir.path(), 16, &[("a", pattern(6 << 20, 1))]);
    let base = std::fs::read(&base_image).unwrap();
    publish(&store.url(), &base_image, "base");
    let cache = dir.path().join("cache");
    let mut node = DaemonProc::start(&store.url(), &cache, &[]);
    let mut checked = 0;
    for trial in 0..trials {
        let sb = format!("sb{trial}");
        let (ok, out, err) = run(&[
            "overlay",
            "create",
            "base",
            "--sandbox",
            &sb,
            "--node",
            &node.url(),
        ]);
        assert!(ok, "{out}{err}");
        let model = Arc::new(Mutex::new(Model::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (model, stop, sb) = (model.clone(), stop.clone(), sb.clone());
            let port = node.nbd_port;
            std::thread::spawn(move || traffic(port, &sb, trial + 1, &model, &stop))
        };
        let delay = 100 + (trial * 2654435761) % 700;
        std::thread::sleep(Duration::from_millis(delay));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
        node.restart();
        let got = read_blocks(&node, &sb, dir.path());
        let model = model.lock().unwrap();
        for block in 0..BLOCKS {
            let range = (block * BLOCK) as usize..((block + 1) * BLOCK) as usize;
            assert!(
                model.allowed(block, &base[range.clone()], &got[range]),
                "trial {trial} (kill after {delay} ms): block {block} lost an acknowledged write"
            );
        }
        checked += model.acknowledged_durable;
        assert!(got[(BLOCKS * BLOCK) as usize..] == base[(BLOCKS * BLOCK) as usize..]);
    }
    eprintln!("overlay crash trials: {trials} trials, {trials} kill points, {checked} acknowledged writes checked, 0 losses");
}

fn status(node: &DaemonProc, id: &str) -> Value {
    let (code, body) = http_get(&format!("{}/v1/templates/{id}", node.url())).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn fills_killed_at_random_moments_never_leave_a_ready_replica_without_its_chunks() {
    let trials = trials();
    let dir = tempfile::tempdir().unwrap();
    let store = StoreProc::start();
    let image = make_ext4(dir.path(), 32, &[("a", pattern(24 << 20, 2))]);
    let expected = std::fs::read(&image).unwrap();
    publish(&store.url(), &image, "t");
    let (mut ready, mut partial) = (0, 0);
    for trial in 0..trials {
        let cache = dir.path().join(format!("cache-{trial}"));
        let mut node = DaemonProc::start(&store.url(), &cache, &["--fill-rate", "64M"]);
        let (ok, out, err) = run(&["warm", "t", "--node", &node.url()]);
        assert!(ok, "{out}{err}");
        std::thread::sleep(Duration::from_millis((trial * 2654435761) % 600));
        node.kill9();
        node.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            let s = status(&node, "t");
            if s["phase"] == "READY" || Instant::now() > deadline {
                break s;
            }
            if s["phase"] != "DISTRIBUTING" && s["phase"] != "READY" {
                // Never warmed before the kill: nothing to check but the bytes.
                break s;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if s["phase"] == "READY" {
            ready += 1;
            assert_eq!(
                s["local_chunks"], s["stored_chunks"],
                "trial {trial}: READY without every chunk: {s}"
            );
        } else {
            partial += 1;
        }
        assert!(
            read_blocks(&node, "t", dir.path()) == expected,
            "trial {trial}: wrong bytes"
        );
    }
    eprintln!("fill crash trials: {trials} trials, {trials} kill points, {ready} READY after restart, {partial} not warmed yet, 0 losses");
}
