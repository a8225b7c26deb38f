//! Helpers shared by the integration tests: the real binary, a real store process on
//! a free loopback port, plain HTTP probes, and ext4 images made with mkfs.ext4.
//!
//! Everything here is synchronous (std only), so both plain and `#[tokio::test]` tests
//! can use it. [`node`] starts daemons the same way.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a started server gets to answer /healthz (a debug build starts in well
/// under a second; a loaded CI machine can be slower).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The `lazyblk` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lazyblk"))
}

/// A `Command` for the binary under test, with quiet logs unless `LAZYBLK_LOG` is set.
pub fn lazyblk() -> Command {
    let mut cmd = Command::new(bin());
    if std::env::var_os("LAZYBLK_LOG").is_none() {
        cmd.env("LAZYBLK_LOG", "warn,fuser=error");
    }
    cmd
}

/// Runs the binary with `args` and returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = lazyblk()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running lazyblk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A free TCP port on 127.0.0.1 (bound and released; the kernel does not hand it out
/// again at once), never one this test process handed out before: two ports asked for
/// back to back (a daemon's HTTP and NBD) could otherwise come back equal.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
        let port = listener.local_addr().expect("local address").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A plain HTTP/1.0 GET (no client library, no keep-alive): (status, body).
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("not an http URL: {url}")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `url` answers 200, panicking after [`START_TIMEOUT`].
pub fn wait_http(url: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok((200, _)) = http_get(url) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer 200 within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of one sample in a Prometheus text page (`name` with its labels exactly
/// as printed, e.g. `lazyblk_store_chunks_served_total`); 0 when absent.
pub fn metric(base_url: &str, name: &str) -> f64 {
    let (status, page) = http_get(&format!("{base_url}/metrics")).expect("scraping /metrics");
    assert_eq!(status, 200, "GET {base_url}/metrics");
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The sum of every sample of the metric family `family` (all its label sets).
pub fn metric_sum(base_url: &str, family: &str) -> f64 {
    let (status, page) = http_get(&format!("{base_url}/metrics")).expect("scraping /metrics");
    assert_eq!(status, 200, "GET {base_url}/metrics");
    page.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// 4 KiB at `offset` of the export at `uri`, read with nbdsh: the bytes, or the error.
pub fn pread_4k(uri: &str, offset: usize) -> Result<Vec<u8>, String> {
    let script = format!("import sys; sys.stdout.write(h.pread(4096, {offset}).hex())");
    let (ok, out, err) = node::nbdsh(uri, &script);
    if !ok {
        return Err(err);
    }
    Ok((0..out.trim().len() / 2)
        .map(|i| u8::from_str_radix(&out.trim()[2 * i..2 * i + 2], 16).unwrap())
        .collect())
}

/// A `lazyblk store` process with its own temporary root; killed on drop.
pub struct StoreProc {
    child: Child,
    port: u16,
    root: tempfile::TempDir,
    extra: Vec<String>,
}

fn spawn_store(root: &Path, port: u16, extra: &[String]) -> Child {
    lazyblk()
        .arg("store")
        .arg("--root")
        .arg(root)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .env_remove("LAZYBLK_WRITE_TOKEN")
        .env_remove("LAZYBLK_READ_TOKEN")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting lazyblk store")
}

impl StoreProc {
    /// A store without tokens.
    pub fn start() -> StoreProc {
        StoreProc::start_with(&[])
    }

    /// A store with extra arguments (e.g. `["--write-token", "w"]`).
    pub fn start_with(extra: &[&str]) -> StoreProc {
        let root = tempfile::tempdir().expect("store root");
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn_store(root.path(), port, &extra);
        let store = StoreProc {
            child,
            port,
            root,
            extra,
        };
        wait_http(&format!("{}/healthz", store.url()));
        store
    }

    /// Kills the store and starts it again on the same port and directory (its
    /// in-memory state, the membership, is gone; what it keeps on disk is not).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_store(self.root.path(), self.port, &self.extra);
        wait_http(&format!("{}/healthz", self.url()));
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The store's process id (for a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// A store counter, e.g. `metric("lazyblk_store_chunks_served_total")`.
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.url(), name)
    }
}

impl Drop for StoreProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `image` to the store at `store_url` as template `id`, asserting success.
pub fn publish(store_url: &str, image: &Path, id: &str) {
    let image = image.to_str().expect("a UTF-8 image path");
    let (ok, out, err) = run(&["publish", image, "--template", id, "--store", store_url]);
    assert!(ok, "publish {id}: {out}{err}");
}

/// Publishes `image` as `id` with `--json` (and `extra` flags), asserting success;
/// returns the report.
pub fn publish_json(image: &Path, id: &str, store: &str, extra: &[&str]) -> serde_json::Value {
    let image = image.to_str().expect("a UTF-8 image path");
    let mut args = vec![
        "publish",
        image,
        "--template",
        id,
        "--store",
        store,
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "publish {id} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

/// The first bytes of a chunk stored in blocks (format 3): a zstd skippable frame.
pub const BLOCKS_MAGIC: [u8; 4] = [0x5B, 0x2A, 0x4D, 0x18];

/// Flips a byte of the stored chunk at `path` that a read of the chunk's first 4 KiB
/// depends on: in its first block's frame when it is stored in blocks (a read checks
/// only the blocks it reads), else in the middle (a frame or a raw chunk is checked
/// whole).
pub fn corrupt_stored_chunk(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let at = if bytes.starts_with(&BLOCKS_MAGIC) {
        20 + 4 * word(16) + word(20) / 2
    } else {
        bytes.len() / 2
    };
    bytes[at] ^= 0xff;
    std::fs::write(path, &bytes).unwrap();
}

/// Bytes of a full page of the block index (32 KiB).
pub const PAGE_BYTES: usize = 32 << 10;

/// Pages of the block index of the manifest `m` (objects the store holds beside the
/// chunks, fetched like chunks).
pub fn index_pages(m: &serde_json::Value) -> usize {
    m["blocks"]["pages"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p.is_string()).count())
}

/// The manifest of `id` as the store at `store_url` serves it.
pub fn manifest_json(store_url: &str, id: &str) -> serde_json::Value {
    let (status, body) =
        http_get(&format!("{store_url}/v1/templates/{id}/manifest")).expect("GET manifest");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("a JSON manifest")
}

/// Makes an ext4 image with 4 KiB blocks, `size_mib` MiB, holding `files` (paths
/// relative to the file system root; parents are created). Returns the image path,
/// a new file under `dir`.
pub fn make_ext4(dir: &Path, size_mib: u64, files: &[(&str, Vec<u8>)]) -> PathBuf {
    make_ext4_blocks(dir, size_mib, 4096, files)
}

/// [`make_ext4`] with another block size (1024 makes an image publish must refuse).
pub fn make_ext4_blocks(
    dir: &Path,
    size_mib: u64,
    block_size: u32,
    files: &[(&str, Vec<u8>)],
) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let src = dir.join(format!("ext4-src-{n}"));
    std::fs::create_dir_all(&src).expect("creating the source directory");
    for (name, bytes) in files {
        let path = src.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("creating a source subdirectory");
        }
        std::fs::write(&path, bytes).expect("writing a source file");
    }
    let image = dir.join(format!("ext4-{n}.img"));
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", &block_size.to_string(), "-d"])
        .arg(&src)
        .arg(&image)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("running mkfs.ext4 (install e2fsprogs)");
    assert!(
        out.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// Bytes that do not repeat and do not compress to zero chunks: a simple LCG stream
/// seeded by `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}
pub mod buckets;
pub mod lease;
pub mod node;
pub mod oci;
pub mod proxy;

/// Waits until `ok` holds, within `within` (polled every 100 ms); fails the test naming
/// `what` otherwise.
pub fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The indices of template `id`'s data (non-zero) chunks.
pub fn data_chunks(store_url: &str, id: &str) -> Vec<u64> {
    let m = manifest_json(store_url, id);
    m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_string())
        .map(|(i, _)| i as u64)
        .collect()
}

/// PUTs a trace document to the store; returns (HTTP status, body).
pub fn put_trace(store_url: &str, id: &str, doc: &serde_json::Value) -> (u16, String) {
    let (ok, out, err) = node::sh(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/stderr",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &doc.to_string(),
            &format!("{store_url}/v1/templates/{id}/trace"),
        ],
    );
    assert!(ok, "curl: {err}");
    (out.trim().parse().unwrap_or(0), err)
}

/// A 64 MiB ext4 holding one file of text (it compresses: its chunks are stored in
/// blocks), published as `id`; returns the image and the offset of its line 100000.
pub fn text_template(dir: &Path, store_url: &str, id: &str) -> (PathBuf, u64) {
    let text: String = (0..200_000)
        .map(|i| format!("line {i} of the text\n"))
        .collect();
    let image = make_ext4(dir, 64, &[("text", text.into_bytes())]);
    publish(store_url, &image, id);
    let bytes = std::fs::read(&image).unwrap();
    let needle = b"line 100000 of the text";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap() as u64;
    (image, at)
}
